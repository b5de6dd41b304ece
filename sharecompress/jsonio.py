"""Bounded JSON parsing for everything the tool reads: manifests, adapter configs, file headers.

``json.loads`` alone accepts what a stranger's file should not get past: nesting deep enough
to exhaust the interpreter's recursion (a traceback), ``NaN``/``Infinity``, numbers that
overflow to infinity, and duplicate keys (the last silently wins). Here each is one error.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate

MAX_DEPTH = 64

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")  # every byte but brackets: deleted
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


class JSONProblem(ValueError):
    """Text that is not JSON this tool accepts; the message says why."""


def nesting_depth(data: bytes) -> int:
    """Deepest bracket nesting outside strings, without recursion (safe on any input)."""
    skeleton = _STRING.sub(b"", data).translate(None, _BRACKETS)
    return max(accumulate(_DEPTH_STEP[b] for b in skeleton), default=0)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise JSONProblem(f"key {key!r} appears twice")
        out[key] = value
    return out


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
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise JSONProblem(f"nested {depth} levels deep (at most {max_depth})")

    def constant(name: str) -> float:
        if allow_infinity and name == "Infinity":
            return math.inf
        raise JSONProblem(f"{name} is not a JSON value")

    try:
        text = raw.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=constant, parse_float=_float)
    except UnicodeDecodeError:
        raise JSONProblem("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise JSONProblem(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:  # cannot happen below MAX_DEPTH; kept as a last line of defence
        raise JSONProblem("nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        if isinstance(exc, JSONProblem):
            raise
        raise JSONProblem(str(exc)) from None
