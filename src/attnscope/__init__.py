"""attnscope: positional kernels, contextual heads and context-sensitive neurons from a model's weights.

The exports are loaded on first use (PEP 562): ``import attnscope`` does not import torch, so the
console entry point (:mod:`attnscope.entry`) starts fast and can handle Ctrl-C from its first line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import AttnscopeError
    from .models import ModelWeights, load_model

__all__ = ["AttnscopeError", "ModelWeights", "load_model", "__version__"]
__version__ = "0.1.0"

_LAZY = {"AttnscopeError": ".errors", "ModelWeights": ".models", "load_model": ".models"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
