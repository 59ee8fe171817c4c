"""Tests for jaxattn.models.gpt: config checks, init, a float64 NumPy reference, PyTorch parity
(logits and gradients), causality, dropout, remat, bfloat16 and bad inputs."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.models.gpt import (
    GPTConfig,
    GPTWeights,
    generate,
    gpt,
    gpt_decode,
    gpt_loss,
    init_cache,
    init_gpt,
    unstack_layers,
    weight_decay_mask,
)

# Odd, distinct sizes: V=13, block=11, L=2, N=3, D=12 (H=4, even for rope), F=48.
BASE = GPTConfig(vocab_size=13, block_size=11, num_layers=2, num_heads=3, embed_dim=12)
GQA = dataclasses.replace(BASE, num_heads=4, num_kv_heads=2, embed_dim=20)  # H=5, K=2
ROPE = dataclasses.replace(BASE, positions="rope")
UNTIED = dataclasses.replace(BASE, tie_embeddings=False, use_bias=False)
B, T = 2, 11  # T = block_size: the longest allowed context; one shape for every test

STATIC = ("config", "deterministic")
gpt_jit = jax.jit(gpt, static_argnames=STATIC)
loss_jit = jax.jit(gpt_loss, static_argnames=STATIC)
value_and_grad_jit = jax.jit(jax.value_and_grad(gpt_loss), static_argnames=STATIC)


def key(seed: int) -> jax.Array:
    """A PRNG key whose draws compile ~5x faster on CPU than threefry's (same semantics)."""
    return jax.random.key(seed, impl="rbg")


def random_weights(config: GPTConfig, seed: int = 0) -> GPTWeights:
    """Random weights of ``init_gpt``'s structure: every leaf noisy, so biases and norms matter.

    Drawn with NumPy from ``jax.eval_shape(init_gpt)``: no init program to compile per config.
    """
    np_rng = np.random.default_rng(seed)

    def leaf(path, shape):
        base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0  # layer-norm gains
        return jnp.asarray(base + 0.3 * np_rng.standard_normal(shape.shape), jnp.float32)

    shapes = jax.eval_shape(lambda key: init_gpt(key, config), jax.random.key(0))
    return jax.tree_util.tree_map_with_path(leaf, shapes)


def tokens_for(config: GPTConfig, shape=(B, T), seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, shape), jnp.int32)


# --------------------------------------------------------------------------------------
# float64 NumPy reference: an explicit loop over layers and heads.
# --------------------------------------------------------------------------------------


def np_layer_norm(x, scale, bias, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * scale
    return y if bias is None else y + bias


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_gelu_erf(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def np_rope(x, base=10000.0):
    """x: [B, T, H]; rotate-half RoPE at positions 0..T-1."""
    h = x.shape[-1]
    inv = base ** (-np.arange(0, h, 2) / h)  # [H/2]
    theta = np.arange(x.shape[1])[:, None] * inv  # [T, H/2]
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    return np.concatenate(
        [x1 * np.cos(theta) - x2 * np.sin(theta), x2 * np.cos(theta) + x1 * np.sin(theta)], -1
    )


def np_gpt(weights: GPTWeights, tokens, config: GPTConfig):
    w = jax.tree.map(lambda a: np.asarray(a, np.float64), weights)
    tokens = np.asarray(tokens)
    t = tokens.shape[1]
    n, k, h = config.num_heads, config.kv_heads, config.head_dim
    x = w.token_embedding.table[tokens]  # [B, T, D]
    if config.positions == "learned":
        x = x + w.position_embedding.table[:t]
    causal = np.tril(np.ones((t, t), bool))
    if config.attention_window is not None:  # query i sees keys i - window + 1 .. i
        causal &= np.arange(t)[:, None] - np.arange(t)[None, :] < config.attention_window

    def bias(b, *idx):
        return 0.0 if b is None else b[idx]

    for layer in range(config.num_layers):
        blk = jax.tree.map(lambda a, layer=layer: a[layer], w.blocks)
        a = blk.attn
        hid = np_layer_norm(x, blk.ln1.scale, blk.ln1.bias, config.layer_norm_eps)
        out = np.zeros_like(x)
        for head in range(n):
            g = head // (n // k)  # the kv head this query head reads
            q = hid @ a.w_q[:, head] + bias(a.b_q, head)  # [B, T, H]
            key = hid @ a.w_k[:, g] + bias(a.b_k, g)
            val = hid @ a.w_v[:, g] + bias(a.b_v, g)
            if config.positions == "rope":
                q, key = np_rope(q, config.rope_base), np_rope(key, config.rope_base)
            s = q @ key.transpose(0, 2, 1) / math.sqrt(h)  # [B, T, T]
            s = np.where(causal, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out += (p @ val) @ a.w_o[head]  # [B, T, D]
        x = x + out + bias(a.b_o, slice(None))
        hid = np_layer_norm(x, blk.ln2.scale, blk.ln2.bias, config.layer_norm_eps)
        act = np_gelu_tanh if config.gelu_approximate else np_gelu_erf
        up = act(hid @ blk.mlp.up.w + bias(blk.mlp.up.b, slice(None)))
        x = x + up @ blk.mlp.down.w + bias(blk.mlp.down.b, slice(None))
    x = np_layer_norm(x, w.ln_f.scale, w.ln_f.bias, config.layer_norm_eps)
    return x @ (w.token_embedding.table.T if w.head is None else w.head.w)


def np_cross_entropy(logits, targets):
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]  # [B, T]


# --------------------------------------------------------------------------------------
# Config and init
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(embed_dim=13), "divisible"),
        (dict(num_kv_heads=2), "num_kv_heads"),
        (dict(num_kv_heads=0), "num_kv_heads"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(positions="sinusoidal"), "positions"),
        (dict(dtype="float16"), "dtype"),
        # A dtype object equalled its name but hashed differently (jit's cache, lru_cache).
        (dict(dtype=np.dtype("float32")), r"GPTConfig.dtype must be one of .*got dtype"),
        (dict(dtype=jnp.dtype("bfloat16")), r"GPTConfig.dtype must be one of .*got dtype"),
        (dict(num_layers=0), "num_layers"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(block_size=0), "block_size"),
        (dict(num_heads=4, embed_dim=12, positions="rope"), "even head_dim"),  # H=3
        (dict(mlp_ratio=2.5), "mlp_ratio must be a positive int"),
        (dict(mlp_ratio=0), "mlp_ratio must be a positive int"),
        (dict(rope_base=0.0), "rope_base must be positive"),
        (dict(rope_base=float("nan")), "rope_base must be positive"),
        (dict(layer_norm_eps=float("nan")), "layer_norm_eps must be positive"),
        (dict(num_layers=2.5), "num_layers must be a positive int"),
        (dict(use_bias="no"), "use_bias must be a bool, got 'no'"),
        (dict(tie_embeddings=1), "tie_embeddings must be a bool"),
        (dict(remat="false"), "remat must be a bool"),
        (dict(gelu_approximate=None), "gelu_approximate must be a bool"),
        (dict(attention_implementation="flash"), "attention_implementation must be None or"),
        (dict(attention_window=0), "GPTConfig.attention_window must be a positive int"),
        (dict(attention_window=2.0), "GPTConfig.attention_window must be a positive int"),
        (dict(attention_window=True), "GPTConfig.attention_window must be a positive int"),
        (dict(loss_chunk_size=0), "GPTConfig.loss_chunk_size must be a positive int"),
        (dict(loss_chunk_size=8.0), "GPTConfig.loss_chunk_size must be a positive int"),
        (
            dict(attention_window=4, attention_implementation="pallas"),
            "GPTConfig: attention_implementation='pallas' takes no attention_window",
        ),
        (
            dict(attention_implementation="cudnn", dropout=0.1),
            r"GPTConfig.attention_implementation='cudnn' takes no attention dropout",
        ),
        # Not numbers: a TypeError naming no field; a JAX scalar: an unhashable config.
        (dict(dropout="0.1"), "GPTConfig.dropout must be a number"),
        (dict(dropout=None), "GPTConfig.dropout must be a number"),
        (dict(dropout=jnp.float32(0.1)), "GPTConfig.dropout must be a number"),
        (dict(layer_norm_eps="1e-5"), "layer_norm_eps must be positive"),
        (dict(rope_base="1e4"), "rope_base must be positive"),
        # inf passed and switched the layer off: layer norm outputs its bias, rope no turn.
        (dict(layer_norm_eps=float("inf")), "layer_norm_eps must be positive"),
        (dict(rope_base=float("inf")), "rope_base must be positive"),
    ],
)
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(BASE, **changes)


