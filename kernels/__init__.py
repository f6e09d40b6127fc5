"""Functional ops of stableblocks: Triton kernels with plain-PyTorch references beside them.

Every op checks its arguments, then runs its Triton kernel or its reference as the backend
switch decides (see backend.py).
"""

from .backend import get_backend, load_kernels, set_backend
from .fused_add_norm import fused_add_norm
from .fused_attention import fused_attention
from .fused_embedding import fused_embedding
from .layer_norm import layer_norm

load_kernels()

__all__ = ["fused_add_norm", "fused_attention", "fused_embedding", "get_backend", "layer_norm", "set_backend"]
