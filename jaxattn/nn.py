"""Flax NNX modules: thin owners of the same weight pytrees the pure functions take.

Each module stores one weights NamedTuple (the tree ``jaxattn.ops``/``jaxattn.models``
build) with every array wrapped in ``nnx.Param``; ``__call__`` unwraps it and calls the pure
function. There is no math here, so a module and its function compute the same numbers,
and the two forms convert both ways::

    lstm = LSTM.from_weights(weights)    # pure tree -> module
    weights = lstm.pure_weights()              # module -> pure tree
    nnx.state(lstm, nnx.Param)                 # the same leaves, by path, for optimisers

Modules: ``LSTM`` (stacked/bidirectional, like ``torch.nn.LSTM(batch_first=True)``),
``GeneralAttention`` (Luong), ``AdditiveAttention`` (Bahdanau), ``MultiHeadAttention``,
and whole models: ``GPT`` (``jaxattn.models.gpt``: logits, loss, sampling), ``Seq2Seq``
(the LSTM encoder-decoder, ``jaxattn.models.seq2seq``) and ``Transformer``
(``jaxattn.models.transformer``): logits, loss, translation. A model module keeps its
frozen config as a static attribute, so ``nnx.jit`` compiles once per config. The
partition rules (``jaxattn.models.partitioning``, placed by ``jaxattn.training.sharding``)
match the pure tree's paths: shard ``module.pure_weights()`` and build the module from the
result with ``from_weights``.

Dropout follows NNX's switches: modules start deterministic (evaluation);
``module.train()``, ``module.eval()`` and ``nnx.view(module, deterministic=...)`` set it,
and a call's ``deterministic=`` overrides it. Randomness stays explicit, as in the pure
functions: a training call takes ``rng=key`` (no RNG stream is kept in the module).
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.models import gpt as gpt_model
from jaxattn.models import seq2seq as seq2seq_model
from jaxattn.models import transformer as transformer_model
from jaxattn.models._config import check_rate_value, check_weights, describe_key, is_key, key_shape
from jaxattn.ops import attention as attention_ops
from jaxattn.ops import lstm as lstm_ops
from jaxattn.ops._checks import (
    caller_stacklevel,
    check_flag,
    check_float_dtype,
    check_floating_leaves,
)

__all__ = [
    "GPT",
    "LSTM",
    "AdditiveAttention",
    "GeneralAttention",
    "MultiHeadAttention",
    "Seq2Seq",
    "Transformer",
    "WeightsModule",
]

Array = jax.Array


def _is_param(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _own(a: Any) -> Any:
    """A JAX array (or shape) as is; anything else (NumPy) copied into a new JAX array.

    jnp.array copies: jnp.asarray shared an aligned NumPy buffer on CPU before jax 0.10.1, so
    later writes to the caller's array changed the module.
    """
    return a if isinstance(a, (jax.Array, jax.ShapeDtypeStruct)) else jnp.array(a)


def _params(weights: Any) -> Any:
    """Wrap every array of ``weights`` in ``nnx.Param``, copying NumPy arrays into JAX ones.

    A NumPy leaf (e.g. a converted checkpoint) would otherwise stay the caller's mutable
    buffer, so writing to it later would silently change the module's weights.
    """

    return jax.tree.map(lambda a: nnx.Param(_own(a)), weights)


def _params_key(rngs: Any, module: Any) -> Array:
    """``rngs.params()``, the key a constructor draws ``module``'s weights with; ``TypeError``
    naming the module unless ``rngs`` is an ``nnx.Rngs`` (a key, as the pure inits take, or
    a seed failed as "'PRNGKeyArray' object has no attribute 'params'")."""
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(
            f"{type(module).__name__}: rngs must be an nnx.Rngs such as nnx.Rngs(0), got "
            f"{describe_key(rngs)}"
        )
    return rngs.params()


def _holds_params(weights: Any) -> bool:
    """True for a tree with ``nnx.Param`` leaves (``module.weights``, not ``pure_weights()``)."""
    return any(map(_is_param, jax.tree.leaves(weights, is_leaf=_is_param)))


def _stacked_hint(weights: Any) -> str:
    """A hint for an error about ``weights`` when every leaf has the same leading size, as
    in the stacked tree of an ``nnx.vmap`` ensemble (its size was read as a module size)."""
    shapes = [jnp.shape(leaf) for leaf in jax.tree.leaves(weights)]
    if not shapes or not all(shapes) or len({shape[0] for shape in shapes}) != 1:
        return ""
    if len(shapes) == 1 and len(shapes[0]) < 3:  # (one matrix: its rows are no stack)
        return ""
    return (
        f" (every weight has the leading size {shapes[0][0]}: a stacked tree, such as an "
        "nnx.vmap ensemble's? build those modules inside nnx.vmap(Module.from_weights))"
    )


def _check_fits(name: str, weights: Any, expected: Any, sizes: dict[str, Any]) -> None:
    """Raise unless ``weights`` has the tree and shapes of the module its sizes describe.

    The sizes come from a few leaves (``_sizes``); a tree that does not fit together (a
    layer-1 ``w_ih`` of another input size, an MHA ``w_o`` of the wrong heads) would
    otherwise fail only at the first call, blaming the input.
    """
    # By path and shape, not tree type: a list of LSTM layers is the tuple's equal.
    got, want = (
        [(jax.tree_util.keystr(path), tuple(jnp.shape(leaf))) for path, leaf in leaves]
        for leaves in (jax.tree.flatten_with_path(t)[0] for t in (weights, expected))
    )
    if [path for path, _ in got] != [path for path, _ in want]:
        raise ValueError(
            f"{name}.from_weights: the weights hold {[path for path, _ in got]}, but the "
            f"module that {sizes} describe holds {[path for path, _ in want]}"
        )
    for (path, shape), (_, expected_shape) in zip(got, want):
        if shape != expected_shape:
            raise ValueError(
                f"{name}.from_weights: weight {path} has shape {shape}, but the sizes read "
                f"off the others ({sizes}) give {expected_shape}{_stacked_hint(weights)}"
            )


def _check_width(module: Any, weights: Any, name: str, x: Any, field: str) -> None:
    """Raise unless ``x``'s last axis is the size ``field`` the module was built for (read
    off its ``weights``, the ``pure_weights()`` its call passes on).

    The pure ops check the same thing, but name themselves and can blame the weights
    ("w must be [dq, dk] = (6, 6), got (8, 6)") for an input of the wrong width.
    """
    size = module._sizes(weights)[field]
    try:
        # np.shape: JAX's warns (DeprecationWarning) for a nested list, which the ops take.
        shape = np.shape(x)
    except ValueError:  # a ragged list: the op refuses it by name
        return
    if not shape or shape[-1] != size:
        raise ValueError(
            f"{type(module).__name__}: {name} has shape {shape}, but the module was built for "
            f"{field}={size} (its last axis)"
        )


class WeightsModule(nnx.Module):
    """Base class: owns ``self.weights``, a weights NamedTuple whose arrays are ``nnx.Param``s."""

    def __init__(self, weights: Any):
        self.weights = nnx.data(_params(weights))

    @classmethod
    def from_weights(cls, weights: Any, **options: Any):
        """Build a module that owns ``weights`` (a pure pytree), e.g. a converted checkpoint.

        The constructor's sizes are read off the weights' shapes (``_sizes``); the module is
        built abstractly (``nnx.eval_shape``, no random init) and then given ``weights``.
        NumPy leaves are copied; JAX arrays are shared, not copied (as ``nnx.Param(x)``
        shares ``x``): donating the module's state to a jitted step deletes the caller's
        tree too, and ``pure_weights()`` likewise returns the module's own arrays.
        """
        # ``module.weights`` is the same tree with nnx.Param leaves: each would be wrapped in
        # a second Param, and pure_weights() and safetensors names would carry ``.value``.
        if _holds_params(weights):
            raise TypeError(
                f"{cls.__name__}.from_weights: expected the pure weights tree (e.g. "
                f"module.pure_weights()), got {type(weights).__name__} of nnx.Params"
            )
        weights = jax.tree.map(_own, weights)  # NumPy -> JAX copies, dtypes canonical
        # As the models' weight check does: an integer tree ran silently in the attention
        # modules, or MultiHeadAttention blamed a param_dtype the caller never passed.
        check_floating_leaves(weights, "weights", f"{cls.__name__}.from_weights")
        try:
            sizes = cls._sizes(weights)
        except (AttributeError, TypeError, LookupError, ValueError) as e:
            # A module, an nnx.State or another layer's tree: say so, not "no attribute w_q".
            raise TypeError(
                f"{cls.__name__}.from_weights: expected the pure weights tree of a "
                f"{cls.__name__} (e.g. module.pure_weights()), got {type(weights).__name__}: {e}"
                f"{_stacked_hint(weights)}"
            ) from e
        # Options the weights fix failed as "got multiple values for keyword argument", or for
        # MultiHeadAttention's dtype= (param_dtype's old name) as "got dtype= and param_dtype=",
        # which the caller never passed together.
        if "rngs" in options:
            raise TypeError(f"{cls.__name__}.from_weights: takes no rngs (nothing is drawn)")
        fixed = sorted({*sizes, *(("dtype",) if "param_dtype" in sizes else ())} & set(options))
        if fixed:
            raise TypeError(
                f"{cls.__name__}.from_weights: {', '.join(fixed)} cannot be passed: the weights "
                f"set it ({sizes}); change the weights instead (e.g. cast them)"
            )
        module = nnx.eval_shape(lambda: cls(**sizes, **options, rngs=nnx.Rngs(0)))
        _check_fits(cls.__name__, weights, module.pure_weights(), sizes)
        module.weights = nnx.data(_params(weights))
        return module

    @staticmethod
    def _sizes(weights: Any) -> dict[str, Any]:
        """The constructor arguments that reproduce ``weights``' shapes."""
        raise NotImplementedError

    def pure_weights(self) -> Any:
        """The weights as the plain pytree the pure functions take.

        ``get_value()``, not ``p[...]``: an abstract module (``nnx.eval_shape``, or
        ``from_weights`` of a ``jax.eval_shape`` tree) holds ``ShapeDtypeStruct``s, which
        cannot be indexed; its pure tree is then the shapes (a ``load_safetensors`` template).
        """
        return jax.tree.map(self._value_of, self.weights, is_leaf=_is_param)

    def _call_weights(self) -> Any:
        """``pure_weights()`` for a computation (a call, loss, decoding): ``TypeError`` for an
        abstract module's ``ShapeDtypeStruct``s, which failed inside JAX naming neither the
        module nor the cause ("'ShapeDtypeStruct' object has no attribute 'astype'", or "is
        not a valid JAX type")."""
        weights = self.pure_weights()
        if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(weights)):
            name = type(self).__name__
            raise TypeError(
                f"{name} holds abstract weights (jax.ShapeDtypeStruct: a module of "
                f"nnx.eval_shape, or {name}.from_weights of shapes), a template to load into: "
                "give it arrays first (nnx.update(module, restored_state), or from_weights of "
                "the loaded tree)"
            )
        return weights

    def _value_of(self, param: Any) -> Any:
        if not _is_param(param):
            # ``module.weights = tree`` of plain arrays (as in Flax, an attribute set to an
            # array is no Param: nnx.state and an optimizer no longer see it); the call then
            # failed as "'ArrayImpl' object has no attribute 'get_value'".
            name = type(self).__name__
            raise TypeError(
                f"{name}.weights holds a leaf of type {type(param).__name__}, not an "
                f"nnx.Param (a pure tree assigned to .weights?): build "
                f"{name}.from_weights(tree), or nnx.update(module, "
                f"nnx.state({name}.from_weights(tree)))"
            )
        return param.get_value()


