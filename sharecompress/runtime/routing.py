"""Which adapter each row of the next forward uses: shared by every wrapper of one runtime."""

from __future__ import annotations

import torch


class Routing:
    """Slot ``t`` is the t-th adapter; slot ``base`` (= the number of adapters) is the base model;
    slot ``live`` (``base + 1``) is a new task in training (``Runtime.new_adapter``).

    ``single`` holds one slot for the whole batch; ``rows`` one slot per row (a long tensor, kept
    on each device it is asked for, so a swap moves a few bytes at most and never the bases).
    """

    def __init__(self, count: int) -> None:
        self.base = count
        self.live = count + 1
        self.version = 0  # bumped by every use: wrappers cache per-routing plans against it
        self.single: int | None = count
        self.rows: torch.Tensor | None = None
        self._on: dict[torch.device, torch.Tensor] = {}

    def use_one(self, slot: int) -> None:
        self.single, self.rows, self._on = slot, None, {}
        self.version += 1

    def use_rows(self, slots: list[int]) -> None:
        self.single, self.rows, self._on = None, torch.tensor(slots, dtype=torch.long), {}
        self.version += 1

    def rows_on(self, device: torch.device, batch: int) -> torch.Tensor:
        """The per-row slots on ``device``; the batch must have exactly one row per slot."""
        assert self.rows is not None
        if batch != self.rows.numel():
            raise ValueError(f"rt.use was given {self.rows.numel()} adapters, one per row, but the batch has {batch} rows")
        key = (device, torch.is_inference_mode_enabled())  # an inference tensor must not reach autograd later
        found = self._on.get(key)
        if found is None:
            found = self._on[key] = self.rows.to(device)
        return found

    def groups(self) -> list[tuple[int, list[int]]]:
        """[(slot, row indices)] in first-seen order: rows that share an adapter, for per-group work."""
        assert self.rows is not None
        seen: dict[int, list[int]] = {}
        for row, slot in enumerate(self.rows.tolist()):
            seen.setdefault(slot, []).append(row)
        return list(seen.items())
