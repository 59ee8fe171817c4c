"""train/common.py's helpers, in process: the note a resume with changed settings prints."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from script_runs import REPO  # tests/train/script_runs.py

from jaxattn.training.checkpoint import Checkpointer

sys.path.insert(0, str(REPO / "train"))
import common  # train/common.py, as the scripts import it


def _config(**model):
    config = ml_collections.ConfigDict()
    config.batch_size = 12
    config.learning_rate = 1e-3
    config.buckets = (8, 16)  # saved as a JSON list
    config.num_steps = 100
    config.mesh = ml_collections.ConfigDict({"data": -1})
    config.model = ml_collections.ConfigDict({"embed_dim": 32, **model})
    return config


@pytest.fixture
def workdir(tmp_path):
    """A checkpoint saved by a config without ``model.gelu_approximate``, whose resolved
    model (``meta["model"]``, as lm.py saves it) had it True."""
    saved = _config()
    with Checkpointer(tmp_path / "checkpoints", async_save=False) as ckpt:
        ckpt.save(
            5,
            {"w": jnp.zeros(2)},
            metadata={
                "config": saved.to_dict(),
                "model": {"embed_dim": 32, "gelu_approximate": True},
            },
        )
    return tmp_path


def _note(capsys, workdir, config, **kw):
    meta = common.latest_checkpoint_metadata(workdir, config, **kw)
    assert meta["step"] == 5
    return capsys.readouterr().out


def test_no_note_for_the_same_settings_or_free_ones(capsys, workdir):
    assert _note(capsys, workdir, _config()) == ""  # tuples vs the saved lists: the same
    free = _config()
    free.num_steps, free.mesh.data = 200, 2  # the loop's length and the mesh may change
    assert _note(capsys, workdir, free) == ""
    free.batch_size = 8
    assert _note(capsys, workdir, free, also_free=["batch_size"]) == ""
    # A model field the config file gained since, at the value the run resolved it to.
    assert _note(capsys, workdir, _config(gelu_approximate=True)) == ""


def test_a_numpy_value_of_the_config_compares_as_its_python_value(capsys, workdir):
    """A config file's NumPy integer (LoopConfig and make_mesh take it as an int) failed a
    resumed run's comparison with the checkpoint's settings with a TypeError traceback."""
    config = lambda batch_size: ml_collections.ConfigDict(
        _config().to_dict() | {"batch_size": batch_size}  # (a ConfigDict's int refuses one)
    )
    assert _note(capsys, workdir, config(np.int64(12))) == ""
    assert "batch_size 12 -> 8" in _note(capsys, workdir, config(np.int64(8)))


def test_note_names_each_changed_setting(capsys, workdir):
    changed = _config(gelu_approximate=False)
    changed.batch_size, changed.learning_rate = 8, 3e-4
    out = _note(capsys, workdir, changed)
    assert out == (
        f"note: {workdir / 'checkpoints' / '5'} was saved with other settings: batch_size 12 "
        "-> 8, learning_rate 0.001 -> 0.0003, model.gelu_approximate True -> False; the "
        "resumed run will not match an uninterrupted one\n"
    )


def test_no_checkpoint_no_metadata(capsys, tmp_path):
    assert common.latest_checkpoint_metadata(tmp_path, _config()) is None
    assert capsys.readouterr().out == ""


def test_workdir_from_flag(monkeypatch, tmp_path, config_flag):
    monkeypatch.setenv("HOME", str(tmp_path))
    config_flag()  # --config=<tmp_path>/run_config.py
    assert common.workdir_from_flag(None) == str(Path("workdirs") / "run_config")
    # The shell leaves ~ in --workdir=~/run: it was a folder named ~ in the current one.
    assert common.workdir_from_flag("~/run") == str(tmp_path / "run")
    assert common.workdir_from_flag("gs://bucket/~run") == "gs://bucket/~run"
    assert common.workdir_from_flag("runs/a") == "runs/a"
    for empty in ("", "  "):  # --workdir=$UNSET would train into the current folder
        with pytest.raises(ValueError, match="--workdir is empty"):
            common.workdir_from_flag(empty)
    # A run's checkpoints folder, named for the run: a fresh run began in checkpoints/checkpoints.
    (tmp_path / "run" / "checkpoints" / "250").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"is a run's checkpoints folder .*--workdir=.*run$"):
        common.workdir_from_flag(str(tmp_path / "run" / "checkpoints"))
    assert common.workdir_from_flag("~/run") == str(tmp_path / "run")
    (tmp_path / "other" / "checkpoints").mkdir(parents=True)  # no steps: a folder like any
    assert common.workdir_from_flag("~/other/checkpoints") == str(tmp_path / "other/checkpoints")


@pytest.fixture
def parse_flags():
    """``parse(*argv)``: parse common.py's flags from ``argv``; unparsed again afterwards."""

    def parse(*argv):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["test", *argv])

    yield parse
    flags.FLAGS.unparse_flags()


