"""Hugging Face GPT-2 <-> jaxattn GPT: logits, greedy generation, round trips, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from jaxattn.interop.gpt2 import (  # noqa: E402
    gpt2_config_from_hf,
    gpt2_from_hf,
    gpt2_to_hf_state_dict,
)
from jaxattn.models.gpt import GPTConfig, generate, gpt, init_gpt  # noqa: E402


def _hf_model(seed: int = 0, **kwargs):
    """A small random GPT-2, weights scaled up so that logits are far from ties."""
    fields = dict(n_layer=2, n_head=3, n_embd=12, vocab_size=31, n_positions=17)
    fields.update(bos_token_id=0, eos_token_id=None, pad_token_id=0)
    fields.update(kwargs)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def _random_weights(config: GPTConfig, seed: int):
    """jaxattn GPT weights with every leaf random (norms and biases too), so that a swapped
    or dropped tensor shows; the shapes come from ``init_gpt`` without compiling it."""
    shapes = jax.eval_shape(lambda: init_gpt(jax.random.key(0), config))
    gen = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(gen.normal(size=s.shape).astype(np.float32)), shapes)


def _close(a, b, atol=1e-4):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-4)


def test_config_from_hf():
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=3, n_embd=12, vocab_size=31, n_positions=17, n_inner=36,
        layer_norm_epsilon=1e-3, tie_word_embeddings=False, activation_function="gelu",
    )  # fmt: skip
    got = gpt2_config_from_hf(cfg)
    assert (got.num_layers, got.num_heads, got.embed_dim, got.vocab_size) == (2, 3, 12, 31)
    assert (got.block_size, got.mlp_dim, got.layer_norm_eps) == (17, 36, 1e-3)
    assert not got.tie_embeddings and not got.gelu_approximate and got.positions == "learned"
    assert gpt2_config_from_hf(transformers.GPT2Config()).gelu_approximate  # "gelu_new"
    assert gpt2_config_from_hf(cfg, dropout=0.1).dropout == 0.1
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        gpt2_config_from_hf(transformers.GPT2Config(scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ValueError, match="relu"):
        gpt2_config_from_hf(transformers.GPT2Config(activation_function="relu"))


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_hf_with_right_padding(tied):
    model = _hf_model(tie_word_embeddings=tied)
    config = gpt2_config_from_hf(model.config)
    weights = gpt2_from_hf(model, config)
    assert (weights.head is None) == tied
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 31, size=(3, 17))
    lengths = np.array([17, 11, 4])
    mask = np.arange(17)[None, :] < lengths[:, None]
    tokens = np.where(mask, tokens, 0)  # right padding with id 0
    with torch.no_grad():
        want = model(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))
        ).logits.numpy()
    got = np.asarray(gpt(weights, tokens.astype(np.int32), config))
    assert got.shape == want.shape == (3, 17, 31)
    assert np.abs(want).max() > 1.0  # the comparison is not between near-zero numbers
    _close(got[mask], want[mask])


def test_safetensors_file_import(tmp_path):
    model = _hf_model(seed=3)
    model.save_pretrained(tmp_path)  # the hub's format: model.safetensors, tied head dropped
    config = gpt2_config_from_hf(transformers.GPT2Config.from_pretrained(tmp_path))
    weights = gpt2_from_hf(tmp_path / "model.safetensors", config)
    tokens = np.random.default_rng(2).integers(0, 31, size=(2, 9))
    with torch.no_grad():
        want = model(input_ids=torch.tensor(tokens)).logits.numpy()
    _close(gpt(weights, tokens.astype(np.int32), config), want)


def test_a_safetensors_save_model_file_that_kept_lm_head_imports(tmp_path):
    """safetensors.torch.save_model stores a tied pair once, as lm_head.weight (no wte):
    gpt2_from_hf said "missing tensor 'wte.weight'"."""
    from safetensors.torch import save_model

    model = _hf_model(seed=4)
    save_model(model, tmp_path / "model.safetensors")
    config = gpt2_config_from_hf(model.config)
    weights = gpt2_from_hf(tmp_path / "model.safetensors", config)
    tokens = np.random.default_rng(3).integers(0, 31, size=(2, 7))
    with torch.no_grad():
        want = model(input_ids=torch.tensor(tokens)).logits.numpy()
    _close(gpt(weights, tokens.astype(np.int32), config), want)
    untied = dataclasses.replace(config, tie_embeddings=False)  # no wte: still missing
    with pytest.raises(KeyError, match=r"missing tensor 'wte\.weight'"):
        gpt2_from_hf(tmp_path / "model.safetensors", untied)


def test_greedy_generation_matches_hf():
    # 7 prompt tokens + 20 new ones must fit the position table (n_positions).
    model = _hf_model(seed=4, n_positions=27)
    config = gpt2_config_from_hf(model.config)
    weights = gpt2_from_hf(model, config)
    prompt = np.random.default_rng(5).integers(1, 31, size=(2, 7))
    with torch.no_grad():
        want = model.generate(
            torch.tensor(prompt),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
        ).numpy()
    got = generate(
        weights, config, prompt.astype(np.int32), 20, rng=jax.random.key(0), temperature=0.0
    )
    assert want.shape == (2, 27)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_greedy_generation_of_padded_prompts_matches_hf_with_left_padding():
    """HF takes prompts of different lengths left-padded with an attention mask; jaxattn
    right-padded with ``prompt_lengths``. Each row's continuation must be the same."""
    model = _hf_model(seed=4, n_positions=27)
    config = gpt2_config_from_hf(model.config)
    weights = gpt2_from_hf(model, config)
    lengths = np.array([7, 2, 5])
    prompt = np.random.default_rng(6).integers(1, 31, size=(3, 7))  # right-padded with ...
    prompt[np.arange(7)[None, :] >= lengths[:, None]] = 0  # ... zeros
    left = np.stack([np.roll(row, 7 - n) for row, n in zip(prompt, lengths)])
    with torch.no_grad():
        want = model.generate(
            torch.tensor(left),
            attention_mask=torch.tensor(np.arange(7)[None, :] >= 7 - lengths[:, None]).long(),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
        ).numpy()  # [3, 27]: padding, prompt, new tokens
    got = generate(
        weights, config, prompt.astype(np.int32), 20, rng=None, temperature=0.0,
        prompt_lengths=lengths,
    )  # fmt: skip  # [3, 27]: prompt, new tokens, padding
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(np.asarray(got[row, : n + 20]), want[row, 7 - n :])


