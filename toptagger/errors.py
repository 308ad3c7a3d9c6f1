"""Typed errors shared by every entry point.

Each error carries a message meant for the person who ran the command: it names the file, URI or
argument and says what is wrong with it. CLIs print it as one line (see :mod:`toptagger.cli`),
servers map it to a 4xx answer. Anything that is *not* a ``TaggerError`` is a bug and keeps its
traceback.
"""

from __future__ import annotations


class TaggerError(Exception):
    """Base class of all errors that are the user's input, not our bug."""


class DataError(TaggerError, ValueError):
    """A dataset (file, URI or array) is missing, malformed or holds invalid values."""


class StorageError(TaggerError, OSError):
    """A storage location (local path or ``s3://`` URI) cannot be read or written."""


class ConfigError(TaggerError, ValueError):
    """A command-line argument or pipeline parameter cannot work."""
