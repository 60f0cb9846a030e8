"""Multi-GPU inference: tensor parallelism for the decoder (see tp.py) and process-group helpers."""

from .launch import default_backend, init_distributed, spawn
from .tp import (DataParallelVision, RowParallelLinear, ShardedTextConfig, TPLayout, VocabParallelEmbedding,
                 VocabParallelLMHead, load_tp, param_bytes, shard_model)

__all__ = ["spawn", "init_distributed", "default_backend", "shard_model", "load_tp", "param_bytes", "TPLayout",
           "ShardedTextConfig", "RowParallelLinear", "VocabParallelEmbedding", "VocabParallelLMHead",
           "DataParallelVision"]