def test_greedy_generation_with_eos_matches_hf():
    """HF stops a row at eos_token_id and pads it with pad_token_id (here the same id, so
    its rows read as jaxattn's, which repeat eos_id), and stops when every row has."""
    model = _hf_model(seed=4, n_positions=27)
    config = gpt2_config_from_hf(model.config)
    weights = gpt2_from_hf(model, config)
    prompt = np.random.default_rng(5).integers(1, 31, size=(2, 7)).astype(np.int32)
    plain = np.asarray(generate(weights, config, prompt, 20, rng=None, temperature=0.0))
    eos = int(plain[0, 7 + 3])  # row 0 ends at its 4th new token, row 1 wherever it draws it
    with torch.no_grad():
        want = model.generate(
            torch.tensor(prompt, dtype=torch.long),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        ).numpy()
    got = np.asarray(generate(weights, config, prompt, 20, rng=None, temperature=0.0, eos_id=eos))
    assert 7 + 4 <= want.shape[1] <= 27
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert (got[:, want.shape[1] :] == eos).all()  # where HF had stopped


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_through_torch_is_exact(tied):
    config = GPTConfig(
        vocab_size=31, block_size=17, num_layers=2, num_heads=3, embed_dim=12, mlp_ratio=3,
        tie_embeddings=tied, layer_norm_eps=1e-3,
    )  # fmt: skip
    weights = _random_weights(config, seed=7)
    hf_config = transformers.GPT2Config(
        n_layer=2, n_head=3, n_embd=12, vocab_size=31, n_positions=17, n_inner=36,
        layer_norm_epsilon=1e-3, tie_word_embeddings=tied,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    model.load_state_dict(gpt2_to_hf_state_dict(weights, config))  # strict: every name used
    back = gpt2_from_hf(model, gpt2_config_from_hf(hf_config))
    assert jax.tree.structure(back) == jax.tree.structure(weights)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(weights)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... and torch computes the same logits as jaxattn on the exported weights.
    tokens = np.random.default_rng(0).integers(0, 31, size=(2, 13))
    with torch.no_grad():
        want = model(input_ids=torch.tensor(tokens)).logits.numpy()
    _close(gpt(weights, tokens.astype(np.int32), config), want, atol=1e-3)


def test_numpy_export_matches_torch_export():
    config = GPTConfig(vocab_size=31, block_size=17, num_layers=2, num_heads=3, embed_dim=12)
    weights = _random_weights(config, seed=8)
    as_np = gpt2_to_hf_state_dict(weights, config, framework="np")
    as_pt = gpt2_to_hf_state_dict(weights, config)
    assert as_np.keys() == as_pt.keys()
    for k in as_np:
        assert isinstance(as_np[k], np.ndarray)
        np.testing.assert_array_equal(as_np[k], as_pt[k].numpy())
    with pytest.raises(ValueError, match="framework"):
        gpt2_to_hf_state_dict(weights, config, framework="tf")
    with pytest.raises(ValueError, match="rope"):
        gpt2_to_hf_state_dict(weights, dataclasses.replace(config, positions="rope"))


def test_errors_name_the_tensor():
    model = _hf_model()
    config = gpt2_config_from_hf(model.config)
    state = dict(model.state_dict())
    del state["transformer.h.1.mlp.c_fc.bias"]
    # The hint lists the keys ending most alike (it listed any five ending in "bias").
    with pytest.raises(
        KeyError,
        match=r"h\.1\.mlp\.c_fc\.bias.*\(48,\)\); keys ending alike: \['h\.0\.mlp\.c_fc\.bias'\]",
    ):
        gpt2_from_hf(state, config)
    state = dict(model.state_dict())
    state["transformer.h.0.attn.c_attn.weight"] = torch.zeros(36, 12)  # transposed
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.weight.*\(36, 12\).*\(12, 36\)"):
        gpt2_from_hf(state, config)
    wrong = dataclasses.replace(config, vocab_size=32)
    with pytest.raises(ValueError, match=r"wte\.weight.*\(31, 12\).*\(32, 12\)"):
        gpt2_from_hf(model, wrong)
    untied = dataclasses.replace(config, tie_embeddings=False)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(KeyError, match=r"lm_head\.weight"):
        gpt2_from_hf(state, untied)
    state = dict(model.state_dict(), **{"transformer.h.x.foo": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"'h\.x\.foo' does not name a block h\.<int>"):
        gpt2_from_hf(state, config)  # was int()'s message
    state = dict(model.state_dict(), **{"wte.weight": torch.zeros(31, 12)})
    with pytest.raises(ValueError, match=r"holds 'wte\.weight' twice"):
        gpt2_from_hf(state, config)  # one of the two silently won
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("n_head", "vocab_size")}
    with pytest.raises(KeyError, match="the GPT-2 config has no n_head, vocab_size"):
        gpt2_config_from_hf(fields)  # was KeyError: 'vocab_size'
    for not_a_config in (None, "gpt2"):  # was AttributeError: ... has no attribute 'to_dict'
        with pytest.raises(TypeError, match=f"got {type(not_a_config).__name__}"):
            gpt2_config_from_hf(not_a_config)


@pytest.mark.parametrize(
    "extra",
    [
        "transformer.h.0.attn.c_attn.wieght",  # a misspelt name
        "transformer.h.0.crossattention.c_attn.weight",  # cross-attention GPT-2 lacks
        "score.weight",  # another model's head
        "h.01.ln_1.weight",  # not the block h.1
    ],
)
def test_tensors_without_a_place_are_refused_unless_not_strict(extra):
    """A tensor the layout has no place for was dropped without a word: a different model."""
    model = _hf_model()
    config = gpt2_config_from_hf(model.config)
    state = dict(model.state_dict(), **{extra: torch.zeros(3)})
    name = extra.removeprefix("transformer.").replace(".", r"\.")
    with pytest.raises(
        ValueError,
        match=rf"1 tensor\(s\) that the layout has no place for: '{name}'",
    ):
        gpt2_from_hf(state, config)
    loose = gpt2_from_hf(state, config, strict=False)
    for a, b in zip(jax.tree.leaves(loose), jax.tree.leaves(gpt2_from_hf(model, config))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_old_mask_buffers_are_not_weights():
    model = _hf_model()
    config = gpt2_config_from_hf(model.config)
    state = dict(model.state_dict())
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 17, 17, dtype=torch.bool))
    state["transformer.h.1.attn.masked_bias"] = torch.tensor(-1e4)
    gpt2_from_hf(state, config)  # strict, and accepted


