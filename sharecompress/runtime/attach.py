"""``zoo.attach(model)``: serve a whole zoo from memory, one basis per module, cores swapped by name.

The adapted modules of ``model`` are replaced in place by wrappers (``layers``) around the
original modules, and the modules an adapter saves whole (heads) by ``HeadSwitch``; ``use``
only changes which slot each row reads, so a swap moves no tensor; ``detach`` puts every
original module back, so the model is exactly what it was.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import nn

from ..errors import ShareError, ZooError
from ..io.formats import zoo_module_layouts
from .bank import CoreBank
from .heads import HeadSwitch
from .layers import WRAPPERS, flat_shape
from .matching import ModelIndex, split_extra
from .routing import Routing
from . import training as _training
from .training import Training

if TYPE_CHECKING:
    from ..store.reader import ZooReader


class Runtime:
    """A zoo attached to a model. ``use`` picks adapters; ``memory`` and ``detach`` as documented."""

    def __init__(self, zoo: "ZooReader", model: nn.Module, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.zoo = zoo
        self._device, self._dtype = device, dtype
        self._patched: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, original)
        self._hook = None
        self.training: Training | None = None
        with torch.inference_mode(False):  # bases a later training step can use, even when attached under inference_mode
            self._attach()

    def _attach(self) -> None:
        """Read one generation of the zoo and patch the model (again, after ``commit``)."""
        zoo = self.zoo
        self.names = list(zoo.names)
        self._slot = {name: t for t, name in enumerate(self.names)}
        self.routing = Routing(len(self.names))
        self.modules: dict[str, tuple[str, nn.Module]] = {}  # zoo module → (model module, wrapper)
        bases, cores, residuals, extras, manifest = zoo.consistent(lambda: (
            zoo.bases(), [zoo.cores(n) for n in self.names], [zoo.residuals(n) for n in self.names],
            [zoo.extras(n) for n in self.names], zoo.manifest))
        self.manifest = manifest  # the generation attached (``commit`` trains against these bases)
        index = ModelIndex(self.model)
        plan = self._plan(zoo, index, bases, cores, extras, residuals)
        try:
            for target, make in plan:
                self._patch(target, make)
        except BaseException:
            self.detach()
            raise
        self.banks = [m.bank for _, _, m in self._wrappers() if hasattr(m, "bank")]
        self.heads = [m for _, _, m in self._wrappers() if isinstance(m, HeadSwitch)]
        for module, target in self._targets.items():
            self.modules[module] = (target, self.model.get_submodule(target))
        self._hook = self.model.register_forward_pre_hook(self._check_rows, with_kwargs=True)

    # -- planning: every check before the model is touched --------------------------------

    def _plan(self, zoo, index: ModelIndex, bases, cores, extras, residuals) -> list:
        layouts = zoo_module_layouts(zoo.manifest)
        plan, claimed = [], {}
        self._targets: dict[str, str] = {}
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
            self._targets[module] = target
            per_adapter = [c.get(module) for c in cores]
            own = [r.get(module) for r in residuals]
            plan.append((target, lambda o, U=U, V=V, p=per_adapter, r=own, w=WRAPPERS[kind]: w(o, self._bank(o, U, V, p, r))))
        heads: dict[str, list[dict[str, torch.Tensor] | None]] = {}
        self._head_names: dict[str, str] = {}  # model module → the name the zoo's adapters save it under
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
                self._head_names[target] = module_name
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

    def _bank(self, original: nn.Module, U, V, per_adapter, residuals=None) -> CoreBank:
        device, dtype = self._placement(original)
        return CoreBank(U, V, per_adapter, self.routing, device, dtype, residuals)

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

    def _unpatch(self, target: str) -> None:
        for i, (parent, attr, original) in enumerate(self._patched):
            if getattr(parent, attr) is self.model.get_submodule(target):
                setattr(parent, attr, original)
                del self._patched[i]
                return

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
        if self.training is not None and name == self.training.name:
            return self.routing.live
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

    # -- training a new task in the zoo's subspace (DESIGN.md §8a) ------------------------------

    def new_adapter(self, name: str, extra: int = 0, heads: Iterable[str] | None = (), verbose: bool = True) -> list[nn.Parameter]:
        """Trainable parameters for a new task ``name``; everything else in the model is frozen.

        Each zoo module gets a core C (k_u × k_v), zero, so the model starts at the base model;
        ``extra`` = φ adds φ trainable directions per side and module, kept orthogonal to the
        bases (what the subspace lacks); ``heads`` are module names (as ``model.named_modules()``
        gives them) trained in full, from the model's own values, like PEFT's modules_to_save.
        ``use(name)`` routes rows to it (``new_adapter`` selects it for every row); ``commit``
        folds it into the zoo, ``discard`` drops it. Prints the trainable parameters next to what
        a LoRA of the zoo's rank would train (``verbose=False``: see ``training.counts``).
        """
        self._check_attached()
        if self.training is not None:
            raise ZooError(name, f"{self.training.name!r} is in training: commit or discard it first")
        self.training = _training.start(self, name, extra, heads)
        self.use(name)
        if verbose:
            print(_training.summary(self.training, len(self.modules)))
        return list(self.training.parameters)

    def commit(self, name: str, grow: str = "auto") -> dict:
        """Fold the task in training into the zoo on disk (crash-safe, as ``add``), then serve it from there.

        Exact when the update lies in the bases (``extra=0``, and the zoo's bases unchanged
        since attach): bases and every other adapter stay as they are. Otherwise through the
        ``add`` path (bases refit, as ``grow`` allows). Returns {"path", "drift", "error"}: the
        path taken, each old adapter's relative drift, and the new adapter's relative error as
        stored. The trainable parameters are removed from the model, and the committed adapter
        is served from the zoo like any other (selected for every row).
        """
        from ..ops.commit import commit_trained, trained_adapter

        self._check_attached()
        training = self.training
        if training is None or training.name != name:
            raise ZooError(name, "no task of this name is in training (start one with new_adapter)")
        if grow not in ("auto", "off"):
            raise ValueError("grow must be auto or off")
        modules, heads, config = _training.collect(self, training)
        adapter = trained_adapter(name, modules, heads, config)
        result = commit_trained(self.zoo.path, adapter, modules, self.manifest.get("basis_sha256"), grow=grow)
        _training.stop(self, training)
        self.training = None
        self.detach()
        try:
            self.zoo.reload()
            result["error"] = self.zoo.adapter(name)["relative_error"]
            with torch.inference_mode(False):
                self._attach()
        except ShareError as exc:
            raise ZooError(self.zoo.path, f"{name!r} is committed to the zoo, but the runtime could not attach "
                                          f"it again ({exc}); attach the zoo anew") from exc
        self.use(name)
        return result

    def discard(self, name: str) -> None:
        """Drop the task in training: the model is as it was before ``new_adapter``."""
        if self.training is None or self.training.name != name:
            raise ZooError(name, "no task of this name is in training")
        _training.stop(self, self.training)
        self.training = None

    def detach(self) -> None:
        """Put every original module back: the model is the very one given to ``attach``."""
        if getattr(self, "training", None) is not None:
            _training.stop(self, self.training)
            self.training = None
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