class _DropoutModule(WeightsModule):
    """A module with dropout: ``self.deterministic`` follows NNX's switches.

    ``module.train()``/``.eval()`` set the attribute by name; ``nnx.view`` calls
    ``set_view``. Modules without dropout do not define it, so ``nnx.view(module,
    deterministic=...)`` reports the key as unused there, as for ``nnx.Linear``.
    """

    deterministic: bool

    def __setattr__(self, name: str, value: Any) -> None:
        # None would mean training (dropout on), a string or a JAX array breaks nnx.jit.
        if name == "deterministic" and not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{type(self).__name__}: deterministic must be a bool, got {value!r}")
        super().__setattr__(name, value)

    def _dropout_args(self, rng: Any, deterministic: bool | None, rate: float) -> tuple[Any, bool]:
        """``(rng, deterministic)`` for the pure call, ``deterministic=None`` read from the
        module. Refused here, naming the module and what to do, what the pure function
        would refuse naming itself and a flag the caller never passed."""
        name = type(self).__name__
        if deterministic is None:
            deterministic = self.deterministic
        # The call's flag too (__setattr__ checks the attribute): lstm_stack and the models
        # took "no" as true, dropout silently off.
        check_flag(deterministic, "deterministic", name)
        # nnx.Dropout takes either (rngs=); here the pure functions' key ("unexpected PRNG key
        # type <class 'flax.nnx.rnglib.RngStream'>" for rng=rngs.dropout).
        if isinstance(rng, (nnx.Rngs, nnx.RngStream)):
            raise TypeError(
                f"{name}: rng is a key, not an nnx.{type(rng).__name__}: pass rng=rngs.dropout()"
            )
        if rng is None and not deterministic and rate > 0:
            raise ValueError(
                f"{name} applies dropout {rate} here (train mode, or deterministic=False): "
                "pass rng=key to the call, or call .eval() (or pass deterministic=True) to "
                "run without it"
            )
        # An int seed (nnx.Rngs(0)'s habit) failed in JAX as "invalid PRNG key data",
        # naming neither the module nor rng; a batch of keys as "split accepts a single key".
        if not deterministic and rate > 0 and not (is_key(rng) and key_shape(rng) == ()):
            raise TypeError(
                f"{name}: rng must be one PRNG key such as jax.random.key(seed) or "
                f"rngs.dropout(), got {describe_key(rng)}"
            )
        return rng, deterministic

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by ``nnx.view(module, deterministic=...)``.

        Args:
          deterministic: if True, disables dropout.
        """
        if deterministic is not None:
            self.deterministic = deterministic


class LSTM(_DropoutModule):
    """Stacked, optionally bidirectional LSTM over ``[B, T, I]`` inputs (see ``ops.lstm_stack``)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout_rate: float = 0.0,
        deterministic: bool = True,
        implementation: str | None = None,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            lstm_ops.init_lstm_stack(
                _params_key(rngs, self),
                input_size,
                hidden_size,
                num_layers=num_layers,
                bidirectional=bidirectional,
            )
        )
        check_rate_value(dropout_rate, "LSTM: dropout_rate")  # now, not at the first train call
        if dropout_rate > 0 and num_layers == 1:  # as torch.nn.LSTM warns
            warnings.warn(
                f"LSTM: dropout_rate={dropout_rate} acts between layers only, and a "
                "1-layer LSTM has none: it drops nothing",
                stacklevel=caller_stacklevel((__file__,), ("flax", "jax")),
            )
        if implementation not in (None, *lstm_ops.IMPLEMENTATIONS):
            raise ValueError(
                f"LSTM: implementation must be None or one of {lstm_ops.IMPLEMENTATIONS}, "
                f"got {implementation!r}"
            )
        self.dropout_rate = dropout_rate
        # ops.lstm_scan's kernel: None (the hand-written backward) or "autodiff" (forward
        # mode, jax.jvp) or "cudnn" (GPU).
        self.implementation = implementation
        # An attribute, so that module.train() / .eval() / nnx.view(deterministic=...) reach it.
        self.deterministic = deterministic

    @staticmethod
    def _sizes(weights: Any) -> dict[str, Any]:
        first = weights[0]
        bidirectional = isinstance(first, lstm_ops.BidirectionalWeights)
        w = first.forward if bidirectional else first
        return dict(
            input_size=w.w_ih.shape[0],
            hidden_size=w.w_hh.shape[0],
            num_layers=len(weights),
            bidirectional=bidirectional,
        )

    def __call__(
        self,
        xs: Array,
        carry: tuple[Array, Array] | None = None,
        *,
        lengths: Array | None = None,
        rng: Array | None = None,
        deterministic: bool | None = None,
    ) -> tuple[Array, tuple[Array, Array]]:
        """``xs: [B, T, I]`` -> ``(ys [B, T, dirs*h], (h_n, c_n) [L*dirs, B, h])``.

        Dropout (``dropout_rate``) is active when not ``deterministic`` and needs ``rng``;
        ``deterministic=None`` uses ``self.deterministic`` (set by ``train()``/``eval()``).
        """
        weights = self._call_weights()
        _check_width(self, weights, "xs", xs, "input_size")
        between_layers = self.dropout_rate if len(weights) > 1 else 0.0  # (one layer: none)
        rng, deterministic = self._dropout_args(rng, deterministic, between_layers)
        return lstm_ops.lstm_stack(
            weights,
            xs,
            carry,
            lengths=lengths,
            dropout_rate=self.dropout_rate,
            rng=rng,
            deterministic=deterministic,
            implementation=self.implementation,
        )


