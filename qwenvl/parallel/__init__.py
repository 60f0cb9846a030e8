"""Multi-GPU inference: tensor parallelism for the decoder (see tp.py) and process-group helpers."""

from .launch import Workers, default_backend, init_distributed, spawn, start_workers
from .tp import (DataParallelVision, RowParallelLinear, ShardedTextConfig, TPLayout, VocabParallelEmbedding,
                 VocabParallelLMHead, RandomWeights, load_tp, param_bytes, random_shard, shard_model)

__all__ = ["spawn", "start_workers", "Workers", "init_distributed", "default_backend", "shard_model", "load_tp",
           "random_shard", "RandomWeights", "param_bytes", "TPLayout",
           "ShardedTextConfig", "RowParallelLinear", "VocabParallelEmbedding", "VocabParallelLMHead",
           "DataParallelVision"]
