"""torch.nn.LSTM <-> jaxattn LSTM stack: parity after import, exact round trip, errors."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxattn.interop.torch_lstm import lstm_from_torch, lstm_to_torch_state_dict  # noqa: E402
from jaxattn.ops.lstm import BidirectionalWeights, LSTMWeights, lstm_stack  # noqa: E402

D_IN, H, B, T = 5, 7, 3, 11


def _torch_lstm(layers, bidirectional, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.LSTM(
        D_IN, H, num_layers=layers, bidirectional=bidirectional, bias=bias, batch_first=True
    ).eval()


@pytest.mark.parametrize(
    ("layers", "bidirectional", "bias"),
    [(1, False, True), (2, False, True), (3, True, True), (2, True, False)],
)
def test_import_matches_torch(layers, bidirectional, bias):
    module = _torch_lstm(layers, bidirectional, bias)
    weights = lstm_from_torch(module)
    assert len(weights) == layers
    kind = BidirectionalWeights if bidirectional else LSTMWeights
    assert all(isinstance(w, kind) for w in weights)
    xs = np.random.default_rng(0).normal(size=(B, T, D_IN)).astype(np.float32)
    with torch.no_grad():
        want_ys, (want_h, want_c) = module(torch.tensor(xs))
    ys, (h, c) = lstm_stack(weights, xs)
    np.testing.assert_allclose(np.asarray(ys), want_ys.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), want_h.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(c), want_c.numpy(), atol=1e-5)


def test_state_dict_with_prefix_and_numpy_values():
    module = _torch_lstm(2, True)
    state = {f"encoder.rnn.{k}": v.numpy() for k, v in module.state_dict().items()}
    state["encoder.embedding.weight"] = np.zeros((3, 5), np.float32)  # ignored: other prefix
    got = lstm_from_torch(state, prefix="encoder.rnn.")
    want = lstm_from_torch(module)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    sd = module.state_dict()
    np.testing.assert_array_equal(
        np.asarray(got[1].backward.w_hh), sd["weight_hh_l1_reverse"].numpy().T
    )
    np.testing.assert_array_equal(
        np.asarray(got[0].forward.b), (sd["bias_ih_l0"] + sd["bias_hh_l0"]).numpy()
    )


@pytest.mark.parametrize("bidirectional", [False, True])
def test_round_trip_through_torch_is_exact(bidirectional):
    weights = lstm_from_torch(_torch_lstm(2, bidirectional, seed=1))
    target = _torch_lstm(2, bidirectional, seed=2)
    target.load_state_dict(lstm_to_torch_state_dict(weights))  # strict: every name matches
    assert not target.bias_hh_l0.detach().any()  # the whole bias goes to bias_ih
    back = lstm_from_torch(target)
    assert jax.tree.structure(back) == jax.tree.structure(weights)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(weights)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np_sd = lstm_to_torch_state_dict(weights, framework="np", prefix="rnn.")
    assert all(isinstance(v, np.ndarray) for v in np_sd.values())
    assert np_sd["rnn.weight_ih_l1"].shape == (4 * H, (2 if bidirectional else 1) * H)


def test_errors_name_the_tensor():
    state = dict(_torch_lstm(2, False).state_dict())
    del state["bias_hh_l1"]
    with pytest.raises(KeyError, match="bias_hh_l1"):
        lstm_from_torch(state)
    state = dict(_torch_lstm(2, False).state_dict())
    state["weight_ih_l1"] = torch.zeros(4 * H, H + 1)
    with pytest.raises(ValueError, match=r"weight_ih_l1.*\(28, 8\).*\(28, 7\)"):
        lstm_from_torch(state)
    with pytest.raises(KeyError, match="no LSTM tensors"):
        lstm_from_torch({"weight": torch.zeros(3)})
    proj = torch.nn.LSTM(D_IN, H, proj_size=3)
    with pytest.raises(ValueError, match="proj_size"):
        lstm_from_torch(proj)


@pytest.mark.parametrize("shape", [(), (4 * H,)])
def test_a_first_weight_ih_that_is_not_a_matrix_is_named(shape):
    # Its last axis was read as the input size: a 0-d tensor raised a bare IndexError, and a
    # 1-d one was "expected (28, 28)", an input size the checkpoint never had.
    state = dict(_torch_lstm(1, False).state_dict())
    state["weight_ih_l0"] = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"'weight_ih_l0' has shape .*an LSTM's is \[4h, I\]"):
        lstm_from_torch(state)


def test_a_reverse_direction_of_another_input_size_is_named():
    # Layer 0's reverse direction must read the forward's input size, not its own.
    state = dict(_torch_lstm(1, True).state_dict())
    state["weight_ih_l0_reverse"] = torch.zeros(4 * H, D_IN + 2)
    with pytest.raises(ValueError, match=r"weight_ih_l0_reverse.*\(28, 7\).*\(28, 5\)"):
        lstm_from_torch(state)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_keep_their_dtype_both_ways(dtype):
    torch_dtype = getattr(torch, dtype)
    state = {k: v.to(torch_dtype) for k, v in _torch_lstm(1, True).state_dict().items()}
    layers = lstm_from_torch(state)
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(layers)} == {dtype}
    back = lstm_to_torch_state_dict(layers)
    for name, tensor in state.items():  # (the two biases come back as their sum and 0)
        assert back[name].dtype == torch_dtype
        assert name.startswith("bias") or torch.equal(back[name], tensor), name


def test_export_refuses_a_stack_torch_cannot_load():
    # Each exported before and was refused by torch's load_state_dict (missing or
    # unexpected keys) or failed naming nothing.
    bi, uni = lstm_from_torch(_torch_lstm(1, True))[0], lstm_from_torch(_torch_lstm(1, False))[0]
    with pytest.raises(ValueError, match=r"lstm_to_torch_state_dict: .*mixed uni- and bidir"):
        lstm_to_torch_state_dict((bi, uni))
    with pytest.raises(ValueError, match=r"lstm_to_torch_state_dict: not an LSTM stack"):
        lstm_to_torch_state_dict((uni, uni))  # layer 1 reads h = 7 inputs, not D_IN = 5
    with pytest.raises(ValueError, match=r"lstm_to_torch_state_dict: not an LSTM stack"):
        lstm_to_torch_state_dict((uni._replace(b=None),))
    state = dict(_torch_lstm(1, True).state_dict(), weight_ih_l0_reversed=torch.zeros(1))
    with pytest.raises(
        ValueError, match=r"lstm_from_torch: 1 tensor\(s\) .* 'weight_ih_l0_reversed'"
    ):
        lstm_from_torch(state)  # was dropped silently
    lstm_from_torch(state, strict=False)
    # None said "got no layers", a dict "layer 0: expected LSTMWeights, got <class 'str'>".
    for wrong in (None, {"a": uni}):
        with pytest.raises(TypeError, match=r"expected a tuple of .* got (NoneType|dict)"):
            lstm_to_torch_state_dict(wrong)


def test_an_inconsistent_weight_hh_or_another_rnn_is_named():
    """weight_hh [18, 5] is no LSTM's; a GRU ([3h, h]) or RNN ([h, h]) is said to be one."""
    state = dict(_torch_lstm(1, False).state_dict())
    state["weight_hh_l0"] = torch.zeros(18, 5)
    with pytest.raises(ValueError, match=r"'weight_hh_l0' has shape \(18, 5\): an LSTM's is \["):
        lstm_from_torch(state)
    for cls, layout in [(torch.nn.GRU, r"GRU's \[3h, h\]"), (torch.nn.RNN, r"RNN's \[h, h\]")]:
        with pytest.raises(ValueError, match=rf"got a torch\.nn\.{cls.__name__}, not an LSTM"):
            lstm_from_torch(cls(D_IN, H, num_layers=2))
        state = cls(D_IN, H, num_layers=2).state_dict()
        with pytest.raises(ValueError, match=rf"'weight_hh_l0' has shape .*{layout}: not an LSTM"):
            lstm_from_torch(state)


