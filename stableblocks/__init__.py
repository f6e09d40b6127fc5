"""stableblocks: drop-in GPT-2 blocks, fused Triton kernels and recipes that keep pre-training from spiking."""

from . import kernels
from .config import StableConfig
from .init import fold_wesar_gates, init_weights
from .kernels import get_backend, set_backend
from .model import StableGPT
from .modules import LayerNorm, StableAttention, StableBlock, StableEmbedding, StableLinear, StableMLP
from .recipes import recipe, recipes

__version__ = "0.1.0"

__all__ = [
    "LayerNorm", "StableAttention", "StableBlock", "StableConfig", "StableEmbedding", "StableGPT",
    "StableLinear", "StableMLP", "fold_wesar_gates", "get_backend", "init_weights", "kernels",
    "recipe", "recipes", "set_backend",
]
