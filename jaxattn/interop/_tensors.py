"""Tensor helpers shared by the converters: to NumPy, to PyTorch, checked state-dict reads."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

_FRAMEWORKS = ("pt", "np")

# Floating dtypes that NumPy lacks, which torch and safetensors have under these names:
# ml_dtypes' (JAX's) have the same bits. torch's .numpy() and torch.tensor() refuse them, and
# safetensors names a NumPy float8 dtype NumPy does not have, so they cross as raw bits.
_BIT_FLOATS = ("bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
_SAFETENSORS_FLOAT8 = {
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
_UINT = {1: "uint8", 2: "uint16"}  # (the same-width integer that carries the bits)


def to_numpy(x: Any) -> np.ndarray:
    """Return a NumPy copy of a torch tensor, JAX array or array-like (keeps the dtype)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor, without importing torch
        x = x.detach().cpu()
        name = str(x.dtype).removeprefix("torch.")
        if name in _BIT_FLOATS:
            # NumPy has no bfloat16 or float8 of its own: the same bits as ml_dtypes' (JAX's),
            # so the weights keep their dtype, as float16 ones do.
            import torch

            bits = x.view(getattr(torch, _UINT[x.element_size()])).numpy()
            return bits.view(getattr(ml_dtypes, name)).copy()
        return x.numpy().copy()
    return np.array(x)


def unwrap_compiled(module: Any) -> Any:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) wraps; else ``module``."""
    return getattr(module, "_orig_mod", module)


def state_dict_of(source: Any) -> Mapping[str, Any]:
    """Accept a ``torch.nn.Module`` (its ``state_dict()``) or a mapping of name -> tensor.

    A ``torch.compile``'d module is read through the module it wraps (``unwrap_compiled``):
    the wrapper's own state dict prefixes every name with ``_orig_mod.``."""
    source = unwrap_compiled(source)
    if hasattr(source, "state_dict") and callable(source.state_dict):
        return source.state_dict()
    if isinstance(source, Mapping):
        return source
    raise TypeError(f"expected a torch.nn.Module or a state dict mapping, got {type(source)}")


def pure_weights_of(weights: Any) -> Any:
    """A ``jaxattn.nn`` module's ``pure_weights()``; anything else is returned unchanged.

    Duck-typed (``hasattr``), so interop does not import ``jaxattn.nn``.
    """
    if hasattr(weights, "pure_weights") and callable(weights.pure_weights):
        return weights.pure_weights()
    return weights


class ReadLog(Mapping):
    """A read-only view of a state dict that notes each name read (``state[name]``), so that
    an import can refuse what it left unread (``refuse_unread``)."""

    def __init__(self, state: Mapping[str, Any]):
        self._state, self.read = state, set()

    def __getitem__(self, name: str) -> Any:
        value = self._state[name]
        self.read.add(name)
        return value

    def __contains__(self, name: object) -> bool:  # (Mapping's would read the tensor)
        return name in self._state

    def __iter__(self):
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


