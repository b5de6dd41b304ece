"""Anchors: each adapter's exact point, kept so that its figure after later adds stays tight.

An adapter's error is measured exactly where the zoo last saw its original: at the merge, or
at the add that brought it in. Later adds move it by exactly known drifts; summing them gives a
loose chain. ``core.bounds`` gives a far tighter bound from that exact point's bases and the
adapter's stored update there, so those two files are kept (an earlier generation's basis file,
and the adapter's cores file of then) and named in the manifest under ``anchors`` and each
entry's ``anchor``, with their checksums. Each generation kept costs its basis file and its
adapters' cores files, so few stay (``prune``); when one goes, the adapters anchored there fall
back to the chain from the bound they had then (``bound2``), which stays rigorous.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from ..core.bounds import Frame, anchored_bound2
from ..errors import ZooError
from ..io.confined import Dir
from ..store.manifest import stored_bytes
from ..store.reader import ZooReader
from .entries import module_bound2

KEEP = 4  # earlier basis generations kept as anchors (the current one is there anyway)
_TAG = re.compile(r"\.g([0-9]+)\.safetensors$")
f64 = torch.float64


def _size(root: Dir, rel: str) -> int:
    folder, _, leaf = rel.rpartition("/")
    if folder:
        with root.sub(folder) as sub:
            st = sub.lstat(leaf)
    else:
        st = root.lstat(leaf)
    if st is None:
        raise ZooError(rel, "was just written but is not there")
    return st.st_size


def anchor_here(manifest: dict, entry: dict, root: Dir) -> None:
    """Anchor ``entry`` at the generation being written: its error there was just measured exactly."""
    basis = manifest["basis_file"]
    anchors = manifest.setdefault("anchors", {})
    if basis not in anchors:
        anchors[basis] = {"sha256": manifest["basis_sha256"], "bytes": _size(root, basis)}
    entry["anchor"] = {"basis_file": basis, "file": entry["file"], "sha256": entry["file_sha256"],
                       "bytes": _size(root, entry["file"])}


def generation_of(rel: str) -> int:
    found = _TAG.search(rel)
    return int(found[1]) if found else 1


def prune(manifest: dict, keep: int | None = None, root: Dir | None = None) -> list[str]:
    """Drop anchors nobody uses, then earlier generations beyond what is kept; returns the basis files
    dropped. Their adapters go on from the bound they hold (the chain from there: rigorous, looser).

    ``keep`` N: the N earlier generations that anchor the most adapters (newest first on ties).
    ``keep`` None: at most ``KEEP``, the most adapters per byte first, and never more bytes than the
    zoo's own files take on disk (in ``root``; else its bases, cores and residuals): anchors at most
    double what a zoo stores.
    """
    anchors = manifest.get("anchors") or {}
    holders = Counter(e["anchor"]["basis_file"] for e in manifest["adapters"] if e.get("anchor"))
    dropped = [rel for rel in anchors if not holders[rel]]
    earlier = [rel for rel in anchors if holders[rel] and rel != manifest["basis_file"]]

    def cost(rel: str) -> int:
        own = sum(e["anchor"]["bytes"] for e in manifest["adapters"]
                  if e.get("anchor") and e["anchor"]["basis_file"] == rel and e["anchor"]["file"] != e["file"])
        return anchors[rel]["bytes"] + own

    if keep is None:
        count, room = KEEP, _on_disk(manifest, root) if root is not None else stored_bytes(manifest)
        earlier.sort(key=lambda rel: (-holders[rel] / max(cost(rel), 1), -generation_of(rel)))
    else:
        count, room = keep, None
        earlier.sort(key=lambda rel: (-holders[rel], -generation_of(rel)))
    spent = kept = 0
    for rel in earlier:
        if kept < count and (room is None or spent + cost(rel) <= room):
            kept += 1
            spent += cost(rel)
        else:
            dropped.append(rel)
    for rel in dropped:
        anchors.pop(rel, None)
    for entry in manifest["adapters"]:
        if entry.get("anchor") and entry["anchor"]["basis_file"] not in anchors:
            del entry["anchor"]
            for mod in entry["modules"].values():
                mod.pop("err_parts", None)
    if not anchors:
        manifest.pop("anchors", None)
    return dropped


def _on_disk(manifest: dict, root: Dir) -> int:
    """Bytes of the current generation's basis and cores files."""
    return _size(root, manifest["basis_file"]) + sum(_size(root, e["file"]) for e in manifest["adapters"])


