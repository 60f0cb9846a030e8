"""qwenvl: Qwen2.5-VL in plain PyTorch. Public API (a contract, see DESIGN.md).

Names are imported on first use, so `import qwenvl.tasks` stays light and a machine without the media
libraries (PyAV) can still run the model.
"""
import importlib

_EXPORTS = {
    "ModelConfig": "config", "TextConfig": "config", "VisionConfig": "config", "preset": "config",
    "QwenVLError": "errors", "Qwen25VL": "model", "Processor": "processor", "Tokenizer": "tokenizer",
    "LLM": "engine", "AsyncLLM": "engine", "SamplingParams": "engine", "RequestOutput": "engine",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qwenvl' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
