"""benchmarks/torch_nanogpt.py: the PyTorch peer's KV-cache decoding matches its full pass."""

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.torch_nanogpt import NanoGPT  # noqa: E402


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
