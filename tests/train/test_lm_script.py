"""train/lm.py end to end, as a user runs it: a subprocess with the tiny config.

Training runs take tens of seconds (mostly XLA compiling the GPT step), so they share one
module-scoped run and are marked slow; the argument errors fail before any compile.
"""

import dataclasses
import hashlib
import importlib.util
import shutil
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
import pytest
from etils import epath
from script_runs import REPO, ScriptRunner  # tests/train/script_runs.py

from jaxattn.models.gpt import GPTConfig, init_gpt, weight_decay_mask
from jaxattn.training.checkpoint import Checkpointer
from jaxattn.training.metrics import read_metrics

TINY = REPO / "train" / "configs" / "tiny.py"


run_lm = ScriptRunner("lm.py", TINY)
run_sample = ScriptRunner("sample.py", TINY)  # lm.py --sample_only under nanoGPT's name


def samples_of(stdout):
    """The texts of the samples a run printed, in order."""
    return [s.split("\n", 1)[1] for s in stdout.split("---------- sample ")[1:]]


def snapshot(directory):
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 8-step tiny run: (workdir, completed process, its compilation cache entries).

    It fills a compilation cache through ``--compilation_cache``; later runs load from it
    (``run_lm.cache_dir``, passed as ``JAX_COMPILATION_CACHE_DIR``).
    """
    cache = tmp_path_factory.mktemp("jax_cache")
    workdir = tmp_path_factory.mktemp("lm") / "run"
    proc = run_lm(
        f"--workdir={workdir}", f"--compilation_cache={cache}", "--sample_tokens=12",
        "--num_samples=2",
    )  # fmt: skip
    entries = sorted(p.name for p in cache.iterdir())  # Before any later run adds to it.
    run_lm.cache_dir = cache
    return workdir, proc, entries


@pytest.mark.slow
def test_first_run_fills_the_compilation_cache(trained):
    _, _, entries = trained
    assert any(name.startswith("jit_train_step") for name in entries), entries
    assert any(name.startswith("jit__generate_jit") for name in entries), entries


def test_unwritable_compilation_cache_is_a_warning(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    missing = tmp_path / "no_such_text.txt"  # Fails right after the cache is set up.
    proc = run_lm(
        f"--workdir={tmp_path / 'run'}", f"--compilation_cache={not_a_folder / 'xla'}",
        f"--config.data_path={missing}", check=False,
    )  # fmt: skip
    assert f"warning: cannot write the compilation cache {not_a_folder / 'xla'}" in proc.stderr
    assert f"text data file not found: '{missing}'" in proc.stderr  # The run went on.


@pytest.mark.slow
def test_training_writes_metrics_checkpoints_and_samples(trained):
    workdir, proc, _ = trained
    records = read_metrics(workdir / "metrics.jsonl")
    for r in records:
        assert "step" in r and "tokens_per_s" in r and ("train_loss" in r or "val_loss" in r)
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(val) == [0, 4, 8]
    assert val[8] < val[0]  # ~ln(65) = 4.17 at step 0.
    assert max(r["step"] for r in records if "train_loss" in r) == 8
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 8]
    assert (workdir / "tb").is_dir()
    assert "step 8: train loss" in proc.stdout
    assert "---------- sample 0 ----------" in proc.stdout
    assert "---------- sample 1 ----------" in proc.stdout


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(trained, killed_run_copy, assert_same_saved_state):
    workdir, *_ = trained
    # A run killed after its step-4 checkpoint: the same workdir without step 8.
    resumed = killed_run_copy(workdir, 8)
    proc = run_lm(f"--workdir={resumed}", "--num_samples=0")
    assert f"Resumed from {resumed / 'checkpoints' / '4'}" in proc.stdout
    assert "note:" not in proc.stdout  # the same settings: nothing to say
    assert "sample 0" not in proc.stdout
    assert_same_saved_state(resumed, workdir, 8)


@pytest.mark.slow
def test_sample_only_loads_the_latest_checkpoint(trained):
    workdir, *_ = trained
    proc = run_lm(
        f"--workdir={workdir}", "--sample_only", "--prompt=ROMEO:", "--prompt=I", "--num_samples=3",
        "--sample_tokens=20", "--top_k=1",
    )  # fmt: skip
    assert f"Sampling from {workdir / 'checkpoints' / '8'}" in proc.stdout
    samples = proc.stdout.split("---------- sample ")[1:]
    assert len(samples) == 6  # 3 per prompt, in one batch of prompts of 6 and 1 characters
    for i, sample in enumerate(samples):
        header, text = sample.split("\n", 1)
        assert header == f"{i} ----------"
        prompt = "ROMEO:" if i < 3 else "I"
        # The prompt and 20 new characters (not the short prompt's padding), then print's \n.
        assert text.startswith(prompt) and len(text) == len(prompt) + 20 + 1
    # top_k=1 leaves one choice a character: each prompt's samples are the same, greedy one.
    texts = samples_of(proc.stdout)
    assert len(set(texts[:3])) == 1 and len(set(texts[3:])) == 1
    # The short prompt continues as it would alone, never seeing its padding.
    alone = run_lm(
        f"--workdir={workdir}", "--sample_only", "--prompt=I", "--num_samples=1",
        "--sample_tokens=20", "--top_k=1",
    )  # fmt: skip
    assert samples_of(alone.stdout) == texts[3:4]


@pytest.mark.slow
def test_sample_script_samples_as_lm_sample_only(trained):
    workdir, *_ = trained
    run_sample.cache_dir = run_lm.cache_dir
    flags = (f"--workdir={workdir}", "--prompt=ROMEO:", "--num_samples=2", "--sample_tokens=20")
    want = run_lm(*flags, "--sample_only")
    got = run_sample(*flags)
    # It restores and samples; it does not run lm.py's training over the finished run.
    assert f"Sampling from {workdir / 'checkpoints' / '8'}" in got.stdout
    assert len(samples_of(got.stdout)) == 2
    assert samples_of(got.stdout) == samples_of(want.stdout)  # the same seed: the same texts
    # --sample_only is given last: a --nosample_only typed by mistake does not train.
    again = run_sample(*flags, "--nosample_only")
    assert samples_of(again.stdout) == samples_of(want.stdout)
    assert "Resumed" not in again.stdout


@pytest.mark.slow
def test_sample_only_takes_another_attention_kernel(trained, tmp_path):
    """A run trained with cuDNN's kernel (here its metadata says so) samples on a CPU with
    --config.model.attention_implementation=xla, as the error advises: it was refused as
    another run's setting, leaving no way to sample it there."""
    workdir, *_ = trained
    gpu_run = tmp_path / "gpu_run"
    shutil.copytree(workdir, gpu_run)
    for meta in gpu_run.glob("checkpoints/*/meta/metadata"):
        text = meta.read_text()
        assert '"attention_implementation": null' in text
        meta.write_text(
            text.replace('"attention_implementation": null', '"attention_implementation": "cudnn"')
        )
    flags = ["--sample_only", "--num_samples=1", "--sample_tokens=20", "--top_k=1"]
    proc = run_lm(f"--workdir={gpu_run}", *flags, config="", check=False)
    assert proc.returncode == 1 and 'implementation="cudnn" needs a GPU' in proc.stderr
    xla = "--config.model.attention_implementation=xla"
    proc = run_lm(f"--workdir={gpu_run}", *flags, xla, config="")
    assert samples_of(proc.stdout) == samples_of(run_lm(f"--workdir={workdir}", *flags).stdout)


