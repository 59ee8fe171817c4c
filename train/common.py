"""Helpers shared by the training scripts in ``train/``: flag parsing, processes, mesh."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import signal
import sys
import textwrap
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from jaxattn.models._config import init_shapes
from jaxattn.training import sharding
from jaxattn.training.checkpoint import (
    ORBAX_READ_ERROR,
    Checkpointer,
    CheckpointError,
    IncompatibleCheckpointError,
    NotWritableError,
    check_compatible,
    error_chain,
    folder_exists,
    holds_step_folders,
    json_metadata,
)
from jaxattn.training.loop import LoopConfig, NonFiniteLossError
from jaxattn.training.metrics import is_remote
from jaxattn.training.state import TrainState, create_train_state

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, to join processes (jax.distributed)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. N-1.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Join the other processes with jax.distributed.initialize() and no arguments: on TPU "
    "VMs (and SLURM/Open MPI clusters) JAX finds the coordinator and process ids itself.",
)

_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout",
    300,
    "Seconds each process waits for all the others to join (jax.distributed's "
    "initialization_timeout): a process that fails before it joins (a missing file on its "
    "host) leaves the others waiting this long.",
    lower_bound=1,
)


def _user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME``, or ``~/.cache`` where it is unset, empty or relative (as the XDG
    spec says: an empty one put the cache in the current directory)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return Path(xdg) if os.path.isabs(xdg) else Path("~/.cache").expanduser()


_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    str(_user_cache_dir() / "jaxattn" / "xla"),
    "Folder for JAX's persistent compilation cache, so that a rerun, a resumed run or "
    "sampling loads its compiled programs instead of compiling them again ('' disables "
    "it). Without this flag on the command line, JAX_COMPILATION_CACHE_DIR (when set) wins.",
)
_CACHE_MAX_BYTES = 1 << 30  # Least recently used entries go first beyond 1 GiB.

# Exit status of a run stopped by SIGTERM or Ctrl-C after saving (128 + SIGTERM, as if
# killed): job schedulers then see an unfinished job and can requeue it, which resumes.
INTERRUPTED_EXIT_CODE = 143


# What a run reports as one ``error:`` line (bad input, a corrupt or incompatible
# checkpoint, a NaN loss), exiting with status 1; anything else is a bug and shows its traceback.
REPORTED_ERRORS = (
    FileNotFoundError, ValueError, CheckpointError, IncompatibleCheckpointError,
    NonFiniteLossError, NotWritableError,
)  # fmt: skip


# What orbax's reads still pending after a failed checkpoint read report as the process
# exits: their own wrapper of the read error, and the closed event loop they call back into.
_LEFTOVER_MESSAGES = (ORBAX_READ_ERROR, "Event loop is closed")


def _is_leftover(error: BaseException | None) -> bool:
    """True if ``error`` or an error in its chain is one of orbax's leftovers."""
    return any(
        message in str(link) for link in error_chain(error) for message in _LEFTOVER_MESSAGES
    )


def drop_orbax_leftovers() -> None:
    """Keep orbax's leftover reports of a failed checkpoint read off stderr, for this process.

    When one array of a checkpoint cannot be read, the restore fails while orbax's reads of
    the others are still pending, and orbax closes the event loop they report back to. Each
    then reports itself, as the error travels up and again as the interpreter exits: up to
    thousands of lines of tracebacks around the one line that says what is wrong. Those
    reports are dropped: unraisable errors whose chain holds orbax's read wrapper or "Event
    loop is closed" (TensorStore's callbacks into the closed loop), and asyncio's "exception
    was never retrieved". Any other error (an atexit callback's, such as a failed
    ``jax.distributed`` shutdown) is still reported. The scripts call this before they open a
    checkpoint: the reports start before the restore's error reaches them.
    """
    report_unraisable = sys.unraisablehook

    def drop_leftovers(unraisable) -> None:
        if not _is_leftover(unraisable.exc_value):
            report_unraisable(unraisable)

    sys.unraisablehook = drop_leftovers
    # "Task/Future exception was never retrieved": the loop orbax's reads ran on logs each
    # read that failed after the first had ended the restore (nothing awaits them now).
    logging.getLogger("asyncio").addFilter(
        lambda record: "exception was never retrieved" not in record.getMessage()
    )