class _ScoredAttention(WeightsModule):
    """Seq2seq attention: ``context = softmax(scores(query, keys)) values``."""

    def _scores(self, weights: Any, query: Array, keys: Array) -> Array:
        raise NotImplementedError

    def __call__(
        self, query: Array, keys: Array, values: Array | None = None, *, mask: Array | None = None
    ) -> tuple[Array, Array]:
        """Attend from ``query: [..., Tq, dq]`` over ``keys: [..., Tk, dk]``.

        ``values`` default to the keys (the encoder states); ``mask`` is broadcastable to
        ``[..., Tq, Tk]``, True = attend.
        Returns ``(context [..., Tq, dv], weights [..., Tq, Tk])``.
        """
        weights = self._call_weights()
        _check_width(self, weights, "query", query, "query_dim")
        _check_width(self, weights, "keys", keys, "key_dim")
        scores = self._scores(weights, query, keys)
        return attention_ops.attend(scores, keys if values is None else values, mask)


class GeneralAttention(_ScoredAttention):
    """Luong "general" attention: ``scores = q W kᵀ``."""

    def __init__(self, query_dim: int, key_dim: int, *, rngs: nnx.Rngs):
        super().__init__(attention_ops.init_general(_params_key(rngs, self), query_dim, key_dim))

    @staticmethod
    def _sizes(weights: Any) -> dict[str, Any]:
        query_dim, key_dim = weights.shape
        return dict(query_dim=query_dim, key_dim=key_dim)

    def _scores(self, weights: Any, query: Array, keys: Array) -> Array:
        return attention_ops.general_scores(weights, query, keys)


