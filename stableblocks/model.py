"""StableGPT: a GPT-2 whose stabilisers are switched on by a StableConfig (nanoGPT conventions)."""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import StableConfig
from .init import init_weights
from .kernels import fused_linear_cross_entropy
from .modules import LayerNorm, StableBlock, StableEmbedding, StableLinear


def param_groups(model: nn.Module, embeddings, embed_weight_decay: bool, weight_decay: float,
                 gate_weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups: decay on weight matrices only, not on biases or norms, nor on the embeddings
    unless embed_weight_decay (a tied LM head counts as the token embedding). WeSaR gates get a
    group of their own ("wesar_gates": no decay by default) so their lr and decay can be set."""
    embedding_ids = {id(p) for p in embeddings}
    groups = {"decay": [], "no_decay": [], "wesar_gates": []}
    for name, p in model.named_parameters():  # tied weights are listed once
        if not p.requires_grad:
            continue
        if name.endswith(".gate"):
            groups["wesar_gates"].append(p)
        elif p.dim() >= 2 and (id(p) not in embedding_ids or embed_weight_decay):
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    decays = {"decay": weight_decay, "no_decay": 0.0, "wesar_gates": gate_weight_decay}
    return [{"name": k, "params": v, "weight_decay": decays[k]} for k, v in groups.items() if v or k != "wesar_gates"]


class StableGPT(nn.Module):
    def __init__(self, config: StableConfig):
        super().__init__()
        self.config = config
        self.embed = StableEmbedding(config)
        self.blocks = nn.ModuleList([StableBlock(config) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config.bias, config.eps)
        self.lm_head = StableLinear(config.n_embd, config.vocab_size, bias=False, gates=1 if config.init == "wesar" else 0)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.wte.weight
        init_weights(self, config)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; without the position embeddings by default (nanoGPT's convention)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) token ids -> (logits (B, T, vocab), None); with targets, (None, loss): the loss
        comes from fused_linear_cross_entropy, which never forms the logits. targets == -1 are
        ignored; when all are, the loss is 0 (with zero gradients)."""
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
            got = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx: expected an int64 or int32 tensor of token ids, got {got}")
        if idx.dim() != 2:
            raise ValueError(f"idx: expected shape (B, T), got {tuple(idx.shape)}")
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"idx: sequence length {idx.shape[1]} exceeds block_size {self.config.block_size}")
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        cap = self.config.logit_softcap
        if targets is not None:
            return None, fused_linear_cross_entropy(x, self.lm_head.effective_weight(), targets, self.lm_head.bias,
                                                    ignore_index=-1, softcap=cap, z_loss=self.config.z_loss)
        logits = self.lm_head(x)
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits, None

    def param_groups(self, weight_decay: float, gate_weight_decay: float = 0.0) -> list[dict]:
        embeddings = (self.embed.wte.weight, self.embed.wpe.weight)
        return param_groups(self, embeddings, self.config.embed_weight_decay, weight_decay, gate_weight_decay)

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95), eps: float = 1e-8):
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and next(self.parameters()).is_cuda
        return torch.optim.AdamW(self.param_groups(weight_decay), lr=learning_rate, betas=betas, eps=eps, fused=fused or None)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]
            logits, _ = self(context)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)), dim=1)
        return idx
