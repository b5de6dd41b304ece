"""``zoo.attach(model)``: serve a whole zoo from memory, one basis per module, cores swapped by name.

The adapted modules of ``model`` are replaced in place by wrappers (``layers``) around the
original modules, and the modules an adapter saves whole (heads) by ``HeadSwitch``; ``use``
only changes which slot each row reads, so a swap moves no tensor; ``detach`` puts every
original module back, so the model is exactly what it was.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from ..errors import ZooError
from ..io.formats import zoo_module_layouts
from .bank import CoreBank
from .heads import HeadSwitch
from .layers import WRAPPERS, flat_shape
from .matching import ModelIndex, split_extra
from .routing import Routing

if TYPE_CHECKING:
    from ..store.reader import ZooReader


class Runtime:
    """A zoo attached to a model. ``use`` picks adapters; ``memory`` and ``detach`` as documented."""

    def __init__(self, zoo: "ZooReader", model: nn.Module, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.model = model
        self._device, self._dtype = device, dtype
        self.names = list(zoo.names)
        self._slot = {name: t for t, name in enumerate(self.names)}
        self.routing = Routing(len(self.names))
        self._patched: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, original)
        bases, cores, extras = zoo.consistent(lambda: (zoo.bases(), [zoo.cores(n) for n in self.names],
                                                       [zoo.extras(n) for n in self.names]))
        index = ModelIndex(model)
        plan = self._plan(zoo, index, bases, cores, extras)
        try:
            for target, make in plan:
                self._patch(target, make)
        except BaseException:
            self.detach()
            raise
        self.banks = [m.bank for _, _, m in self._wrappers() if hasattr(m, "bank")]
        self.heads = [m for _, _, m in self._wrappers() if isinstance(m, HeadSwitch)]
        self._hook = model.register_forward_pre_hook(self._check_rows, with_kwargs=True)

    # -- planning: every check before the model is touched --------------------------------

    def _plan(self, zoo, index: ModelIndex, bases, cores, extras) -> list:
        layouts = zoo_module_layouts(zoo.manifest)
        plan, claimed = [], {}
        for module, (U, V) in bases.items():
            target = index.find(module, layouts[module], "zoo module")
            original = index.modules[target]
            kind = next((k for k in WRAPPERS if type(original) is k), None)
            if kind is None:
                raise ZooError(module, f"zoo module: model module {target!r} is a {type(original).__name__}; "
                                       "the runtime serves Linear, Conv2d and Embedding")
            want = tuple(zoo.modules[module]["shape"])
            if flat_shape(original) != want:
                raise ZooError(module, f"zoo module: shape {list(want)}, but model module {target!r} has {list(flat_shape(original))}")
            kernel = tuple(original.weight.shape[1:]) if isinstance(original, nn.Conv2d) else None
            for entry in zoo.adapters:
                a_shape = entry["modules"].get(module, {}).get("a_shape")
                if kernel and a_shape and len(a_shape) == 4 and tuple(a_shape[1:]) != kernel:
                    raise ZooError(module, f"zoo module: conv kernels {a_shape[1:]} in {entry['name']!r}, "
                                           f"but model module {target!r} has {list(kernel)}")
                if kernel and a_shape and len(a_shape) == 2 and kernel[1:] != (1, 1):
                    raise ZooError(module, f"zoo module: a Linear update, but model module {target!r} is a {kernel[1]}x{kernel[2]} conv")
            if target in claimed:
                raise ZooError(module, f"zoo module: model module {target!r} is also zoo module {claimed[target]!r}")
            claimed[target] = module
            per_adapter = [c.get(module) for c in cores]
            plan.append((target, lambda o, U=U, V=V, p=per_adapter, w=WRAPPERS[kind]: w(o, self._bank(o, U, V, p))))
        heads: dict[str, list[dict[str, torch.Tensor] | None]] = {}
        self.skipped_heads: list[str] = []
        for t, tensors in enumerate(extras):
            for key, tensor in tensors.items():
                module_name, param = split_extra(key)
                try:
                    target = index.find(module_name, "peft", f"saved tensor of {self.names[t]!r}")
                except ZooError:
                    if not index.has_any(module_name):  # a head outside the (sub)model attached to: not served
                        self.skipped_heads.append(key)
                        continue
                    raise
                if target in claimed:
                    raise ZooError(key, f"saved tensor of {self.names[t]!r}: module {target!r} also has LoRA cores; not supported")
                if param not in dict(index.modules[target].named_parameters(recurse=False)) | dict(index.modules[target].named_buffers(recurse=False)):
                    raise ZooError(key, f"saved tensor of {self.names[t]!r}: model module {target!r} has no parameter {param!r}")
                slots = heads.setdefault(target, [None] * len(self.names))
                slots[t] = {**(slots[t] or {}), param: tensor}
        for target, overrides in heads.items():
            plan.append((target, lambda o, ov=overrides: HeadSwitch(o, [self._to_module(o, d) for d in ov], self.routing)))
        if self.skipped_heads:
            warnings.warn(f"the model has no module for {len(self.skipped_heads)} saved tensors of the zoo's adapters "
                          f"(e.g. {self.skipped_heads[0]!r}): served without them", stacklevel=3)
        return plan

    def _placement(self, original: nn.Module) -> tuple[torch.device, torch.dtype]:
        weight = next(original.parameters(), None)
        device = torch.device(self._device) if self._device is not None else (weight.device if weight is not None else torch.device("cpu"))
        dtype = self._dtype or (weight.dtype if weight is not None and weight.is_floating_point() else torch.float32)
        return device, dtype

    def _bank(self, original: nn.Module, U, V, per_adapter) -> CoreBank:
        device, dtype = self._placement(original)
        return CoreBank(U, V, per_adapter, self.routing, device, dtype)

    def _to_module(self, original: nn.Module, tensors: dict[str, torch.Tensor] | None):
        """An adapter's saved tensors on the module's own device and dtype (they replace its
        parameters; ``device``/``dtype`` given to ``attach`` place the bases and cores only)."""
        if tensors is None:
            return None
        weight = next(original.parameters(), None)
        device = weight.device if weight is not None else torch.device("cpu")
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else None
        return {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
                for k, v in tensors.items()}

    # -- patching ---------------------------------------------------------------------------

    def _patch(self, target: str, make) -> None:
        parent_name, _, attr = target.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        original = getattr(parent, attr)
        wrapper = make(original)
        setattr(parent, attr, wrapper)
        self._patched.append((parent, attr, original))

    def _wrappers(self):
        return [(parent, attr, getattr(parent, attr)) for parent, attr, _ in self._patched]

    # -- the public API -----------------------------------------------------------------------

    def use(self, selection: str | None | Sequence[str | None]) -> None:
        """One adapter name (or None, the base model) for every row, or a list: one per row.

        A row is index 0 of each adapted module's input (batch-first, as PEFT's ``adapter_names``).
        """
        self._check_attached()
        if selection is None or isinstance(selection, str):
            self.routing.use_one(self._slot_of(selection))
        else:
            self.routing.use_rows([self._slot_of(name) for name in selection])
        for bank in self.banks:
            bank.forget()

    def _check_rows(self, module, args, kwargs) -> None:
        """Before each forward of the model: a list given to ``use`` must have one name per row."""
        rows = self.routing.rows
        if rows is None:
            return
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        if first is not None and first.shape[0] != rows.numel():
            raise ValueError(f"rt.use was given {rows.numel()} adapters, one per row, but the batch has {first.shape[0]} rows")

    def _slot_of(self, name: str | None) -> int:
        if name is None:
            return self.routing.base
        if name not in self._slot:
            raise ZooError(name, f"no adapter of this name in the attached zoo (it has: {', '.join(self.names)})")
        return self._slot[name]

    def memory(self) -> dict[str, int]:
        """Bytes held: the bases, every adapter's cores, every adapter's saved modules (heads), and
        ``folded_bytes``: the one adapter a whole batch uses, folded into its own rank-p factors
        (p·(n + d) per module, rebuilt after each ``use`` of a single name, none for mixed batches)."""
        basis = sum(b.basis_bytes() for b in self.banks)
        cores = sum(b.core_bytes() for b in self.banks)
        extras = sum(h.extra_bytes() for h in self.heads)
        count = len(self.names)
        return {"basis_bytes": basis, "cores_bytes": cores, "extras_bytes": extras,
                "per_adapter_bytes": (cores + extras) // count if count else 0, "adapters": count,
                "folded_bytes": sum(b.folded_bytes() for b in self.banks)}

    def detach(self) -> None:
        """Put every original module back: the model is the very one given to ``attach``."""
        while self._patched:
            parent, attr, original = self._patched.pop()
            setattr(parent, attr, original)
        for bank in getattr(self, "banks", []):
            bank.forget()
        if getattr(self, "_hook", None) is not None:
            self._hook.remove()
            self._hook = None

    def _check_attached(self) -> None:
        if not self._patched:
            raise ZooError("runtime", "detached: attach the zoo again to use it")
