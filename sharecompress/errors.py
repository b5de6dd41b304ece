"""Errors the CLI turns into one clear line and a non-zero exit code."""

from __future__ import annotations


class ShareError(Exception):
    """Base class: a problem the user can fix; never a bug in sharecompress."""

    exit_code = 2


class InputError(ShareError):
    """A source file or directory that cannot be used, named in the message."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ZooError(ShareError):
    """A zoo directory that is missing, corrupt, locked or from a newer format."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
