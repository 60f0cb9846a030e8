"""Training: SFT, LoRA, DPO and staged pretraining with length-balanced packing (docs/TRAINING.md)."""
from .config import TrainConfig
from .data import ChatEncoder, DataError, JsonlStream, Sample, SkipStats
from .dpo import dpo_loss, sequence_logps
from .lora import apply_lora, load_adapter, merge_lora, save_adapter
from .packing import PackedLoader, collate, pack_lengths
from .trainer import train

__all__ = ["TrainConfig", "ChatEncoder", "DataError", "JsonlStream", "Sample", "SkipStats", "dpo_loss",
           "sequence_logps", "apply_lora", "load_adapter", "merge_lora", "save_adapter", "PackedLoader", "collate",
           "pack_lengths", "train"]
