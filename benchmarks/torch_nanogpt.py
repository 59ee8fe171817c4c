"""The PyTorch side of the GPT benchmarks: nanoGPT's model and optimiser, written from its
published configuration (no code taken from nanoGPT), for a same-machine comparison.

Architecture (nanoGPT's defaults: no biases in Linear and LayerNorm layers): token + learned
position embeddings, pre-LN blocks (causal self-attention
through ``F.scaled_dot_product_attention``, exact-erf GELU MLP of width 4D), final LayerNorm,
output head tied to the token embedding; init N(0, 0.02) with residual projections scaled by
1/sqrt(2L). Optimiser: AdamW with weight decay on >= 2-D parameters only, fused where torch
offers it, global-norm clipping, warmup + cosine learning rate.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(dim, bias=bias)
        self.c_attn = nn.Linear(dim, 3 * dim, bias=bias)
        self.c_proj = nn.Linear(dim, dim, bias=bias)
        self.ln_2 = nn.LayerNorm(dim, bias=bias)
        self.c_fc = nn.Linear(dim, 4 * dim, bias=bias)
        self.mlp_proj = nn.Linear(4 * dim, dim, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = x + F.dropout(self.c_proj(y), p, self.training)
        h = self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))
        return x + F.dropout(h, p, self.training)


class NanoGPT(nn.Module):
    def __init__(
        self,
        vocab: int,
        block: int,
        layers: int,
        heads: int,
        dim: int,
        dropout: float = 0.0,
        bias: bool = False,
    ):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(block, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout, bias) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim, bias=bias)
        self.dropout = dropout
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias") and "ln" not in name:
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        x = F.dropout(x, self.dropout, self.training)
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T  # tied head
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def learning_rate(step: int, lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr`` at ``decay_steps`` (nanoGPT's schedule)."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step > decay_steps:
        return min_lr
    ratio = (step - warmup) / (decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)