@pytest.mark.slow
def test_attention_variants_from_the_command_line(tmp_path):
    """The config files list GPTConfig's optional attention fields (None: off), so a run
    can train, checkpoint and sample a sliding-window, grouped-query, rotary model. A
    string setting given as None is None (ml_collections read it as the string 'None',
    which the model refused as "must be None or one of ..., got 'None'")."""
    workdir = tmp_path / "run"
    run_lm(
        f"--workdir={workdir}", "--config.num_steps=2", "--config.eval_every=2",
        "--config.checkpoint_every=2", "--num_samples=0", "--config.model.attention_window=3",
        "--config.model.num_kv_heads=1", "--config.model.positions=rope",
        "--config.model.rope_base=500.0", "--config.model.attention_implementation=None",
        "--config.model.loss_chunk_size=None",  # (an int: was a flags error, int('None'))
    )  # fmt: skip
    with Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
        model = GPTConfig(**ckpt.read_metadata()["model"])
    assert (model.attention_window, model.num_kv_heads, model.rope_base) == (3, 1, 500.0)
    assert model.positions == "rope" and model.attention_implementation is None
    params = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "2" / "state")
    params = params["params"]
    assert params.get("position_embedding") is None  # rope: no position table
    attn = params["blocks"]["attn"]  # [layers, D, heads, head_dim]
    assert attn["w_q"].shape == (2, 16, 2, 8) and attn["w_k"].shape == (2, 16, 1, 8)
    # Sampling rebuilds the model from the checkpoint (no --config): 20 characters, past
    # block_size 16.
    proc = run_lm(
        f"--workdir={workdir}", "--sample_only", "--prompt=ROMEO:", "--num_samples=1",
        "--sample_tokens=20", "--config.model.attention_implementation=None", config="",
    )  # fmt: skip
    (text,) = samples_of(proc.stdout)
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 20 + 1


