"""Exceptions that the CLI turns into one clear `error:` line and exit code 2. Every bad input (option, config file,
data file, array, checkpoint, output folder) raises one of these with a message that says what to do; any other
exception is a bug (a traceback, exit code 1)."""


class VlmDepthError(Exception):
    """Base class for user-facing errors (bad input, bad config, missing files)."""


class ConfigError(VlmDepthError):
    """A config file or command-line option is wrong."""


class RunFolderError(ConfigError):
    """`--out` cannot be used: a file, not creatable, locked by a live process, or holding another run."""


class DeviceError(ConfigError):
    """`--device` names a device that this machine does not have."""


class DataError(VlmDepthError):
    """An input file is missing, unreadable or not what it claims to be (names the file)."""


class ImplausibleDepthError(DataError):
    """Depth values outside any sane metric range: the unit or `--depth_scale` is wrong."""


class InputTooLargeError(DataError):
    """An input image above the pixel budget (`max_input_pixels`)."""


class ModelError(VlmDepthError):
    """A checkpoint folder cannot be loaded or does not fit the request."""


class CheckpointError(ModelError):
    """A resumable training checkpoint is damaged or incomplete (names the previous good one)."""
