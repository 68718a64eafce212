"""Errors that mean "the user's input is wrong": the CLI prints them as one ``error:`` line."""


class UserError(ValueError):
    """Bad input; the message names what is wrong, the field or path, and what is allowed."""


class ConfigError(UserError):
    """An invalid configuration value, file or override."""


class DataError(UserError):
    """A missing, corrupt or unsuitable dataset, manifest or shard."""


class Interrupted(Exception):
    """The user stopped a run (Ctrl-C); the message says where rerunning resumes."""