@pytest.mark.parametrize("wrapper", ["_orig_mod.", "module.", "module._orig_mod."])
def test_a_wrapped_models_state_dict_imports(wrapper):
    """A torch.compile'd (or DistributedDataParallel) GPT2LMHeadModel's state dict names every
    tensor "_orig_mod.transformer..." ("module."): it failed with "missing tensor
    'h.0.attn.c_attn.weight'", and gpt2_from_hf has no prefix= to get past it."""
    model = _hf_model()
    config = gpt2_config_from_hf(model.config)
    state = {wrapper + k: v for k, v in model.state_dict().items()}
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        want = model.double()(torch.tensor(tokens)).logits.numpy()  # float64 reference
    _close(gpt(gpt2_from_hf(state, config), tokens, config), want)


def test_an_nn_gpt_module_exports():
    from flax import nnx

    from jaxattn.nn import GPT

    config = GPTConfig(vocab_size=31, block_size=17, num_layers=2, num_heads=3, embed_dim=12)
    module = GPT(config, rngs=nnx.Rngs(0))
    got = gpt2_to_hf_state_dict(module, config, framework="np")  # was an AttributeError
    want = gpt2_to_hf_state_dict(module.pure_weights(), config, framework="np")
    assert got.keys() == want.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], want[k])


