"""What every wrapper shares: the original module kept inside, invisible to ``state_dict``.

While a zoo is attached, ``model.state_dict()`` is the base model's own (``query.weight``, not
``query.base_layer.weight``), so saving or reloading the model while attached gives back exactly
the model that was attached, without any adapter; the bases and cores are non-persistent buffers.
"""

from __future__ import annotations

from torch import nn

INNER = "base_layer."


class Wrapper(nn.Module):
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.register_state_dict_post_hook(_hide_inner)
        self.register_load_state_dict_pre_hook(_show_inner)


def _hide_inner(module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state if k.startswith(prefix + INNER)]:
        state[prefix + key[len(prefix) + len(INNER):]] = state.pop(key)


def _show_inner(module: nn.Module, state: dict, prefix: str, *args) -> None:
    own = {name for name, _ in module.base_layer.named_parameters()} | {name for name, _ in module.base_layer.named_buffers()}
    for name in own:
        if prefix + name in state:
            state[prefix + INNER + name] = state.pop(prefix + name)
