"""Serving a zoo from memory: one basis per module, every adapter's cores resident, swapped by name."""

from .attach import Runtime

__all__ = ["Runtime"]
