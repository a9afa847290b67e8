"""Errors a user can act on.

The CLI turns every ``RerankError`` into a one-line message and a non-zero exit code; anything else is a bug
and keeps its traceback.
"""


class RerankError(Exception):
    """Base class: the message says what is wrong and what to do."""


class ConfigError(RerankError):
    """The configuration is invalid (unknown key, bad value, unreadable file)."""


class InputError(RerankError):
    """The input as a whole is unusable: no files, missing columns, wrong types, unreadable storage."""


class OutputError(RerankError):
    """The output location cannot be used as asked (it exists and output.mode is 'error', or it is not writable)."""
