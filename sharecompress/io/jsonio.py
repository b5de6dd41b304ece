"""Bounded JSON parsing for everything the tool reads: manifests, adapter configs, file headers.

``json.loads`` alone accepts what a stranger's file should not get past: nesting deep enough
to exhaust the interpreter's recursion (a traceback), ``NaN``/``Infinity``, numbers that
overflow to infinity, and duplicate keys (the last silently wins). Here each is one error.
Depth is checked on the parsed value: the C parser stops runaway nesting itself (RecursionError
after a few hundred levels), and a scan of the raw text would cost more than the parse.
"""

from __future__ import annotations

import json
import math

MAX_DEPTH = 64
# Each container costs ~70 bytes parsed, whatever its text (``[],`` is 3 bytes): a cap on the
# brackets bounds what a hostile file can make the parser allocate. A zoo manifest holds ~3 per
# adapter and module, so 4M is 10x a 1,000-adapter, 128-module zoo.
MAX_CONTAINERS = 4_000_000


class JSONProblem(ValueError):
    """Text that is not JSON this tool accepts; the message says why."""


def nesting_depth(value: object) -> int:
    """Deepest container nesting of a parsed value, level by level (1 for ``[]``, 0 for a number)."""
    depth, level = 0, [value] if isinstance(value, (dict, list)) else []
    while level:
        depth += 1
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, (dict, list))]
    return depth


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)  # built in C; the loop below runs only to name a key that appears twice
    if len(out) != len(pairs):
        seen: set = set()
        for key, _ in pairs:
            if key in seen:
                raise JSONProblem(f"key {key!r} appears twice")
            seen.add(key)
    return out


def _int(text: str) -> int:
    if len(text) < 19:  # at most 18 characters: within ±10¹⁸, inside 64 bits (a header holds 4 per tensor)
        return int(text)
    if len(text.lstrip("-")) > 19 or not -(1 << 63) <= int(text) < (1 << 63):
        raise JSONProblem(f"integer {text[:40]} is beyond 64 bits")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONProblem(f"number {text[:40]} overflows")
    return value


def loads(data: bytes | str, *, max_depth: int = MAX_DEPTH, allow_infinity: bool = False) -> object:
    """Parse ``data``; JSONProblem when it is not UTF-8 JSON within the limits.

    ``allow_infinity`` admits the literal ``Infinity`` (our own manifests write it for an
    undefined relative error); NaN is refused always.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    brackets = raw.count(b"[") + raw.count(b"{")
    if brackets > MAX_CONTAINERS:
        raise JSONProblem(f"holds {brackets} arrays or objects (at most {MAX_CONTAINERS:,})")

    def constant(name: str) -> float:
        if allow_infinity and name == "Infinity":
            return math.inf
        raise JSONProblem(f"{name} is not a JSON value")

    try:
        text = raw.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=constant, parse_float=_float,
                           parse_int=_int)
    except UnicodeDecodeError:
        raise JSONProblem("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise JSONProblem(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:  # the C parser guards its own recursion: hundreds of levels, long before memory
        raise JSONProblem(f"nested more than {max_depth} levels deep") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        if isinstance(exc, JSONProblem):
            raise
        raise JSONProblem(str(exc)) from None
    depth = nesting_depth(value)
    if depth > max_depth:
        raise JSONProblem(f"nested {depth} levels deep (at most {max_depth})")
    return value