class AdditiveAttention(_ScoredAttention):
    """Bahdanau additive attention: ``scores = v · tanh(q W_q + k W_k)``."""

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int, *, rngs: nnx.Rngs):
        super().__init__(
            attention_ops.init_additive(_params_key(rngs, self), query_dim, key_dim, hidden_dim)
        )

    @staticmethod
    def _sizes(weights: Any) -> dict[str, Any]:
        query_dim, hidden_dim = weights.w_query.shape
        return dict(query_dim=query_dim, key_dim=weights.w_key.shape[0], hidden_dim=hidden_dim)

    def _scores(self, weights: Any, query: Array, keys: Array) -> Array:
        return attention_ops.additive_scores(weights, query, keys)


class MultiHeadAttention(_DropoutModule):
    """Multi-head (self- or cross-) attention, GQA when ``num_kv_heads < num_heads``.

    The weights are ``jaxattn.ops.init_multi_head_attention``'s (see it for the sizes);
    ``param_dtype`` is theirs, as in ``flax.nnx``. There is no separate compute dtype:
    the inputs set it (``jaxattn.ops.layers.project``), so float32 weights with bfloat16 inputs
    give bfloat16 products, where ``flax.nnx.MultiHeadAttention`` would promote to float32.
    """

    def __init__(
        self,
        q_dim: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        kv_dim: int | None = None,
        num_kv_heads: int | None = None,
        out_dim: int | None = None,
        use_bias: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool = True,
        param_dtype: Any = None,  # None: float32
        rngs: nnx.Rngs,
        dtype: Any = None,
    ):
        if dtype is not None and param_dtype is not None:
            # flax.nnx's dtype= is the compute dtype: (dtype=bf16, param_dtype=f32) there
            # means float32 weights, which the old name would silently make bfloat16.
            raise TypeError(
                "MultiHeadAttention: got dtype= and param_dtype=; dtype= is the old name of "
                "param_dtype= (the weights' dtype; the inputs set the compute dtype): pass "
                "param_dtype= only"
            )
        if dtype is not None:  # the name until 2026-12-04
            warnings.warn(
                "MultiHeadAttention: dtype= is the weights' dtype, now named param_dtype= "
                "(as in flax.nnx); dtype= will go",
                DeprecationWarning,
                stacklevel=caller_stacklevel((__file__,), ("flax", "jax")),
            )
            param_dtype = dtype
        if param_dtype is not None:  # named here: the op's error said "dtype"
            check_float_dtype(
                param_dtype, "MultiHeadAttention", "param_dtype" if dtype is None else "dtype"
            )
        super().__init__(
            attention_ops.init_multi_head_attention(
                _params_key(rngs, self),
                q_dim,
                num_heads,
                head_dim=head_dim,
                kv_dim=kv_dim,
                num_kv_heads=num_kv_heads,
                out_dim=out_dim,
                use_bias=use_bias,
                dtype=jnp.float32 if param_dtype is None else param_dtype,
            )
        )
        check_rate_value(dropout_rate, "MultiHeadAttention: dropout_rate")
        self.dropout_rate = dropout_rate
        self.deterministic = deterministic  # see LSTM

    @staticmethod
    def _sizes(weights: Any) -> dict[str, Any]:
        q_dim, num_heads, head_dim = weights.w_q.shape
        kv_dim, num_kv_heads, _ = weights.w_k.shape
        return dict(
            q_dim=q_dim,
            num_heads=num_heads,
            head_dim=head_dim,
            kv_dim=kv_dim,
            num_kv_heads=num_kv_heads,
            out_dim=weights.w_o.shape[-1],
            use_bias=weights.b_q is not None,
            param_dtype=weights.w_q.dtype,
        )

    def __call__(
        self,
        x_q: Array,
        x_kv: Array | None = None,
        *,
        mask: Array | None = None,
        bias: Array | None = None,
        is_causal: bool = False,
        return_weights: bool = False,
        implementation: str | None = None,
        rng: Array | None = None,
        deterministic: bool | None = None,
        local_window_size: int | tuple[int, int] | None = None,
    ) -> Array | tuple[Array, Array]:
        """``x_q: [B, T, Dq]``, ``x_kv: [B, S, Dkv]`` -> ``[B, T, Dout]``.

        See ``jaxattn.ops.multi_head_attention`` for the arguments; ``deterministic=None``
        uses ``self.deterministic`` (set by ``train()``/``eval()``).
        """
        weights = self._call_weights()
        _check_width(self, weights, "x_q", x_q, "q_dim")
        # (self-attention: x_q is also the keys' input)
        kv_name, kv = ("x_q", x_q) if x_kv is None else ("x_kv", x_kv)
        _check_width(self, weights, kv_name, kv, "kv_dim")
        rng, deterministic = self._dropout_args(rng, deterministic, self.dropout_rate)
        return attention_ops.multi_head_attention(
            weights,
            x_q,
            x_kv,
            mask=mask,
            bias=bias,
            is_causal=is_causal,
            return_weights=return_weights,
            implementation=implementation,
            dropout_rate=self.dropout_rate,
            rng=rng,
            deterministic=deterministic,
            local_window_size=local_window_size,
        )


