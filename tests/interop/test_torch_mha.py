"""torch.nn.MultiheadAttention <-> MultiHeadAttentionWeights: parity, round trip, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxattn.interop.torch_mha import mha_from_torch, mha_to_torch_state_dict  # noqa: E402
from jaxattn.ops.attention import multi_head_attention  # noqa: E402

E, N, B, T, S = 15, 3, 2, 7, 5  # head dim 5


def _mha(seed=0, **kwargs):
    torch.manual_seed(seed)
    module = torch.nn.MultiheadAttention(E, N, batch_first=True, **kwargs).eval()
    with torch.no_grad():  # torch initialises biases to zero; make them matter
        for name, p in module.named_parameters():
            if "bias" in name:
                p.copy_(torch.randn_like(p))
    return module


@pytest.mark.parametrize("bias", [True, False])
def test_self_attention_matches_torch(bias):
    module = _mha(bias=bias)
    weights = mha_from_torch(module)
    assert (weights.b_q is None) == (not bias)
    assert weights.w_q.shape == (E, N, E // N) and weights.w_o.shape == (N, E // N, E)
    x = np.random.default_rng(0).normal(size=(B, T, E)).astype(np.float32)
    causal = np.tril(np.ones((T, T), bool))
    with torch.no_grad():
        want, _ = module(*[torch.tensor(x)] * 3, attn_mask=torch.tensor(~causal))  # True = hide
    got = multi_head_attention(weights, x, mask=causal)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)


def test_cross_attention_kdim_matches_torch():
    kdim = 11
    module = _mha(seed=1, kdim=kdim, vdim=kdim)
    weights = mha_from_torch(module.state_dict(), num_heads=N)
    assert weights.w_k.shape == (kdim, N, E // N)
    gen = np.random.default_rng(1)
    x_q = gen.normal(size=(B, T, E)).astype(np.float32)
    x_kv = gen.normal(size=(B, S, kdim)).astype(np.float32)
    keep = np.arange(S)[None, :] < np.array([S, 2])[:, None]  # [B, S] key padding
    with torch.no_grad():
        want, _ = module(
            torch.tensor(x_q), torch.tensor(x_kv), torch.tensor(x_kv),
            key_padding_mask=torch.tensor(~keep),
        )  # fmt: skip
    got = multi_head_attention(weights, x_q, x_kv, mask=keep[:, None, None, :])
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs", [{}, {"bias": False}, {"kdim": 11, "vdim": 11}, {"kdim": 11, "vdim": 13}]
)
def test_round_trip_through_torch_is_exact(kwargs):
    weights = mha_from_torch(_mha(seed=2, **kwargs))
    target = _mha(seed=3, **kwargs)
    target.load_state_dict(mha_to_torch_state_dict(weights))  # strict: names and layout
    back = mha_from_torch(target)
    assert jax.tree.structure(back) == jax.tree.structure(weights)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(weights)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if "vdim" in kwargs:
        assert back.w_v.shape == (kwargs["vdim"], N, E // N)


def test_bfloat16_weights_export_to_torch_bfloat16():
    from jaxattn.ops.attention import init_multi_head_attention

    weights = init_multi_head_attention(jax.random.key(0), E, N, dtype=jnp.bfloat16)
    state = mha_to_torch_state_dict(weights)
    assert state["in_proj_weight"].dtype == torch.bfloat16
    back = mha_from_torch(state, num_heads=N)  # bfloat16 again, as float16 stays float16
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(weights)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# torch.compile imports torch._dynamo, whose TorchScript parts warn that they are deprecated.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_errors():
    state = dict(_mha().state_dict())
    del state["out_proj.bias"]
    with pytest.raises(KeyError, match=r"out_proj\.bias"):
        mha_from_torch(state, num_heads=N)
    state = dict(_mha().state_dict())
    state["in_proj_weight"] = torch.zeros(3 * E, E + 1)
    with pytest.raises(ValueError, match=r"in_proj_weight.*\(45, 16\).*\(45, 15\)"):
        mha_from_torch(state, num_heads=N)
    with pytest.raises(ValueError, match="num_heads"):
        mha_from_torch(_mha().state_dict())
    with pytest.raises(ValueError, match="add_bias_kv"):
        mha_from_torch(_mha(add_bias_kv=True))
    state = dict(_mha().state_dict(), in_proj_wieght=torch.zeros(1))  # was dropped silently
    with pytest.raises(ValueError, match=r"1 tensor\(s\) .* 'in_proj_wieght'"):
        mha_from_torch(state, num_heads=N)
    mha_from_torch(state, num_heads=N, strict=False)
    # Under a prefix only that module's tensors count.
    whole = {f"layers.0.self_attn.{k}": v for k, v in _mha().state_dict().items()}
    whole["layers.0.norm.weight"] = torch.zeros(E)
    mha_from_torch(whole, num_heads=N, prefix="layers.0.self_attn.")
    whole["layers.0.self_attn.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"under prefix 'layers\.0\.self_attn\.' .*\.extra'"):
        mha_from_torch(whole, num_heads=N, prefix="layers.0.self_attn.")
    for wrong in (None, (1, 2)):  # were "'NoneType' object is not subscriptable" / "unpack"
        with pytest.raises(TypeError, match="expected MultiHeadAttentionWeights"):
            mha_to_torch_state_dict(wrong)
    weights = mha_from_torch(_mha())
    with pytest.raises(ValueError, match="all four biases"):
        mha_to_torch_state_dict(weights._replace(b_o=None))
    state = dict(_mha().state_dict(), **{"out_proj.weight": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"'out_proj\.weight' has shape \(\), expected \[E, E\]"):
        mha_from_torch(state, num_heads=N)  # was an IndexError
    # Another module (it used to be told to pass num_heads=); a subclass is taken.
    layer = torch.nn.TransformerEncoderLayer(E, N, batch_first=True)
    with pytest.raises(ValueError, match=r"type TransformerEncoderLayer .*layer\.self_attn"):
        mha_from_torch(layer, prefix="self_attn.")
    mha_from_torch(layer.self_attn)
    subclass = type("MyAttention", (torch.nn.MultiheadAttention,), {})(E, N, batch_first=True)
    assert mha_from_torch(subclass).w_q.shape == (E, N, E // N)
    # A torch.compile'd module reads as the module it wraps (its state dict's names carry
    # "_orig_mod."). torch.compile wraps lazily: nothing compiles until a call.
    module = _mha()
    for got, want in zip(mha_from_torch(torch.compile(module)), mha_from_torch(module)):
        np.testing.assert_array_equal(got, want)


def test_a_lone_bias_or_conflicting_options_are_errors_not_silent():
    state = dict(_mha().state_dict())
    del state["in_proj_bias"]  # out_proj.bias alone must not be dropped as if bias=False
    with pytest.raises(KeyError, match=r"in_proj_bias"):
        mha_from_torch(state, num_heads=N)
    with pytest.raises(ValueError, match=r"num_heads=5 but the module has num_heads=3"):
        mha_from_torch(_mha(), num_heads=5)  # would split the same matrices into other heads
    assert mha_from_torch(_mha(), num_heads=N).w_q.shape == (E, N, E // N)
    with pytest.raises(ValueError, match="add_zero_attn"):
        mha_from_torch(_mha(add_zero_attn=True))


def test_export_refuses_a_bias_or_weight_of_another_shape():
    weights = mha_from_torch(_mha())
    h = E // N
    # A [H, N] b_q flattened to E numbers all the same: it was written scrambled, and a b_o of
    # another size (framework="np") went out for torch to refuse later, if at all.
    for name, bad in [("b_q", (h, N)), ("b_v", (E,)), ("b_o", (E - 1,))]:
        wrong = weights._replace(**{name: jnp.zeros(bad)})
        with pytest.raises(ValueError, match=rf"{name} has shape \({bad[0]},"):
            mha_to_torch_state_dict(wrong, framework="np")
    with pytest.raises(ValueError, match=r"PyTorch needs w_q \[E, N, H\].*got w_q \(15, 15\)"):
        mha_to_torch_state_dict(weights._replace(w_q=jnp.zeros((E, E))))  # was an unpack error


@pytest.mark.parametrize("shape", [(), (E,)])
def test_a_k_proj_weight_that_is_not_a_matrix_is_named(shape):
    # Its last axis was read as kdim: 0-d raised a bare IndexError, 1-d "expected (15, 15)".
    state = dict(_mha(kdim=11, vdim=11).state_dict())
    state["k_proj_weight"] = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"'k_proj_weight' has shape .*expected \[E, Dk\]"):
        mha_from_torch(state, num_heads=N)


def test_an_integer_weight_is_named():
    state = {k: v.clone() for k, v in _mha().state_dict().items()}
    state["in_proj_weight"] = state["in_proj_weight"].to(torch.int32)
    with pytest.raises(ValueError, match=r"'in_proj_weight' has dtype int32, expected a floating"):
        mha_from_torch(state, num_heads=N)


def test_a_jaxattn_nn_module_exports_its_pure_weights():
    from flax import nnx

    from jaxattn import nn

    module = nn.MultiHeadAttention(E, N, rngs=nnx.Rngs(0))
    got = mha_to_torch_state_dict(module, framework="np")
    want = mha_to_torch_state_dict(module.pure_weights(), framework="np")
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_ml_dtypes_floats_are_weights_but_ints_are_not():
    import ml_dtypes

    from jaxattn.interop._tensors import get

    for dtype in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, np.float16):
        assert get({"w": np.ones((2, 2), dtype)}, "w", (2, 2)).dtype == dtype
    for dtype in (np.int8, np.bool_, np.uint16):
        with pytest.raises(ValueError, match="expected a floating dtype"):
            get({"w": np.ones((2, 2), dtype)}, "w", (2, 2))


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_bit_float_conversions_copy_their_bits(dtype):
    """bfloat16 / float8 cross as a view of their bits: each side must still get its own
    copy, as float32 does (an export aliasing a JAX or NumPy weight, or an import aliasing
    a torch Parameter that training keeps updating, would change with it)."""
    import ml_dtypes

    from jaxattn.interop._tensors import export, to_numpy

    same_width = {1: torch.uint8, 2: torch.int16}
    tensor = torch.tensor([1.5, -2.0, 0.5]).to(getattr(torch, dtype))
    imported = to_numpy(tensor)
    tensor.view(same_width[tensor.element_size()]).zero_()  # overwrite the torch side
    assert imported.dtype == getattr(ml_dtypes, dtype)
    np.testing.assert_array_equal(np.asarray(imported, np.float32), [1.5, -2.0, 0.5])
    weight = np.array([1.5, -2.0, 0.5], getattr(ml_dtypes, dtype))
    exported = export(weight, "pt")
    assert exported.dtype == getattr(torch, dtype)
    exported.view(same_width[exported.element_size()]).zero_()  # overwrite the export
    np.testing.assert_array_equal(np.asarray(weight, np.float32), [1.5, -2.0, 0.5])


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_a_bad_num_heads_is_named(bad):
    with pytest.raises(ValueError, match=r"mha_from_torch: num_heads must be an int >= 1, got"):
        mha_from_torch(_mha().state_dict(), num_heads=bad)


@pytest.mark.parametrize("kwargs", [{}, {"kdim": 11, "vdim": 13}])
def test_a_prefixed_state_dict_imports_and_exports_every_tensor(kwargs):
    """A submodule's entries in a whole model's state dict: every name carries the prefix,
    so no tensor (the biases included) is dropped or written without it."""
    prefix = "layers.0.self_attn."
    module = _mha(seed=4, **kwargs)
    state = {prefix + k: v for k, v in module.state_dict().items()}
    state["layers.0.norm.weight"] = torch.ones(E)  # another submodule's entry: ignored
    got = mha_from_torch(state, num_heads=N, prefix=prefix)
    want = mha_from_torch(module)
    assert got.b_q is not None and got.b_o is not None
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    exported = mha_to_torch_state_dict(got, prefix=prefix)
    assert set(exported) == {prefix + k for k in module.state_dict()}


@pytest.mark.parametrize("kwargs", [{}, {"kdim": E, "vdim": 13}])
def test_torch_round_trip_gives_back_the_same_state_dict(kwargs):
    """Each tensor lands in its own place. A key bias b_k cannot show in any output (it adds
    q · b_k to a whole row of logits), and PyTorch packs in_proj_weight only when kdim and
    vdim both equal E: compare the tensors themselves."""
    module = _mha(seed=5, **kwargs)
    exported = mha_to_torch_state_dict(mha_from_torch(module))
    want = module.state_dict()
    assert exported.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)


def test_a_numpy_export_owns_its_arrays():
    # NumPy weights (a converted checkpoint): writing to the export must not change them.
    weights = jax.tree.map(np.array, mha_from_torch(_mha(seed=6)))
    exported = mha_to_torch_state_dict(weights, framework="np")
    for name, arr in exported.items():
        shared = [i for i, w in enumerate(weights) if np.shares_memory(arr, w)]
        assert not shared, f"{name} shares memory with weights[{shared}]"


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_weights_cross_both_ways_bit_for_bit(dtype):
    # torch's .numpy() and torch.tensor() refuse float8: both raised TypeError
    # ("Got unsupported ScalarType Float8_e4m3fn", "can't convert np.ndarray of type ...").
    state = {k: v.to(getattr(torch, dtype)) for k, v in _mha(bias=True).state_dict().items()}
    weights = mha_from_torch(state, num_heads=N)
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(weights)} == {dtype}
    back = mha_to_torch_state_dict(weights)
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_a_whole_layers_state_dict_without_prefix_names_the_attention_prefix():
    layer = torch.nn.TransformerEncoderLayer(E, N, batch_first=True)
    with pytest.raises(KeyError, match=r"out_proj\.weight.*\['self_attn\.out_proj\.weight'\]"):
        mha_from_torch(layer.state_dict(), num_heads=N)