class Anchors:
    """Reads anchors (each basis generation once) and tightens moved adapters' bounds with them."""

    def __init__(self, zoo: ZooReader) -> None:
        self.zoo = zoo
        self._bases: dict[str, object] = {}
        self._frames: dict[tuple[str, str], Frame] = {}
        # the last adapter's anchor, read once for its bound, its take-back and its bound again (one slot:
        # every adapter's would hold a copy of the anchor's bases each)
        self._last: tuple[str, dict[str, tuple]] | None = None

    def _basis(self, rel: str):
        if rel not in self._bases:
            anchor = self.zoo.manifest["anchors"][rel]
            self._bases[rel] = self.zoo.checked_file(rel, anchor["sha256"], anchor["bytes"])
        return self._bases[rel]

    def state(self, entry: dict) -> dict[str, tuple]:
        """{module: (U₀, V₀, E₀, F₀, RU₀, RV₀)} at the adapter's anchor (RU₀, RV₀ None without a residual)."""
        anchor = entry["anchor"]
        if self._last is not None and self._last[0] == anchor["file"]:
            return self._last[1]
        basis = self._basis(anchor["basis_file"])
        cores = self.zoo.checked_file(anchor["file"], anchor["sha256"], anchor["bytes"])
        where = self.zoo.path / anchor["file"]
        read = lambda f, key: f.read(key) if key in f.tensors else None  # noqa: E731
        out = {}
        for m, mod in entry["modules"].items():
            if not mod.get("err_parts"):
                continue
            n, d = self.zoo.modules[m]["shape"]
            U, V, E, F = read(basis, f"{m}.U"), read(basis, f"{m}.V"), read(cores, f"{m}.E"), read(cores, f"{m}.F")
            if any(t is None or t.dim() != 2 for t in (U, V, E, F)) or U.shape[0] != n or V.shape[0] != d \
                    or E.shape[0] != U.shape[1] or F.shape[1] != V.shape[1] or E.shape[1] != F.shape[0]:
                raise ZooError(where, f"anchor of {entry['name']!r}: module {m!r} is missing or misshapen")
            RU, RV = read(cores, f"{m}.RU"), read(cores, f"{m}.RV")
            if (RU is None) != (RV is None) or (RU is not None and (RU.dim() != 2 or RV.dim() != 2 or RU.shape[0] != n
                                                                   or RV.shape[0] != d or RU.shape[1] != RV.shape[1])):
                raise ZooError(where, f"anchor of {entry['name']!r}: module {m!r} has a misshapen residual")
            out[m] = (U, V, E, F, RU, RV)
        self._last = (anchor["file"], out)
        return out

    def totals(self, entry: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """{module: (L₀, R₀)}: the adapter's stored update at its anchor, Ŵ₀ = L₀·R₀ (its residual then
        included); None without an anchor, or when a module has none (one an add brought in later)."""
        if not entry.get("anchor"):
            return None
        state = self.state(entry)
        if set(state) != set(entry["modules"]):
            return None
        out = {}
        for m, (U0, V0, E0, F0, RU0, RV0) in state.items():
            out[m] = stored_factors({m: (U0, V0)}, {m: (E0, F0)}, {m: (RU0, RV0)} if RU0 is not None else {})[m]
        return out

    def tighten(self, entry: dict, bases: dict, cores: dict, residuals: dict) -> None:
        """Where the adapter has an anchor, each moved module's ``bound2`` = the anchored bound when lower."""
        if not entry.get("anchor"):
            return
        rel = entry["anchor"]["basis_file"]
        state = self.state(entry)
        for m, (E, F) in cores.items():
            mod = entry["modules"][m]
            if not mod.get("drift") or m not in state:
                continue
            U0, V0, E0, F0, RU0, RV0 = state[m]
            if (rel, m) not in self._frames:
                self._frames[rel, m] = Frame(U0, V0, *bases[m])
            frame = self._frames[rel, m]
            now = residuals.get(m)
            if (RU0 is None and now is None) or (RU0 is not None and now is not None and RU0.shape == now[0].shape
                                                 and torch.equal(RU0, now[0]) and torch.equal(RV0, now[1])):
                bound2 = frame.bound2(mod["err2"], mod["err_parts"], E0, F0, E, F)  # a residual kept as it was cancels
            else:
                L0, R0 = stored_factors({m: (U0, V0)}, {m: (E0, F0)}, {m: (RU0, RV0)} if RU0 is not None else {})[m]
                L, R = stored_factors({m: bases[m]}, {m: (E, F)}, {m: now} if now is not None else {})[m]
                bound2 = anchored_bound2(mod["err2"], mod["err_parts"], frame.QU, frame.QV, L0, R0, L, R)
            if bound2 < module_bound2(mod):
                mod["bound2"] = bound2


def move(mod: dict, drift: float) -> None:
    """A module moved by ``drift`` (exact, absolute): the summed drift grows, and so does a tight bound
    held from before (by the triangle inequality, from that bound on)."""
    if "bound2" in mod:
        mod["bound2"] = (module_bound2(mod) ** 0.5 + drift) ** 2
    mod["drift"] = mod.get("drift", 0.0) + drift


def stored_factors(bases: dict, cores: dict, residuals: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (L, R)}: an adapter's stored update as factors, L·R = U·E·F·Vᵀ + RU·RVᵀ (float64)."""
    out = {}
    for module, (E, F) in cores.items():
        U, V = (t.to(f64) for t in bases[module])
        L, R = [U @ E.to(f64)], [F.to(f64) @ V.T]
        if module in residuals:
            L.append(residuals[module][0].to(f64))
            R.append(residuals[module][1].to(f64).T)
        out[module] = (torch.cat(L, 1), torch.cat(R, 0))
    return out
