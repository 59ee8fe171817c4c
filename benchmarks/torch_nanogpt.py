"""The PyTorch side of the GPT benchmarks: nanoGPT's model and optimiser, written from its
published configuration (no code taken from nanoGPT), for a same-machine comparison.

Architecture (nanoGPT's defaults: no biases in Linear and LayerNorm layers): token + learned
position embeddings, pre-LN blocks (causal self-attention
through ``F.scaled_dot_product_attention``, exact-erf GELU MLP of width 4D), final LayerNorm,
output head tied to the token embedding; init N(0, 0.02) with residual projections scaled by
1/sqrt(2L). Optimiser: AdamW with weight decay on >= 2-D parameters only, fused on CUDA
only (as nanoGPT), global-norm clipping, warmup + cosine learning rate.

``generate`` is nanoGPT's (no KV cache); ``decode`` and ``generate_cached`` add one, the
cached decoder a PyTorch user would write, for the generation benchmark.
"""

from __future__ import annotations

import math
import time

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

    def forward(
        self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x: (B, T, C)`` -> ``(x, (k, v))``; ``k, v: (B, nh, S, hs)`` of every position seen.

        Without ``cache`` the T positions attend causally among themselves (training, or a
        prompt's first pass). With the keys and values of the positions before (a KV cache,
        not in nanoGPT) the new ones are appended to it; decoding passes one token (T = 1),
        which may see every cached position, so no mask is needed.
        """
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            if T != 1:
                raise ValueError(f"Block: a cached step takes one new token, got T={T}")
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = x + F.dropout(self.c_proj(y), p, self.training)
        h = self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))
        return x + F.dropout(h, p, self.training), (k, v)


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
        self.block_size = block
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

    def _run(
        self, idx: torch.Tensor, start: int, caches: list[tuple[torch.Tensor, torch.Tensor]] | None
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Final-norm activations ``(B, T, C)`` of ``idx: (B, T)`` at positions ``start ..
        start+T-1``, and every layer's keys and values so far (``caches``: those before)."""
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(start, start + T, device=idx.device))
        x = F.dropout(x, self.dropout, self.training)
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if caches is None else caches[i])
            new_caches.append(kv)
        return self.ln_f(x), new_caches

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final-norm activations ``(B, T, C)`` of token ids ``idx: (B, T)``."""
        return self._run(idx, 0, None)[0]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.hidden(idx) @ self.wte.weight.T  # tied head
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, new_tokens: int, temperature: float = 1.0, top_k: int | None = None
    ) -> torch.Tensor:
        """nanoGPT's ``generate``, without a KV cache: for each new token a full forward over
        the last ``block_size`` tokens, the last position's logits / temperature, top-k,
        then a draw."""
        for _ in range(new_tokens):
            x = self.hidden(idx[:, -self.block_size :])
            logits = x[:, -1] @ self.wte.weight.T  # (B, V): last position only
            idx = torch.cat([idx, _draw(logits, temperature, top_k)], dim=1)
        return idx

    @torch.no_grad()
    def decode(
        self,
        idx: torch.Tensor,
        start: int,
        caches: list[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Logits ``(B, V)`` of the last of ``idx: (B, T)``, the tokens at positions
        ``start .. start+T-1``, and every layer's keys and values so far.

        ``caches=None`` runs a prompt (``start = 0``); after it, one token per call against
        the returned caches (the same computation as ``hidden`` on the whole prefix).
        """
        T = idx.shape[1]
        if start + T > self.block_size:
            raise ValueError(
                f"decode: positions up to {start + T - 1} exceed block_size={self.block_size}"
            )
        x, caches = self._run(idx, start, caches)
        return x[:, -1] @ self.wte.weight.T, caches

    @torch.no_grad()
    def generate_cached(
        self, idx: torch.Tensor, new_tokens: int, temperature: float = 1.0, top_k: int | None = None
    ) -> torch.Tensor:
        """``generate`` with a KV cache (a PyTorch user's own; nanoGPT has none): the
        prompt in one pass, then one token per step against the cached keys and values
        (appended with ``torch.cat``, as a growing cache does). The whole result must fit
        ``block_size``."""
        positions = idx.shape[1] + new_tokens - 1  # (the last draw is never fed back)
        if positions > self.block_size:
            raise ValueError(
                f"generate_cached: a prompt of {idx.shape[1]} and {new_tokens} new tokens need "
                f"{positions} positions, more than block_size={self.block_size} (a cache "
                "does not crop)"
            )
        logits, caches = self.decode(idx, 0, None)
        for step in range(new_tokens):
            nxt = _draw(logits, temperature, top_k)
            idx = torch.cat([idx, nxt], dim=1)
            if step + 1 < new_tokens:  # the last draw is not fed back
                logits, caches = self.decode(nxt, idx.shape[1] - 1, caches)
        return idx


