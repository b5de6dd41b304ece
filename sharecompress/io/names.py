"""Adapter names: one path component's worth of text, never a path.

A name comes from a directory, a file, a Hub id or a manifest someone else wrote. It is shown
to users and matched by them, and a file stem is *derived* from it (``storage.safe_name``),
so it must not carry separators, dot-only forms, drive prefixes, control characters or
unbounded length. The same check runs on merge, add and every manifest read.
"""

from __future__ import annotations

import re
import unicodedata

MAX_NAME_CHARS = 200
_DRIVE = re.compile(r"^[A-Za-z]:")
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be an adapter name, or None when it can."""
    if not isinstance(name, str):
        return "is not a string"
    if not name:
        return "is empty"
    if len(name) > MAX_NAME_CHARS:
        return f"is {len(name)} characters long (at most {MAX_NAME_CHARS})"
    if name in (".", ".."):
        return "is a relative path component"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if _DRIVE.match(name):
        return "starts like a drive path"
    if name != name.strip():
        return "starts or ends with white space"
    for ch in name:
        if unicodedata.category(ch) in _BAD_CATEGORIES:
            return f"contains the control character U+{ord(ch):04X}"
    return None


def printable(text: str, limit: int = 4096) -> str:
    """``text`` with control characters replaced by '?', cut to ``limit``: safe to record and print."""
    return "".join("?" if unicodedata.category(ch) in _BAD_CATEGORIES else ch for ch in text[:limit])


def visible(text: str) -> str:
    """``text`` with each control character written as an escape (``\\n``, ``\\x1b``): one line, no terminal codes."""
    return "".join(
        ch if unicodedata.category(ch) not in _BAD_CATEGORIES else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )
