"""qwenvl: Qwen2.5-VL in plain PyTorch."""
from .config import ModelConfig, TextConfig, VisionConfig, preset
from .errors import QwenVLError

__all__ = ["ModelConfig", "TextConfig", "VisionConfig", "preset", "QwenVLError"]
__version__ = "0.1.0"
