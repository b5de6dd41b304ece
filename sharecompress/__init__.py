"""sharecompress: many LoRA adapters → one shared low-rank basis per layer + tiny cores.

The package is built in rooms, each importing only those below it: ``io`` (reading adapters
and files), ``core`` (the linear algebra), ``store`` (the zoo on disk), ``ops`` (merge, add,
remove, combine, export), ``runtime`` (serving a zoo in memory) and ``report``. The public API
(``merge``, ``Zoo``) and the CLI sit on top; nothing below imports them.
"""

from ._version import __version__
from .errors import InputError, ShareError, ZooError

__all__ = ["merge", "Zoo", "ShareError", "InputError", "ZooError", "__version__"]


def __getattr__(name: str):
    """``merge`` and ``Zoo`` on first use: importing the package (or running ``--help`` or ``list``)
    does not import torch."""
    if name in ("merge", "Zoo"):
        from . import zoo

        return getattr(zoo, name)
    raise AttributeError(f"module 'sharecompress' has no attribute {name!r}")
