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


class StorageError(ShareError):
    """The operating system refused a read or write (no space, permission, name too long, …)."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ZooChanged(ZooError):
    """A file named by the manifest we hold is gone or different because a writer published a
    new generation meanwhile: the reader starts again from the new manifest."""