def test_config_is_hashable_and_has_properties():
    assert hash(BASE) == hash(dataclasses.replace(BASE))
    assert {BASE: 1}[GPTConfig(13, 11, 2, 3, 12)] == 1
    assert (GQA.head_dim, GQA.kv_heads, GQA.mlp_dim) == (5, 2, 80)
    assert (BASE.kv_heads, jnp.dtype(BASE.compute_dtype)) == (3, jnp.float32)


@pytest.mark.parametrize("config", [BASE, GQA, UNTIED], ids=["base", "gqa", "untied"])
def test_param_shapes_and_count(config):
    w = jax.eval_shape(lambda key: init_gpt(key, config), jax.random.key(0))
    v, d, L, f = config.vocab_size, config.embed_dim, config.num_layers, config.mlp_dim
    n, k, h = config.num_heads, config.kv_heads, config.head_dim
    assert w.token_embedding.table.shape == (v, d)
    assert w.position_embedding.table.shape == (config.block_size, d)
    assert w.blocks.attn.w_q.shape == (L, d, n, h)
    assert w.blocks.attn.w_k.shape == w.blocks.attn.w_v.shape == (L, d, k, h)
    assert w.blocks.attn.w_o.shape == (L, n, h, d)
    assert w.blocks.mlp.up.w.shape == (L, d, f)
    assert w.blocks.mlp.down.w.shape == (L, f, d)
    assert w.blocks.ln1.scale.shape == (L, d)
    bias = config.use_bias
    per_layer = (d * n * h + 2 * d * k * h + n * h * d) + 2 * d * f  # attention + mlp kernels
    per_layer += bias * ((n + 2 * k) * h + d + f + d) + 2 * d * (1 + bias)  # biases, 2 norms
    expected = v * d + config.block_size * d + L * per_layer + d * (1 + bias)
    expected += 0 if config.tie_embeddings else d * v
    assert sum(math.prod(a.shape) for a in jax.tree.leaves(w)) == expected
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(w))
    assert (w.head is None) == config.tie_embeddings
    assert (w.blocks.attn.b_q is None) == (not bias)


def test_init_compiles_once_for_the_fields_that_leave_the_weights_alone():
    """init_gpt resets the fields that do not shape the weights: a config differing only in
    them reuses the compiled init (gelu_approximate, attention_window and loss_chunk_size
    each compiled it again, for the same weights)."""
    from jaxattn.models import gpt as gpt_module

    want = init_gpt(key(1), BASE)
    compiled = gpt_module._init_gpt._cache_size()
    for changes in (
        dict(dropout=0.1, dtype="bfloat16", remat=True, rope_base=500.0, layer_norm_eps=1e-3),
        dict(attention_implementation="blockwise"),
        dict(gelu_approximate=False),
        dict(attention_window=3),
        dict(loss_chunk_size=4),
    ):
        got = init_gpt(key(1), dataclasses.replace(BASE, **changes))
        assert gpt_module._init_gpt._cache_size() == compiled, changes
        assert all(
            bool((a == b).all()) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
        )