def test_config_and_weights_must_agree():
    """Mismatches that would otherwise convert silently into a different model."""
    tied_model, untied_model = _hf_model(), _hf_model(tie_word_embeddings=False)
    config = gpt2_config_from_hf(tied_model.config)
    with pytest.raises(ValueError, match=r"blocks h\.1\.\.h\.1 beyond config\.num_layers=1"):
        gpt2_from_hf(tied_model, dataclasses.replace(config, num_layers=1))
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from wte\.weight"):
        gpt2_from_hf(untied_model, config)  # a tied config
    gpt2_from_hf(tied_model.state_dict(), config)  # a tied model's copy of wte is fine
    untied = gpt2_from_hf(untied_model, dataclasses.replace(config, tie_embeddings=False))
    with pytest.raises(ValueError, match=r"own output head but config\.tie_embeddings is True"):
        gpt2_to_hf_state_dict(untied, config)
    with pytest.raises(ValueError, match=r"mlp\.up\.w \(2, 12, 48\) != \(2, 12, 36\)"):
        gpt2_to_hf_state_dict(
            untied, dataclasses.replace(config, mlp_ratio=3, tie_embeddings=False)
        )


def test_a_tied_model_with_a_nan_in_wte_imports_as_tied():
    """Its lm_head.weight is wte itself: the tie check said "differs from wte.weight (an
    untied model: use tie_embeddings=False)", as NaN != NaN."""
    model = _hf_model()
    with torch.no_grad():
        model.transformer.wte.weight[5, 2] = float("nan")
    weights = gpt2_from_hf(model, gpt2_config_from_hf(model.config))
    assert weights.head is None and np.isnan(weights.token_embedding.table[5, 2])


@pytest.mark.parametrize("tied", [True, False])
def test_export_checks_the_embeddings_against_the_config(tied):
    """wte/wpe/lm_head sized otherwise than the config would not load into its GPT2LMHeadModel."""
    config = GPTConfig(
        vocab_size=31, block_size=17, num_layers=2, num_heads=3, embed_dim=12,
        tie_embeddings=tied,
    )  # fmt: skip
    weights = _random_weights(config, seed=9)
    with pytest.raises(ValueError, match=r"position_embedding\.table \(17, 12\) != \(9, 12\)"):
        gpt2_to_hf_state_dict(weights, dataclasses.replace(config, block_size=9))
    with pytest.raises(ValueError, match=r"token_embedding\.table \(31, 12\) != \(40, 12\)"):
        gpt2_to_hf_state_dict(weights, dataclasses.replace(config, vocab_size=40))
    if not tied:
        wider_head = weights._replace(head=weights.head._replace(w=jnp.zeros((12, 40))))
        with pytest.raises(ValueError, match=r"head\.w \(12, 40\) != \(12, 31\)"):
            gpt2_to_hf_state_dict(wider_head, config)


