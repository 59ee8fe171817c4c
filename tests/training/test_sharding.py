"""Mesh, partition rules and batch placement on this process's devices (one CPU here).

The multi-device and multi-process behaviour is tested in subprocesses:
``test_sharding_multidevice.py`` and ``tests/train/test_lm_distributed.py``.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from jaxattn.models import gpt, transformer
from jaxattn.models.partitioning import SEQ2SEQ_RULES, TRANSFORMER_RULES
from jaxattn.models.seq2seq import Seq2SeqConfig, init_seq2seq
from jaxattn.training import data, sharding, translation_data
from jaxattn.training.metrics import MetricsWriter
from jaxattn.training.state import create_train_state

MESH_222 = AbstractMesh((2, 2, 2), sharding.MESH_AXES)
RULES = (
    (r"attn/w_q$", ("embed", "heads", None)),
    (r"attn/w_o$", ("heads", None, "embed")),
    (r"table$", ("vocab", "embed")),
)


def test_make_mesh_uses_every_device_and_names_axes():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == sharding.MESH_AXES
    assert mesh.size == jax.device_count()
    assert sharding.make_mesh(1, -1, 1).shape["fsdp"] == jax.device_count()


@pytest.mark.parametrize(
    "sizes, message",
    [
        ((2, 1, 1), "product must equal the device count"),
        ((-1, -1, 1), "only one mesh axis may be -1"),
        ((0, 1, 1), "integers >= 1"),
        ((True, 1, 1), "integers >= 1"),  # read as 1 before
        ((1.0, 1, 1), "integers >= 1"),
    ],
)
def test_make_mesh_rejects_sizes_that_do_not_fit(sizes, message):
    devices = jax.devices()[:1]
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(*sizes, devices=devices)


def test_make_mesh_takes_numpy_integers():
    mesh = sharding.make_mesh(np.int64(1), np.int32(-1), 1, devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_leaf_spec_names_trailing_axes_and_skips_the_layer_axis():
    # [L, D, N, H]: layers replicated, D over fsdp, N over tensor, H whole.
    spec = sharding.leaf_spec("params/blocks/attn/w_q", (3, 4, 6, 5), RULES, MESH_222)
    assert spec == PartitionSpec(None, "fsdp", "tensor")
    spec = sharding.leaf_spec("params/blocks/attn/w_o", (3, 6, 5, 4), RULES, MESH_222)
    assert spec == PartitionSpec(None, "tensor", None, "fsdp")


def test_leaf_spec_matches_optimizer_moments_like_their_parameter():
    path = "opt_state/1/0/mu/blocks/attn/w_q"
    assert sharding.leaf_spec(path, (3, 4, 6, 5), RULES, MESH_222) == PartitionSpec(
        None, "fsdp", "tensor"
    )


def test_leaf_spec_replicates_what_the_mesh_does_not_divide():
    # 65 characters over tensor=2: the vocabulary axis stays whole, D still splits.
    assert sharding.leaf_spec("table", (65, 8), RULES, MESH_222) == PartitionSpec(None, "fsdp")
    # Size-1 mesh axes never appear in a spec.
    mesh = AbstractMesh((8, 1, 1), sharding.MESH_AXES)
    assert sharding.leaf_spec("table", (64, 8), RULES, mesh) == PartitionSpec()
    # Unmatched leaves (norms, step, keys) are replicated.
    assert sharding.leaf_spec("blocks/ln1/scale", (3, 8), RULES, MESH_222) == PartitionSpec()


def test_leaf_spec_uses_a_mesh_axis_once_per_leaf():
    """Two logical names on one mesh axis: only the first dimension takes it (a spec that
    names an axis twice is no valid sharding)."""
    rules = ((r"up$", ("heads", "mlp")),)
    assert sharding.leaf_spec("up", (4, 6), rules, MESH_222) == PartitionSpec("tensor")
    # When the first does not divide, the second dimension still gets the axis.
    assert sharding.leaf_spec("up", (3, 6), rules, MESH_222) == PartitionSpec(None, "tensor")


def test_leaf_spec_rejects_a_rule_longer_than_the_leaf():
    with pytest.raises(ValueError, match=r"names 3 axes .* has shape \(4,\)"):
        sharding.leaf_spec("attn/w_q", (4,), RULES, MESH_222)


def _split_leaves(params, rules, mesh):
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = sharding.path_string(path)
        out[name] = sharding.leaf_spec(name, leaf.shape, rules, mesh)
    return out


@pytest.mark.parametrize("model", ["gpt", "transformer"])
def test_transformer_rules_split_every_matrix_of_both_models(model):
    """Renaming a weight must not silently leave it replicated on every device."""
    if model == "gpt":
        config = gpt.GPTConfig(
            vocab_size=16, block_size=8, num_layers=2, num_heads=4, embed_dim=8, use_bias=True,
            tie_embeddings=False,
        )  # fmt: skip
        params = jax.eval_shape(lambda: gpt.init_gpt(jax.random.key(0), config))
    else:
        config = transformer.TransformerConfig(
            src_vocab_size=16, tgt_vocab_size=16, embed_dim=8, num_heads=4,
            num_encoder_layers=1, num_decoder_layers=1, max_len=8,
        )  # fmt: skip
        params = jax.eval_shape(lambda: transformer.init_transformer(jax.random.key(0), config))
    specs = _split_leaves(params, TRANSFORMER_RULES, MESH_222)
    matrices = {
        name: spec
        for name, spec in specs.items()
        if not any(part in name for part in ("ln", "norm", "/b_o", "down/b"))
        and name.rsplit("/", 1)[-1] != "bias"
    }
    assert matrices, specs
    unsplit = [name for name, spec in matrices.items() if spec == PartitionSpec()]
    assert not unsplit, f"no rule splits {unsplit}"
    for name, spec in specs.items():
        if "ln" in name or "norm" in name:
            assert spec == PartitionSpec(), name


def test_seq2seq_rules_split_the_vocabulary_and_keep_lstm_matrices_whole():
    config = Seq2SeqConfig(
        src_vocab_size=16, tgt_vocab_size=16, embed_dim=8, hidden_size=8, attention="dot"
    )
    params = jax.eval_shape(lambda: init_seq2seq(jax.random.key(0), config))
    specs = _split_leaves(params, SEQ2SEQ_RULES, MESH_222)
    assert specs["src_embedding/table"] == PartitionSpec("tensor", "fsdp")
    assert specs["tgt_embedding/table"] == PartitionSpec("tensor", "fsdp")
    assert specs["output/w"] == PartitionSpec("fsdp", "tensor")
    assert specs["output/b"] == PartitionSpec("tensor")  # [V], split as output/w's columns
    assert all(spec == PartitionSpec() for name, spec in specs.items() if "w_hh" in name)


def _gpt_shapes(**fields):
    config = gpt.GPTConfig(vocab_size=65, block_size=8, num_layers=2, **fields)
    return jax.eval_shape(lambda: gpt.init_gpt(jax.random.key(0), config))


def test_a_mesh_axis_that_splits_no_parameter_is_warned_about():
    """3 heads, MLP width 45 and 65 characters over tensor=4 (embed 15 over fsdp=2): every
    weight was replicated over the axis, its devices repeating the same work, silently."""
    params = _gpt_shapes(num_heads=3, embed_dim=15, mlp_ratio=3)
    mesh = AbstractMesh((1, 2, 4), sharding.MESH_AXES)
    with pytest.warns(UserWarning) as caught:
        sharding.tree_shardings(params, TRANSFORMER_RULES, mesh)
    assert [str(w.message) for w in caught] == [
        "mesh axis fsdp=2 splits no parameter (no embed dimension is a multiple of 2): every "
        "parameter is replicated over its devices",
        "mesh axis tensor=4 splits no parameter (no heads, kv_heads, mlp, vocab dimension is "
        "a multiple of 4): every parameter is replicated over its devices",
    ]
    assert {w.filename for w in caught} == {__file__}  # the caller's line, not sharding.py's


def test_no_warning_when_every_parameter_axis_splits_something():
    params = _gpt_shapes(num_heads=3, embed_dim=12)  # 3 heads over tensor=2: the MLP splits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        specs = sharding.tree_shardings(
            params, TRANSFORMER_RULES, AbstractMesh((4, 2, 2), sharding.MESH_AXES)
        )
    assert specs.blocks.attn.w_q.spec == PartitionSpec(None, "fsdp")  # [L, D, N, H]
    # data splits only the batch: never warned about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sharding.tree_shardings(
            params, TRANSFORMER_RULES, AbstractMesh((8, 1, 1), sharding.MESH_AXES)
        )


def test_create_sharded_places_the_tree_and_returns_its_shardings():
    mesh = sharding.make_mesh()
    tree, shardings = sharding.create_sharded(
        lambda: {"attn": {"w_q": jnp.ones((4, 2, 3))}, "step": jnp.int32(0)}, RULES, mesh
    )
    assert tree["attn"]["w_q"].sharding == shardings["attn"]["w_q"]
    np.testing.assert_array_equal(tree["attn"]["w_q"], np.ones((4, 2, 3)))


def test_create_sharded_abstract_runs_nothing_and_gives_the_same_shardings():
    mesh = sharding.make_mesh()
    calls = []

    def init():
        calls.append(1)  # (traced once by eval_shape; never run)
        return {"attn": {"w_q": jnp.ones((4, 2, 3))}, "step": jnp.int32(0)}

    tree, shardings = sharding.create_sharded(init, RULES, mesh, abstract=True)
    assert calls == [1]
    leaf = tree["attn"]["w_q"]
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.shape == (4, 2, 3)
    assert leaf.sharding == shardings["attn"]["w_q"]
    assert shardings == sharding.create_sharded(init, RULES, mesh)[1]


def test_one_process_loads_the_whole_batch_and_global_batch_keeps_it():
    mesh = sharding.make_mesh()
    batch_sharding = sharding.batch_sharding(mesh)
    assert sharding.process_batch_slice(batch_sharding, 6) == slice(0, 6)
    local = {"inputs": np.arange(12, dtype=np.int32).reshape(6, 2)}
    placed = sharding.global_batch(local, batch_sharding)
    assert placed["inputs"].sharding == batch_sharding
    np.testing.assert_array_equal(placed["inputs"], local["inputs"])
    np.testing.assert_array_equal(sharding.to_host(placed)["inputs"], local["inputs"])


def test_process_batch_slice_names_a_batch_size_that_is_not_a_size():
    # None failed as "unsupported operand type(s) for %: 'NoneType' and 'int'"; 0 (and
    # False) passed, as a slice of no rows.
    batch_sharding = sharding.batch_sharding(sharding.make_mesh())
    for bad in (None, 0, False, 4.0):
        with pytest.raises(
            ValueError, match=r"^process_batch_slice: config.batch_size must be an int >= 1"
        ):
            sharding.process_batch_slice(batch_sharding, bad, "config.batch_size")
    assert sharding.process_batch_slice(batch_sharding, np.int64(4)) == slice(0, 4)


def test_global_batch_names_a_scalar_leaf():
    # JAX refused it with a rank error that named neither the leaf nor the batch.
    batch_sharding = sharding.batch_sharding(sharding.make_mesh())
    local = {"inputs": np.zeros((2, 3), np.int32), "temperature": np.float32(1.0)}
    with pytest.raises(ValueError, match=r"global_batch: batch leaf temperature is a scalar"):
        sharding.global_batch(local, batch_sharding)


def test_adafactor_state_shards_and_a_rule_too_long_for_a_parameter_is_still_refused():
    """Adafactor keeps ``v_row``/``v_col`` of fewer axes than the parameter (``[1]`` for one
    it does not factor): tree_shardings refused every such TrainState, also on one device
    ("partition rule 'embedding/table$' names 2 axes ... opt_state/0/v_row/... (1,)")."""
    state = jax.eval_shape(
        lambda: create_train_state(
            gpt.init_gpt(jax.random.key(0), gpt.GPTConfig(65, 8, 2, 4, 16)),
            optax.adafactor(1e-2),
            jax.random.key(1),
        )
    )
    specs = sharding.tree_shardings(state, TRANSFORMER_RULES, MESH_222)
    assert specs.params.blocks.attn.w_q.spec == PartitionSpec(None, "fsdp", "tensor")
    assert specs.opt_state[0].v_row.token_embedding.table.spec == PartitionSpec()
    vector = {"head": {"w": jax.ShapeDtypeStruct((16,), jnp.float32)}}  # rule: [D, V]
    too_short = {"params": vector, "opt_state": {"mu": vector}}
    with pytest.raises(ValueError, match=r"names 2 axes .* params/head/w has shape \(16,\)"):
        sharding.tree_shardings(too_short, TRANSFORMER_RULES, MESH_222)


def test_leaf_spec_names_a_logical_axis_mapped_to_an_axis_the_mesh_lacks():
    # A typo in logical_to_mesh was a bare "KeyError: 'fdsp'".
    with pytest.raises(ValueError, match=r"'embed' of a/w maps to mesh axis 'fdsp'.*'data'"):
        sharding.leaf_spec("a/w", (4, 4), [("w$", ("embed",))], MESH_222, {"embed": "fdsp"})


def test_make_mesh_refuses_a_device_listed_twice():
    # The mesh was made; global_batch then failed asking for a global shape of 8 rows
    # for a batch of 4, naming no device.
    device = jax.devices()[0]
    with pytest.raises(ValueError, match=rf"make_mesh: devices lists {device} more than once"):
        sharding.make_mesh(2, 1, 1, devices=[device, device])


def test_make_mesh_refuses_an_empty_device_list():
    # It failed with "IndexError: list index out of range" while writing its own message.
    with pytest.raises(ValueError, match=r"make_mesh: devices is empty"):
        sharding.make_mesh(devices=[])
    with pytest.raises(ValueError, match=r"make_mesh: devices is empty"):
        sharding.make_mesh(data=-1, devices=[])


def test_lm_dataset_process_rows_are_slices_of_the_same_global_batch():
    tokens = np.arange(200, dtype=np.int32) % 7
    kw = dict(batch_size=6, seq_len=5, seed=3, vocab_size=7)
    whole = data.lm_dataset(tokens, **kw)[4]
    parts = [data.lm_dataset(tokens, process_rows=slice(i, i + 2), **kw)[4] for i in (0, 2, 4)]
    for key in ("inputs", "targets"):
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    with pytest.raises(ValueError, match="selects no row"):
        data.lm_dataset(tokens, process_rows=slice(6, 8), **kw)


def test_translation_dataset_process_rows_share_the_global_batch_bucket():
    rng = np.random.default_rng(0)
    src = [rng.integers(3, 9, size=n).astype(np.int32) for n in rng.integers(1, 11, size=40)]
    tgt = [rng.integers(3, 9, size=n).astype(np.int32) for n in rng.integers(1, 11, size=40)]
    kw = dict(batch_size=4, buckets=(4, 8, 12), seed=1, vocab_size=9)
    whole = translation_data.translation_dataset(src, tgt, **kw)[5]
    halves = [
        translation_data.translation_dataset(src, tgt, process_rows=rows, **kw)[5]
        for rows in (slice(0, 2), slice(2, 4))
    ]
    for key, value in whole.items():
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value)


def test_inactive_metrics_writer_writes_nothing(tmp_path):
    with MetricsWriter(tmp_path / "run", active=False) as writer:
        writer.write(1, {"train_loss": 1.0})
    assert not (tmp_path / "run").exists()


def test_metrics_writer_rewrites_instead_of_appending_on_object_stores(tmp_path, monkeypatch):
    """gs:// cannot append: the remote path keeps the lines and rewrites the whole file."""
    from jaxattn.training import metrics

    monkeypatch.setattr(metrics, "is_remote", lambda path: True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 3.0}\n')
    with MetricsWriter(tmp_path) as writer:
        assert writer.remote and writer._tb is None
        writer.write(2, {"train_loss": 2.0})
        writer.write(3, {"val_loss": 1.5})
    records = metrics.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["train_loss"] == 2.0 and records[2]["val_loss"] == 1.5