@pytest.fixture
def jax_cache_config():
    """Restores the compilation-cache settings that ``enable_compilation_cache`` changes."""
    names = (
        "jax_compilation_cache_dir",
        "jax_enable_compilation_cache",
        "jax_compilation_cache_max_size",
        "jax_persistent_cache_min_compile_time_secs",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_compilation_cache_flag_wins_over_the_environment(parse_flags, jax_cache_config, tmp_path):
    """JAX_COMPILATION_CACHE_DIR (here its config value) holds only without the flag."""
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "env"))
    parse_flags()
    common.enable_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
    parse_flags(f"--compilation_cache={tmp_path / 'flag'}")
    common.enable_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "flag")
    assert jax.config.jax_enable_compilation_cache
    assert (tmp_path / "flag").is_dir()


@pytest.mark.parametrize("where", ["empty", "under_a_file", "not_writable"])
def test_empty_or_unwritable_compilation_cache_disables_it(
    where, parse_flags, jax_cache_config, tmp_path, monkeypatch, capsys
):
    """``--compilation_cache=`` turns the cache off; so, with a warning, does a folder it
    cannot make (under a file) or cannot write (access faked: root writes anywhere)."""
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_enable_compilation_cache", True)
    path = ""
    if where == "under_a_file":
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "xla"
    elif where == "not_writable":
        monkeypatch.setattr(common.os, "access", lambda path, mode: False)
        path = tmp_path
    parse_flags(f"--compilation_cache={path}")
    common.enable_compilation_cache()
    assert not jax.config.jax_enable_compilation_cache
    assert jax.config.jax_compilation_cache_dir is None
    warning = f"warning: cannot write the compilation cache {path}" if path else "warning:"
    assert (warning in capsys.readouterr().err) == bool(path)