class _ModelModule(_DropoutModule):
    """A whole model of ``jaxattn.models``: its weights tree as ``nnx.Param``s, its frozen
    config a static attribute. Subclasses name the config and weights types and the init."""

    _config_type: type
    _weights_type: type
    _init: Any  # (rng, config) -> weights

    def __init__(self, config: Any, *, deterministic: bool = True, rngs: nnx.Rngs):
        self._check_config(config, type(self).__name__)
        super().__init__(type(self)._init(_params_key(rngs, self), config))
        self.config = config
        self.deterministic = deterministic  # see LSTM

    @classmethod
    def _check_config(cls, config: Any, where: str) -> None:
        if not isinstance(config, cls._config_type):
            raise TypeError(
                f"{where}: config must be a {cls._config_type.__name__}, got "
                f"{type(config).__name__}"
            )

    @classmethod
    def _check_weights(cls, weights: Any, config: Any, where: str) -> None:
        check_weights(weights, cls._init, config, where)

    @classmethod
    def from_weights(cls, weights: Any, config: Any, **options: Any):
        """Build a module owning ``weights`` (a pure tree: an init's, a checkpoint's, a
        converted one), which must fit ``config``: a model's sizes are not all in its
        weights' shapes, so the config comes along."""
        where = f"{cls.__name__}.from_weights"
        # ``module.weights`` (nnx.Param leaves) too: refused here, or the weight check would
        # report every path as missing and ``.value`` as unexpected.
        wrapped = _holds_params(weights)
        if isinstance(weights, nnx.Module) or not isinstance(weights, cls._weights_type) or wrapped:
            got = f"{type(weights).__name__} of nnx.Params" if wrapped else type(weights).__name__
            raise TypeError(
                f"{where}: expected the pure {cls._weights_type.__name__} tree (e.g. "
                f"module.pure_weights()), got {got}"
            )
        cls._check_config(config, where)  # before the weight check reads its fields
        cls._check_weights(weights, config, where)
        return super().from_weights(weights, config=config, **options)

    @staticmethod
    def _sizes(weights: Any) -> dict[str, Any]:
        return {}  # all in the config, which from_weights passes on

    def _dropout(self, rng: Any, deterministic: bool | None) -> dict[str, Any]:
        """The pure model's ``rng=`` and ``deterministic=`` (see ``_dropout_args``)."""
        rng, deterministic = self._dropout_args(rng, deterministic, self.config.dropout)
        return dict(rng=rng, deterministic=deterministic)