def exit_with_error(error: BaseException) -> NoReturn:
    """Print ``error: <error>`` to stderr and exit with status 1.

    In a multi-process run the error is also left with the coordinator, for the other
    processes to name (``exit_if_another_process_failed``).
    """
    # One write, so that a traceback printed by another thread cannot land inside the line.
    sys.stderr.write(f"error: {error}\n")
    sys.stderr.flush()
    client = _distributed_client()
    if client is not None:
        try:
            client.key_value_set(f"{_ERROR_KEY}{jax.process_index()}", str(error))
        except Exception:  # (the coordinator gone: the others learn nothing more)
            pass
    sys.exit(1)


# Where a process that stops with an ``error:`` line leaves it in the coordinator's
# key-value store (``<prefix><process index>``).
_ERROR_KEY = "jaxattn/error/"


def _distributed_client():
    """``jax.distributed``'s coordination client, or None (one process, or none found)."""
    if not jax.distributed.is_initialized():
        return None
    try:
        from jax._src import distributed  # (no public handle on its key-value store)

        return distributed.global_state.client
    except (ImportError, AttributeError):
        return None


def exit_if_another_process_failed() -> None:
    """Exit with status 1 and one ``error:`` line if another process of the run stopped
    with one (``exit_with_error``); return otherwise.

    Call it on an error from a collective: a check that fails on one host only (its data
    file missing there, a flag given to it alone) stopped that process with a clear line,
    and the others, left waiting for it in their next collective, ended half a minute
    later in a long traceback of a timed-out broadcast that did not say why.
    """
    client = _distributed_client()
    if client is None:
        return
    try:
        reports = client.key_value_dir_get(_ERROR_KEY)
    except Exception:  # (the coordinator gone with its process: nothing to read)
        return
    if reports:
        key, message = min(reports, key=lambda report: int(report[0].rsplit("/", 1)[-1]))
        sys.stderr.write(
            f"error: process {key.rsplit('/', 1)[-1]} of the run failed, stopping this one "
            f"({jax.process_index()}) in a collective: {message}\n"
        )
        sys.stderr.flush()
        sys.exit(1)


# How ml_collections reports an unknown field (a field below a None one: ValueError), or
# the config file's own failure (NameError, ImportError: only the file's).
_CONFIG_ERRORS = (AttributeError, KeyError, ValueError, SyntaxError, NameError, ImportError)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a clear message for an unknown ``--config.<key>`` override and
    for a ``--config`` file that cannot be loaded."""
    try:
        try:
            rest = flags.FLAGS(_without_none_overrides(argv))
        except flags.Error as e:
            # A config file whose get_config raised (a ValueError in it, FILE:arg for a
            # get_config of no argument) came as absl's "FATAL Flags parsing error" with the
            # traceback ml_collections wrote into the message: its last line is the error.
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            if "Error whilst parsing config file" not in str(e) or not lines:
                _exit_with_flags_error(e)  # absl's own report
            where = f"--config={_config_file(argv, None)}"
            print(f"error: cannot load {where}: {lines[-1]}", file=sys.stderr)
            sys.exit(2)
        _check_config_loaded()
        _read_none_overrides()
        return rest
    except OSError as e:  # ml_collections defers a missing file to the config's first use.
        cause = str(e.__cause__ or e).strip().splitlines()
        path = _config_file(argv, None)
        where = "--config" if path is None else f"--config={path}"
        print(f"error: cannot load {where}: {cause[-1].strip() if cause else e}", file=sys.stderr)
        sys.exit(2)
    except _CONFIG_ERRORS as e:
        _report_config_error(e, argv)


def _exit_with_flags_error(error: flags.Error) -> NoReturn:
    """Report ``error`` as absl's ``app.parse_flags_with_usage`` does, and exit with status 1.

    That function parses the command line again to get the error: with ``--config=FILE``
    on it, ml_collections then defines the ``--config.<key>`` overrides a second time, and
    a mistyped override (``--config.num_steps=abc``) or any other bad flag was reported as
    "The flag 'config.num_steps' is defined twice".
    """
    message = str(error)
    message = f"\n{textwrap.indent(message, '  ')}" if "\n" in message else f" {message}"
    sys.stderr.write(f"FATAL Flags parsing error:{message}\n")
    sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def define_config_file(default: str, help_string: str):
    """``config_flags.DEFINE_config_file("config", default, ...)`` with ``parse_flags``'s
    message for a bad ``--config.<key>`` override.

    Without ``--config`` on the command line ml_collections loads the default file and
    checks the overrides' keys right here, when the script's module defines its flags,
    before ``parse_flags`` runs: an unknown key ended in a traceback.
    """
    try:
        return config_flags.DEFINE_config_file("config", default, help_string)
    except _CONFIG_ERRORS as e:
        _report_config_error(e, sys.argv, default)


def _config_file(argv: list[str], default: str | None) -> str | None:
    """The config file the command line names, else ``default``: ``--config=FILE[:arg]``,
    ``--config FILE`` or either with one dash, the last one before ``--`` (as absl reads
    them)."""
    named = None
    for i, arg in enumerate(argv):
        if arg == "--":  # absl reads no flags after it
            break
        if arg in ("--config", "-config") and i + 1 < len(argv):
            named = argv[i + 1]
        elif arg.startswith(("--config=", "-config=")):
            named = arg.split("=", 1)[1]
    return named.split(":", 1)[0] if named is not None else default


def _report_config_error(e: Exception, argv: list[str], default: str | None = None) -> NoReturn:
    """Exit with status 2 and one line: the config file's own error (a typo in it, no
    ``get_config``, a syntax error), or else a bad ``--config.<key>`` override's."""
    path = _config_file(argv, default)
    frames = {Path(frame.filename).resolve() for frame in traceback.extract_tb(e.__traceback__)}
    in_file = path is not None and Path(path).resolve() in frames
    if in_file or isinstance(e, SyntaxError) or "get_config" in str(e):
        message = f"{type(e).__name__}: {_one_line(e)}"
        print(f"error: cannot load --config={path}: {message}", file=sys.stderr)
        sys.exit(2)
    _report_bad_override(e, argv)


