"""One exception type for mistakes a user can fix.

The CLI catches `UserError` and prints its message as a single line (exit status 2), so
every bad file, bad option or bad cache reaches the user as a sentence naming the thing and
what was expected, never as a traceback from inside PyTorch.
"""


class UserError(Exception):
    """A problem with the user's input: a file, an option, a data set or a checkpoint."""


class DataError(UserError):
    """The data set or its cache is missing, malformed or corrupted."""


class ConfigError(UserError):
    """An option or configuration value is out of range or unknown."""


class CheckpointError(UserError):
    """A checkpoint is unreadable or does not fit the requested model."""