def test_init_matches_nanogpt(assert_independent_draws):
    # Same shapes as BASE apart from the init-irrelevant fields: init compiles once for both.
    config = dataclasses.replace(BASE, dropout=0.1, dtype="bfloat16", remat=True)
    w = init_gpt(key(1), config)
    resid_std = 0.02 / math.sqrt(2 * config.num_layers)  # 0.01: half the others
    for arr, std in [
        (w.token_embedding.table, 0.02),
        (w.position_embedding.table, 0.02),
        (w.blocks.attn.w_q, 0.02),
        (w.blocks.attn.w_k, 0.02),
        (w.blocks.mlp.up.w, 0.02),
        (w.blocks.attn.w_o, resid_std),
        (w.blocks.mlp.down.w, resid_std),
    ]:
        np.testing.assert_allclose(np.std(np.asarray(arr)), std, rtol=0.2)  # >= 144 samples each
    for arr in (w.blocks.attn.b_q, w.blocks.attn.b_o, w.blocks.mlp.up.b, w.ln_f.bias):
        np.testing.assert_array_equal(arr, 0.0)
    np.testing.assert_array_equal(w.blocks.ln1.scale, 1.0)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(w))  # params stay float32
    # Every leaf and every layer its own draw (a reused key ties them together).
    layers = [jax.tree.map(lambda a, i=i: a[i], w.blocks) for i in range(config.num_layers)]
    assert_independent_draws(w._replace(blocks=None), *layers)
    # The untied head's draw is nanoGPT's std too.
    untied = init_gpt(key(1), dataclasses.replace(config, tie_embeddings=False))
    np.testing.assert_allclose(np.std(np.asarray(untied.head.w)), 0.02, rtol=0.2)
    assert_independent_draws(untied._replace(blocks=None))
    # Deterministic in the key.
    np.testing.assert_array_equal(init_gpt(key(1), BASE).blocks.mlp.up.w, w.blocks.mlp.up.w)


# --------------------------------------------------------------------------------------
# Forward pass against the reference (scan over layers == explicit loop)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        BASE,
        GQA,
        ROPE,
        UNTIED,
        dataclasses.replace(BASE, gelu_approximate=False),
        dataclasses.replace(BASE, positions="rope", num_kv_heads=1, attention_window=3),
        dataclasses.replace(BASE, attention_window=1, attention_implementation="blockwise"),
    ],
    ids=["base", "gqa", "rope", "untied", "erf-gelu", "window3-mqa-rope", "window1-blockwise"],
)
def test_matches_numpy_reference(config):
    w = random_weights(config)
    tokens = tokens_for(config)
    logits = gpt_jit(w, tokens, config)
    assert logits.shape == (B, T, config.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, np_gpt(w, tokens, config), atol=1e-4, rtol=1e-4)


def test_vmap_over_a_leading_axis():
    w = random_weights(BASE)
    tokens = tokens_for(BASE, (3, B, T))
    out = jax.vmap(lambda t: gpt(w, t, BASE))(tokens)
    np.testing.assert_allclose(out[1], gpt_jit(w, tokens[1], BASE), atol=1e-5)


def test_loss_matches_reference_with_and_without_mask():
    w = random_weights(BASE)
    tokens, targets = tokens_for(BASE, seed=1), tokens_for(BASE, seed=2)
    ce = np_cross_entropy(np_gpt(w, tokens, BASE), targets)  # [B, T]
    np.testing.assert_allclose(
        value_and_grad_jit(w, tokens, targets, BASE)[0], ce.mean(), rtol=1e-4
    )
    mask = np.arange(T)[None, :] < np.array([[3], [8]])  # [B, T]
    np.testing.assert_allclose(
        loss_jit(w, tokens, targets, BASE, mask=mask), ce[mask].mean(), rtol=1e-4
    )
    empty = loss_jit(w, tokens, targets, BASE, mask=np.zeros((B, T), bool))
    assert float(empty) == 0.0
    # A -100 "ignore" label where the mask is 0: dropped under jit, refused eagerly before.
    ignored = np.where(mask, targets, -100)
    np.testing.assert_allclose(
        gpt_loss(w, tokens, ignored, BASE, mask=mask), ce[mask].mean(), rtol=1e-4
    )
    with pytest.raises(ValueError, match=r"gpt_loss: targets must lie in .*first: -100 at"):
        gpt_loss(w, tokens, ignored, BASE, mask=np.ones((B, T), bool))
    with pytest.raises(ValueError, match="targets"):
        gpt_loss(w, tokens, targets[:, :-1], BASE)
    with pytest.raises(ValueError, match="mask"):
        gpt_loss(w, tokens, targets, BASE, mask=mask[:, :-1])
    with pytest.raises(ValueError, match="targets"):
        gpt_loss(w, tokens, jnp.full((B, T), 13), BASE)


@pytest.mark.parametrize("config", [BASE, GQA, ROPE], ids=["learned", "gqa", "rope"])
def test_loss_and_generate_under_rank_promotion_raise(config):
    """Under jax.numpy_rank_promotion("raise") (a user's guard against their own implicit
    broadcasts) gpt, gpt_loss and generate failed inside the library: the [T, D] position
    table added to [B, T, D] embeddings, the norms' [D] scales, the biases, rope."""
    w = random_weights(config)
    tokens, targets = tokens_for(config, seed=1), tokens_for(config, seed=2)
    want = np_cross_entropy(np_gpt(w, tokens, config), targets).mean()
    run = functools.partial(generate, w, config, tokens[:, :3], 4, temperature=0.0)
    with jax.numpy_rank_promotion("raise"):
        loss, grads = jax.value_and_grad(gpt_loss)(w, tokens, targets, config)
        greedy = run()
    np.testing.assert_allclose(loss, want, rtol=1e-4)
    np.testing.assert_array_equal(greedy, run())
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------------------
# PyTorch parity: a nanoGPT-style model with copied weights
# --------------------------------------------------------------------------------------