def _one_line(e: Exception) -> str:
    """``e``'s message on one line. ml_collections' KeyErrors (and the AttributeErrors made
    from them) carry a quoted, escaped message: ``'\\'modle\\'\\nDid you mean ...'``."""
    text = str(e.args[0]) if e.args and not isinstance(e, SyntaxError) else str(e)
    while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        try:
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            break
    return " ".join(text.split())


def _report_bad_override(e: Exception, argv: list[str]) -> NoReturn:
    """Print what is wrong with a ``--config.<key>`` override and exit with status 2."""
    message = _one_line(e)
    key = re.search(r"'(\w+)'", message)
    key = key.group(1) if key else message
    hint = re.search(r'Did you mean "(\w+)"', message)
    overrides = [a for a in argv if a.startswith("--config.")]
    named = [a for a in overrides if key in a.split("=")[0].split(".")]
    if named:
        print(
            f"error: unknown config key {key!r} in {named[0]}"
            + (f" (did you mean {hint.group(1)!r}?)" if hint else ""),
            file=sys.stderr,
        )
    else:  # e.g. a key below a number, --config.num_steps.x=1, reported as 'int'
        overrides = " ".join(overrides)
        print(f"error: bad config override in {overrides}: {message}", file=sys.stderr)
    sys.exit(2)


def _check_config_loaded() -> None:
    """Raise the deferred OSError of a ``--config`` file that could not be loaded (a typo in
    its path): ml_collections otherwise raises it, with two tracebacks, where the run first
    reads a setting."""
    if "config" in flags.FLAGS:
        hasattr(flags.FLAGS["config"].value, "to_dict")  # a failed load raises OSError here


# The keys of the command line's --config.KEY=None overrides (see _without_none_overrides).
_NONE_OVERRIDES: list[str] = []
# An override's flag, --config.KEY=VALUE or --config.KEY before a word (one dash too).
_CONFIG_OVERRIDE = re.compile(r"--?config\.([\w.]+)(?:=(.*))?", re.DOTALL)