class GPT(_ModelModule):
    """Decoder-only transformer language model owning ``jaxattn.models.gpt``'s weights.

    ``config.dropout`` is the dropout rate. Train it the NNX way::

        model = GPT(config, rngs=nnx.Rngs(0))
        tx = optax.adamw(1e-3, mask=gpt.weight_decay_mask)  # no decay on norms, biases
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

        @nnx.jit
        def train_step(model, optimizer, tokens, targets, rng):
            loss, grads = nnx.value_and_grad(
                lambda m: m.loss(tokens, targets, rng=rng, deterministic=False)
            )(model)
            optimizer.update(model, grads)
            return loss

    or hand ``model.pure_weights()`` to ``jaxattn.training`` with ``gpt.gpt_loss``.
    """

    _config_type = gpt_model.GPTConfig
    _weights_type = gpt_model.GPTWeights
    _init = staticmethod(gpt_model.init_gpt)

    @classmethod
    def _check_weights(cls, weights: Any, config: Any, where: str) -> None:
        gpt_model.check_gpt_weights(weights, config, where, per_layer_ok=False)

    def __call__(
        self, tokens: Array, *, rng: Array | None = None, deterministic: bool | None = None
    ) -> Array:
        """``tokens: [B, T]`` ids -> ``[B, T, V]`` float32 logits (see ``gpt.gpt``).

        Dropout needs ``rng`` when active; ``deterministic=None`` uses
        ``self.deterministic`` (set by ``train()``/``eval()``).
        """
        return gpt_model.gpt(
            self._call_weights(), tokens, self.config, **self._dropout(rng, deterministic)
        )

    def loss(
        self,
        tokens: Array,
        targets: Array,
        *,
        mask: Array | None = None,
        rng: Array | None = None,
        deterministic: bool | None = None,
    ) -> Array:
        """Mean next-token cross-entropy of ``targets: [B, T]`` (see ``gpt.gpt_loss``)."""
        return gpt_model.gpt_loss(
            self._call_weights(),
            tokens,
            targets,
            self.config,
            **self._dropout(rng, deterministic),
            mask=mask,
        )

    def generate(
        self, prompt: Array, max_new_tokens: int, *, rng: Array | None = None, **sampling: Any
    ) -> Array:
        """``prompt: [B, T0]`` -> ``[B, T0 + max_new_tokens]`` with a KV cache; ``rng``: the
        sampling key (None only for greedy decoding, ``temperature=0``); ``sampling``:
        ``temperature``, ``top_k``, ``top_p``, ``unroll_layers``, ``prompt_lengths``,
        ``eos_id`` (see ``gpt.generate``)."""
        return gpt_model.generate(
            self._call_weights(), self.config, prompt, max_new_tokens, rng=rng, **sampling
        )


