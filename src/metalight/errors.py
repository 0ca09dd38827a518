"""User-facing error types: each message says what is wrong, with which value, and how to fix it."""


class MetalightError(Exception):
    """Base of every error meant for the user rather than a developer (printed without traceback)."""


class DataError(MetalightError):
    """A data set, split file, image or cache cannot be used as configured."""


class ConfigError(MetalightError):
    """A configuration value is missing, of the wrong type or out of range."""


class CheckpointError(MetalightError):
    """A checkpoint is missing, truncated or was written by another kind of run."""