def _draw(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """nanoGPT's sampling: ``logits: (B, V)`` / temperature, keep the top k, draw ``(B, 1)``."""
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits[logits < kth] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # nanoGPT's configure_optimizers: fused only on CUDA (use_fused = fused_available and
    # device_type == "cuda"); on a CPU it runs torch's default AdamW there, the single-tensor
    # loop (foreach is the default only on CUDA and other accelerators).
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))


def learning_rate(step: int, lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr`` at ``decay_steps`` (nanoGPT's schedule)."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step > decay_steps:
        return min_lr
    ratio = (step - warmup) / (decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def train_run(
    text_path: str,
    *,
    steps: int = 2000,
    eval_every: int = 250,
    eval_iters: int = 20,
    batch_size: int = 12,
    block_size: int = 64,
    layers: int = 4,
    heads: int = 4,
    dim: int = 128,
    lr: float = 1e-3,
    min_lr: float = 1e-4,
    warmup: int = 100,
    lr_decay_steps: int = 2000,
    checkpoint_path: str | None = None,
    seed: int = 1337,
) -> tuple[float, float]:
    """nanoGPT's character-level training run, as its train.py does it on a CPU.

    The defaults are its CPU Shakespeare command (``--device=cpu --compile=False
    --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
    --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``): 90/10 split of
    the characters, batches of random windows, evaluation of both splits every
    ``eval_every`` steps and at the end (and a checkpoint when val loss improves), the
    loss fetched every step for the log. Returns the val loss at ``steps`` and the seconds
    spent in train steps (evaluations and checkpoints left out). It takes exactly ``steps``
    optimizer steps, as ``train/lm.py`` does; nanoGPT's loop (``iter_num += 1; if iter_num
    > max_iters: break``) takes one more after its last evaluation, about 40 ms of ~95 s.
    """
    import numpy as np

    torch.manual_seed(seed)
    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = np.array([index[c] for c in text], dtype=np.int64)
    split = int(0.9 * len(data))
    splits = {"train": torch.from_numpy(data[:split]), "val": torch.from_numpy(data[split:])}

    def batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        d = splits[name]
        starts = torch.randint(len(d) - block_size, (batch_size,))
        x = torch.stack([d[s : s + block_size] for s in starts])
        y = torch.stack([d[s + 1 : s + 1 + block_size] for s in starts])
        return x, y

    model = NanoGPT(len(chars), block_size, layers, heads, dim)
    opt = make_optimizer(model, lr, 0.1, (0.9, 0.99))

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        out = {name: float(np.mean([model(*batch(name)).item() for _ in range(eval_iters)]))
               for name in splits}  # fmt: skip
        model.train()
        return out

    best, val, step_seconds = math.inf, math.nan, 0.0
    for step in range(steps + 1):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, lr, min_lr, warmup, lr_decay_steps)
        if step % eval_every == 0 or step == steps:
            val = evaluate()["val"]
            if val < best:
                best = val
                if step > 0 and checkpoint_path:
                    args = {"vocab": len(chars), "block": block_size, "layers": layers,
                            "heads": heads, "dim": dim}  # fmt: skip
                    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                                "model_args": args}, checkpoint_path)  # fmt: skip
        if step == steps:
            break
        start = time.perf_counter()
        loss = model(*batch("train"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # log_interval=1: the loss is fetched every step
        step_seconds += time.perf_counter() - start
    return val, step_seconds


def sample_run(
    text_path: str,
    checkpoint_path: str,
    *,
    num_samples: int = 2,
    new_tokens: int = 500,
    prompt: str = "\n",
    temperature: float = 0.8,
    top_k: int = 200,
    seed: int = 1337,
) -> list[str]:
    """nanoGPT's sample.py after its train.py: load the checkpoint, then generate
    ``num_samples`` continuations of ``prompt`` one after the other (batch 1), with its
    defaults (temperature 0.8, top-k 200) and ``num_samples`` set to lm.py's 2."""
    torch.manual_seed(seed)
    with open(text_path, encoding="utf-8") as f:
        chars = sorted(set(f.read()))  # sample.py reads them from the data's meta.pkl
    index = {c: i for i, c in enumerate(chars)}
    checkpoint = torch.load(checkpoint_path, map_location="cpu")
    model = NanoGPT(**checkpoint["model_args"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    start = torch.tensor([[index[c] for c in prompt]], dtype=torch.long)
    out = [model.generate(start, new_tokens, temperature, top_k)[0] for _ in range(num_samples)]
    return ["".join(chars[i] for i in ids.tolist()) for ids in out]