def _torch_gpt(config: GPTConfig):
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional
    d, n = config.embed_dim, config.num_heads

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
            q, k, v = (z.view(b, t, n, c // n).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, c))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(config.vocab_size, d)
            self.wpe = nn.Embedding(config.block_size, d)
            self.h = nn.ModuleList([Block() for _ in range(config.num_layers)])
            self.ln_f = nn.LayerNorm(d)

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            return self.ln_f(x) @ self.wte.weight.T  # tied head

    return torch, GPT()


def _torch_params(model, w: GPTWeights, config: GPTConfig):
    """Pairs (torch parameter, function mapping a GPTWeights-shaped tree to its torch layout)."""
    d = config.embed_dim
    pairs = [
        (model.wte.weight, lambda t: t.token_embedding.table),
        (model.wpe.weight, lambda t: t.position_embedding.table),
        (model.ln_f.weight, lambda t: t.ln_f.scale),
        (model.ln_f.bias, lambda t: t.ln_f.bias),
    ]
    for i, blk in enumerate(model.h):

        def at(f, i=i):
            return lambda t: np.asarray(f(t.blocks))[i]

        qkv_w = lambda b: np.concatenate(
            [
                np.asarray(x).reshape(-1, d, d).transpose(0, 2, 1)
                for x in (b.attn.w_q, b.attn.w_k, b.attn.w_v)
            ],
            1,
        )
        qkv_b = lambda b: np.concatenate(
            [np.asarray(x).reshape(-1, d) for x in (b.attn.b_q, b.attn.b_k, b.attn.b_v)], 1
        )
        pairs += [
            (blk.ln_1.weight, at(lambda b: b.ln1.scale)),
            (blk.ln_1.bias, at(lambda b: b.ln1.bias)),
            (blk.c_attn.weight, at(qkv_w)),
            (blk.c_attn.bias, at(qkv_b)),
            (
                blk.c_proj.weight,
                at(lambda b: np.asarray(b.attn.w_o).reshape(-1, d, d).transpose(0, 2, 1)),
            ),
            (blk.c_proj.bias, at(lambda b: b.attn.b_o)),
            (blk.ln_2.weight, at(lambda b: b.ln2.scale)),
            (blk.ln_2.bias, at(lambda b: b.ln2.bias)),
            (blk.c_fc.weight, at(lambda b: np.asarray(b.mlp.up.w).transpose(0, 2, 1))),
            (blk.c_fc.bias, at(lambda b: b.mlp.up.b)),
            (blk.mlp_proj.weight, at(lambda b: np.asarray(b.mlp.down.w).transpose(0, 2, 1))),
            (blk.mlp_proj.bias, at(lambda b: b.mlp.down.b)),
        ]
    return pairs


def test_pytorch_parity_logits_and_gradients():
    torch, model = _torch_gpt(BASE)
    w = random_weights(BASE)
    pairs = _torch_params(model, w, BASE)
    assert len(pairs) == len(list(model.parameters()))
    with torch.no_grad():
        for param, to_torch in pairs:
            param.copy_(torch.tensor(np.asarray(to_torch(w), np.float32)))
    tokens, targets = tokens_for(BASE, seed=4), tokens_for(BASE, seed=5)

    logits_t = model(torch.tensor(np.asarray(tokens), dtype=torch.long))
    np.testing.assert_allclose(gpt_jit(w, tokens, BASE), logits_t.detach().numpy(), atol=2e-5)

    loss_t = torch.nn.functional.cross_entropy(
        logits_t.reshape(-1, BASE.vocab_size),
        torch.tensor(np.asarray(targets), dtype=torch.long).reshape(-1),
    )
    loss_t.backward()
    loss, grads = value_and_grad_jit(w, tokens, targets, BASE)
    np.testing.assert_allclose(loss, loss_t.item(), rtol=1e-5)
    for param, to_torch in pairs:
        np.testing.assert_allclose(to_torch(grads), param.grad.numpy(), atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------
# Causality
# --------------------------------------------------------------------------------------


def test_causality_by_gradient():
    """d logits[:, t] / d position_table[s] is exactly zero for every s > t."""
    w = random_weights(BASE)
    tokens = tokens_for(BASE)

    def per_position(table, tokens):  # [T]: sum of the logits at each position
        weights = w._replace(position_embedding=w.position_embedding._replace(table=table))
        return jnp.sum(gpt(weights, tokens, BASE), axis=(0, 2))

    jac = np.asarray(jax.jit(jax.jacrev(per_position))(w.position_embedding.table, tokens))
    assert jac.shape == (T, BASE.block_size, BASE.embed_dim)
    for t in range(T):
        np.testing.assert_array_equal(jac[t, t + 1 :], 0.0)
        assert np.all(np.abs(jac[t, : t + 1]).sum(-1) > 0)  # every past position matters


@pytest.mark.parametrize("config", [GQA, ROPE], ids=["gqa", "rope"])
def test_causality_by_changing_future_tokens(config):
    w = random_weights(config)
    tokens = tokens_for(config)
    base = gpt_jit(w, tokens, config)
    for t in (0, 4, T - 2):
        changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 5) % config.vocab_size)
        out = gpt_jit(w, changed, config)
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6)
        assert not np.allclose(out[:, t + 1], base[:, t + 1], atol=1e-3)


# --------------------------------------------------------------------------------------
# Dropout, remat, bfloat16
# --------------------------------------------------------------------------------------


def test_dropout():
    config = dataclasses.replace(BASE, dropout=0.3)
    w = random_weights(BASE)
    tokens = tokens_for(config)
    k1, k2 = key(1), key(2)
    evaluate = gpt_jit(w, tokens, config)
    np.testing.assert_allclose(evaluate, gpt_jit(w, tokens, config, rng=k1), atol=1e-6)
    np.testing.assert_allclose(evaluate, gpt_jit(w, tokens, BASE), atol=1e-6)  # rate unused
    train1 = gpt_jit(w, tokens, config, rng=k1, deterministic=False)
    np.testing.assert_allclose(train1, gpt_jit(w, tokens, config, rng=k1, deterministic=False))
    assert not np.allclose(train1, evaluate, atol=1e-3)
    assert not np.allclose(
        train1, gpt_jit(w, tokens, config, rng=k2, deterministic=False), atol=1e-3
    )
    # The blockwise kernel drops the same attention entries as the einsum path.
    blockwise = dataclasses.replace(config, attention_implementation="blockwise")
    np.testing.assert_allclose(
        gpt_jit(w, tokens, blockwise, rng=k1, deterministic=False), train1, atol=1e-5
    )
    with pytest.raises(ValueError, match="rng"):
        gpt(w, tokens, config, deterministic=False)
    # Rate 0 needs no key even in training mode.
    np.testing.assert_allclose(gpt_jit(w, tokens, BASE, deterministic=False), evaluate, atol=1e-6)