def _without_none_overrides(argv: list[str]) -> list[str]:
    """``argv`` without its ``--config.KEY=None`` and ``--config.KEY None`` overrides,
    whose keys go to ``_NONE_OVERRIDES`` for ``_read_none_overrides`` to set after parsing.

    ml_collections parses ``None`` with the field's type: ``int('None')`` for an int
    placeholder failed (``--config.model.attention_window=None`` could not switch a window
    off), and a str field got the string ``'None'`` (``model.attention_implementation``,
    whose check then said "must be None or one of (...), got 'None'"). No setting of ours
    takes that string. A setting that cannot be None is refused by the script's own check
    of it, whichever form set it. As absl's, the last override of a key wins: a None one
    before ``--config.KEY=5`` is dropped (it set None, the value ignored).
    """
    _NONE_OVERRIDES.clear()
    kept, i = [], 0
    while i < len(argv) and argv[i] != "--":  # (absl reads no flags after "--")
        match = _CONFIG_OVERRIDE.fullmatch(argv[i])
        if match and match.group(1) in _NONE_OVERRIDES:  # overridden again: the last wins
            _NONE_OVERRIDES.remove(match.group(1))
        # --config.KEY=None, or --config.KEY None in two words
        two_words = match and match.group(2) is None and argv[i + 1 : i + 2] == ["None"]
        if match and (match.group(2) == "None" or two_words):
            _NONE_OVERRIDES.append(match.group(1))
            i += 2 if two_words else 1
        else:
            kept.append(argv[i])
            i += 1
    return kept + argv[i:]


def _override_values() -> dict[str, Any]:
    """The ``--config.KEY=VALUE`` overrides, with ``None`` for a VALUE of ``None``."""
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    return overrides | dict.fromkeys(_NONE_OVERRIDES)


def _read_none_overrides() -> None:
    """Set each ``--config.KEY=None`` override to None in the config (see
    ``_without_none_overrides``); an unknown key raises AttributeError, reported as
    ``parse_flags`` reports any unknown override."""
    if "config" not in flags.FLAGS:
        return
    config = flags.FLAGS["config"].value
    for key, value in _override_values().items():
        if value is None:
            *parents, name = key.split(".")
            owner = functools.reduce(getattr, parents, config)
            getattr(owner, name)  # (setattr would add an unknown key)
            setattr(owner, name, None)


def _load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _unknown_key(key: str, known: Iterable[str], where: str, prefix: str = "") -> ValueError:
    # Matched without a shared prefix ("model."), which would make any key look close.
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
    return ValueError(f"unknown config key {prefix + key!r} in {where}{hint}")


def _config_file_flag() -> str:
    """The file that ``--config`` names, or the script's default config file."""
    return config_flags.get_config_filename(flags.FLAGS["config"])


def config_source() -> str:
    """Where the config came from, for messages: the ``--config`` file, or ``the config``
    (a function called without the script's flags, as in a test)."""
    return (_config_file_flag() if "config" in flags.FLAGS else None) or "the config"


def check_config_keys(config: ml_collections.ConfigDict, default_file: str | os.PathLike) -> None:
    """Refuse a config whose keys outside ``model`` are not those of the script's default
    config file.

    ml_collections checks each ``--config.<key>`` override against the file, but nothing
    checks the file: a misspelt key there (``eval_evry``) would be ignored, the run taking
    the setting's default, and a missing one would fail where the run first reads it, as
    an ``AttributeError``. ``model`` is checked by ``model_config`` against the model's
    config class, whose fields have defaults.
    """
    source = config_source()

    def keys(tree: ml_collections.ConfigDict) -> set[str]:
        return {key for key in _flatten(tree.to_dict()) if key.split(".")[0] != "model"}

    want, got = keys(_load_config_file(default_file)), keys(config)
    if unknown := sorted(got - want):
        raise _unknown_key(unknown[0], want, source)
    if missing := sorted(want - got):
        raise ValueError(
            f"{source} does not set {', '.join(missing)}: a config for this script sets "
            f"every key that {Path(default_file).name} sets"
        )


def model_config(
    cls: type, fields: Mapping[str, Any], where: str | None = None, **fixed: Any
) -> Any:
    """``cls(**fixed, **fields)`` for a dataclass ``cls``, with ``fields`` from
    ``config.model``; a key that is not one of ``cls``'s fields (or is set by the script,
    ``fixed``) is refused by name rather than as a ``TypeError``. ``where`` names the
    config in the message (default ``config_source()``)."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in fixed]
    for key in fields:
        if key in fixed:  # (a close match would be a wrong hint: vocab_size -> block_size)
            raise ValueError(
                f"unknown config key {'model.' + key!r} in {where or config_source()} (the "
                "script sets it: leave it out)"
            )
        if key not in names:
            raise _unknown_key(key, names, where or config_source(), prefix="model.")
    return cls(**fixed, **fields)


def new_train_state(
    init: Callable[[jax.Array, Any], Any], model: Any, optimizer, init_rng, train_rng
) -> TrainState:
    """A fresh train state: ``init(init_rng, model)``'s weights, their optimizer state and the
    loop's key ``train_rng``."""
    return create_train_state(init(init_rng, model), optimizer, train_rng)