@pytest.mark.slow
def test_sample_only_temperature_zero_is_greedy(trained):
    workdir, first, _ = trained
    proc = run_lm(
        f"--workdir={workdir}", "--sample_only", "--temperature=0", "--num_samples=2",
        "--sample_tokens=12",
    )  # fmt: skip
    greedy = samples_of(proc.stdout)
    assert len(greedy) == 2 and greedy[0] == greedy[1]
    assert greedy != samples_of(first.stdout)  # the first run sampled at temperature 0.8


@pytest.mark.slow
def test_rerunning_a_finished_run_reports_it_and_writes_nothing(trained):
    workdir, first, _ = trained
    before = snapshot(workdir)
    # A finished run only samples: here with another seed than the first run's (0).
    proc = run_lm(
        f"--workdir={workdir}", "--num_samples=2", "--sample_tokens=12", "--sample_seed=1"
    )
    final = read_metrics(workdir / "metrics.jsonl")[-1]["val_loss"]
    assert "Step 8 >= num_steps=8: nothing to do." in proc.stdout
    assert f"Done: step 8, val loss {final:.4f}" in proc.stdout  # from the checkpoint
    assert snapshot(workdir) == before  # no new TensorBoard file, no checkpoint
    samples = samples_of(proc.stdout)
    assert len(samples) == 2 and samples != samples_of(first.stdout)


