"""save_safetensors / load_safetensors on jaxattn weight pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")

from jaxattn.interop.safetensors import (
    flatten_with_names,
    load_safetensors,
    read_safetensors_metadata,
    save_safetensors,
)
from jaxattn.ops.attention import MultiHeadAttentionWeights
from jaxattn.ops.lstm import BidirectionalWeights, LSTMWeights, init_lstm_stack


def _tree(seed: int = 0):
    """Two bidirectional LSTM layers, bias-free attention (None leaves), bf16 and int leaves."""
    gen = np.random.default_rng(seed)
    arr = lambda *shape: jnp.asarray(gen.normal(size=shape).astype(np.float32))
    lstm = lambda i: LSTMWeights(arr(i, 20), arr(5, 20), arr(20))
    attn = MultiHeadAttentionWeights(
        arr(15, 3, 5), arr(7, 3, 5), arr(7, 3, 5), arr(3, 5, 15), None, None, None, None
    )
    return {
        "encoder": tuple(BidirectionalWeights(lstm(i), lstm(i)) for i in (3, 10)),
        "attn": attn,
        "scale": jnp.asarray([1.5, -2.0], jnp.bfloat16),
        "step": jnp.asarray(7, jnp.int32),
    }


def test_names():
    names = flatten_with_names(_tree())
    assert "encoder/1/backward/w_ih" in names and "attn/w_k" in names
    assert names["attn/w_k"].shape == (7, 3, 5)
    assert not any(n.startswith("attn/b_") for n in names)  # None leaves are not stored


def test_round_trip_is_exact(tmp_path):
    tree = _tree()
    path = tmp_path / "w.safetensors"
    save_safetensors(tree, path, metadata={"model": "test"})
    back = load_safetensors(path, like=jax.eval_shape(lambda: tree))
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    assert back["attn"].b_q is None
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    flat = load_safetensors(path)
    assert set(flat) == set(flatten_with_names(tree))


def test_the_file_keeps_64_bit_numpy_leaves(tmp_path):
    """Without x64, jnp.asarray would have written float64 / int64 leaves as 32-bit."""
    from safetensors.numpy import load_file

    tree = {"a": np.arange(3, dtype=np.float64) / 3, "b": np.arange(2, dtype=np.int64) - 2**40}
    save_safetensors(tree, tmp_path / "w.safetensors")
    stored = load_file(tmp_path / "w.safetensors")
    for name, leaf in tree.items():
        assert stored[name].dtype == leaf.dtype
        np.testing.assert_array_equal(stored[name], leaf)


def test_errors(tmp_path):
    tree = _tree()
    path = tmp_path / "w.safetensors"
    save_safetensors(tree, path)
    bigger = dict(tree, extra=jnp.zeros(3))
    with pytest.raises(KeyError, match="'extra'"):
        load_safetensors(path, like=bigger)
    smaller = {k: v for k, v in tree.items() if k != "step"}
    # (The hint said only "pass strict=False", which silently drops weights of a model
    # loaded into a template of another config.)
    with pytest.raises(ValueError, match=r"unexpected tensors.*'step'.*another config"):
        load_safetensors(path, like=smaller)
    assert "step" not in load_safetensors(path, like=smaller, strict=False)
    wrong = dict(tree, scale=jnp.zeros(3, jnp.bfloat16))
    with pytest.raises(ValueError, match=r"'scale' has shape \(2,\), expected \(3,\)"):
        load_safetensors(path, like=wrong)
    # Another width of the same kind loads as stored; another kind is refused (integer
    # weights used to load into float slots, and a model ran on them).
    as_f32 = load_safetensors(path, like=dict(tree, scale=jnp.zeros(2, jnp.float32)))
    assert as_f32["scale"].dtype == jnp.bfloat16
    as_float = dict(tree, step=jax.ShapeDtypeStruct((), jnp.float32))
    with pytest.raises(ValueError, match=r"'step' is int32, expected floating-point values"):
        load_safetensors(path, like=as_float)
    as_int = dict(tree, scale=jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match=r"'scale' is bfloat16, expected integer values"):
        load_safetensors(path, like=as_int)
    as_bool = dict(tree, step=jnp.asarray(True))
    with pytest.raises(ValueError, match=r"'step' is int32, expected bool values"):
        load_safetensors(path, like=as_bool)


def test_an_abstract_tree_is_refused_naming_the_leaf(tmp_path):
    # safetensors' own error was 'Unknown dtype "object"', naming no leaf.
    abstract = jax.eval_shape(_tree)
    with pytest.raises(TypeError, match=r"leaf 'attn/w_q' is a ShapeDtypeStruct, not an array"):
        save_safetensors(abstract, tmp_path / "w.safetensors")
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_typed_prng_key_is_refused_naming_the_leaf(tmp_path):
    # JAX's own error ("PRNGKey dtype cannot be converted to a NumPy array") named no leaf.
    tree = dict(_tree(), dropout_key=jax.random.key(1))
    with pytest.raises(TypeError, match=r"leaf 'dropout_key' is a typed PRNG key.*key_data"):
        save_safetensors(tree, tmp_path / "w.safetensors")
    assert not list(tmp_path.iterdir())


def test_a_failed_save_leaves_the_existing_file(tmp_path, monkeypatch):
    """The new file is written beside the old one and renamed over it: a write that fails
    half-way (here: a full disk) must not leave a truncated file in its place."""
    import safetensors.flax

    tree = _tree()
    path = tmp_path / "w.safetensors"
    save_safetensors(tree, path)
    before = path.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.flax, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_safetensors(_tree(seed=1), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    monkeypatch.undo()
    save_safetensors(_tree(seed=1), path)  # a save that succeeds replaces it
    np.testing.assert_array_equal(
        load_safetensors(path, like=tree)["attn"].w_q, _tree(seed=1)["attn"].w_q
    )


def test_unreadable_files_are_named(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors(_tree(), path)
    data = path.read_bytes()
    for name, content in [
        ("cut", data[: len(data) // 2]),
        ("text", b"not safetensors"),
        ("empty", b""),
    ]:
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name}\.safetensors: not a valid \.safetensors"):
            load_safetensors(bad, like=_tree())
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_safetensors(tmp_path, like=_tree())


def test_a_jaxattn_nn_module_is_saved_and_loaded_as_its_pure_weights(tmp_path):
    from flax import nnx

    from jaxattn import nn

    module = nn.LSTM(3, 5, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    path = tmp_path / "m.safetensors"
    save_safetensors(module, path)
    assert set(load_safetensors(path)) == set(flatten_with_names(module.pure_weights()))
    template = jax.eval_shape(
        lambda: init_lstm_stack(jax.random.key(0), 3, 5, num_layers=2, bidirectional=True)
    )
    for like in (template, module):  # a pure template or the module itself
        back = load_safetensors(path, like=like)
        assert jax.tree.structure(back) == jax.tree.structure(module.pure_weights())
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(module.pure_weights())):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_contiguous_numpy_leaves_are_saved_in_logical_order(tmp_path):
    # safetensors writes raw memory from the data pointer: a transposed or strided NumPy
    # view must be stored as its values, not as its underlying buffer.
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    tree = {"w_t": w.T, "every_other": np.arange(8, dtype=np.float32)[::2], "s": np.float32(3)}
    path = tmp_path / "views.safetensors"
    save_safetensors(tree, path)
    back = load_safetensors(path, tree)
    for name, leaf in tree.items():
        np.testing.assert_array_equal(np.asarray(back[name]), leaf)
        assert back[name].shape == np.shape(leaf)


def test_metadata_is_stored_in_the_header(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "w.safetensors"
    save_safetensors(_tree(), path, metadata={"model": "test", "step": "3"})
    with safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"model": "test", "step": "3"}
    # ... and jaxattn reads it back (load_safetensors returns only the weights).
    assert read_safetensors_metadata(path) == {"model": "test", "step": "3"}
    save_safetensors(_tree(), path)
    assert read_safetensors_metadata(path) == {}
    path.write_bytes(path.read_bytes()[:5])
    with pytest.raises(ValueError, match=r"w.safetensors: not a valid .safetensors file"):
        read_safetensors_metadata(path)


def test_two_leaves_with_one_name_are_refused_not_overwritten(tmp_path):
    tree = {"a/b": jnp.zeros(2), "a": {"b": jnp.ones(2)}}  # both flatten to "a/b"
    with pytest.raises(ValueError, match=r"two leaves share the name 'a/b'"):
        save_safetensors(tree, tmp_path / "w.safetensors")


def test_torch_leaves_are_saved(tmp_path):
    """A framework="pt" export (bfloat16 tensors) and a Parameter that requires grad."""
    torch = pytest.importorskip("torch")
    tree = {
        "bf16": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "param": torch.nn.Parameter(torch.arange(6.0).reshape(2, 3)),
    }
    save_safetensors(tree, tmp_path / "w.safetensors")  # both raised TypeError / RuntimeError
    back = load_safetensors(tmp_path / "w.safetensors")
    assert back["bf16"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(back["bf16"], np.float32), [1.5, -2.0])
    np.testing.assert_array_equal(back["param"], np.arange(6.0).reshape(2, 3))


def test_a_big_endian_template_loads(tmp_path):
    tree = {"w": np.arange(4, dtype=">f4")}
    save_safetensors(tree, tmp_path / "w.safetensors")
    back = load_safetensors(tmp_path / "w.safetensors", like=tree)  # was a TypeError
    np.testing.assert_array_equal(np.asarray(back["w"]), np.arange(4.0))


def test_a_symlink_is_written_through(tmp_path):
    real, link = tmp_path / "real.safetensors", tmp_path / "link.safetensors"
    save_safetensors({"w": np.zeros(3, np.float32)}, real)
    link.symlink_to(real)
    save_safetensors({"w": np.ones(3, np.float32)}, link)
    assert link.is_symlink()  # was replaced by a regular file, the real one left stale
    np.testing.assert_array_equal(load_safetensors(real)["w"], np.ones(3))


@pytest.mark.parametrize(
    "dtype", ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"]
)
def test_float8_leaves_load_back(tmp_path, dtype):
    # save wrote them; load raised AttributeError: module 'numpy' has no attribute ...
    import ml_dtypes

    # (w 2-D: the float8 tensors are rebuilt from their bytes, which must take their shape)
    w = np.linspace(-2, 2, 6).reshape(2, 3).astype(getattr(ml_dtypes, dtype))
    tree = {"w": jnp.asarray(w),
            "b": jnp.asarray([0.5, 1.5], jnp.bfloat16), "n": jnp.arange(3)}  # fmt: skip
    save_safetensors(tree, tmp_path / "w.safetensors")
    for back in (load_safetensors(tmp_path / "w.safetensors", tree),
                 load_safetensors(tmp_path / "w.safetensors")):  # fmt: skip
        assert list(back) == ["b", "n", "w"] and isinstance(back["w"], jax.Array)
        for name, leaf in tree.items():
            assert back[name].dtype == leaf.dtype and back[name].shape == leaf.shape, name
            np.testing.assert_array_equal(
                np.asarray(back[name], np.float32), np.asarray(leaf, np.float32)
            )


def test_a_file_with_float8_tensors_loads_in_the_files_order(tmp_path):
    # The float8 tensors are read apart from the others: the flat dict keeps the file's
    # (sorted) order rather than putting them last.
    import ml_dtypes

    tree = {"a": np.ones(2, ml_dtypes.float8_e4m3fn), "b": np.ones(2, np.float32)}
    save_safetensors(tree, tmp_path / "w.safetensors")
    assert list(load_safetensors(tmp_path / "w.safetensors")) == ["a", "b"]


def test_a_path_in_a_missing_folder_or_a_folder_is_named(tmp_path):
    # safetensors' own error named its temporary file, os.replace the partial one.
    path = tmp_path / "no" / "w.safetensors"
    with pytest.raises(FileNotFoundError, match=r"folder of .*no/w\.safetensors does not exist"):
        save_safetensors({"a": np.ones(2, np.float32)}, path)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        save_safetensors({"a": np.ones(2, np.float32)}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_tensors_are_named_with_their_shapes_and_the_names_ending_alike(tmp_path):
    """The error listed the missing names only: no expected shape (the README promises
    one), and for a tree saved whole ({"params": ..., "step": ...}) loaded into its params'
    template, no word that the file holds every one of them under "params/"."""
    layers = init_lstm_stack(jax.random.key(0), 3, 4, num_layers=2)
    path = tmp_path / "state.safetensors"
    save_safetensors({"params": layers, "step": jnp.int32(3)}, path)
    with pytest.raises(
        KeyError,
        match=r"load_safetensors: .*6 missing tensor\(s\).*'0/w_ih' \(3, 16\), '0/w_hh' \(4, 16\)"
        r".*keys ending alike: \['params/0/w_ih'\]",
    ):
        load_safetensors(path, like=layers)