def abstract_train_state(
    init: Callable[[jax.Array, Any], Any], model: Any, optimizer
) -> TrainState:
    """``new_train_state``'s shapes and dtypes, computing nothing: what a checkpoint of this
    model and optimizer restores into."""
    key = jax.random.key(0)
    return jax.eval_shape(functools.partial(new_train_state, init, model, optimizer), key, key)


def enable_compilation_cache() -> None:
    """Point JAX's persistent compilation cache at ``--compilation_cache``.

    The Shakespeare run compiles for about 9 s (state init, train and eval steps at the
    start, the sampling program at the end); a later run with the same programs loads them
    instead. Entries are keyed by the program, the JAX version and the backend; an XLA:CPU
    entry compiled for another CPU is recompiled rather than run. Only process 0 of a
    multi-process run writes entries. Call before anything compiles; it does not touch a
    device, so it may come before ``initialize_distributed``.
    """
    if jax.config.jax_compilation_cache_dir and not flags.FLAGS["compilation_cache"].present:
        return  # JAX_COMPILATION_CACHE_DIR chose the folder and its settings.
    path = _COMPILATION_CACHE.value
    if path and not is_remote(path):  # A local folder: make sure it can be written.
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            usable = os.access(path, os.W_OK)
        except OSError:
            usable = False
        if not usable:
            print(f"warning: cannot write the compilation cache {path}; not caching",
                  file=sys.stderr)  # fmt: skip
            path = ""
    if not path:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_compilation_cache_max_size", _CACHE_MAX_BYTES)  # also file-locks
    # JAX keeps only compiles over 1 s by default; the eval step takes about 0.5 s.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)


def initialize_distributed() -> None:
    """Join the other processes of a multi-host run, before anything touches a device.

    ``--coordinator_address --num_processes --process_id`` (all three) or ``--distributed``
    (auto-detect); with neither, the run is one process. Each process waits
    ``--distributed_timeout`` seconds for the others to join.

    Raises:
      ValueError: some but not all of the three explicit flags were given.
    """
    explicit = {
        "coordinator_address": _COORDINATOR.value,
        "num_processes": _NUM_PROCESSES.value,
        "process_id": _PROCESS_ID.value,
    }
    given = {k: v for k, v in explicit.items() if v is not None}
    if given and len(given) != len(explicit):
        missing = sorted(set(explicit) - set(given))
        raise ValueError(f"--{' --'.join(missing)} missing: joining processes needs all three")
    if not given and not _DISTRIBUTED.value:
        return
    timeout = _DISTRIBUTED_TIMEOUT.value
    # Said first: the wait is silent, and a process that fails before it joins (or is never
    # started) ends it only with JAX's abort "DEADLINE_EXCEEDED" after the timeout.
    who = (
        f"as process {given['process_id']} of {given['num_processes']} through "
        f"{given['coordinator_address']}"
        if given
        else "(found by jax.distributed)"
    )
    print(
        f"Joining the run's processes {who}; each waits up to {timeout} s for all of them "
        "(--distributed_timeout)",
        file=sys.stderr,
        flush=True,
    )
    jax.distributed.initialize(**given, initialization_timeout=timeout)
    # Start the backend now, which waits for every process: a process that failed a check
    # before it touched a device (its data file missing on that host) otherwise left the
    # others waiting for its devices for 2 minutes (5 when it was process 0) before a
    # traceback of an unstarted backend.
    jax.devices()


# Where each process of a multi-process run leaves its settings and their digest
# (``check_processes_agree``): ``<prefix><process index>``.
_SETTINGS_KEY = "jaxattn/settings/"
_DIGEST_KEY = "jaxattn/settings_digest/"