def test_transformer_rules_put_each_logical_axis_on_its_own_dimension():
    """A rule naming the right axes in the wrong order still splits every matrix: pin where."""
    config = gpt.GPTConfig(
        vocab_size=16, block_size=8, num_layers=2, num_heads=4, embed_dim=8, use_bias=True,
        tie_embeddings=False,
    )  # fmt: skip
    params = jax.eval_shape(lambda: gpt.init_gpt(jax.random.key(0), config))
    specs = _split_leaves(params, TRANSFORMER_RULES, MESH_222)
    f, t = "fsdp", "tensor"  # embed -> fsdp; vocab, heads, mlp -> tensor
    expected = {
        "token_embedding/table": PartitionSpec(t, f),  # [V, D]
        "position_embedding/table": PartitionSpec(None, f),  # [T, D]: positions not split
        "blocks/attn/w_q": PartitionSpec(None, f, t),  # [L, D, N, H]
        "blocks/attn/w_k": PartitionSpec(None, f, t),
        "blocks/attn/w_o": PartitionSpec(None, t, None, f),  # [L, N, H, D]
        "blocks/attn/b_q": PartitionSpec(None, t),  # [L, N, H]
        "blocks/mlp/up/w": PartitionSpec(None, f, t),  # [L, D, F]
        "blocks/mlp/up/b": PartitionSpec(None, t),  # [L, F]
        "blocks/mlp/down/w": PartitionSpec(None, t, f),  # [L, F, D]
        "head/w": PartitionSpec(f, t),  # [D, V]
    }
    assert {name: specs[name] for name in expected} == expected


def test_transformer_rules_split_gqa_key_value_heads_on_their_head_axis():
    config = gpt.GPTConfig(
        vocab_size=16, block_size=8, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=8,
        use_bias=True,
    )  # fmt: skip
    params = jax.eval_shape(lambda: gpt.init_gpt(jax.random.key(0), config))
    specs = _split_leaves(params, TRANSFORMER_RULES, MESH_222)
    f, t = "fsdp", "tensor"  # kv_heads -> tensor
    expected = {
        "blocks/attn/w_k": PartitionSpec(None, f, t),  # [L, D, K, H]
        "blocks/attn/w_v": PartitionSpec(None, f, t),
        "blocks/attn/b_k": PartitionSpec(None, t),  # [L, K, H]: K split, not H
        "blocks/attn/b_v": PartitionSpec(None, t),
    }
    assert {name: specs[name] for name in expected} == expected