def test_dropout_reaches_the_attention_probabilities(monkeypatch):
    # The output checks above cannot tell attention-probability dropout from residual
    # dropout: record what every attention call is given instead.
    from jaxattn.models import gpt as gpt_module

    config = dataclasses.replace(BASE, dropout=0.3)
    w, tokens = random_weights(BASE), tokens_for(config)
    real, seen = gpt_module.dot_product_attention, []

    def spy(*args, dropout_rate=0.0, dropout_rng=None, **kwargs):
        seen.append((dropout_rate, dropout_rng is not None))
        return real(*args, dropout_rate=dropout_rate, dropout_rng=dropout_rng, **kwargs)

    monkeypatch.setattr(gpt_module, "dot_product_attention", spy)
    # Traced afresh (eval_shape): an eager call may reuse a program compiled without the spy.
    jax.eval_shape(lambda: gpt(w, tokens, config, rng=key(1), deterministic=False))
    assert seen and set(seen) == {(0.3, True)}
    seen.clear()
    jax.eval_shape(lambda: gpt(w, tokens, config, rng=key(1)))  # evaluation: no dropout
    assert seen and set(seen) == {(0.0, False)}


def test_remat_gives_same_loss_and_grads():
    remat = dataclasses.replace(BASE, remat=True)
    w = random_weights(BASE)
    tokens, targets = tokens_for(BASE, seed=6), tokens_for(BASE, seed=7)
    loss, grads = value_and_grad_jit(w, tokens, targets, BASE)
    loss_r, grads_r = value_and_grad_jit(w, tokens, targets, remat)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(g_r, g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "config",
    [BASE, UNTIED, dataclasses.replace(BASE, dtype="bfloat16")],
    ids=["tied", "untied", "bfloat16"],
)
def test_loss_chunks_give_the_same_loss_and_grads(config):
    # 11 positions in chunks of 5: the last chunk is padded. The chunks' output-layer gradients
    # add up to the whole loss's, tied (the embedding table) or untied (the head).
    chunked = dataclasses.replace(config, loss_chunk_size=5)
    w = random_weights(config)
    tokens, targets = tokens_for(config, seed=6), tokens_for(config, seed=7)
    mask = np.random.default_rng(8).random((B, T)) > 0.3
    # bfloat16 output products of [5, D] rows round differently from those of [22, D] rows:
    # the gradients differ by as much as bfloat16 and float32 ones do (~1% of the largest).
    rtol, atol = (1e-3, 6e-3) if config.dtype == "bfloat16" else (1e-6, 1e-6)
    for m in (None, mask):
        loss, grads = value_and_grad_jit(w, tokens, targets, config, mask=m)
        loss_c, grads_c = value_and_grad_jit(w, tokens, targets, chunked, mask=m)
        np.testing.assert_allclose(loss_c, loss, rtol=rtol)
        for g, g_c in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_c)):
            np.testing.assert_allclose(g_c, g, atol=atol, rtol=10 * rtol)


def test_eager_chunked_loss_reuses_its_compiled_program(assert_compiled_once):
    # The chunk loop runs over a closure built per call: eagerly it was traced and compiled
    # on every call (160 ms a call for this config).
    chunked = dataclasses.replace(BASE, loss_chunk_size=4)
    w, tokens = random_weights(BASE), tokens_for(BASE)
    assert_compiled_once({"gpt_loss": lambda: gpt_loss(w, tokens, tokens, chunked)})


def test_loss_chunks_keep_the_logits_of_one_chunk_in_memory():
    # A GPT-2-sized vocabulary: the whole loss's backward holds float32 [B, T, V] logits and
    # their gradient (bfloat16 adds a float32 copy); chunks of 8 positions hold 8 x 8 x V.
    tokens = jnp.zeros((8, 128), jnp.int32)
    logits_bytes = tokens.size * 50257 * 4  # 196 MiB

    def temp_bytes(config):
        w = jax.eval_shape(lambda key: init_gpt(key, config), jax.random.key(0))
        grad = jax.jit(jax.grad(gpt_loss), static_argnames="config")
        compiled = grad.lower(w, tokens, tokens, config=config).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    for dtype in ("float32", "bfloat16"):
        config = GPTConfig(50257, 128, 1, 2, 32, dtype=dtype)
        whole = temp_bytes(config)
        chunked = temp_bytes(dataclasses.replace(config, loss_chunk_size=8))
        assert whole > 2 * logits_bytes, (dtype, whole)
        assert chunked < logits_bytes / 4, (dtype, chunked, whole)


def test_jit_takes_the_config_as_static_without_static_argnames():
    """GPTConfig is a pytree with no leaves: plain ``jax.jit`` compiles once per config and
    gives the same numbers as static_argnames. Before, jit traced the config (its dtype field
    made JAX take it for an array) and failed with an AttributeError on a tracer."""
    w, tokens = random_weights(BASE), tokens_for(BASE)
    traced = []

    @jax.jit
    def logits(w, tokens, config):
        traced.append(config)
        return gpt(w, tokens, config)

    np.testing.assert_array_equal(logits(w, tokens, BASE), gpt_jit(w, tokens, BASE))
    np.testing.assert_array_equal(
        jax.jit(gpt_loss)(w, tokens, tokens, BASE), loss_jit(w, tokens, tokens, BASE)
    )
    logits(w, tokens, dataclasses.replace(BASE))  # an equal config: no new trace
    assert traced == [BASE]
    logits(w, tokens, dataclasses.replace(BASE, dtype="bfloat16"))
    assert [c.dtype for c in traced] == ["float32", "bfloat16"]
    assert jax.jit(lambda c: init_cache(c, 1, 4))(BASE).k.shape == init_cache(BASE, 1, 4).k.shape
    inits = jax.vmap(init_gpt, in_axes=(0, None))(jax.random.split(jax.random.key(0), 2), BASE)
    assert inits.ln_f.scale.shape == (2, BASE.embed_dim)
    assert jax.tree.leaves(BASE) == []


