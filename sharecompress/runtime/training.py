"""A new task trained inside an attached zoo's subspace: what is trainable, and what ``commit`` takes.

``start`` gives every zoo module of the model a ``LiveCore`` (trainable cores, zero, so the model
starts at the base model) and every named head a trainable copy of its parameters, and freezes
everything else; ``collect`` reads the trained update of each module and the heads back out, as
``ops.commit`` wants them; ``stop`` removes the trainable parts and restores every
``requires_grad`` flag it changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import operator
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from ..errors import ZooError
from ..io.formats import PEFT_PREFIX, zoo_module_layouts
from ..io.names import name_problem
from ..io.readers import MAX_MODULE_CHARS
from ..ops.commit import TrainedModule
from .heads import HeadSwitch
from .layers import SharedConv2d, SharedEmbedding, SharedLayer
from .live import LiveCore
from .wrapper import Wrapper

if TYPE_CHECKING:
    from .attach import Runtime


@dataclass
class Training:
    """The task in training: its name, its trainable parameters and what was changed to make them."""

    name: str
    extra: int
    heads: dict[str, HeadSwitch]  # model module → its switch (one ``start`` may have patched in)
    frozen: dict[nn.Parameter, bool]  # every model parameter's requires_grad before ``start``
    patched_heads: list[str] = field(default_factory=list)
    parameters: list[nn.Parameter] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    # the same parameters by role, for optimiser groups: cores tolerate a larger learning rate
    # than directions and heads, which move like LoRA factors and full modules
    groups: dict[str, list[nn.Parameter]] = field(default_factory=lambda: {"cores": [], "directions": [], "heads": []})


def start(rt: "Runtime", name: str, extra: int, heads: Iterable[str] | None) -> Training:
    problem = name_problem(name)
    if problem:
        raise ZooError(name, f"adapter name {problem}")
    if name in rt.names:
        raise ZooError(name, "an adapter of this name is already in the zoo")
    try:
        extra = -1 if isinstance(extra, bool) else operator.index(extra)
    except TypeError:
        extra = -1
    if extra < 0:
        raise ValueError("extra must be a whole number of directions, 0 or more")
    heads = check_heads(rt, [heads] if isinstance(heads, str) else list(heads or ()))
    frozen = {p: p.requires_grad for p in rt.model.parameters()}
    training = Training(name, extra, {}, frozen)
    try:
        with torch.inference_mode(False):  # trainable tensors, even when called under inference_mode
            for p in frozen:
                p.requires_grad_(False)
            core_params = extra_params = 0
            for module, (target, wrapper) in rt.modules.items():
                wrapper.live = LiveCore(wrapper.bank.U, wrapper.bank.V, extra)
                wrapper.live_slot = rt.routing.live
                core_params += wrapper.live.core.numel()
                extra_params += wrapper.live.parameter_count() - wrapper.live.core.numel()
                training.parameters += list(wrapper.live.parameters())
                training.groups["cores"].append(wrapper.live.core)
                training.groups["directions"] += [p for p in wrapper.live.parameters() if p is not wrapper.live.core]
            head_params = 0
            for head in heads:
                switch = rt.model.get_submodule(head)
                if not isinstance(switch, HeadSwitch):
                    rt._patch(head, lambda o: HeadSwitch(o, [None] * len(rt.names), rt.routing))
                    switch = rt.model.get_submodule(head)
                    training.patched_heads.append(head)
                    rt.heads.append(switch)
                training.heads[head] = switch
                trainable = switch.train_slot(rt.routing.live)
                head_params += sum(p.numel() for p in trainable)
                training.parameters += trainable
                training.groups["heads"] += trainable
    except BaseException:
        stop(rt, training)
        raise
    rank = max((e["rank"] for e in rt.manifest["adapters"]), default=0)
    lora = sum(rank * sum(rt.manifest["modules"][m]["shape"]) for m in rt.modules)
    training.counts = {"cores": core_params, "directions": extra_params, "heads": head_params,
                       "trainable": core_params + extra_params + head_params, "lora_rank": rank,
                       "lora_same_modules": lora + head_params}
    return training


def check_heads(rt: "Runtime", heads: list[str]) -> list[str]:
    """The heads, each once; refused unless each is a module of its own: no zoo module (nor another
    head) inside it, not inside a wrapper, with float parameters to train."""
    modules = dict(rt.model.named_modules())
    found = []
    for head in heads:
        if not isinstance(head, str) or not head or len(head) > MAX_MODULE_CHARS:
            raise ZooError(str(head)[:80], "head: give a module name as model.named_modules() gives it")
        module = modules.get(head)
        if module is None:
            raise ZooError(head, "head: the model has no module of this name (give names as model.named_modules() does)")
        inside = [n for n in modules if n and n.startswith(head + ".") and isinstance(modules[n], (Wrapper, LiveCore))]
        if isinstance(module, SharedLayer) or any(isinstance(modules[n], SharedLayer) for n in inside):
            raise ZooError(head, "head: this module has (or holds modules with) the zoo's LoRA cores; "
                                 "a head is a module trained in full, apart from them")
        if inside and not isinstance(module, HeadSwitch):
            raise ZooError(head, f"head: holds {inside[0]!r}, a module the zoo already swaps; name that one instead")
        parent = head.rpartition(".")[0]
        if parent and isinstance(modules.get(parent), Wrapper):
            raise ZooError(head, "head: this is the inside of a module the runtime wraps; name the module itself")
        params = list((module.base_layer if isinstance(module, HeadSwitch) else module).named_parameters())
        if not params:
            raise ZooError(head, "head: this module has no parameters to train")
        fixed = [n for n, p in params if not p.is_floating_point()]
        if fixed:
            raise ZooError(head, f"head: parameter {fixed[0]!r} is not floating point and cannot be trained")
        if head in found:
            continue
        if any(head.startswith(other + ".") or other.startswith(head + ".") for other in found):
            raise ZooError(head, "head: one head inside another; name each module once")
        found.append(head)
    return found


def summary(training: Training, modules: int) -> str:
    c = training.counts
    parts = [f"{c['cores']:,} in cores"]
    if c["directions"]:
        parts.append(f"{c['directions']:,} in {training.extra} new directions per side")
    if c["heads"]:
        parts.append(f"{c['heads']:,} in heads ({', '.join(training.heads)})")
    line = f"training {training.name!r}: {c['trainable']:,} trainable parameters ({'; '.join(parts)}) in {modules} modules"
    if not c["lora_rank"]:
        return line
    ratio = c["lora_same_modules"] / c["trainable"] if c["trainable"] else float("inf")
    return (f"{line}; a LoRA of the zoo's largest rank, {c['lora_rank']}, on the same modules and heads "
            f"would train {c['lora_same_modules']:,} ({ratio:.1f}x as many)")


def collect(rt: "Runtime", training: Training) -> tuple[dict[str, TrainedModule], dict[str, torch.Tensor], dict]:
    """The trained update of every module, the heads' tensors under PEFT keys, and the adapter's config."""
    layouts = zoo_module_layouts(rt.manifest)
    modules = {}
    for module, (target, wrapper) in rt.modules.items():
        live = wrapper.live
        with torch.no_grad():
            U, V = live.bases(wrapper.bank.U, wrapper.bank.V)
            U, V, C = (t.detach().to("cpu", torch.float64) for t in (U, V, live.core))
        kind = "conv" if isinstance(wrapper, SharedConv2d) else "embedding" if isinstance(wrapper, SharedEmbedding) else "linear"
        # the zoo's own name where it is a PEFT one (the export then loads on the model the zoo
        # was made for, whichever submodule this runtime is attached to), else the model's
        key = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
        key = key if layouts[module] == "peft" else target
        ku, kv = wrapper.bank.U.shape[1], wrapper.bank.V.shape[1]
        # new directions the training never used (their blocks of C still exactly zero) are not new
        extra = (live.extra_u if _moved(C[ku:]) else 0, live.extra_v if _moved(C[:, kv:]) else 0)
        if extra == (0, 0):
            U, V, C = U[:, :ku], V[:, :kv], C[:ku, :kv]
        modules[module] = TrainedModule(key, kind, U, C, V, extra=extra, kernel=getattr(wrapper, "kernel_shape", ()))
    prefix = model_prefix(rt)
    heads = {}
    for head, switch in training.heads.items():
        # the name the zoo's other adapters save this head under, or the model's own from the zoo's root
        own = rt._head_names.get(head, prefix + head)
        for param, tensor in switch.slot_tensors(rt.routing.live).items():
            heads[f"{PEFT_PREFIX}{own}.{param}"] = tensor.detach().to("cpu")
    task_types = {(e.get("config") or {}).get("task_type") for e in rt.manifest["adapters"]}
    config = {
        "base_model_name_or_path": rt.manifest.get("base_model"),
        "task_type": task_types.pop() if len(task_types) == 1 else None,
        "target_modules": sorted({m.key.rsplit(".", 1)[-1] for m in modules.values()}),
        "modules_to_save": [rt._head_names.get(h, prefix + h) for h in training.heads] or None,
        "inference_mode": True, "bias": "none",
    }
    return modules, heads, config


def _moved(block: torch.Tensor) -> bool:
    return block.numel() > 0 and bool(block.abs().max() > 0)


def model_prefix(rt: "Runtime") -> str:
    """What the zoo's PEFT module names have before the attached model's own (``bert.`` when a
    zoo of ``BertForSequenceClassification`` adapters is attached to ``model.bert``), or ""."""
    for module, (target, _) in rt.modules.items():
        own = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
        if own != target and own.endswith("." + target):
            return own[: -len(target)]
    return ""


def stop(rt: "Runtime", training: Training) -> None:
    """Remove the trainable parts; every parameter's requires_grad as it was before ``start``."""
    for p, flag in training.frozen.items():  # first: whatever follows, the model is trainable as before
        p.requires_grad_(flag)
    for _, wrapper in rt.modules.values():
        wrapper.live, wrapper.live_slot = None, -1
    for switch in training.heads.values():
        switch.drop_slot(rt.routing.live)
    for head in training.patched_heads:
        if training.heads.get(head) in rt.heads:
            rt.heads.remove(training.heads[head])
        rt._unpatch(head)
    routing = rt.routing
    if routing.single == routing.live or (routing.rows is not None and bool((routing.rows == routing.live).any())):
        routing.use_one(routing.base)
