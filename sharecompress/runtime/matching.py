"""Zoo module names (PEFT ``base_model.model.…``, kohya ``lora_unet_…``, diffusers ``unet.…``) onto
the model's own ``named_modules()``.

Both sides are flattened to the layout-free form ``formats.canonical`` uses (dots as
underscores, PEFT and diffusers prefixes dropped). A zoo module matches the model module whose
flat name equals its own, or else the one module whose flat name it ends with (or that ends
with it) at an ``_`` boundary: a zoo written against ``BertForSequenceClassification``
(``bert.encoder…``) then serves a ``BertModel`` (``encoder…``), and ``text_encoder_…`` serves the
text encoder on its own. Anything else is one clear error naming the module.
"""

from __future__ import annotations

from torch import nn

from ..errors import ZooError
from ..io.formats import PEFT_PREFIX, canonical, without_text_model

# What PEFT puts between a module and its saved modules_to_save parameters.
_SAVED = (".modules_to_save.default.", ".modules_to_save.")


def flat(name: str) -> str:
    """The model's own name in the zoo's layout-free form (``formats.canonical``'s rules)."""
    return without_text_model(name.replace(".", "_"))


class ModelIndex:
    """The model's modules by flat name, for matching."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self.by_flat: dict[str, str] = {}
        self.ambiguous: set[str] = set()
        for name in self.modules:
            if name and flat(name) in self.by_flat:
                self.ambiguous.add(flat(name))  # ``a.b_c`` and ``a_b.c``: only a dotted name can tell them apart
            elif name:
                self.by_flat[flat(name)] = name

    def has_any(self, zoo_name: str) -> bool:
        """Does any module of the model end like ``zoo_name``'s last component?"""
        last = zoo_name.rsplit(".", 1)[-1]
        return any(name.rsplit(".", 1)[-1] == last for name in self.modules if name)

    def find(self, zoo_name: str, layout: str, what: str) -> str:
        dotted = zoo_name[len(PEFT_PREFIX):] if zoo_name.startswith(PEFT_PREFIX) else zoo_name
        if dotted in self.modules and dotted:
            return dotted
        key = canonical(zoo_name, layout)
        if key in self.ambiguous:
            raise ZooError(zoo_name, f"{what}: several modules of the model flatten to {key!r}; name them apart")
        if key in self.by_flat:
            return self.by_flat[key]
        found = [name for f, name in self.by_flat.items() if key.endswith("_" + f) or f.endswith("_" + key)]
        if len(found) == 1:
            return found[0]
        if not found:
            raise ZooError(zoo_name, f"{what}: the model has no module of this name")
        shown = ", ".join(sorted(found)[:3])
        raise ZooError(zoo_name, f"{what}: matches {len(found)} modules of the model ({shown}); attach to the submodule it belongs to")


def split_extra(key: str) -> tuple[str, str]:
    """(module, parameter) of a saved non-LoRA tensor: ``base_model.model.classifier.weight`` → (``classifier``, ``weight``)."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for marker in _SAVED:
        name = name.replace(marker, ".")
    module, _, param = name.rpartition(".")
    return module, param