def check_processes_agree(
    flag_values: Mapping[str, Any], config: ml_collections.ConfigDict | None
) -> None:
    """Refuse a multi-process run whose processes were given different settings: the
    ``flag_values`` (``--workdir`` as typed, and the flags that pick what the run does)
    and the ``config`` of a training run (None: taken from the checkpoint). Its
    ``data_path`` may differ: a host may read its own copy of the data.

    Every process runs one program on its own rows and shards: a learning rate given to
    one process alone trained its replicas of the weights with it, silently (the
    checkpoint recorded process 0's config); a ``num_steps`` or ``--workdir`` of its own
    left a process waiting in a collective for minutes before JAX aborted it, and another
    workdir failed orbax's save naming a temporary file. Every process calls it, after
    ``initialize_distributed`` and before anything is written; it does nothing on one
    process. The settings go through the coordinator's key-value store, not a collective
    (one would connect the processes, and a later error on one host then left the others
    hanging in their next collective instead of stopping).

    Raises:
      ValueError: on every process alike, naming the settings in which the first process
        that differs from process 0 differs, with both values.
    """
    client = _distributed_client()
    if client is None or jax.process_count() == 1:
        return
    settings = dict(flag_values)
    if config is not None:
        settings["config"] = {k: v for k, v in config.to_dict().items() if k != "data_path"}
    flat = _flatten(json_metadata(settings, "settings"))  # (tuples as lists, as saved)
    mine, index = json.dumps(flat, sort_keys=True), jax.process_index()
    timeout_ms = _DISTRIBUTED_TIMEOUT.value * 1000
    client.key_value_set(f"{_SETTINGS_KEY}{index}", mine)
    client.key_value_set(f"{_DIGEST_KEY}{index}", hashlib.sha256(mine.encode()).hexdigest())
    client.wait_at_barrier("jaxattn/settings", timeout_ms)  # every digest is there
    # Digests only (a few bytes per process), for a pod slice of many hosts.
    digests = {int(key.rsplit("/", 1)[-1]): d for key, d in client.key_value_dir_get(_DIGEST_KEY)}
    differ = sorted(i for i, digest in digests.items() if digest != digests[0])
    if not differ:
        return
    get = lambda i: client.blocking_key_value_get(f"{_SETTINGS_KEY}{i}", timeout_ms)
    other = differ[0]
    want, got = json.loads(get(0)), json.loads(get(other))
    show = lambda flat, key: repr(flat[key]) if key in flat else "(unset)"
    changes = [
        f"{key} {show(want, key)} -> {show(got, key)}"
        for key in sorted(set(want) | set(got))
        if want.get(key) != got.get(key)
    ]
    shown = ", ".join(changes[:4]) + (", ..." if len(changes) > 4 else "")
    raise ValueError(
        f"process {other} of the run was given other settings than process 0 (process 0 "
        f"-> process {other}: {shown}); give every process the same command line (but "
        "--process_id)"
    )


def sigterm_ends_the_process() -> None:
    """Give SIGTERM its default action back (end the process: status 143 in a shell), as
    in a one-process run, for the work after ``fit``'s loop or without one (sampling,
    decoding), where nothing is being saved.

    ``jax.distributed.initialize`` hands SIGTERM to JAX's preemption service for good. It
    only records the notice, for ``fit`` to agree with the other processes on a step to
    save at; outside the loop nothing asks, and ``launch.sh stop`` or a preemption notice
    did not stop sampling or the test decoding. Main thread only; no-op on one process.
    """
    if jax.distributed.is_initialized() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def workdir_from_flag(value: str | None) -> str:
    """The run folder that ``--workdir`` names: ``workdirs/<config file name>`` when it is
    left out (``workdirs/<name>_<arg>`` for ``--config=FILE:arg``, so that two models of
    one config file do not meet in one folder), with ``~`` expanded (the shell leaves it
    in ``--workdir=~/run``).

    Raises:
      ValueError: the flag is empty (e.g. ``--workdir=$UNSET``), which would otherwise
        train into the current folder; or it names a run's ``checkpoints`` folder, not
        the run (a fresh run would start in ``checkpoints/checkpoints``).
    """
    if value is None:
        # (Path's stem alone would drop ":arg" with the suffix: "tiny.py:transformer" -> "tiny")
        path, _, arg = _config_file_flag().partition(":")
        arg = re.sub(r"[^\w.-]+", "_", arg)  # a folder name, whatever the argument holds
        return str(Path("workdirs") / (Path(path).stem + (f"_{arg}" if arg else "")))
    if not value.strip():
        raise ValueError("--workdir is empty (leave it out for workdirs/<config name>)")
    if is_remote(value):
        return value
    workdir = Path(os.path.expanduser(value))
    if (
        workdir.name == "checkpoints"
        and not (workdir / "checkpoints").exists()
        and holds_step_folders(workdir)
    ):
        raise ValueError(
            f"--workdir={value} is a run's checkpoints folder (it holds the step folders); "
            f"pass the run's own folder, --workdir={workdir.parent}"
        )
    return str(workdir)


