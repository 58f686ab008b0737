"""User-facing errors: the CLI prints the message on one line and exits with `exit_code`, no traceback."""


class LmlabError(Exception):
    """A problem with the user's input or environment (bad config value, missing file, ...)."""

    exit_code = 2


class ConfigError(LmlabError):
    """An invalid configuration key or value, detected before any compute."""


class DataError(LmlabError):
    """A missing, empty or unreadable data source or tokenizer."""
