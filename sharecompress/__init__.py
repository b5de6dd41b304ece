"""sharecompress: many LoRA adapters → one shared low-rank basis per layer + tiny cores."""

__version__ = "0.1.0"

from .errors import InputError, ShareError, ZooError  # noqa: E402
from .zoo import Zoo  # noqa: E402
from .merge import merge  # noqa: E402

__all__ = ["merge", "Zoo", "ShareError", "InputError", "ZooError", "__version__"]