def setup_mesh(config: ml_collections.ConfigDict):
    """``(mesh, batch_sharding)`` from ``config.mesh`` over all devices of all processes."""
    mesh = sharding.make_mesh(**config.mesh.to_dict())
    return mesh, sharding.batch_sharding(mesh)


def describe_mesh(mesh) -> str:
    sizes = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    return (
        f"mesh: {sizes} over {mesh.size} {jax.devices()[0].platform} devices, "
        f"process {jax.process_index()} of {jax.process_count()}"
    )


def seed_key(seed: int) -> jax.Array:
    """``jax.random.key(seed)`` for any int64 seed (``config.seed``, ``--sample_seed``).

    With 64-bit types off (JAX's default) ``jax.random.key`` keeps only a seed's low 32
    bits: seed 2**32 drew the samples of seed 0, and -1 those of 2**32 - 1. Seeds in
    ``[0, 2**32)`` keep their key; the high 32 bits of any other are folded into it.
    """
    bits = int(seed) & (2**64 - 1)  # the int64's two's-complement bits
    key = jax.random.key(bits & 0xFFFFFFFF)
    if bits >> 32:
        key = jax.random.fold_in(key, np.uint32(bits >> 32))
    return key


def print_once(*args, **kwargs) -> None:
    """``print`` on process 0 only (every process runs the same script)."""
    if jax.process_index() == 0:
        print(*args, **kwargs)


def checkpoint_config_overrides(mode: str, allowed: Iterable[str] = ()) -> dict[str, Any]:
    """The ``--config.*`` overrides of a run that takes its config from a checkpoint.

    Only ``allowed`` settings may be overridden: any other would describe another run, so
    it is an error rather than silently ignored.

    Raises:
      ValueError: naming the first override outside ``allowed``.
    """
    allowed = tuple(allowed)
    overrides = _override_values()
    others = sorted(set(overrides) - set(allowed))
    if others:
        can = (
            f"only {', '.join(allowed)} can be overridden"
            if allowed
            else "sampling is set with its own flags (--prompt, --num_samples, ...)"
        )
        raise ValueError(
            f"--config.{others[0]}: {mode} takes its config from the checkpoint; {can}"
        )
    return overrides


# Settings a resumed run may change without changing the updates it computes: the loop's
# length and bookkeeping, and the device mesh (checkpoints restore onto any mesh).
_RESUMABLE_CHANGES = frozenset(f.name for f in dataclasses.fields(LoopConfig)) | {"mesh"}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _config_changes(
    meta: Mapping[str, Any],
    config: ml_collections.ConfigDict,
    free: Iterable[str],
    *,
    both_only: bool = False,
) -> list[str]:
    """``"key saved -> now"`` for each setting of ``config`` that differs from the one the
    checkpoint ``meta`` was saved with, but those in ``free`` (top-level names or dotted
    keys); with ``both_only``, only the settings both of them set."""
    free = set(free)
    saved = _flatten(meta.get("config") or {})
    now = _flatten(json_metadata(config.to_dict(), "config"))  # as saved: tuples -> lists
    # A model field the saved config did not set (the config file gained it since) took
    # the value the checkpoint's resolved model records.
    for key, value in _flatten({"model": meta.get("model") or {}}).items():
        if key in now and key not in saved:
            saved[key] = value
    show = lambda flat, key: repr(flat[key]) if key in flat else "(unset)"
    keys = set(saved) & set(now) if both_only else set(saved) | set(now)
    return [
        f"{key} {show(saved, key)} -> {show(now, key)}"
        for key in sorted(keys)
        if key.split(".")[0] not in free and key not in free and saved.get(key) != now.get(key)
    ]