def test_initialize_distributed_needs_all_three_flags_or_none(parse_flags, monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    parse_flags("--coordinator_address=127.0.0.1:1234", "--num_processes=2")
    with pytest.raises(ValueError, match="--process_id missing: joining processes needs all"):
        common.initialize_distributed()
    assert calls == []
    parse_flags()
    common.initialize_distributed()  # one process
    assert calls == []
    parse_flags("--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=1")
    common.initialize_distributed()
    joined = {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
    assert calls == [joined | {"initialization_timeout": 300}]  # (JAX's default)
    parse_flags("--distributed", "--distributed_timeout=30")
    common.initialize_distributed()  # auto-detect: no process arguments
    assert calls[-1] == {"initialization_timeout": 30} and len(calls) == 2
    with pytest.raises(flags.IllegalFlagValueError, match="distributed_timeout"):
        parse_flags("--distributed_timeout=0")


def use_config_flag(monkeypatch, config_file, *overrides):
    """Make ``flags.FLAGS`` a --config file flag as the scripts define it, given on the
    command line with those ``--config.*`` overrides."""
    argv = ["test", f"--config={config_file}", *overrides]
    values = flags.FlagValues()  # (the overrides are found in sys_argv at definition)
    config_flags.DEFINE_config_file(
        "config", str(config_file), "Run config.", flag_values=values, sys_argv=argv
    )
    values(common._without_none_overrides(argv))  # as parse_flags parses them
    monkeypatch.setattr(flags, "FLAGS", values)


def test_default_workdir_is_named_after_the_config_file(monkeypatch):
    use_config_flag(monkeypatch, REPO / "train" / "configs" / "tiny.py")
    assert common.workdir_from_flag(None) == str(Path("workdirs") / "tiny")


@pytest.mark.parametrize(
    ("arg", "folder"),
    [("transformer", "translate_tiny_transformer"), ("a/b c", "translate_tiny_a_b_c")],
)
def test_default_workdir_keeps_the_config_argument(monkeypatch, arg, folder):
    # Both were workdirs/translate_tiny: the second model's run was refused as the first's
    # incompatible checkpoint.
    use_config_flag(monkeypatch, f"{REPO / 'train' / 'configs' / 'translate_tiny.py'}:{arg}")
    assert common.workdir_from_flag(None) == str(Path("workdirs") / folder)


@pytest.fixture
def config_flag(monkeypatch, tmp_path):
    """``parse(*overrides)``: ``use_config_flag`` with a config file of its own. The file
    sets a field, ``added``, that the checkpoints of ``_saved_meta`` lack (as a config
    file that gained it since)."""
    config_file = tmp_path / "run_config.py"
    config_file.write_text(
        "import ml_collections\n\n\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict(\n"
        "        {'beam_size': 1, 'num_steps': 9, 'added': 3, 'model': {'embed_dim': 32}}\n"
        "    )\n"
    )

    def parse(*overrides):
        use_config_flag(monkeypatch, config_file, *overrides)
        return config_file

    return parse


def _saved_meta(beam_size=1, embed_dim=32):
    return {"config": {"beam_size": beam_size, "num_steps": 100, "model": {"embed_dim": embed_dim}}}


def test_checkpoint_config_file_accepts_the_runs_own_file(config_flag):
    """The loop's settings may differ, and a field only the file sets is not compared."""
    config_flag()
    common.checkpoint_config_file("--mode", _saved_meta(), "ckpt/100", allowed=["beam_size"])
    config_flag("--config.beam_size=4")  # an override: vetted by checkpoint_config_overrides
    common.checkpoint_config_file("--mode", _saved_meta(), "ckpt/100", allowed=["beam_size"])


def test_checkpoint_config_file_refuses_another_runs_file(config_flag):
    config_file = config_flag()
    with pytest.raises(ValueError) as error:
        meta = _saved_meta(beam_size=4, embed_dim=16)
        common.checkpoint_config_file("--mode", meta, "ckpt/100", allowed=["beam_size"])
    assert str(error.value) == (
        f"--config={config_file}: --mode takes its config from the checkpoint, and ckpt/100 "
        "was saved with other settings (checkpoint -> config file: model.embed_dim 16 -> 32, "
        "beam_size 4 -> 1); leave out --config and name the run with --workdir (and give "
        "--config.beam_size=... and the like)"
    )


def test_checkpoint_config_overrides_takes_only_the_allowed_ones(config_flag):
    """A --bleu_only or --translate run may change the decode settings, nothing else."""
    config_flag("--config.beam_size=4")
    assert common.checkpoint_config_overrides("--mode", ["beam_size"]) == {"beam_size": 4}
    config_flag("--config.beam_size=4", "--config.model.embed_dim=8")
    with pytest.raises(ValueError) as error:
        common.checkpoint_config_overrides("--mode", ["beam_size"])
    assert str(error.value) == (
        "--config.model.embed_dim: --mode takes its config from the checkpoint; only "
        "beam_size can be overridden"
    )


def test_checkpoint_config_file_takes_an_allowed_override_of_a_model_key(config_flag):
    """A dotted override (``--config.model.attention_implementation=xla`` for a cuDNN run)
    is compared by its full key: the file's run, with that one setting overridden, is the
    checkpoint's run."""
    config_flag("--config.model.embed_dim=8")
    meta = _saved_meta(embed_dim=16)
    common.checkpoint_config_file("--mode", meta, "ckpt/100", allowed=["model.embed_dim"])


def test_a_none_override_sets_the_field_to_none(monkeypatch, tmp_path):
    """ml_collections reads ``--config.KEY=None`` for a str placeholder as the string
    'None', and for an int one as int('None'), a flags error (an attention window set in a
    config file could not be switched off); the scripts' flag parsing makes it None in the
    config and in the overrides."""
    config_file = tmp_path / "str_config.py"
    config_file.write_text(
        "import ml_collections\n"
        "from ml_collections.config_dict import placeholder\n\n\n"
        "def get_config():\n"
        "    config = ml_collections.ConfigDict({'seed': 1, 'model': {'kernel': 'xla'}})\n"
        "    config.model.impl = placeholder(str)\n"
        "    config.model.window = placeholder(int)\n"
        "    config.model.window = 32\n"
        "    return config\n"
    )
    nones = ["--config.model.impl=None", "--config.model.kernel=None", "--config.model.window=None"]
    use_config_flag(monkeypatch, config_file, *nones, "--config.seed=2")
    common._read_none_overrides()
    config = flags.FLAGS["config"].value
    assert config.model.impl is None and config.model.kernel is None and config.seed == 2
    assert config.model.window is None
    keys = ["model.impl", "model.kernel", "model.window", "seed"]
    overrides = common.checkpoint_config_overrides("--mode", keys)
    assert overrides == {"model.impl": None, "model.kernel": None, "model.window": None, "seed": 2}


def test_a_none_override_in_two_words_sets_the_field_to_none(monkeypatch, tmp_path):
    """``--config.KEY None`` (absl's two-word form) reached ml_collections' parser, which
    failed for an int placeholder as ``int('None')``; it now reads as ``--config.KEY=None``
    (a setting that cannot be None is then refused by the script's check of it)."""
    config_file = tmp_path / "two_words_config.py"
    config_file.write_text(
        "import ml_collections\n"
        "from ml_collections.config_dict import placeholder\n\n\n"
        "def get_config():\n"
        "    config = ml_collections.ConfigDict({'seed': 1, 'model': {'kernel': 'xla'}})\n"
        "    config.model.window = placeholder(int)\n"
        "    config.model.window = 32\n"
        "    return config\n"
    )
    argv = ["--config.model.window", "None", "-config.model.kernel", "None", "--config.seed", "2"]
    use_config_flag(monkeypatch, config_file, *argv)
    common._read_none_overrides()
    config = flags.FLAGS["config"].value
    assert config.model.window is None and config.model.kernel is None and config.seed == 2
    overrides = common.checkpoint_config_overrides(
        "--mode", ["model.window", "model.kernel", "seed"]
    )
    assert overrides == {"model.window": None, "model.kernel": None, "seed": 2}
    # Only a flag's next word of None: absl still reads the rest (and what follows "--").
    rest = ["--config.seed", "--config.model.window", "3", "--", "--config.seed", "None"]
    assert common._without_none_overrides(["x", *rest]) == ["x", *rest]


@pytest.mark.parametrize(
    ("argv", "window", "name"),
    [
        (["--config.model.window", "None", "--config.model.window=5"], 5, "a"),
        (["--config.model.window=None", "-config.model.window", "5"], 5, "a"),
        (["--config.model.window=5", "--config.model.window", "None"], None, "a"),
        (["--config.name", "None", "--config.name", "b"], 32, "b"),
        (["--config.name=b", "--config.name=None"], 32, None),
    ],
)
def test_the_last_override_of_a_key_wins_also_over_a_none_one(
    monkeypatch, tmp_path, argv, window, name
):
    """absl keeps a flag's last value, but a None override won from anywhere: a launcher's
    default ``--config.KEY None`` could not be overridden after it (a str setting's two-word
    None, read by absl itself before, then lost its later value too)."""
    config_file = tmp_path / "last_wins_config.py"
    config_file.write_text(
        "import ml_collections\n"
        "from ml_collections.config_dict import placeholder\n\n\n"
        "def get_config():\n"
        "    config = ml_collections.ConfigDict({'name': 'a', 'model': {}})\n"
        "    config.model.window = placeholder(int)\n"
        "    config.model.window = 32\n"
        "    return config\n"
    )
    use_config_flag(monkeypatch, config_file, *argv)
    common._read_none_overrides()
    config = flags.FLAGS["config"].value
    assert (config.model.window, config.name) == (window, name)


def test_checkpoint_config_file_hints_only_at_allowed_overrides(config_flag):
    """No "give --config.model.embed_dim=..." hint: a model setting cannot be overridden."""
    config_flag()
    with pytest.raises(ValueError) as error:
        meta = _saved_meta(embed_dim=16)
        common.checkpoint_config_file("--mode", meta, "ckpt/100", allowed=["beam_size"])
    assert str(error.value).endswith("leave out --config and name the run with --workdir")


def test_initialize_distributed_joins_once_with_explicit_flags_and_distributed(
    parse_flags, monkeypatch
):
    """The explicit flags win over --distributed: a second initialize() would raise."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    parse_flags(
        "--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=0",
        "--distributed",
    )  # fmt: skip
    common.initialize_distributed()
    joined = {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 0}
    assert calls == [joined | {"initialization_timeout": 300}]


def test_orbaxs_leftovers_are_dropped_and_other_exit_errors_reported(tmp_path):
    """orbax's pending reads of a corrupt checkpoint report themselves as the error travels
    up and again as the process exits (a coroutine whose finaliser raises, a failed asyncio
    task): stand-ins for them are dropped; an atexit callback's error (a failed distributed
    shutdown) still shows."""
    script = tmp_path / "fail.py"
    script.write_text(
        "import asyncio, atexit, sys\n"
        f"sys.path.insert(0, {str(REPO / 'train')!r})\n"
        "import common\n"
        "common.drop_orbax_leftovers()\n"
        "class Leftover:\n"
        "    def __del__(self):\n"
        "        raise RuntimeError('Event loop is closed')\n"
        "async def fails():\n"
        "    try:\n"
        "        raise ValueError('Requested byte range is not valid')\n"
        "    except ValueError as e:\n"
        "        raise Exception('Encountered error while reading array index: (0,)') from e\n"
        "def shutdown():\n"
        "    raise RuntimeError('the shutdown barrier timed out')\n"
        "atexit.register(shutdown)\n"
        "loop = asyncio.new_event_loop()\n"
        "task = loop.create_task(fails())\n"
        "loop.run_until_complete(asyncio.sleep(0))\n"  # the task fails; no one awaits it
        "early = Leftover()\n"
        "del early\n"  # reported as the restore's error travels up
        "leftover = Leftover()\n"
        "common.exit_with_error(ValueError('checkpoint 8 is corrupt'))\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 1
    assert run.stderr.startswith("error: checkpoint 8 is corrupt\n")
    assert "RuntimeError: the shutdown barrier timed out" in run.stderr
    for leftover in ("Event loop is closed", "reading array index", "never retrieved"):
        assert leftover not in run.stderr


def test_a_leftover_is_found_through_the_implicit_chain_too():
    """An error raised while handling orbax's read error (``__context__``, no ``from``) is
    one of its leftovers; an unrelated error is not."""
    from jaxattn.training.checkpoint import ORBAX_READ_ERROR

    def raised(error, context=None):
        try:
            try:
                raise context or ValueError("unrelated")
            except Exception:
                raise error  # noqa: B904 (the implicit chain is the point)
        except Exception as e:
            return e

    leftover = raised(RuntimeError("callback failed"), Exception(f"{ORBAX_READ_ERROR}: (0,)"))
    assert leftover.__cause__ is None and common._is_leftover(leftover)
    assert not common._is_leftover(raised(RuntimeError("the shutdown barrier timed out")))


def test_config_keys_must_be_the_default_configs(config_flag, tmp_path):
    """The fixture's file sets beam_size, num_steps, added and model; ``model`` is left to
    ``model_config``, whatever keys it holds."""
    config_file = config_flag()
    config = common._load_config_file(config_file)
    default = tmp_path / "default.py"
    default.write_text(
        "import ml_collections\n\n\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict(\n"
        "        {'beam_size': 1, 'num_steps': 9, 'added': 0, 'model': {'width': 8}}\n"
        "    )\n"
    )
    common.check_config_keys(config, default)
    config.num_stepz = config.num_steps
    del config["num_steps"]
    with pytest.raises(ValueError) as error:
        common.check_config_keys(config, default)
    assert str(error.value) == (
        f"unknown config key 'num_stepz' in {config_file} (did you mean 'num_steps'?)"
    )
    config.num_steps = 9
    del config["num_stepz"], config["beam_size"], config["added"]
    with pytest.raises(ValueError) as error:
        common.check_config_keys(config, default)
    assert str(error.value) == (
        f"{config_file} does not set added, beam_size: a config for this script sets every "
        "key that default.py sets"
    )


def test_model_config_names_an_unknown_model_key(config_flag, monkeypatch):
    from jaxattn.models.gpt import GPTConfig

    # No --config flag defined, whichever script a test in this process imported before
    # (importing train/translate.py defines it, and the message then named its default file).
    monkeypatch.setattr(flags, "FLAGS", flags.FlagValues())
    fields = {"num_layers": 2, "num_heads": 2, "embed_dim": 8, "block_size": 4}
    model = common.model_config(GPTConfig, fields, vocab_size=5)
    assert (model.num_layers, model.vocab_size) == (2, 5)
    with pytest.raises(ValueError, match=r"unknown config key 'model.num_layer' in the config "
                       r"\(did you mean 'model.num_layers'\?\)"):  # fmt: skip
        common.model_config(GPTConfig, fields | {"num_layer": 2}, vocab_size=5)
    # Under the script's flags the message names the file. Close matches are judged
    # without the "model." prefix, which made any key look like some field.
    config_file = config_flag()
    with pytest.raises(ValueError) as error:
        common.model_config(GPTConfig, fields | {"extra_thing": 3}, vocab_size=5)
    assert str(error.value) == f"unknown config key 'model.extra_thing' in {config_file}"
    # A field the script sets from the data is not the config's to set; it was refused with
    # the hint "did you mean 'model.block_size'?".
    with pytest.raises(ValueError) as error:
        common.model_config(GPTConfig, fields | {"vocab_size": 7}, vocab_size=5)
    assert str(error.value) == (
        f"unknown config key 'model.vocab_size' in {config_file} (the script sets it: leave it out)"
    )


def test_a_script_loaded_in_process_leaves_absl_flags_alone(load_script):
    """The in-process script fixtures define lm.py's and translate.py's flags in flag
    values of their own: in absl's global FLAGS, translate's --config changed what
    common.py's helpers read in every later test of the worker."""
    for name in ("lm", "translate"):
        module = load_script(name)
        assert module._WORKDIR.value is None  # defined and parsed, at its default
        assert "workdir" not in flags.FLAGS and "config" not in flags.FLAGS


@pytest.mark.parametrize("value", ["", "relative/cache"])
def test_an_empty_or_relative_xdg_cache_home_means_the_home_cache(monkeypatch, value):
    """The XDG spec: an empty or relative $XDG_CACHE_HOME is ignored. An empty one put the
    compilation cache in the current directory (./jaxattn/xla)."""
    monkeypatch.setenv("XDG_CACHE_HOME", value)
    monkeypatch.setenv("HOME", "/home/someone")
    assert common._user_cache_dir() == Path("/home/someone/.cache")
    monkeypatch.setenv("XDG_CACHE_HOME", "/var/cache/me")
    assert common._user_cache_dir() == Path("/var/cache/me")


@pytest.mark.parametrize("script", ["lm.py", "translate.py"])
def test_help_lists_the_shared_flags(script):
    proc = subprocess.run(
        [sys.executable, str(REPO / "train" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "--compilation_cache:" in proc.stdout and "--[no]distributed:" in proc.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["lm.py", "--config=a.py:arg"],
        ["lm.py", "--config", "a.py"],
        ["lm.py", "-config", "a.py:arg", "--config.seed=1"],
        ["lm.py", "-config=b.py", "--config=a.py"],  # the last one wins, as in absl
        ["lm.py", "--config", "a.py", "--", "--config=b.py"],  # no flags after "--"
    ],
)
def test_config_file_is_read_from_each_form_absl_takes(argv):
    """Only ``--config=FILE`` was read: ``--config FILE`` gave the default (None)."""
    assert common._config_file(argv, None) == "a.py"
    assert common._config_file(["lm.py", "--config.seed=1"], "d.py") == "d.py"


def test_seed_key_keeps_every_int64_seed_apart():
    """jax.random.key keeps a seed's low 32 bits (64-bit types off): 2**32 drew the samples
    of 0 and -1 those of 2**32 - 1. Seeds in [0, 2**32) keep jax.random.key's key."""
    import jax
    import numpy as np

    data = lambda seed: tuple(np.asarray(jax.random.key_data(common.seed_key(seed))).tolist())
    for seed in (0, 1337, 2**31, 2**32 - 1):
        assert data(seed) == tuple(np.asarray(jax.random.key_data(jax.random.key(seed))).tolist())
    seeds = (0, 1, 2**32 - 1, 2**32, 2**32 + 1, 2**40, 2**63 - 1, -1, -2, -(2**63))
    assert len({data(seed) for seed in seeds}) == len(seeds)
