"""Errors that mean "the user's input is wrong": the CLI prints them as one ``error:`` line."""
from __future__ import annotations

import os
from pathlib import Path


class UserError(ValueError):
    """Bad input; the message names what is wrong, the field or path, and what is allowed."""


class ConfigError(UserError):
    """An invalid configuration value, file or override."""


class DataError(UserError):
    """A missing, corrupt or unsuitable dataset, manifest or shard."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or not what the command needs."""


class Interrupted(Exception):
    """The user stopped a run (Ctrl-C); the message says where rerunning resumes."""


def check_output_dir(path: str | Path, flag: str) -> Path:
    """An output directory that exists or can be created, checked before any work starts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a directory")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable")
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """A file that can be written (a new one, or an existing file, never a folder), checked
    before any work starts, so minutes of work do not end in a traceback."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory, expected a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: exists and is not writable")
    check_output_dir(path.parent, flag)
    return path
