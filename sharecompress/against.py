"""Exact errors of stored adapters against their originals (``report --against``)."""

from __future__ import annotations

from typing import Iterable


from . import linalg
from .errors import InputError
from .readers import find_adapters
from .zoo import Zoo


def measure_against(zoo: Zoo, sources: Iterable[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """{adapter: {module: (err², ‖ΔW‖²)}} for each source adapter, matched to the zoo by name."""
    originals = find_adapters(list(sources))
    bases = zoo.bases()
    measured: dict[str, dict[str, tuple[float, float]]] = {}
    for original in originals:
        if original.name not in zoo.names:
            raise InputError(original.source, f"no adapter named {original.name!r} in the zoo {zoo.path}")
        entry = zoo.adapter(original.name)
        if set(original.modules) != set(entry["modules"]):
            raise InputError(original.source, f"its modules differ from those stored for {original.name!r}")
        cores = zoo.cores(original.name)
        measured[original.name] = {}
        for module, spec in original.modules.items():
            b, a = original.factors(module)
            U, V = bases[module]
            E, F = cores[module]
            measured[original.name][module] = linalg.squared_error(b, a, spec.scale, U, E, F, V)
    return measured
