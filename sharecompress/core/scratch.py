"""Buffers a merge keeps from one batch to the next instead of allocating them again.

A fresh tensor of tens of MB is fresh memory from the kernel, and the first write to each of its
pages is a page fault: measured on the 2-core machine, widening a 2 × 128 × 1024 × 16 stack to
float64 took 8.7 ms into a new tensor and 1.0 ms into a reused one. Batches of one shape repeat,
so their buffers can too.
"""

from __future__ import annotations

import math

import torch


PIN_LIMIT = 1 << 30  # bytes: a larger buffer (a huge module times many adapters) stays pageable


class Scratch:
    """Named buffers, each grown to the largest size asked of it and handed out as views.

    A view from ``take`` is valid until the next ``take`` of the same name: the caller must not
    let it (or a view of it) outlive that.
    """

    def __init__(self, pinned: bool = False) -> None:
        """``pinned``: host buffers in page-locked memory, which a GPU copies from directly (a copy
        from pageable memory is staged through the driver's own buffer first)."""
        self._held: dict[str, torch.Tensor] = {}
        self.pinned = pinned

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        count = math.prod(shape)
        buf = self._held.get(name)
        if buf is None or buf.numel() < count or buf.dtype != dtype or buf.device != device:
            self._held.pop(name, None)  # the old buffer goes before the new one is made
            buf = None
            if self.pinned and device.type == "cpu" and count * dtype.itemsize <= PIN_LIMIT:
                try:
                    buf = torch.empty(count, dtype=dtype, device=device, pin_memory=True)
                except RuntimeError:  # page-locked memory refused: pageable memory does the same job, slower
                    buf = None
            if buf is None:
                buf = torch.empty(count, dtype=dtype, device=device)
            self._held[name] = buf
        return buf[:count].view(shape)