def test_eager_calls_reuse_their_compiled_programs(
    assert_compiled_once, assert_inlined_when_traced
):
    """Run eagerly, the layer scan over a fresh closure was traced and compiled again on
    every call (about a second each); the second call of each function now traces nothing."""
    w, tokens = random_weights(BASE), tokens_for(BASE)
    cache = init_cache(BASE, B, T)
    w_layers, cache_layers = unstack_layers(w, cache)
    start = jnp.arange(B) % 3
    calls = {
        "gpt": lambda: gpt(w, tokens, BASE),
        "gpt_loss": lambda: gpt_loss(w, tokens, tokens, BASE),
        "gpt_decode": lambda: gpt_decode(w, tokens[:, :3], cache, BASE),
        "gpt_decode, left-padded": lambda: gpt_decode(w, tokens[:, :3], cache, BASE, start=start),
        "gpt_decode, per layer": lambda: gpt_decode(w_layers, tokens[:, :3], cache_layers, BASE),
    }
    assert_compiled_once(calls)
    # Inside a trace the layers are inlined, not a nested jit: the train step's program and
    # generate's stay as they were.
    assert_inlined_when_traced("_trunk", lambda w: gpt_loss(w, tokens, tokens, BASE), w)


def test_bfloat16_compute():
    config = dataclasses.replace(BASE, dtype="bfloat16")
    w = random_weights(BASE)
    tokens, targets = tokens_for(BASE), tokens_for(BASE, seed=1)

    def loss_and_logits(w, tokens, targets):
        logits = gpt(w, tokens, config)
        return gpt_loss(w, tokens, targets, config), logits

    loss, logits = jax.jit(loss_and_logits)(w, tokens, targets)
    assert logits.dtype == loss.dtype == jnp.float32
    ref = np_gpt(w, tokens, BASE)
    err = np.abs(np.asarray(logits) - ref).max()
    assert err < 0.05 * np.abs(ref).max(), err  # bf16 keeps ~3 significant digits
    assert 0 < err  # it really ran in bfloat16
    np.testing.assert_allclose(loss, np_cross_entropy(ref, targets).mean(), rtol=0.05)
    # Gradients reach the float32 params as float32 (shapes only: no backward to compile).
    grads = jax.eval_shape(jax.grad(lambda *a: loss_and_logits(*a)[0]), w, tokens, targets)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------


def test_bad_inputs_raise():
    w = random_weights(BASE)
    with pytest.raises(ValueError, match=r"T=12.*block_size=11"):
        gpt(w, jnp.zeros((1, 12), jnp.int32), BASE)
    with pytest.raises(ValueError, match=r"\[0, 13\)"):
        gpt(w, jnp.full((1, 3), 13), BASE)
    with pytest.raises(ValueError, match=r"\[0, 13\)"):
        gpt(w, jnp.array([[0, -1, 2]]), BASE)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        gpt(w, jnp.zeros((5,), jnp.int32), BASE)
    for empty in ((2, 0), (0, 3)):  # an error in gpt's terms, not from inside attention
        with pytest.raises(ValueError, match=r"gpt: tokens must be \[B, T\] with B, T >= 1"):
            gpt(w, jnp.zeros(empty, jnp.int32), BASE)
        with pytest.raises(ValueError, match=r"gpt_loss: tokens must be \[B, T\] with B, T >= 1"):
            gpt_loss(w, jnp.zeros(empty, jnp.int32), jnp.zeros(empty, jnp.int32), BASE)
    with pytest.raises(ValueError, match="integers"):
        gpt(w, jnp.zeros((1, 3), jnp.float32), BASE)
    # Weights made for another config: fewer layers, other heads, other positions.
    tokens = jnp.zeros((1, 3), jnp.int32)
    for other in (
        dataclasses.replace(BASE, num_layers=BASE.num_layers + 1),
        dataclasses.replace(BASE, num_heads=BASE.num_heads * 2),
        dataclasses.replace(BASE, positions="rope"),
        dataclasses.replace(BASE, vocab_size=BASE.vocab_size + 1),
        dataclasses.replace(BASE, num_kv_heads=1),  # GQA weights made for MHA
    ):
        with pytest.raises(ValueError, match="gpt: weights do not fit the config"):
            gpt(w, tokens, other)
    # The parts the shapes above do not pin down: these ran silently with the wrong model
    # (tied weights under an untied config, biases under use_bias=False, a 4x MLP as 2x).
    for changes, match in (
        (dict(tie_embeddings=False), r"missing: \.head\.w"),
        (dict(use_bias=False), r"unexpected: .*\.b_q"),
        (dict(mlp_ratio=2), r"\.blocks\.mlp\.up\.w \(2, 12, 48\) != \(2, 12, 24\)"),
        (dict(block_size=12), r"\.position_embedding\.table \(11, 12\) != \(12, 12\)"),
    ):
        with pytest.raises(ValueError, match=r"gpt: the weights \(GPTWeights\) do not .*" + match):
            gpt(w, tokens, dataclasses.replace(BASE, **changes))
    untied = dataclasses.replace(BASE, tie_embeddings=False)
    with pytest.raises(ValueError, match=r"gpt_decode: the weights .* missing: \.head\.w"):
        per_layer_w, per_layer_cache = unstack_layers(w, init_cache(BASE, 1, 4))
        gpt_decode(per_layer_w, tokens, per_layer_cache, untied)
    # unstack_layers' per-layer tuple is for gpt_decode; the scan would fail obscurely.
    per_layer, _ = unstack_layers(w, init_cache(BASE, 1, BASE.block_size))
    with pytest.raises(ValueError, match="gpt: the weights hold per-layer blocks"):
        gpt(per_layer, tokens, BASE)
    # Unstacking twice, or one of weights and cache alone, is caught where it happens.
    stacked_cache = init_cache(BASE, 1, 4)
    for bad in ((per_layer, stacked_cache), (w, unstack_layers(w, stacked_cache)[1])):
        with pytest.raises(ValueError, match=r"unstack_layers: .* must both be stacked"):
            unstack_layers(*bad)
    # A cache of another depth: the weights were cut to its depth, or (indexing past L
    # clamps) given a copy of their last layer, and gpt_decode then blamed the weights.
    for depth in (BASE.num_layers - 1, BASE.num_layers + 1):
        other = init_cache(dataclasses.replace(BASE, num_layers=depth), 1, 4)
        with pytest.raises(
            ValueError, match=rf"unstack_layers: .* \[2\] layers and the cache {depth}"
        ):
            unstack_layers(w, other)