@pytest.mark.slow
def test_sample_only_refuses_another_runs_config_file(trained):
    workdir, *_ = trained
    other = REPO / "train" / "configs" / "shakespeare_char_cpu.py"
    proc = run_lm(f"--workdir={workdir}", "--sample_only", config=other, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--sample_only takes its config from the checkpoint" in proc.stderr
    assert "model.embed_dim" in proc.stderr  # names what differs


@pytest.mark.slow
def test_sample_prompt_with_unknown_character(trained):
    workdir, *_ = trained
    proc = run_lm(f"--workdir={workdir}", "--sample_only", "--prompt=€uro", check=False)
    assert proc.returncode == 1
    assert "'€' at position 0 is not in the vocabulary" in proc.stderr


@pytest.mark.slow
def test_incompatible_checkpoint_is_an_error_and_nothing_is_overwritten(trained):
    workdir, *_ = trained
    before = snapshot(workdir / "checkpoints")
    proc = run_lm(f"--workdir={workdir}", "--config.model.embed_dim=32", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        f"error: {workdir / 'checkpoints' / '8'} holds a GPT of other shapes than this "
        "config's (model.embed_dim 16 -> 32); nothing was restored or overwritten"
    ) in proc.stderr
    assert snapshot(workdir / "checkpoints") == before
    # Refused before the note that would call it a resumed run, and before anything is built:
    assert "note:" not in proc.stdout and "model: GPT" not in proc.stdout


def test_checkpoint_of_another_vocabulary_is_an_error(tmp_path):
    """Same vocabulary size, other characters: the shapes match, the decoding would not."""
    text = tmp_path / "text.txt"
    text.write_text("abcd\n" * 200)
    checkpoints = tmp_path / "run" / "checkpoints"
    with Checkpointer(checkpoints, async_save=False) as ckpt:
        ckpt.save(4, {"w": jnp.zeros(2)}, metadata={"config": {}, "vocab": "\nabce"})
    before = snapshot(checkpoints)
    proc = run_lm(f"--workdir={tmp_path / 'run'}", f"--config.data_path={text}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{checkpoints / '4'} was trained on a different character vocabulary" in proc.stderr
    assert snapshot(checkpoints) == before


def test_another_vocabulary_from_another_data_path_names_the_saved_one(tmp_path):
    """A resume that leaves out the run's --config.data_path reads the bundled text: the
    error said only "Use another --workdir", not that the run needs its own text back."""
    text = tmp_path / "text.txt"
    text.write_text("abcd\n" * 200)
    checkpoints = tmp_path / "run" / "checkpoints"
    with Checkpointer(checkpoints, async_save=False) as ckpt:
        meta = {"config": {"data_path": str(text)}, "vocab": "\nabcd"}
        ckpt.save(4, {"w": jnp.zeros(2)}, metadata=meta)
    before = snapshot(checkpoints)
    proc = run_lm(f"--workdir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        f"It was trained on data_path {str(text)!r}, this run reads '' (the bundled "
        f"tinyshakespeare): to resume it, pass --config.data_path={text}; else use another "
        "--workdir." in proc.stderr.replace("\n", " ")
    ), proc.stderr
    assert snapshot(checkpoints) == before


@pytest.mark.slow
def test_a_changed_optimizer_structure_is_refused_naming_the_setting(trained):
    """grad_clip 1.0 -> 0 drops a leaf of the optimizer state: the run printed a note that
    called it a resumed run, built the model, then failed naming only the leaf."""
    workdir, *_ = trained
    before = snapshot(workdir / "checkpoints")
    proc = run_lm(f"--workdir={workdir}", "--config.grad_clip=0", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: checkpoint {workdir / 'checkpoints' / '8'} is incompatible: " in proc.stderr
    assert "(settings that differ from the checkpoint's: grad_clip 1.0 -> 0.0)" in proc.stderr
    assert "note:" not in proc.stdout and "model: GPT" not in proc.stdout
    assert snapshot(workdir / "checkpoints") == before


def _another_scripts_checkpoint(checkpoints):
    """A checkpoint as translate.py saves one: its own model record, no vocabulary."""
    meta = {"config": {"batch_size": 8}, "model": {"kind": "seq2seq", "src_vocab_size": 300}}
    with Checkpointer(checkpoints, async_save=False) as ckpt:
        ckpt.save(2, {"w": jnp.zeros(2)}, metadata=meta)
    return snapshot(checkpoints)


@pytest.mark.parametrize("config", ["", None])  # None: with --config (tiny.py)
def test_sample_only_refuses_another_scripts_checkpoint(tmp_path, config):
    """It was a TypeError traceback (GPTConfig got an unexpected keyword argument). With a
    --config file it said the checkpoint was saved with other settings than the file's, and
    to leave --config out, which then ended in this error."""
    checkpoints = tmp_path / "run" / "checkpoints"
    before = _another_scripts_checkpoint(checkpoints)
    proc = run_lm(f"--workdir={tmp_path / 'run'}", "--sample_only", config=config, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {checkpoints / '2'} holds no character GPT of train/lm.py" in proc.stderr
    assert snapshot(checkpoints) == before


def test_training_refuses_another_scripts_checkpoint_before_anything_is_built(tmp_path):
    """It printed a note calling it a resumed run (every setting differing), built the model,
    and failed only in the restore; then it named a leaf and the other script's settings,
    ending "Resume without those changes", as if that could work."""
    checkpoints = tmp_path / "run" / "checkpoints"
    before = _another_scripts_checkpoint(checkpoints)
    proc = run_lm(f"--workdir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {checkpoints / '2'} holds no character GPT of train/lm.py" in proc.stderr
    assert "Resume without" not in proc.stderr
    assert "note:" not in proc.stdout and "model: GPT" not in proc.stdout
    assert snapshot(checkpoints) == before


@pytest.mark.slow
def test_non_finite_loss_stops_with_an_error(trained, tmp_path):
    """A diverging run stops with the step and the last good checkpoint, no traceback.

    (``trained`` only for its compilation cache.)"""
    workdir = tmp_path / "run"
    proc = run_lm(
        f"--workdir={workdir}", "--config.learning_rate=1e30", "--config.min_lr=1e30",
        "--config.warmup_steps=0", "--config.checkpoint_every=2", check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "training stopped. Nothing was saved after it" in proc.stderr, proc.stderr[-3000:]
    assert "sample 0" not in proc.stdout


def test_unwritable_workdir_fails_before_anything_is_built(tmp_path):
    workdir = tmp_path / "file"
    workdir.write_text("not a folder")  # (a read-only folder would not stop root)
    proc = run_lm(f"--workdir={workdir}", check=False)
    assert proc.returncode == 1
    assert f"error: cannot write to {workdir / 'checkpoints'}: Not a directory" in proc.stderr
    assert "model: GPT" not in proc.stdout  # failed before the model was built
    assert workdir.read_text() == "not a folder"


def test_a_file_named_like_a_step_fails_before_anything_is_built(tmp_path):
    """orbax deleted it without a word when the run saved that step."""
    stray = tmp_path / "checkpoints" / "3"
    stray.parent.mkdir()
    stray.write_text("my notes")
    proc = run_lm(f"--workdir={tmp_path}", "--config.num_steps=3", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: {stray} is a file, not a checkpoint folder" in proc.stderr
    assert "model: GPT" not in proc.stdout  # failed before the model was built
    assert stray.read_text() == "my notes"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--config.model.block_size=256"],
            "--config.model.block_size: --sample_only takes its config from the checkpoint",
        ),
        (["--num_samples=0"], "--sample_only with --num_samples=0 has nothing to do"),
        (["--num_samples=-1"], "flag --num_samples=-1: -1 is not a non-negative integer"),
        (["--sample_tokens=0"], "flag --sample_tokens=0: 0 is not a positive integer"),
        (["--top_k=-3"], "flag --top_k=-3: -3 is not a non-negative integer"),
        (["--sample_seed=9223372036854775808"], "flag --sample_seed=9223372036854775808: "),
    ],
)
def test_sample_only_refuses_settings_it_would_ignore(tmp_path, flags, message):
    proc = run_lm(f"--workdir={tmp_path / 'run'}", "--sample_only", *flags, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_config_key_is_an_error(tmp_path):
    proc = run_lm(f"--workdir={tmp_path}", "--config.num_stepz=3", check=False)
    assert proc.returncode == 2
    assert "unknown config key 'num_stepz' in --config.num_stepz=3" in proc.stderr
    assert "did you mean 'num_steps'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())
    # A key below a number names the override, not the number's type.
    proc = run_lm(f"--workdir={tmp_path}", "--config.model.num_layers.x=2", check=False)
    assert proc.returncode == 2
    assert "bad config override in --config.model.num_layers.x=2:" in proc.stderr
    assert "'int'" not in proc.stderr.split(":")[0]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--config.num_steps=abc", "flag --config.num_steps=abc: invalid literal for int()"),
        ("--config.model.use_bias=maybe", "Non-boolean argument to boolean flag"),
    ],
)
def test_a_bad_flag_beside_a_config_file_is_named(tmp_path, flag, message):
    """With --config=FILE on the command line, absl's report of a bad flag (parsing the
    command line again) said "The flag 'config.num_steps' is defined twice"."""
    proc = run_lm(f"--workdir={tmp_path / 'run'}", flag, check=False)  # (--config=tiny.py)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "defined twice" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_config_key_of_the_default_config_is_an_error(tmp_path):
    """Without --config, ml_collections loads the default config and checks the overrides
    when lm.py defines its flags, before parse_flags runs: this used to be a traceback."""
    command, env = run_lm._command([f"--workdir={tmp_path}", "--config.num_stepz=3"], None)
    command = [a for a in command if not a.startswith("--config=")]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 2
    assert "unknown config key 'num_stepz' in --config.num_stepz=3" in proc.stderr
    assert "did you mean 'num_steps'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_misspelt_key_in_a_config_file_is_an_error(tmp_path):
    """ml_collections checks the overrides against the file; lm.py checks the file's keys
    against its default config's: a typo there used to be ignored, the run taking the
    default (eval_every=0)."""
    config_file = tmp_path / "typo.py"
    source = (REPO / "train" / "configs" / "tiny.py").read_text()
    config_file.write_text(source.replace("config.eval_every =", "config.eval_evry ="))
    assert "eval_evry" in config_file.read_text()
    proc = run_lm(f"--workdir={tmp_path / 'run'}", config=config_file, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"error: unknown config key 'eval_evry' in {config_file} (did you mean 'eval_every'?)"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # A typo that fails inside the file: it was blamed on the overrides ("bad config
        # override in --config.seed=1"), with the message's newline mangled to "'n".
        (("config.model.num_layers =", "config.modle.num_layers ="),
         """AttributeError: 'modle' Did you mean "model" instead of "modle"?"""),
        (("def get_config(", "def make_config("), "has no attribute 'get_config'"),
        (("def get_config(", "def get_config(:"), "SyntaxError: invalid syntax"),  # a traceback
        # Tracebacks too: a misspelt name, an import that fails.
        (("config.model.num_layers = ", "config.model.num_layers = num_layrs or "),
         "NameError: name 'num_layrs' is not defined"),
        (("def get_config(", "import no_such_module\n\n\ndef get_config("),
         "ModuleNotFoundError: No module named 'no_such_module'"),
        # absl's "FATAL Flags parsing error", with the traceback in the message.
        (("    return config\n", "    raise ValueError('no such setting')\n"),
         "ValueError: no such setting"),
    ],
    ids=["typo", "no_get_config", "syntax", "name", "import", "raises"],
)  # fmt: skip
def test_an_error_inside_the_config_file_names_the_file(tmp_path, edit, message):
    config_file = tmp_path / "broken.py"
    source = (REPO / "train" / "configs" / "tiny.py").read_text()
    config_file.write_text(source.replace(*edit))
    proc = run_lm(f"--workdir={tmp_path / 'run'}", "--config.seed=1", config=config_file,
                  check=False)  # fmt: skip
    assert proc.returncode == 2
    assert f"error: cannot load --config={config_file}: " in proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_an_argument_for_a_config_file_that_takes_none_is_named(tmp_path):
    """FILE:arg for a get_config() of no argument was absl's "FATAL Flags parsing error"
    with a traceback, and exit status 1."""
    proc = run_lm(f"--workdir={tmp_path / 'run'}", config=f"{TINY}:big", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: cannot load --config={TINY}: TypeError: get_config() takes 0" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_config_file_given_after_a_space_is_named(tmp_path):
    """absl takes ``--config FILE`` too: the file was then "None" in a syntax error's
    message, and a typo inside it was blamed on the overrides ("bad config override in : ")."""
    config_file = tmp_path / "broken.py"
    source = (REPO / "train" / "configs" / "tiny.py").read_text()
    config_file.write_text(source.replace("config.model.num_layers =", "config.modle.num_layers ="))
    proc = run_lm(f"--workdir={tmp_path / 'run'}", "--config", config_file, config="",
                  check=False)  # fmt: skip
    assert proc.returncode == 2
    assert f"error: cannot load --config={config_file}: AttributeError: 'modle'" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_an_override_below_an_unset_field_is_named(tmp_path):
    """model.num_kv_heads is None in tiny.py: ml_collections' ValueError was a traceback."""
    proc = run_lm(f"--workdir={tmp_path}", "--config.model.num_kv_heads.x=1", check=False)
    assert proc.returncode == 2
    assert "bad config override in --config.model.num_kv_heads.x=1: " in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("overrides", [[], ["--config.num_steps=3"]])
def test_missing_config_file_is_an_error(tmp_path, overrides):
    """ml_collections defers a config file's load error to its first use: a typo in the
    path used to end in two tracebacks."""
    missing = tmp_path / "no_such_config.py"
    proc = run_lm(f"--workdir={tmp_path / 'run'}", *overrides, config=missing, check=False)
    assert proc.returncode == 2
    assert f"error: cannot load --config={missing}: [Errno 2] No such file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--prompt=€uro", "'€' at position 0 is not in the vocabulary"),
        ("--prompt=", "--prompt must hold at least one character"),
        ("--temperature=-1", "--temperature=-1.0: temperature must be >= 0, got -1.0"),
        ("--temperature=nan", "--temperature=nan: temperature must be >= 0, got nan"),
        ("--config.batch_size=0", "config.batch_size must be an int >= 1, got 0"),
        ("--config.grad_accum_steps=0", "config.grad_accum_steps must be an int >= 1, got 0"),
        ("--config.mesh.data=3", "the product must equal the device count"),
        ("--config.eval_every=-1", "LoopConfig.eval_every must be an integer >= 0, got -1"),
        ("--config.seed=-1", "config.seed must be an int >= 0, got -1"),
        ("--config.seed=9223372036854775808", "config.seed must be an int in [0, 2**63 - 2]"),
        # Sampling after training would fail with a traceback (OverflowError in JAX).
        ("--sample_seed=9223372036854775808", "flag --sample_seed=9223372036854775808: "),
        # The optimizer's and the data splits' settings too (they used to leave checkpoints/).
        ("--config.warmup_steps=30", "need 0 <= warmup_steps <= lr_decay_steps"),
        ("--config.train_fraction=0.999999", "(the last 0.0001% of the text) holds"),
        # The model's optional fields are in the config file, so they can be set and checked.
        ("--config.model.attention_window=0", "attention_window must be a positive int, got 0"),
        ("--config.model.num_kv_heads=3", "got num_kv_heads=3"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, flag, message):
    proc = run_lm(f"--workdir={tmp_path / 'run'}", flag, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_missing_data_file_is_an_error(tmp_path):
    missing = tmp_path / "no_such_text.txt"
    proc = run_lm(f"--workdir={tmp_path / 'run'}", f"--config.data_path={missing}", check=False)
    assert proc.returncode == 1
    assert f"text data file not found: '{missing}'" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_text_without_line_breaks_names_the_default_prompt(tmp_path):
    """The default --prompt, "\\n", is not in the vocabulary of a one-line text: the error
    named a character the user never typed, not the flag that holds it."""
    text = tmp_path / "one_line.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 100, encoding="utf-8")
    proc = run_lm(f"--workdir={tmp_path / 'run'}", f"--config.data_path={text}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: --prompt='\\n' (the default; pass --prompt=TEXT): character '\\n'" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_empty_workdir_is_an_error_not_the_current_folder():
    """``--workdir=$UNSET`` used to train into the current folder (here the repository)."""
    written = [REPO / name for name in ("checkpoints", "metrics.jsonl", "tb")]
    assert not any(path.exists() for path in written)
    proc = run_lm("--workdir=", "--config.num_steps=1", check=False)
    assert proc.returncode == 1
    assert "error: --workdir is empty" in proc.stderr
    # Only what a run writes: other tests may add files to the repository meanwhile.
    assert not any(path.exists() for path in written)


@pytest.fixture
def lm(load_script):
    """train/lm.py imported in process (its flags kept out of absl's global FLAGS)."""
    return load_script("lm")


def test_loss_fn_turns_dropout_on_exactly_with_a_key(lm, monkeypatch):
    """The loop passes a key to the train step only: the GPU config's dropout 0.2 (the
    tiny config has none) must apply there and nowhere else."""
    calls = []

    def fake_loss(params, inputs, targets, model, *, rng, deterministic):
        calls.append((inputs, targets, rng, deterministic))
        return 2.5

    monkeypatch.setattr(lm, "gpt_loss", fake_loss)
    loss_fn = lm.make_loss_fn(None)
    batch = {"inputs": "x", "targets": "y"}
    assert loss_fn(None, batch, "key") == (2.5, {}) and loss_fn(None, batch, None) == (2.5, {})
    assert calls == [("x", "y", "key", False), ("x", "y", None, True)]


def test_optimizer_decays_only_the_leaves_nanogpt_decays(lm):
    """Weight decay on the kernels and tables, not on the layer-norm scales and biases,
    whose stacks over the layers are [L, D] (optax's ndim >= 2 default would decay them)."""
    model = GPTConfig(vocab_size=11, block_size=8, num_layers=2, num_heads=2, embed_dim=8,
                      use_bias=True)  # fmt: skip
    shapes = jax.eval_shape(lambda: init_gpt(jax.random.key(0), model))
    ones = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), shapes)
    config = ml_collections.ConfigDict(dict(
        learning_rate=1.0, min_lr=1.0, warmup_steps=0, lr_decay_steps=10, b1=0.9, b2=0.99,
        weight_decay=0.5, grad_clip=0.0,
    ))  # fmt: skip
    optimizer, _ = lm.lm_optimizer(config)
    # Zero gradients: Adam's step is 0 and only the decay, -lr * 0.5 * param, is left.
    decay_only = lambda p: optimizer.update(jax.tree.map(jnp.zeros_like, p), optimizer.init(p), p)
    updates, _ = jax.jit(decay_only)(ones)
    decayed = jax.tree.leaves(jax.tree.map(lambda u: bool(jnp.all(u == -0.5)), updates))
    kept = jax.tree.leaves(jax.tree.map(lambda u: bool(jnp.all(u == 0)), updates))
    want = jax.tree.leaves(weight_decay_mask(ones))
    assert decayed == want and kept == [not w for w in want]
    assert not all(want) and any(x.ndim >= 2 and not w for x, w in zip(jax.tree.leaves(ones), want))


def test_top_k_is_capped_at_the_vocabulary(lm):
    """--top_k's default, 200, is more than the 65 characters: all of them, not an error."""
    assert lm._top_k(GPTConfig(vocab_size=11, block_size=8, num_layers=1, num_heads=1,
                               embed_dim=4)) == 11  # fmt: skip


def test_tokens_per_step_counts_every_microbatch(lm, monkeypatch, tmp_path):
    """tokens/s counts all batch_size * grad_accum_steps windows of an optimizer step (what
    the train iterator hands the step), not one microbatch's."""

    class Stop(Exception):
        pass

    seen = {}

    def fake_fit(state, train_step, batches, **kwargs):
        seen["batch"], seen["tokens_per_step"] = next(batches), kwargs["tokens_per_step"]
        raise Stop

    monkeypatch.setattr(lm, "fit", fake_fit)
    config = importlib.import_module("configs.tiny").get_config()
    config.batch_size, config.grad_accum_steps = 3, 2
    with pytest.raises(Stop):
        lm.train(config, epath.Path(tmp_path / "run"))
    block_size = config.model.block_size
    assert seen["batch"]["inputs"].shape == (3 * 2, block_size)
    assert seen["tokens_per_step"] == seen["batch"]["inputs"].size == 3 * 2 * block_size


def test_model_line_names_grouped_query_and_window_attention(lm):
    """The run's header tells a GQA or sliding-window model from a plain one."""
    model = GPTConfig(vocab_size=65, block_size=64, num_layers=2, num_heads=4, embed_dim=32)
    assert lm._attention_note(model) == ""
    assert lm._attention_note(dataclasses.replace(model, num_kv_heads=4)) == ""
    assert lm._attention_note(dataclasses.replace(model, num_kv_heads=1)) == " (1 K/V head)"
    gqa_window = dataclasses.replace(model, num_kv_heads=2, attention_window=32)
    assert lm._attention_note(gqa_window) == " (2 K/V heads, window 32)"
