"""Errors of the data modules, importable without TensorFlow.

`scaleattn.main` catches `DataError` and prints its one-line message (which names the
file or directory and the fix) instead of a traceback.
"""


class DataError(Exception):
    """A dataset that is missing or malformed."""
