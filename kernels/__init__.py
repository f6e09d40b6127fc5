"""Functional ops of stableblocks: Triton kernels with plain-PyTorch references beside them.

Every op checks its arguments, then runs its Triton kernel or its reference as the backend
switch decides (see backend.py).
"""

# This folder is installed as stableblocks.kernels. From a checkout's root it is also importable as
# a top-level `kernels`, and transformers imports any top-level `kernels` it finds (Hugging Face's
# package of that name): loaded a second time, the Triton modules would register their
# torch.library ops again. Under any other name the package stays empty.
if __name__ == "stableblocks.kernels":
    from .backend import get_backend, load_kernels, set_backend
    from .fused_add_norm import fused_add_norm
    from .fused_attention import fused_attention
    from .fused_embedding import fused_embedding
    from .layer_norm import layer_norm

    load_kernels()

    __all__ = ["fused_add_norm", "fused_attention", "fused_embedding", "get_backend", "layer_norm", "set_backend"]
