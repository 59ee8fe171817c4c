"""benchmarks/torch_nanogpt.py: the PyTorch peer's KV-cache decoding matches its full pass,
and with jaxattn's weights it trains and generates as jaxattn does (so that the benchmarks
time the same work on both sides)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import gpt as gpt_bench  # noqa: E402
from benchmarks.torch_nanogpt import NanoGPT, learning_rate, make_optimizer  # noqa: E402
from jaxattn.models import gpt  # noqa: E402
from jaxattn.training.metrics import reduce_means  # noqa: E402

sys.path.insert(0, str(REPO / "train"))
from configs import shakespeare_char_cpu  # noqa: E402


def _net(block: int = 12) -> NanoGPT:
    torch.manual_seed(0)
    net = NanoGPT(vocab=11, block=block, layers=2, heads=2, dim=16)
    # nanoGPT's init (N(0, 0.02)) leaves the logits nearly uniform; larger weights make a
    # wrong cache show in the comparison.
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(5.0)
    return net.eval()


def test_cached_decode_gives_the_full_pass_logits_at_every_position():
    net = _net()
    ids = torch.randint(0, 11, (3, 12))
    full = net.hidden(ids) @ net.wte.weight.T  # [B, T, V]
    prompt = 4
    logits, caches = net.decode(ids[:, :prompt], 0, None)
    torch.testing.assert_close(logits, full[:, prompt - 1], rtol=1e-4, atol=1e-4)
    for t in range(prompt, 12):
        logits, caches = net.decode(ids[:, t : t + 1], t, caches)
        torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-4)
    assert caches[0][0].shape == (3, 2, 12, 8)  # (B, nh, S, hs): every position cached


def test_generate_cached_draws_the_tokens_generate_draws():
    net = _net()
    prompt = torch.tensor([[1, 2, 3]])
    torch.manual_seed(5)
    uncached = net.generate(prompt, 9, temperature=0.9, top_k=4)
    torch.manual_seed(5)
    cached = net.generate_cached(prompt, 9, temperature=0.9, top_k=4)
    assert cached.shape == (1, 12)
    assert torch.equal(cached, uncached)


def test_cached_decoding_stops_at_block_size():
    net = _net(block=8)
    with pytest.raises(ValueError, match="need 9 positions, more than block_size=8"):
        net.generate_cached(torch.tensor([[1, 2, 3]]), 7)
    assert net.generate_cached(torch.tensor([[1, 2, 3]]), 6).shape == (1, 9)  # 8 positions
    _, caches = net.decode(torch.tensor([[1]]), 0, None)
    with pytest.raises(ValueError, match="positions up to 8 exceed block_size=8"):
        net.decode(torch.tensor([[2]]), 8, caches)
    with pytest.raises(ValueError, match="one new token, got T=2"):
        net.decode(torch.tensor([[2, 3]]), 1, caches)


def _ported(weights: gpt.GPTWeights, config: gpt.GPTConfig) -> NanoGPT:
    """A NanoGPT holding jaxattn's (bias-free, tied) GPT weights."""
    d, n = config.embed_dim, config.num_heads
    net = NanoGPT(config.vocab_size, config.block_size, config.num_layers, n, d)
    w = jax.tree.map(lambda a: torch.from_numpy(np.array(a)), weights)
    with torch.no_grad():
        net.wte.weight.copy_(w.token_embedding.table)
        net.wpe.weight.copy_(w.position_embedding.table)
        net.ln_f.weight.copy_(w.ln_f.scale)
        for i, block in enumerate(net.blocks):
            b = jax.tree.map(lambda a, i=i: a[i], w.blocks)
            block.ln_1.weight.copy_(b.ln1.scale)
            block.ln_2.weight.copy_(b.ln2.scale)
            qkv = [m.reshape(d, d) for m in (b.attn.w_q, b.attn.w_k, b.attn.w_v)]
            block.c_attn.weight.copy_(torch.cat(qkv, dim=1).T)  # [3D, D]
            block.c_proj.weight.copy_(b.attn.w_o.reshape(d, d).T)
            block.c_fc.weight.copy_(b.mlp.up.w.T)
            block.mlp_proj.weight.copy_(b.mlp.down.w.T)
    return net


def test_the_benchmarked_train_steps_do_the_same_work():
    """gpt.py times jax_train_step against NanoGPT + make_optimizer: from the same weights
    and batches, three steps (warmup learning rates, clipping, AdamW with decay on matrices
    only) give the same losses and parameters."""
    run = shakespeare_char_cpu.get_config()
    config = gpt_bench.model_config(run)
    step, state = gpt_bench.jax_train_step(run, config)
    net = _ported(state.params, config)
    opt = make_optimizer(net, run.learning_rate, run.weight_decay, (run.b1, run.b2))
    schedule = (run.learning_rate, run.min_lr, run.warmup_steps, run.lr_decay_steps)
    gen = np.random.default_rng(0)
    for i in range(3):
        x, y = (gen.integers(0, config.vocab_size, (run.batch_size, 64)) for _ in range(2))
        batch = {"inputs": jnp.asarray(x, jnp.int32), "targets": jnp.asarray(y, jnp.int32)}
        state, metrics = step(state, batch)
        for group in opt.param_groups:
            group["lr"] = learning_rate(i, *schedule)
        loss = net(torch.from_numpy(x), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), run.grad_clip)
        opt.step()
        jax_loss = reduce_means([metrics])["train_loss"]
        np.testing.assert_allclose(jax_loss, loss.item(), rtol=1e-5)
    after = _ported(state.params, config).state_dict()
    for name, value in net.state_dict().items():
        np.testing.assert_allclose(value.numpy(), after[name].numpy(), atol=2e-6, err_msg=name)


def test_uncached_generate_crops_the_context_as_jaxattn_does():
    """NanoGPT.generate past block_size (the KV-cache target's baseline) gives jaxattn's
    greedy tokens: both see only the last block_size tokens, at positions 0..block-1."""
    config = gpt_bench.model_config(
        shakespeare_char_cpu.get_config(), block_size=8, num_layers=2, num_heads=2, embed_dim=16
    )
    # Large weights, so that the greedy tokens are far from ties.
    weights = jax.tree.map(lambda a: 8 * a, gpt.init_gpt(jax.random.key(3), config))
    prompt = np.array([[1, 2, 3]])
    want = gpt.generate(weights, config, jnp.asarray(prompt, jnp.int32), 17, temperature=0.0)
    got = _ported(weights, config).eval().generate(torch.from_numpy(prompt), 17, top_k=1)
    assert got.shape == (1, 20)  # 12 tokens past the 8-token context
    np.testing.assert_array_equal(got.numpy(), np.asarray(want))