class _Translator(_ModelModule):
    """An encoder-decoder over ``[B, S]`` source ids: teacher-forced logits, the loss of a
    batch (``src, src_lengths, tgt_in, tgt_out, tgt_mask``) and translation."""

    _logits: Any  # (weights, src, src_lengths, tgt_in, config, *, rng, deterministic)
    _loss: Any  # (weights, batch, config, *, rng, deterministic, label_smoothing)
    _translate: Any  # (weights, config, src, src_lengths, *, beam_size, max_len, ...)

    def __call__(
        self,
        src: Array,
        src_lengths: Array,
        tgt_in: Array,
        *,
        rng: Array | None = None,
        deterministic: bool | None = None,
    ) -> Array | tuple[Array, Array | None]:
        """``src: [B, S]``, ``src_lengths: [B]``, ``tgt_in: [B, T]`` -> teacher-forced logits
        ``[B, T, V]`` (Seq2Seq: with its attention, see the model's ``*_logits``);
        ``deterministic=None`` uses ``self.deterministic``."""
        return type(self)._logits(
            self._call_weights(),
            src,
            src_lengths,
            tgt_in,
            self.config,
            **self._dropout(rng, deterministic),
        )

    def loss(
        self,
        batch: dict,
        *,
        rng: Array | None = None,
        deterministic: bool | None = None,
        label_smoothing: float = 0.0,
    ) -> Array:
        """Cross-entropy per real target token of ``batch`` (see the model's ``*_loss``)."""
        return type(self)._loss(
            self._call_weights(),
            batch,
            self.config,
            **self._dropout(rng, deterministic),
            label_smoothing=label_smoothing,
        )

    def translate(self, src: Array, src_lengths: Array, **options: Any) -> Array:
        """Greedy or beam-search translations ``[B, max_len]``; ``options``: ``beam_size``,
        ``max_len``, ``length_penalty`` (see the model's ``translate``)."""
        return type(self)._translate(self._call_weights(), self.config, src, src_lengths, **options)


class Seq2Seq(_Translator):
    """The LSTM encoder-decoder, with or without attention (``jaxattn.models.seq2seq``).

    ``__call__`` returns ``(logits [B, T, V], attention [B, T, S] or None)``.
    """

    _config_type = seq2seq_model.Seq2SeqConfig
    _weights_type = seq2seq_model.Seq2SeqWeights
    _init = staticmethod(seq2seq_model.init_seq2seq)
    _logits = staticmethod(seq2seq_model.seq2seq_logits)
    _loss = staticmethod(seq2seq_model.seq2seq_loss)
    _translate = staticmethod(seq2seq_model.translate)


class Transformer(_Translator):
    """The encoder-decoder Transformer (``jaxattn.models.transformer``).

    ``__call__`` returns logits ``[B, T, V]``; ``translate`` decodes with a KV cache.
    """

    _config_type = transformer_model.TransformerConfig
    _weights_type = transformer_model.TransformerWeights
    _init = staticmethod(transformer_model.init_transformer)
    _logits = staticmethod(transformer_model.transformer_logits)
    _loss = staticmethod(transformer_model.transformer_loss)
    _translate = staticmethod(transformer_model.translate)
