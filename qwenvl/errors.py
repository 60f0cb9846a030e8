"""One exception family for everything the package rejects.

Every error names the file or field at fault and the limit it broke, so a user never has to read a
traceback from deep inside torch or PIL to learn what was wrong with their input.
"""


class QwenVLError(ValueError):
    """Base class of every error raised on purpose by qwenvl (a ValueError, so generic handlers work)."""


class ConfigError(QwenVLError):
    """A config.json (or preset, or dataclass field) is missing, malformed or of an unknown model type."""


class CheckpointError(QwenVLError):
    """A checkpoint directory is incomplete (missing shard, missing tensor) or a tensor has the wrong shape."""


class MediaError(QwenVLError):
    """An image or video could not be loaded, is corrupt, or breaks a size/aspect/duration limit."""


class InputError(QwenVLError):
    """A request or tensor argument is malformed: wrong shapes, mismatched counts, too-long prompts."""
