"""Exact errors of stored adapters against their originals (``report --against``)."""

from __future__ import annotations

from typing import Iterable


import torch

from ..core import linalg
from ..core.residual import factored_norm2
from ..errors import InputError
from ..io.formats import zoo_module_layouts
from ..io.readers import find_adapters
from ..store.reader import ZooReader


def measure_against(zoo: ZooReader, sources: Iterable[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """{adapter: {module: (err², ‖ΔW‖²)}} for each source adapter that the zoo holds (by name).

    Sources the zoo does not hold are passed over, so a directory of originals can be given.
    """
    sources = list(sources)
    known = zoo_module_layouts(zoo.manifest)  # kohya / diffusers originals: modules under the zoo's names
    originals = [a for a in find_adapters(sources, known=known) if a.name in zoo.names]  # others: not in this zoo
    if not originals:
        raise InputError(" ".join(sources), f"none of these adapters is in the zoo {zoo.path} (matched by name)")
    bases = zoo.bases()
    measured: dict[str, dict[str, tuple[float, float]]] = {}
    for original in originals:
        entry = zoo.adapter(original.name)
        if set(original.modules) != set(entry["modules"]):
            raise InputError(original.source, f"its modules differ from those stored for {original.name!r}")
        cores, residuals = zoo.cores(original.name), zoo.residuals(original.name)
        measured[original.name] = {}
        for module, spec in original.modules.items():
            b, a = original.factors(module)
            U, V = bases[module]
            E, F = cores[module]
            if module in residuals:  # ΔW − U·E·F·Vᵀ − RU·RVᵀ, as factors
                RU, RV = (t.to(torch.float64) for t in residuals[module])
                Ue, Fv = U.to(torch.float64) @ E.to(torch.float64), F.to(torch.float64) @ V.to(torch.float64).T
                L = torch.cat([spec.scale * b.to(torch.float64), -Ue, -RU], 1)
                R = torch.cat([a.to(torch.float64), Fv, RV.T], 0)
                measured[original.name][module] = (factored_norm2(L, R), factored_norm2(spec.scale * b.to(torch.float64), a.to(torch.float64)))
            else:
                measured[original.name][module] = linalg.squared_error(b, a, spec.scale, U, E, F, V)
    return measured
