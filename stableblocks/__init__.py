"""stableblocks: drop-in GPT-2 blocks, fused Triton kernels and recipes that keep pre-training from spiking."""

from . import kernels
from .config import StableConfig
from .init import fold_wesar_gates, init_weights
from .kernels import get_backend, set_backend
from .model import StableGPT
from .modules import LayerNorm, StableAttention, StableBlock, StableEmbedding, StableLinear, StableMLP
from .qk_clip import QKClip, apply_qk_clip, record_max_logits
from .recipes import recipe, recipes

__version__ = "0.1.0"

__all__ = [
    "LayerNorm", "QKClip", "StableAttention", "StableBlock", "StableConfig", "StableEmbedding", "StableGPT",
    "StableLinear", "StableMLP", "apply_qk_clip", "fold_wesar_gates", "get_backend", "init_weights", "kernels",
    "recipe", "recipes", "record_max_logits", "set_backend",
]