def refuse_unread(state: ReadLog, where: str, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """Raise ValueError naming the tensors under ``prefix`` that the import did not read
    (names ending in one of ``skip`` are not weights): as PyTorch's strict
    ``load_state_dict``, a misspelt or foreign tensor is not dropped silently."""
    unread = sorted(
        k for k in state if k.startswith(prefix) and k not in state.read and not k.endswith(skip)
    )
    if unread:
        shown = ", ".join(map(repr, unread[:10]))
        more = f" and {len(unread) - 10} more" if len(unread) > 10 else ""
        under = f" under prefix {prefix!r}" if prefix else ""
        raise ValueError(
            f"{where}: {len(unread)} tensor(s){under} that the layout has no place for: "
            f"{shown}{more} (strict=False skips them)"
        )


def _common_prefix(a: list[str], b: list[str]) -> int:
    """How many leading items ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def names_ending_alike(state: Mapping[str, Any], name: str, sep: str = ".") -> list[str]:
    """Up to 5 keys of ``state`` that end like ``name``, for the error of a missing tensor.

    Those share the longest tail of ``sep``-joined parts with it: for h.1.mlp.c_fc.weight,
    a prefixed transformer.h.1.mlp.c_fc.weight or else h.0.mlp.c_fc.weight; for
    self_attn's out_proj.weight, layers.0.self_attn.out_proj.weight. A tail of the last
    part alone ("weight") is no hint unless it is the whole name: every weight would share
    it. ``sep`` is "/" in ``save_safetensors``' files."""
    parts = name.split(sep)[::-1]
    shared = {k: _common_prefix(str(k).split(sep)[::-1], parts) for k in state}
    longest = max(shared.values(), default=0)
    if longest < min(2, len(parts)):
        return []
    return sorted(k for k, n in shared.items() if n == longest)[:5]


def missing_tensor(state: Mapping[str, Any], name: str, expected: str = "") -> KeyError:
    """The KeyError for ``name`` missing from ``state``, naming the keys that end alike
    (``names_ending_alike``). ``expected`` (e.g. "expected shape (3, 4)") goes in brackets
    after the name."""
    near = names_ending_alike(state, name)
    hint = f"; keys ending alike: {near}" if near else ""
    return KeyError(f"missing tensor {name!r}{f' ({expected})' if expected else ''}{hint}")


def get(state: Mapping[str, Any], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Read the weight ``state[name]`` as NumPy; KeyError/ValueError name the tensor."""
    if name not in state:
        raise missing_tensor(state, name, f"expected shape {shape}")
    arr = to_numpy(state[name])
    if arr.shape != tuple(shape):
        raise ValueError(f"tensor {name!r} has shape {arr.shape}, expected {tuple(shape)}")
    # Every tensor read here is a weight: an integer or boolean one is the wrong tensor (a
    # mask buffer, a mislabelled file), not something to cast silently.
    ml_float = arr.dtype.kind == "V" and arr.dtype.name.startswith(("bfloat", "float"))
    if not (arr.dtype.kind == "f" or ml_float):  # ml_dtypes' bfloat16 / float8_* are kind V
        raise ValueError(f"tensor {name!r} has dtype {arr.dtype}, expected a floating dtype")
    return arr


def check_framework(framework: str) -> None:
    if framework not in _FRAMEWORKS:
        raise ValueError(f"framework must be one of {_FRAMEWORKS}, got {framework!r}")


def export(arr: Any, framework: str) -> Any:
    """Return a contiguous NumPy copy of ``arr``, or a torch tensor owning its own memory."""
    out = np.ascontiguousarray(np.asarray(arr))
    if framework == "np":
        return out.copy()
    import torch

    if out.dtype.name in _BIT_FLOATS:  # torch cannot read ml_dtypes' floats: pass the bits
        bits = out.view(_UINT[out.dtype.itemsize]).copy()
        return torch.from_numpy(bits).view(getattr(torch, out.dtype.name))
    return torch.tensor(out)  # copies: exported tensors never share storage (safetensors-safe)


@contextlib.contextmanager
def naming_the_file(path: str) -> Iterator[None]:
    """Reading the safetensors file ``path`` inside: its errors name the file
    (safetensors' own do not), and a folder is refused as one."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, expected a .safetensors file")
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:  # truncated, empty or not a safetensors file at all
        raise ValueError(f"{path}: not a valid .safetensors file ({e})") from e


def read_safetensors(path: str | os.PathLike, load_file: Callable[[str], Any]) -> Any:
    """``load_file(path)``, with errors that name the file (``naming_the_file``).

    A file with float8 tensors, which safetensors' loaders cannot give NumPy or JAX
    ("module 'numpy' has no attribute 'float8_e4m3fn'"), is read as NumPy arrays, the
    float8 ones as ml_dtypes' (JAX's) float8."""
    path = os.fspath(path)
    from safetensors import deserialize, safe_open

    with naming_the_file(path):
        with safe_open(path, framework="np") as f:  # (reads and checks the header)
            dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
            if not set(dtypes.values()) & set(_SAFETENSORS_FLOAT8):
                return load_file(path)
            out = {n: f.get_tensor(n) for n, d in dtypes.items() if d not in _SAFETENSORS_FLOAT8}
        with open(path, "rb") as file:
            for name, t in deserialize(file.read()):
                if t["dtype"] in _SAFETENSORS_FLOAT8:
                    dtype = getattr(ml_dtypes, _SAFETENSORS_FLOAT8[t["dtype"]])
                    out[name] = np.frombuffer(t["data"], dtype).reshape(t["shape"])
    return {name: out[name] for name in dtypes}  # (the file's order)