def test_int64_ids_are_checked_before_the_int32_conversion():
    # jnp.asarray (64-bit types off) wraps the int64 id 2**32 + 5 to 5: it passed the range
    # check and silently read token 5 (and scored target 5).
    w = random_weights(BASE)
    wrapped = np.array([[1, 2**32 + 5]], np.int64)
    ok = np.array([[1, 2]], np.int64)
    with pytest.raises(ValueError, match=r"gpt: token ids must lie in \[0, 13\)"):
        gpt(w, wrapped, BASE)
    with pytest.raises(ValueError, match=r"gpt_loss: targets must lie in \[0, 13\)"):
        gpt_loss(w, ok, wrapped, BASE)
    with pytest.raises(ValueError, match=r"gpt_decode: token ids must lie in \[0, 13\)"):
        gpt_decode(w, wrapped, init_cache(BASE, 1, 4), BASE)
    # In-range int64 ids and lists still work.
    np.testing.assert_array_equal(gpt(w, ok, BASE), gpt(w, [[1, 2]], BASE))


def test_weight_decay_groups_match_nanogpt():
    v, t, d, n_layers = 65, 64, 128, 4
    model = GPTConfig(
        vocab_size=v, block_size=t, num_layers=n_layers, num_heads=4, embed_dim=d, use_bias=True
    )
    weights = jax.eval_shape(lambda: init_gpt(jax.random.key(0), model))
    mask = weight_decay_mask(weights)
    leaves = zip(jax.tree.leaves(weights), jax.tree.leaves(mask), strict=True)
    sizes = [(int(np.prod(w.shape)), m) for w, m in leaves]
    # nanoGPT decays every 2-D tensor: wte, wpe, and per layer c_attn, c_proj, c_fc, mlp.c_proj.
    decayed = v * d + t * d + n_layers * (d * 3 * d + d * d + d * 4 * d + 4 * d * d)
    # ... and not the 1-D ones: per layer ln_1 and ln_2 (weight, bias) and four biases, ln_f.
    not_decayed = n_layers * (4 * d + 3 * d + d + 4 * d + d) + 2 * d
    assert sum(size for size, m in sizes if m) == decayed
    assert sum(size for size, m in sizes if not m) == not_decayed


def test_config_takes_numpy_bools():
    config = GPTConfig(
        vocab_size=11, block_size=8, num_layers=1, num_heads=2, embed_dim=8,
        use_bias=np.False_, tie_embeddings=np.True_,
    )  # fmt: skip
    assert not config.use_bias and config.tie_embeddings


def test_rope_base_and_layer_norm_eps_reach_the_model():
    # Every other test runs both at their defaults, where a block that dropped either
    # one (for q or k, or for one of the norms) still matched the reference.
    config = dataclasses.replace(ROPE, rope_base=7.0, layer_norm_eps=0.5)
    w, tokens = random_weights(config), tokens_for(config)
    np.testing.assert_allclose(gpt_jit(w, tokens, config), np_gpt(w, tokens, config), atol=1e-4)


def test_dropout_draws_a_fresh_mask_at_every_site(monkeypatch):
    # Outputs cannot tell two residual branches dropped with one key (the same mask for
    # both): record the key of every dropout call as it runs.
    from jaxattn.models import gpt as gpt_module

    config = dataclasses.replace(BASE, dropout=0.3)
    w, tokens = random_weights(BASE), tokens_for(config)
    real, seen = gpt_module.dropout, []

    def spy(rng, x, rate, **kw):
        if rng is not None:
            record = lambda k: seen.append(np.asarray(k).tobytes())
            jax.debug.callback(record, jax.random.key_data(rng))
        return real(rng, x, rate, **kw)

    monkeypatch.setattr(gpt_module, "dropout", spy)
    # Under a fresh jit, so that the spy is traced in (an eager call may reuse a program).
    run = jax.jit(lambda w: gpt(w, tokens, config, rng=key(1), deterministic=False))
    jax.block_until_ready(run(w))
    jax.effects_barrier()
    # The embeddings, then two residual branches per layer, each with its own key.
    assert len(seen) == 1 + 2 * config.num_layers and len(set(seen)) == len(seen)


def test_remat_keeps_only_the_block_inputs_for_the_backward_pass():
    # remat changes no value: count what the backward pass keeps from the layer scan.
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    w, tokens = random_weights(BASE), tokens_for(BASE)

    def scan_residuals(config):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(lambda w: gpt_loss(w, tokens, tokens, config), w)
        return [line for line in out.getvalue().splitlines() if "output of scan" in line]

    kept = scan_residuals(dataclasses.replace(BASE, remat=True))
    assert len(kept) == 1 and kept[0].startswith(f"f32[2,{B},{T},12] ")  # [L, B, T, D] inputs
    assert len(scan_residuals(BASE)) > 1  # without remat: matmul outputs too


def test_swapped_arguments_name_the_argument_order():
    """generate takes (weights, config, prompt, ...), gpt (weights, tokens, config): a
    prompt passed where the config goes failed as "tokens must be [B, T] ... got shape ()"."""
    w, tokens = random_weights(BASE), jnp.zeros((1, 3), jnp.int32)
    from jaxattn.models import gpt as gpt_module

    with pytest.raises(
        TypeError,
        match=r"generate: config must be a GPTConfig, got \w+; the "
        r"arguments are generate\(weights, config, prompt, max_new_tokens\)",
    ):
        gpt_module.generate(w, tokens, BASE, 2, temperature=0.0)
    with pytest.raises(TypeError, match=r"gpt: config must be a GPTConfig.*gpt\(weights, tokens"):
        gpt_module.gpt(w, BASE, tokens)
    with pytest.raises(TypeError, match=r"gpt_loss: config must be a GPTConfig"):
        gpt_module.gpt_loss(w, tokens, tokens, tokens)
    # As transformer.init_cache: it was "AttributeError: 'int' object has no attribute".
    with pytest.raises(
        TypeError,
        match=r"init_cache: config must be a GPTConfig, got int; the arguments are "
        r"init_cache\(config, batch_size, max_len\)",
    ):
        gpt_module.init_cache(1, BASE, 4)


