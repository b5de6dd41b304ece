"""Errors the CLI turns into one clear line and a non-zero exit code."""

from __future__ import annotations


class ShareError(Exception):
    """Base class: a problem the user can fix; never a bug in sharecompress."""

    exit_code = 2


class PathError(ShareError):
    """A problem with one file or directory: ``path: problem``, both kept for callers to reword."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class InputError(PathError):
    """A source file or directory that cannot be used, named in the message."""


class ZooError(PathError):
    """A zoo directory that is missing, corrupt, locked or from a newer format."""


class StorageError(PathError):
    """The operating system refused a read or write (no space, permission, name too long, …)."""


class ZooChanged(ZooError):
    """A file named by the manifest we hold is gone or different because a writer published a
    new generation meanwhile: the reader starts again from the new manifest."""
