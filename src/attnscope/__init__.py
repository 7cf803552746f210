"""attnscope: positional kernels, contextual heads and context-sensitive neurons from a model's weights."""

from attnscope.core.errors import AttnscopeError
from attnscope.models import ModelWeights, load_model

__all__ = ["AttnscopeError", "ModelWeights", "load_model", "__version__"]
__version__ = "0.1.0"