# torch.compile imports torch._dynamo, whose TorchScript parts warn that they are deprecated.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_a_compiled_module_reads_as_the_module_it_wraps():
    """torch.compile's wrapper prefixes its state dict's names with "_orig_mod.": the LSTM
    it wraps is read (the same weights), and a wrapped GRU is still named as one."""
    module = _torch_lstm(2, True)
    got, want = lstm_from_torch(torch.compile(module)), lstm_from_torch(module)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"got a torch\.nn\.GRU, not an LSTM"):
        lstm_from_torch(torch.compile(torch.nn.GRU(D_IN, H)))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_bias_free_export_loads_into_a_bias_free_torch_lstm(bidirectional):
    weights = lstm_from_torch(_torch_lstm(2, bidirectional, bias=False))  # b = 0
    target = _torch_lstm(2, bidirectional, bias=False, seed=3)
    target.load_state_dict(lstm_to_torch_state_dict(weights, bias=False), strict=True)
    back = lstm_from_torch(target)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(weights), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with_bias = lstm_from_torch(_torch_lstm(2, bidirectional))
    with pytest.raises(ValueError, match=r"bias=False but layer 0 has a nonzero b"):
        lstm_to_torch_state_dict(with_bias, bias=False)
    # One nonzero entry is enough (random biases are nonzero everywhere, so "any" and
    # "all" would not differ on them).
    first = weights[0].forward if bidirectional else weights[0]
    one = first._replace(b=first.b.at[3].set(1.0))
    layer0 = weights[0]._replace(forward=one) if bidirectional else one
    with pytest.raises(
        ValueError, match=r"bias=False but layer 0 has a nonzero b \(max \|b\| = 1\)"
    ):
        lstm_to_torch_state_dict((layer0, weights[1]), bias=False)
    if bidirectional:  # only the backward bias is nonzero: the message says so
        layer0 = BidirectionalWeights(weights[0].forward, with_bias[0].backward)
        with pytest.raises(ValueError, match=r"layer 0 \(reverse direction\) has a nonzero b"):
            lstm_to_torch_state_dict((layer0, weights[1]), bias=False)


