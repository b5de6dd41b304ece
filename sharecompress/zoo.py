"""The public ``Zoo``: an open zoo and the operations on it (add, export, report, remove, attach, verify).

It sits above every room of the package (``io``, ``core``, ``store``, ``ops``, ``runtime``,
``report``) and nothing below imports it: the operations read through ``store.reader.ZooReader``.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Iterable

from .ops import merge as _merge_op
from .errors import ShareError
from .store.manifest import DEFAULT_ZOO
from .store.reader import ZooReader


def merge(sources: Iterable[str], zoo: str | os.PathLike = DEFAULT_ZOO, **options) -> "Zoo":
    return Zoo.open(_merge_op.merge(sources, zoo, **options))


merge.__doc__ = _merge_op.merge.__doc__.replace("; returns its path.", "; returns it, open.")
merge.__signature__ = inspect.signature(_merge_op.merge).replace(return_annotation="Zoo")  # type: ignore[attr-defined]


class Zoo(ZooReader):
    """An open zoo: its manifest, checked access to its tensors, and the operations on it."""

    @classmethod
    def open(cls, path: str | Path = DEFAULT_ZOO) -> "Zoo":
        return cls(path)

    def report(self, against: list[str] | None = None) -> dict:
        """The report dict; with ``against`` (original adapters) old adapters' errors are exact."""
        from .ops.against import measure_against
        from .report.report import build_report

        if not against:
            return build_report(self.manifest, None)
        return self.consistent(lambda: build_report(self.manifest, measure_against(self, against)))

    def add(self, sources: list[str], grow: str | None = None, **kw) -> dict:
        """Fold new adapters in; returns each old adapter's relative drift."""
        from .ops.add import add

        self.manifest, self._bases = None, None  # not held while add holds its own copy (a big zoo's manifest is big)
        try:
            drift = add(self.path, sources, grow=grow, **kw)
        except BaseException:
            self._reload_quietly()
            raise
        self.reload()
        return drift

    def export(self, name: str, out: str | Path, dtype: str = "float32", force: bool = False, profile: str | None = None) -> Path:
        """In the adapter's own layout; ``profile="vllm"``: a PEFT adapter of a rank vLLM serves."""
        from .ops.export import export

        return export(self, name, out, dtype=dtype, force=force, profile=profile)

    def remove(self, *names: str) -> dict[str, float]:
        """Drop adapters; the bases are refit to the rest (data-free). Returns {adapter: relative drift}
        for the remaining adapters the refit moved."""
        from .ops.remove import remove

        self.manifest, self._bases = None, None
        try:
            drift = remove(self.path, names)
        except BaseException:
            self._reload_quietly()
            raise
        self.reload()
        return drift

    def _reload_quietly(self) -> None:
        """After a failed operation: read the zoo again if it can be read; the operation's error is the one to see."""
        try:
            self.reload()
        except ShareError:
            pass

    def attach(self, model, device=None, dtype=None):
        """Serve this zoo from memory inside ``model`` (patched in place); see ``runtime.Runtime``."""
        from .runtime import Runtime

        return Runtime(self, model, device=device, dtype=dtype)

    def verify(self) -> tuple[list[str], list[str]]:
        from .store.verify import verify

        return verify(self.path)
