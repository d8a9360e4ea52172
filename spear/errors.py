"""Errors a user can fix. The CLI prints them as one line, without a traceback."""


class SpearError(Exception):
    """A problem with the user's input (config, option, URL, data) rather than a bug."""


class ConfigError(SpearError, ValueError):
    """A config file, key or value is wrong: the one error every config check raises (a
    ``ValueError`` too, as a bad value is)."""


class StorageError(SpearError):
    """A URL cannot be resolved or reached."""