def test_a_jaxattn_nn_lstm_module_exports_its_pure_weights():
    from flax import nnx

    from jaxattn import nn

    module = nn.LSTM(D_IN, H, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    got = lstm_to_torch_state_dict(module, framework="np")
    want = lstm_to_torch_state_dict(module.pure_weights(), framework="np")
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_a_single_layer_not_in_a_tuple_is_named():
    (layer,) = lstm_from_torch(_torch_lstm(1, False))
    with pytest.raises(ValueError, match=r"expected a tuple of layers.*single LSTMWeights"):
        lstm_to_torch_state_dict(layer)
    assert (
        lstm_to_torch_state_dict((layer,), framework="np").keys()
        == _torch_lstm(1, False).state_dict().keys()
    )


@pytest.mark.parametrize("bias", [True, False])
def test_a_prefixed_export_names_every_tensor_with_the_prefix(bias):
    module = _torch_lstm(2, True, bias=bias)
    state = lstm_to_torch_state_dict(lstm_from_torch(module), prefix="encoder.rnn.", bias=bias)
    assert set(state) == {f"encoder.rnn.{k}" for k in module.state_dict()}
    back = lstm_from_torch(state, prefix="encoder.rnn.")
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lstm_from_torch(module)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tensors_under_another_prefix_or_an_lstm_cell_are_named():
    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(3, D_IN)
            self.rnn = torch.nn.LSTM(D_IN, H, num_layers=2)

    # A whole model, or a prefix without its dot: the error says where the tensors are.
    for prefix in ("", "rnn"):
        with pytest.raises(KeyError, match=r"under \['rnn\.'\]: pass prefix='rnn\.'"):
            lstm_from_torch(Encoder(), prefix=prefix)
    with pytest.raises(KeyError, match="LSTMCell"):
        lstm_from_torch(torch.nn.LSTMCell(D_IN, H))