def checkpoint_config_file(
    mode: str, meta: Mapping[str, Any], where, allowed: Iterable[str] = ()
) -> None:
    """Refuse an explicit ``--config`` file that describes another run than the checkpoint
    ``meta`` (saved in ``where``) of a run that takes its config from the checkpoint.

    The file is still welcome when it is the run's own (it names the default workdir);
    the loop's settings, the mesh and the ``--config.*`` overrides (which
    ``checkpoint_config_overrides`` vets) may differ, and settings only one side has (a
    field added to the config file since) are not compared. A differing setting in
    ``allowed`` (those ``--config.*`` may override) is refused too, with that hint.

    Raises:
      ValueError: naming the config file and the first settings that differ.
    """
    if not flags.FLAGS["config"].present:
        return
    overridden = _override_values()
    config = flags.FLAGS["config"].value
    free = _RESUMABLE_CHANGES | set(overridden)
    changed = _config_changes(meta, config, free, both_only=True)
    if changed:
        changed.sort(key=lambda change: not change.startswith("model."))  # the model first
        shown = ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
        keys = {change.split(" ")[0] for change in changed}
        hint = sorted(keys & set(allowed))
        hint = f" (and give --config.{hint[0]}=... and the like)" if hint else ""
        raise ValueError(
            f"--config={_config_file_flag()}: {mode} takes "
            f"its config from the checkpoint, and {where} was saved with other settings "
            f"(checkpoint -> config file: {shown}); leave out --config and name the run "
            f"with --workdir{hint}"
        )


def check_model_shapes(
    init_fn: Callable, saved: Any, model: Any, what: str, where, changed: list[str]
) -> None:
    """Refuse a checkpoint whose model (config ``saved``) has other weight shapes than this
    run's ``model``, naming the ``model.*`` settings among ``changed`` (the restore would
    fail naming only one leaf). ``what``: the model's name in the message."""
    if init_shapes(init_fn, saved) != init_shapes(init_fn, model):
        model_changes = [change for change in changed if change.startswith("model.")]
        raise IncompatibleCheckpointError(
            f"{where} holds a {what} of other shapes than this config's "
            f"({', '.join(model_changes) or 'its model settings differ'}); nothing was "
            "restored or overwritten. Resume without those changes, or use another --workdir."
        )


def check_state_tree(meta: Mapping[str, Any], where, changed: list[str], abstract: Any) -> None:
    """Refuse a checkpoint whose state tree differs from ``abstract`` (this config's train
    state, shapes only), as the restore will, naming the settings among ``changed`` that
    differ: an optimizer state of another structure (``grad_clip`` 0 and not) failed in the
    restore naming only a leaf, after a note that called it a resumed run."""
    try:
        check_compatible(meta["tree_signature"], abstract, where=f"checkpoint {where}")
    except IncompatibleCheckpointError as e:
        shown = ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
        differ = f" (settings that differ from the checkpoint's: {shown})" if changed else ""
        raise IncompatibleCheckpointError(
            f"{e}{differ}. Resume without those changes, or use another --workdir."
        ) from None


def latest_checkpoint_metadata(
    workdir,
    config: ml_collections.ConfigDict,
    also_free: Iterable[str] = (),
    check: Callable[[dict[str, Any], Any, list[str]], None] | None = None,
) -> dict[str, Any] | None:
    """The metadata of ``workdir``'s latest checkpoint (None without one), after printing
    which settings of ``config`` differ from those it was saved with.

    A resumed run with another batch size, seed or learning rate is allowed but no longer
    matches an uninterrupted one; the note says so instead of resuming silently. Loop
    settings (``num_steps``, ``eval_every``, ...), the mesh and ``also_free`` may change.
    ``check(meta, step_dir, changes)`` runs first, with the note's ``"key saved -> now"``
    lines, and raises for a checkpoint that cannot be resumed at all (another model size),
    so that no note calls it a resumed run.
    """
    ckpt_dir = workdir / "checkpoints"
    # (process 0's answer on every process: opening a Checkpointer is collective, and
    # another process may have created the folder since)
    if not folder_exists(ckpt_dir):
        return None
    with Checkpointer(ckpt_dir, read_only=True) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            return None
        meta = ckpt.read_metadata(step)
        where = ckpt.step_dir(step)
    changed = _config_changes(meta, config, _RESUMABLE_CHANGES | set(also_free))
    if check is not None:
        check(meta, where, changed)
    if changed:
        print_once(
            f"note: {where} was saved with other settings: {', '.join(changed)}; the resumed "
            "run will not match an uninterrupted one",
            flush=True,
        )
    return meta
