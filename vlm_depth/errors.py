"""Exceptions that the CLI turns into one clear error line and a non-zero exit."""


class VlmDepthError(Exception):
    """Base class for user-facing errors (bad input, bad config, missing files)."""


class ConfigError(VlmDepthError):
    """A config file or command-line option is wrong."""


class DataError(VlmDepthError):
    """An input file is missing, unreadable or not what it claims to be (names the file)."""


class ModelError(VlmDepthError):
    """A checkpoint folder cannot be loaded or does not fit the request."""