def test_unreadable_safetensors_path_is_named(tmp_path):
    config = gpt2_config_from_hf(_hf_model().config)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        gpt2_from_hf(tmp_path, config)  # save_pretrained's folder, not its model.safetensors
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a valid \.safetensors"):
        gpt2_from_hf(tmp_path / "model.safetensors", config)


def test_config_of_a_bare_dict_takes_gpt2s_defaults():
    """The hub's gpt2 config.json names neither tie_word_embeddings nor n_inner nor
    layer_norm_epsilon: GPT-2's defaults (tied head, F = 4 D, eps 1e-5, gelu_new) apply."""
    got = gpt2_config_from_hf(
        {"n_embd": 12, "n_head": 3, "n_layer": 2, "n_positions": 17, "vocab_size": 31}
    )
    assert got.tie_embeddings is True and got.mlp_dim == 48 and got.mlp_ratio == 4
    assert got.layer_norm_eps == 1e-5 and got.gelu_approximate is True


@pytest.mark.parametrize(
    ("activation", "tanh"),
    [("gelu_new", True), ("gelu_pytorch_tanh", True), ("gelu_fast", True), ("gelu", False)],
)
def test_config_maps_each_gelu_to_its_approximation(activation, tanh):
    cfg = transformers.GPT2Config(activation_function=activation)
    assert gpt2_config_from_hf(cfg).gelu_approximate is tanh


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scale_attn_weights": False}, r"scale_attn_weights=False"),
        ({"add_cross_attention": True}, r"add_cross_attention=True"),
        ({"n_embd": 12, "n_head": 3, "n_inner": 30}, r"n_inner=30 is not a multiple of n_embd=12"),
    ],
)
def test_config_refuses_each_unsupported_option(options, message):
    """Each would otherwise import as a model that computes something else than GPT-2's."""
    with pytest.raises(ValueError, match=message):
        gpt2_config_from_hf(transformers.GPT2Config(**options))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_bias": False}, r"use_bias=False \(GPT-2's layers all have biases\)"),
        ({"num_kv_heads": 1}, r"num_kv_heads=1 \(GPT-2 has a K/V head per query head\)"),
        ({"positions": "rope"}, r"positions='rope'"),
        # Same weights, another function: GPT-2 attends to its whole context.
        ({"attention_window": 2}, r"attention_window=2"),
    ],
)
def test_import_refuses_a_config_without_gpt2s_layout(changes, message):
    config = GPTConfig(vocab_size=31, block_size=17, num_layers=2, num_heads=3, embed_dim=12)
    layout = r"GPT-2's layout has no place for a GPTConfig with "
    with pytest.raises(ValueError, match=rf"^gpt2_from_hf: {layout}{message}"):
        gpt2_from_hf({}, dataclasses.replace(config, **changes))
    # Export refuses the same configs, in words that say what is wrong (it said "GPT-2
    # layout needs use_bias=False changed", naming neither the function nor the reason).
    changed = dataclasses.replace(config, **changes)
    weights = jax.eval_shape(lambda: init_gpt(jax.random.key(0), changed))
    with pytest.raises(ValueError, match=rf"^gpt2_to_hf_state_dict: {layout}{message}"):
        gpt2_to_hf_state_dict(weights, changed, framework="np")


def test_a_missing_head_hints_no_keys_that_share_only_weight():
    # A GPT2Model (no lm_head) imported untied: the hint listed h.0.attn.c_attn.weight and
    # four more keys that share nothing with lm_head.weight but the word "weight".
    model = transformers.GPT2Model(_hf_model().config)
    untied = dataclasses.replace(gpt2_config_from_hf(model.config), tie_embeddings=False)
    with pytest.raises(KeyError) as info:
        gpt2_from_hf(model, untied)
    assert "lm_head.weight" in str(info.value)
    assert "keys ending alike" not in str(info.value)
