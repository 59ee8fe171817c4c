"""Optimizer: nanoGPT's schedule, AdamW with decay on matrices only, clipping.

References are written here independently: nanoGPT's ``get_lr`` and a float64 NumPy AdamW
with PyTorch's update rule (and torch.optim.AdamW itself when torch is installed).
"""

import math
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxattn.training import optim


def nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    # nanoGPT train.py: linear warmup, cosine decay, then constant min_lr.
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize(
    "lr, warmup, decay, min_lr", [(1e-3, 100, 2000, 1e-4), (6e-4, 7, 53, 0.0), (1e-2, 0, 11, 1e-3)]
)
def test_schedule_matches_nanogpt(lr, warmup, decay, min_lr):
    schedule = optim.learning_rate_schedule(
        lr, warmup_steps=warmup, lr_decay_steps=decay, min_lr=min_lr
    )
    steps = np.arange(decay + 50)
    got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32)))
    want = np.array([nanogpt_get_lr(int(i), lr, warmup, decay, min_lr) for i in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def test_schedule_rejects_bad_steps():
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.learning_rate_schedule(1e-3, warmup_steps=10, lr_decay_steps=5, min_lr=0.0)
    # Negative, NaN, or beyond float32 (1e39 would be inf in the float32 schedule).
    bad_rates = [(-1e-3, 0.0), (1e-3, -1.0), (float("nan"), 0.0), (1e39, 0.0)]
    # Not real scalars, as make_optimizer refuses them: a string failed in a comparison
    # (a TypeError), True ran as a rate of 1.0, an array failed with NumPy's "ambiguous".
    bad_rates += [("6e-4", 0.0), (True, 0.0), (1e-3, None), (np.full(2, 1e-3), 0.0)]
    for lr, min_lr in bad_rates:
        with pytest.raises(ValueError, match="finite float32 values >= 0"):
            optim.learning_rate_schedule(lr, warmup_steps=1, lr_decay_steps=5, min_lr=min_lr)
    # Step counts are ints: 2.5 bent the warmup ramp, None failed in a comparison.
    bad_steps = [(2.5, 5, "warmup_steps"), (None, 5, "warmup_steps")]
    bad_steps += [(1, True, "lr_decay_steps"), (1, -1, "lr_decay_steps")]
    for warmup, decay, name in bad_steps:
        with pytest.raises(ValueError, match=rf"learning_rate_schedule: {name} must be an int"):
            optim.learning_rate_schedule(1e-3, warmup_steps=warmup, lr_decay_steps=decay, min_lr=0)


def _params():
    rng = np.random.default_rng(1)
    return {
        "matrix": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
        "embedding": jnp.asarray(rng.normal(size=(7, 3)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
        "scale": jnp.asarray(rng.normal(size=(11,)), jnp.float32),
        "absent": None,
    }


def test_decay_mask_marks_matrices_only():
    mask = optim.decay_mask(_params())
    assert mask == {
        "matrix": True,
        "embedding": True,
        "bias": False,
        "scale": False,
        "absent": None,
    }


def test_zero_gradient_step_decays_only_matrices():
    # With zero gradients Adam's step is 0/(0 + eps) = 0, so only weight decay moves params.
    params = _params()
    lr, wd = 0.5, 0.1
    opt = optim.make_optimizer(lr, weight_decay=wd, grad_clip=1.0)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    for name in ("bias", "scale"):
        np.testing.assert_array_equal(new[name], params[name])
    for name in ("matrix", "embedding"):
        np.testing.assert_allclose(new[name], params[name] * (1 - lr * wd), rtol=1e-6)


def test_custom_decay_mask_is_used():
    params = _params()
    opt = optim.make_optimizer(
        0.5, weight_decay=0.1, decay_mask=lambda p: jax.tree.map(lambda x: x.ndim == 1, p)
    )
    grads = jax.tree.map(jnp.zeros_like, params)
    new = optax.apply_updates(params, jax.jit(opt.update)(grads, opt.init(params), params)[0])
    np.testing.assert_array_equal(new["matrix"], params["matrix"])
    assert not np.allclose(new["bias"], params["bias"])


def numpy_adamw(params, grads_seq, lrs, *, b1, b2, eps, wd, clip):
    """float64 AdamW as in torch.optim.AdamW + clip_grad_norm_, decay on ndim >= 2."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items() if v is not None}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (g, lr) in enumerate(zip(grads_seq, lrs), start=1):
        g = {k: np.asarray(x, np.float64) for k, x in g.items() if x is not None}
        norm = math.sqrt(sum(float(np.sum(x**2)) for x in g.values()))
        scale = min(1.0, clip / (norm + 1e-6)) if clip else 1.0
        for k in p:
            gk = g[k] * scale
            if p[k].ndim >= 2:
                p[k] = p[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk**2
            mhat, vhat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            p[k] = p[k] - lr * mhat / (np.sqrt(vhat) + eps)
    return p


def _grads_seq(params, n, scales):
    rng = np.random.default_rng(2)
    return [
        {
            k: None if x is None else rng.normal(size=x.shape).astype(np.float32) * s
            for k, x in params.items()
        }
        for s in scales[:n]
    ]


def test_adamw_schedule_and_clipping_match_numpy_reference():
    params = _params()
    hp = dict(learning_rate=1e-2, warmup_steps=2, lr_decay_steps=6, min_lr=1e-3)
    schedule = optim.learning_rate_schedule(
        hp["learning_rate"],
        warmup_steps=hp["warmup_steps"],
        lr_decay_steps=hp["lr_decay_steps"],
        min_lr=hp["min_lr"],
    )
    opt = optim.make_optimizer(schedule, b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=1.0)
    # Norms far above and below the clip threshold, so clipping changes the result.
    grads_seq = _grads_seq(params, 7, [20.0, 0.05, 3.0, 0.01, 7.0, 0.2, 1.0])
    state, p = opt.init(params), params
    update = jax.jit(opt.update)
    for g in grads_seq:
        updates, state = update(g, state, p)
        p = optax.apply_updates(p, updates)
    lrs = [nanogpt_get_lr(i, hp["learning_rate"], 2, 6, hp["min_lr"]) for i in range(7)]
    want = numpy_adamw(params, grads_seq, lrs, b1=0.9, b2=0.99, eps=1e-8, wd=0.1, clip=1.0)
    for k, x in want.items():
        np.testing.assert_allclose(np.asarray(p[k]), x, rtol=2e-5, atol=1e-6, err_msg=k)
    # And clipping matters here: without it the result differs.
    unclipped = numpy_adamw(params, grads_seq, lrs, b1=0.9, b2=0.99, eps=1e-8, wd=0.1, clip=None)
    assert not np.allclose(unclipped["matrix"], want["matrix"], rtol=1e-3)


def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    params = {k: v for k, v in _params().items() if v is not None}
    grads_seq = _grads_seq(params, 5, [9.0, 0.1, 2.0, 0.5, 4.0])
    lrs = [nanogpt_get_lr(i, 1e-2, 2, 4, 1e-3) for i in range(5)]
    tp = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in params.items()}
    groups = [
        {"params": [t for t in tp.values() if t.dim() >= 2], "weight_decay": 0.1},
        {"params": [t for t in tp.values() if t.dim() < 2], "weight_decay": 0.0},
    ]
    topt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.99))
    for g, lr in zip(grads_seq, lrs):
        for k, t in tp.items():
            t.grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)
        for group in topt.param_groups:
            group["lr"] = lr
        topt.step()
    schedule = optim.learning_rate_schedule(1e-2, warmup_steps=2, lr_decay_steps=4, min_lr=1e-3)
    opt = optim.make_optimizer(schedule, b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=1.0)
    state, p = opt.init(params), params
    update = jax.jit(opt.update)
    for g in grads_seq:
        updates, state = update(g, state, p)
        p = optax.apply_updates(p, updates)
    for k, t in tp.items():
        np.testing.assert_allclose(np.asarray(p[k]), t.detach().numpy(), rtol=2e-5, atol=1e-6)


def test_optimizer_from_config():
    ml_collections = pytest.importorskip("ml_collections")
    config = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-3, min_lr=1e-4, warmup_steps=3, lr_decay_steps=9,
            b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=1.0,
        )
    )  # fmt: skip
    opt, schedule = optim.optimizer_from_config(config)
    assert float(schedule(jnp.int32(1))) == pytest.approx(nanogpt_get_lr(1, 1e-3, 3, 9, 1e-4))
    params = _params()
    jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    # The config's eps and a caller's decay_mask reach AdamW: the first update equals
    # make_optimizer's with the same settings (eps = 0.5 shows beside gradients of 0.1).
    config.eps = 0.5
    no_bias_decay = lambda p: jax.tree.map(lambda x: x.shape[-1] != 5, p)  # decays "scale"
    opt, schedule = optim.optimizer_from_config(config, decay_mask=no_bias_decay)
    want = optim.make_optimizer(
        schedule, b1=0.9, b2=0.99, eps=0.5, weight_decay=0.1, grad_clip=1.0,
        decay_mask=no_bias_decay,
    )  # fmt: skip
    grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
    got, _ = opt.update(grads, opt.init(params), params)
    ref, _ = want.update(grads, want.init(params), params)
    for name in ("matrix", "embedding", "bias", "scale"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("grad_clip", [None, 0.0, -1.0])
def test_non_positive_grad_clip_disables_clipping(grad_clip):
    # nanoGPT's convention: grad_clip = 0.0 turns clipping off (it must not clip to norm 0).
    params = _params()
    grads_seq = _grads_seq(params, 2, [20.0, 5.0])  # norms far above any sane threshold
    opt = optim.make_optimizer(1e-2, b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=grad_clip)
    state, p = opt.init(params), params
    for g in grads_seq:
        updates, state = jax.jit(opt.update)(g, state, p)
        p = optax.apply_updates(p, updates)
    want = numpy_adamw(params, grads_seq, [1e-2] * 2, b1=0.9, b2=0.99, eps=1e-8, wd=0.1, clip=None)
    for k, x in want.items():
        np.testing.assert_allclose(np.asarray(p[k]), x, rtol=2e-5, atol=1e-6, err_msg=k)


def test_optimizer_from_config_matches_numpy_reference():
    # Every setting read from the config reaches the optimizer: several steps with
    # gradients far above grad_clip, so clipping, b1, b2 and the schedule all show.
    config = types.SimpleNamespace(
        learning_rate=1e-2, min_lr=1e-3, warmup_steps=2, lr_decay_steps=6,
        b1=0.8, b2=0.95, weight_decay=0.1, grad_clip=0.5, eps=1e-6,
    )  # fmt: skip
    opt, schedule = optim.optimizer_from_config(config)
    params = _params()
    grads_seq = _grads_seq(params, 5, [20.0, 0.05, 3.0, 0.01, 7.0])
    state, p = opt.init(params), params
    update = jax.jit(opt.update)
    for g in grads_seq:
        updates, state = update(g, state, p)
        p = optax.apply_updates(p, updates)
    lrs = [nanogpt_get_lr(i, 1e-2, 2, 6, 1e-3) for i in range(5)]
    np.testing.assert_allclose([float(schedule(jnp.int32(i))) for i in range(5)], lrs, rtol=1e-5)
    want = numpy_adamw(params, grads_seq, lrs, b1=0.8, b2=0.95, eps=1e-6, wd=0.1, clip=0.5)
    for k, x in want.items():
        np.testing.assert_allclose(np.asarray(p[k]), x, rtol=2e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("warmup", [0, 3])
def test_schedule_without_a_cosine_phase_is_finite(warmup):
    # warmup_steps == lr_decay_steps (allowed): warm up to the peak, then min_lr at once.
    # (nanoGPT's get_lr divides by zero there.)
    schedule = optim.learning_rate_schedule(
        1e-3, warmup_steps=warmup, lr_decay_steps=warmup, min_lr=1e-4
    )
    got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(warmup + 3, dtype=jnp.int32)))
    want = [1e-3 * (t + 1) / (warmup + 1) for t in range(warmup)] + [1e-3, 1e-4, 1e-4]
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (dict(b1=1.0), "b1 must be in [0, 1), got 1.0"),  # NaN weights a step later
        (dict(b2=-0.5), "b2 must be in [0, 1), got -0.5"),
        (dict(b1=float("nan")), "b1 must be in [0, 1), got nan"),
        (dict(eps=-1.0), "eps must be a finite float32 >= 0, got -1.0"),  # climbs the gradient
        (dict(weight_decay=-0.1), "weight_decay must be a finite float32 >= 0, got -0.1"),
        (dict(weight_decay=float("inf")), "weight_decay must be a finite float32 >= 0, got inf"),
        (dict(grad_clip=float("nan")), "grad_clip must be a number or None, got nan"),
        (dict(learning_rate=-1e-3), "learning_rate must be a finite float32 >= 0, got -0.001"),
        # Beyond float32: every weight -inf after one update.
        (dict(learning_rate=1e39), "learning_rate must be a finite float32 >= 0, got 1e+39"),
        (dict(weight_decay=1e39), "weight_decay must be a finite float32 >= 0, got 1e+39"),
        # Not real scalars: a string failed in a comparison, True read as 1.
        (dict(grad_clip="1.0"), "grad_clip must be a number or None, got '1.0'"),
        (dict(b1=True), "b1 must be in [0, 1), got True"),
        (dict(eps=np.ones(2)), "eps must be a finite float32 >= 0, got array"),
    ],
)
def test_bad_adamw_settings_are_refused_by_name(setting, message):
    kwargs = dict(learning_rate=1e-3) | setting
    with pytest.raises(ValueError, match=re.escape(f"make_optimizer: {message}")):
        optim.make_optimizer(kwargs.pop("learning_rate"), **kwargs)


def test_traced_hyperparameters_pass_unchecked():
    # optax.inject_hyperparams calls the factory with the hyperparameters as arrays, traced
    # inside a jitted update.
    factory = optax.inject_hyperparams(optim.make_optimizer)
    tx = factory(learning_rate=1e-3, b1=0.9, weight_decay=0.1)
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)({"w": jnp.ones((2, 2))}, state, params)
    assert np.isfinite(updates["w"]).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_real_scalars_of_any_float_dtype_pass(dtype):
    """bfloat16 (NumPy kind "V", not "f") passed before the check read dtype kinds."""
    value = jnp.asarray(1e-3, dtype)
    optim.make_optimizer(value, b1=jnp.asarray(0.5, dtype), eps=jnp.asarray(0.0, dtype))
    optim.learning_rate_schedule(value, warmup_steps=1, lr_decay_steps=5, min_lr=value)


@pytest.mark.parametrize("grad_clip", [0.5, 0.0, -1.0])
def test_traced_grad_clip_clips_like_a_concrete_one(grad_clip):
    # inject_hyperparams traces grad_clip too: `grad_clip > 0` raised
    # TracerBoolConversionError inside the jitted update.
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    grads = {"w": jnp.full((2, 2), 3.0), "b": jnp.full(2, -4.0)}
    settings = dict(learning_rate=0.1, eps=1.0, grad_clip=grad_clip)  # (eps: size counts)
    tx = optax.inject_hyperparams(optim.make_optimizer)(**settings)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    plain = optim.make_optimizer(**settings)
    expected, _ = plain.update(grads, plain.init(params), params)
    for name in params:
        np.testing.assert_allclose(updates[name], expected[name], rtol=1e-5)


def test_injected_hyperparameters_keep_the_weight_decay_mask():
    # inject_hyperparams took the default decay_mask for a schedule, called it on the step
    # count and passed on its 0-d False: no weight was decayed, without a word.
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    grads = jax.tree.map(jnp.zeros_like, params)
    settings = dict(learning_rate=0.1, weight_decay=0.5)
    tx = optax.inject_hyperparams(optim.make_optimizer)(**settings)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    plain = optim.make_optimizer(**settings)
    expected, _ = plain.update(grads, plain.init(params), params)
    np.testing.assert_allclose(expected["w"], -0.05)  # decayed: lr * weight_decay * w
    for name in params:
        np.testing.assert_allclose(updates[name], expected[name], rtol=1e-6)
    # A custom mask goes in static_args; passed as a hyperparameter it is refused by name.
    mask = lambda p: {"w": False, "b": True}
    factory = optax.inject_hyperparams(optim.make_optimizer, static_args=("decay_mask",))
    tx = factory(**settings, decay_mask=mask)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], 0.0)
    np.testing.assert_allclose(updates["b"], -0.05)
    with pytest.raises(ValueError, match=r"decay_mask must be a function .*static_args"):
        optax.inject_hyperparams(optim.make_optimizer)(**settings, decay_mask=mask).init(params)