def test_gpt_decode_refuses_a_hand_made_cache_past_the_model():
    """init_cache refuses these; a cache built by hand reached the model: positions past
    the learned table embedded as NaN, and index -1 as the last position."""
    w = random_weights(BASE)
    tokens = jnp.array([[1]])
    longer = init_cache(dataclasses.replace(BASE, block_size=14), 1, 14)._replace(index=11)
    with pytest.raises(ValueError, match=r"gpt_decode: the cache holds S=14 .*block_size=11"):
        gpt_decode(w, tokens, longer, BASE)
    negative = init_cache(BASE, 1, 4)._replace(index=jnp.int32(-1))
    with pytest.raises(ValueError, match=r"gpt_decode: cache.index must be >= 0, got -1"):
        gpt_decode(w, tokens, negative, BASE)
    # A float or [1] index failed inside take or int(), naming neither the cache nor its index.
    for bad, shown in [(jnp.float32(0.0), r"float32 of shape \(\)"), (jnp.array([0]), r"\(1,\)")]:
        with pytest.raises(
            ValueError, match=rf"gpt_decode: cache.index must be an integer.*{shown}"
        ):
            gpt_decode(w, tokens, init_cache(BASE, 1, 4)._replace(index=bad), BASE)


def test_weights_that_are_not_gpt_weights_raise_naming_the_difference():
    """A dict of the same arrays (an orbax restore without a target), another model's
    weights or None failed as "AttributeError: 'dict' object has no attribute 'blocks'"."""
    from jaxattn.models import gpt as gpt_module

    w = random_weights(BASE)
    tokens = tokens_for(BASE)
    as_dict = jax.tree.map(lambda x: x, w._asdict())
    for bad, kind in [(as_dict, "dict"), (None, "NoneType"), (tuple(w), "tuple")]:
        with pytest.raises(ValueError, match=rf"gpt: the weights \({kind}\) do not match"):
            gpt(bad, tokens, BASE)
        with pytest.raises(ValueError, match=rf"gpt_loss: the weights \({kind}\) do not match"):
            gpt_loss(bad, tokens, tokens, BASE)
        with pytest.raises(ValueError, match=rf"generate: the weights \({kind}\) do not match"):
            gpt_module.generate(bad, BASE, tokens[:, :2], 1, temperature=0)
        with pytest.raises(ValueError, match=rf"gpt_decode: the weights \({kind}\) do not"):
            gpt_decode(bad, tokens[:, :2], init_cache(BASE, B, 4), BASE)


def test_caches_and_weights_of_the_wrong_kind_raise_naming_the_argument():
    """A cache that is no KVCache (a restored dict, a plain (k, v, index) tuple, None) failed
    as "AttributeError: 'dict' object has no attribute 'k'", as did unstack_layers' weights
    ("... no attribute 'blocks'"); an integer cache, which init_cache refuses, truncated
    every key and value and silently gave wrong logits."""
    w = random_weights(BASE)
    tokens = tokens_for(BASE)[:, :2]
    cache = init_cache(BASE, B, 4)
    for bad, kind in [(cache._asdict(), "dict"), (tuple(cache), "tuple"), (None, "NoneType")]:
        with pytest.raises(ValueError, match=rf"gpt_decode: cache must be a KVCache.*got {kind}"):
            gpt_decode(w, tokens, bad, BASE)
        with pytest.raises(ValueError, match=rf"unstack_layers: cache must be a KVCache.*{kind}"):
            unstack_layers(w, bad)
    for bad, kind in [(w._asdict(), "dict"), (None, "NoneType")]:
        with pytest.raises(
            ValueError, match=rf"unstack_layers: weights must be GPTWeights.*{kind}"
        ):
            unstack_layers(bad, cache)
    ints = cache._replace(k=cache.k.astype(jnp.int32), v=cache.v.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"gpt_decode: cache.k must be floating.*int32"):
        gpt_decode(w, tokens, ints, BASE)
    per_layer = unstack_layers(w, cache)
    per_layer_ints = per_layer[1]._replace(v=tuple(v.astype(jnp.int32) for v in per_layer[1].v))
    with pytest.raises(ValueError, match=r"gpt_decode: cache.v must be floating.*int32"):
        gpt_decode(per_layer[0], tokens, per_layer_ints, BASE)


def test_dropout_rng_that_is_not_one_key_raises_naming_rng():
    """An int seed or a batch of keys failed inside jax.random ("invalid PRNG key data",
    "split accepts a single key"), naming neither gpt nor rng, where generate and nn.GPT
    name it; unused (dropout off), such an rng is still ignored."""
    config = dataclasses.replace(BASE, dropout=0.1)
    w, tokens = random_weights(config), tokens_for(config)
    for bad, shown in [(0, "0"), (jax.random.split(key(0), 2), r"\(2,\)")]:
        with pytest.raises(ValueError, match=rf"gpt: dropout > 0 .*one PRNG key.*got .*{shown}"):
            gpt(w, tokens, config, rng=bad, deterministic=False)
        with pytest.raises(ValueError, match=r"gpt_loss: dropout > 0 .*one PRNG key"):
            gpt_loss(w, tokens, tokens, config, rng=bad, deterministic=False)
        gpt(w, tokens, config, rng=bad)  # deterministic: the key is not used
    raw = jax.random.PRNGKey(0)  # raw uint32 keys stay accepted
    assert jnp.isfinite(gpt(w, tokens, config, rng=raw, deterministic=False)).all()
