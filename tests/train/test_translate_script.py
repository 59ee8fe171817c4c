"""train/translate.py end to end, as a user runs it: subprocesses with the tiny config.

Each training run takes tens of seconds (XLA compiling the train step and the decoders),
so they are module-scoped and marked slow; the argument errors fail before any compile.
"""

import dataclasses
import functools
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from script_runs import REPO, ScriptRunner  # tests/train/script_runs.py

from jaxattn.models.seq2seq import Seq2SeqConfig
from jaxattn.training import translation_data as td
from jaxattn.training.checkpoint import Checkpointer
from jaxattn.training.metrics import read_metrics
from tests.processes import cpu_env, free_port

TINY = REPO / "train" / "configs" / "translate_tiny.py"


run_translate = ScriptRunner("translate.py", TINY)


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory):
    run_translate.cache_dir = tmp_path_factory.mktemp("jax_cache")
    workdir = tmp_path_factory.mktemp("lstm") / "run"
    return workdir, run_translate(f"--workdir={workdir}")


def _check_finished_run(workdir, proc, num_steps=6):
    records = read_metrics(workdir / "metrics.jsonl")
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(val) == [0, 3, 6]
    bleu = [r for r in records if "test_bleu" in r]
    assert len(bleu) == 1 and bleu[0]["step"] == num_steps
    assert 0.0 <= bleu[0]["test_bleu"] <= 100.0
    assert bleu[0]["test_sentences"] == 24 and bleu[0]["translations"] == "test_translations.tsv"
    assert (workdir / "checkpoints" / str(num_steps)).is_dir()
    assert (workdir / "spm.model").is_file()
    assert "test BLEU" in proc.stdout
    rows = (workdir / "test_translations.tsv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 24 and all(len(row.split("\t")) == 3 for row in rows)  # max_test_examples


@pytest.mark.slow
def test_lstm_attention_run_writes_bleu_checkpoints_and_heatmap(lstm_run):
    workdir, proc = lstm_run
    _check_finished_run(workdir, proc)
    png = workdir / "attention.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_translate_mode_prints_translations(lstm_run):
    workdir, _ = lstm_run
    spm_before = (workdir / "spm.model").read_bytes()
    proc = run_translate(
        f"--workdir={workdir}", "--translate=let's go", "--translate=Hi.", "--translate=日本語 Ω"
    )
    lines = [line for line in proc.stdout.splitlines() if " -> " in line]
    assert len(lines) == 3
    assert lines[0].startswith("let's go -> ") and lines[1].startswith("Hi. -> ")
    assert (workdir / "spm.model").read_bytes() == spm_before  # reused, not retrained
    # Characters outside the sentencepiece vocabulary: a note naming them, not silence.
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: --translate='日本語 Ω': '日本語', 'Ω' not in the sentencepiece vocabulary, "
        "translated as <unk>"
    ], proc.stderr
    proc = run_translate(f"--workdir={workdir}", "--translate=Hi.", "--translate=", check=False)
    assert proc.returncode == 1 and "--translate='' has 0 tokens" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_bleu_only_rescores_the_checkpoint_to_the_same_bleu(lstm_run):
    workdir, _ = lstm_run
    before = [r for r in read_metrics(workdir / "metrics.jsonl") if "test_bleu" in r]
    proc = run_translate(f"--workdir={workdir}", "--bleu_only")
    after = [r for r in read_metrics(workdir / "metrics.jsonl") if "test_bleu" in r]
    assert len(after) == len(before) + 1
    assert after[-1]["step"] == before[-1]["step"]
    assert after[-1]["test_bleu"] == pytest.approx(before[-1]["test_bleu"], abs=1e-9)
    assert f"test BLEU {after[-1]['test_bleu']:.2f}" in proc.stdout
    settings = dict(beam_size=1, decode_max_len=16, max_test_examples=24, test_sentences=24)
    assert after[-1].items() >= settings.items()
    assert after[-1]["translations"] == "test_translations_step6_beam1_len16_n24.tsv"
    tsv = lambda name: (workdir / name).read_text(encoding="utf-8")
    assert tsv(after[-1]["translations"]) == tsv("test_translations.tsv")  # same settings


@pytest.mark.slow
def test_bleu_only_takes_decode_overrides_and_refuses_the_rest(lstm_run):
    workdir, _ = lstm_run
    tsv_before = (workdir / "test_translations.tsv").read_text(encoding="utf-8")
    proc = run_translate(f"--workdir={workdir}", "--bleu_only", "--config.max_test_examples=5")
    assert "on 5 sentences" in proc.stdout  # not the checkpoint's 24
    # The rescoring says which settings it used and keeps the training run's translations.
    record = [r for r in read_metrics(workdir / "metrics.jsonl") if "test_bleu" in r][-1]
    assert record["max_test_examples"] == record["test_sentences"] == 5
    assert record["beam_size"] == 1 and record["decode_max_len"] == 16
    assert (workdir / "test_translations.tsv").read_text(encoding="utf-8") == tsv_before
    rows = (workdir / record["translations"]).read_text(encoding="utf-8").splitlines()
    assert record["translations"] == "test_translations_step6_beam1_len16_n5.tsv"
    # With one seed, 5 test pairs are drawn from among the 24 (and translated the same).
    assert len(rows) == 5 and set(rows) < set(tsv_before.splitlines())
    proc = run_translate(
        f"--workdir={workdir}", "--bleu_only", "--config.model.hidden_size=3", check=False
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--config.model.hidden_size: a --bleu_only or --translate run" in proc.stderr
    # An allowed override is still checked, before any decoding.
    proc = run_translate(f"--workdir={workdir}", "--bleu_only", "--config.beam_size=0", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: train/translate.py: config.beam_size must be an int >= 1" in proc.stderr


@pytest.mark.slow
def test_restore_only_modes_refuse_another_runs_config_file(lstm_run):
    """--translate and --bleu_only take the config from the checkpoint: a --config file of
    another run is an error, not silently ignored (the run's own file, as every call here
    passes, is fine)."""
    workdir, _ = lstm_run
    for config, mode, change in [
        (f"{TINY}:transformer", "--translate=Hi.", "model.kind 'seq2seq' -> 'transformer'"),
        (f"{TINY}:additive", "--bleu_only", "model.attention 'dot' -> 'additive'"),
    ]:
        proc = run_translate(f"--workdir={workdir}", mode, config=config, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        says = f"--config={config}: a --bleu_only or --translate run takes its config from"
        assert says in proc.stderr, proc.stderr
        assert change in proc.stderr and "leave out --config" in proc.stderr
        assert " -> " not in proc.stdout and "test BLEU" not in proc.stdout


@pytest.mark.slow
def test_a_changed_optimizer_structure_is_refused_naming_the_setting(lstm_run):
    """grad_clip 1.0 -> 0 drops a leaf of the optimizer state: the run printed a note that
    called it a resumed run, loaded the data, then failed naming only the leaf (as lm.py
    did)."""
    workdir, _ = lstm_run
    before = {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}
    proc = run_translate(
        f"--workdir={workdir}", "--config.num_steps=9", "--config.grad_clip=0", check=False
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: checkpoint {workdir / 'checkpoints' / '6'} is incompatible: " in proc.stderr
    assert "(settings that differ from the checkpoint's: grad_clip 1.0 -> 0.0)" in proc.stderr
    assert "note:" not in proc.stdout and "data:" not in proc.stdout
    assert {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()} == before


@pytest.mark.slow
def test_a_tokenizer_of_other_settings_is_refused_before_a_resume_note(lstm_run):
    """vocab_size, max_train_examples or split_seed changed on a resume: the run printed a
    note that called it a resumed run, then refused the cached sentencepiece model."""
    workdir, _ = lstm_run
    before = {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}
    for override, error in [
        ("--config.vocab_size=250", "was trained with vocab_size=300, not 250"),
        ("--config.max_train_examples=1500", "was trained on other sentences"),
        ("--config.split_seed=1", "was trained on other sentences"),
    ]:
        proc = run_translate(f"--workdir={workdir}", "--config.num_steps=9", override, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"error: {workdir / 'spm.model'} {error}" in proc.stderr, proc.stderr
        assert "note:" not in proc.stdout and "data:" not in proc.stdout, proc.stdout
    assert {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()} == before


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(lstm_run, killed_run_copy, assert_same_saved_state):
    workdir, _ = lstm_run
    # A run killed after its step-3 checkpoint: the same workdir without step 6.
    resumed = killed_run_copy(workdir, 6)
    bleu_before = [r for r in read_metrics(resumed / "metrics.jsonl") if "test_bleu" in r]
    # A decode setting only shapes the final test decode: no note that the run differs.
    proc = run_translate(f"--workdir={resumed}", "--config.max_test_examples=5")
    assert f"Resumed from {resumed / 'checkpoints' / '3'}" in proc.stdout
    assert "note:" not in proc.stdout  # same settings (the saved JSON has lists for tuples)
    assert_same_saved_state(resumed, workdir, 6)
    bleu = [r for r in read_metrics(resumed / "metrics.jsonl") if "test_bleu" in r]
    assert len(bleu) == len(bleu_before) + 1 and bleu[-1]["step"] == 6
    assert bleu[-1]["test_sentences"] == 5


@pytest.mark.slow
def test_rerunning_a_finished_run_reports_its_bleu_without_decoding_again(lstm_run, tmp_path):
    """A rerun of a finished run trained nothing, yet decoded the test split again: a second
    test_bleu record of the same step and settings, the translations and heat-map rewritten.
    Other decode settings are a new measurement, recorded once."""
    workdir, _ = lstm_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    outputs = [run / name for name in ("metrics.jsonl", "test_translations.tsv", "attention.png")]
    snapshot = lambda: [(p.read_bytes(), p.stat().st_mtime_ns) for p in outputs]
    before = snapshot()
    bleu = lambda: [r for r in read_metrics(run / "metrics.jsonl") if "test_bleu" in r]
    # The training run's, or a --bleu_only rescore's of these settings (the same score).
    settings = dict(step=6, beam_size=1, decode_max_len=16, test_sentences=24).items()
    recorded = [r for r in bleu() if r.items() >= settings][-1]
    proc = run_translate(f"--workdir={run}")
    assert "Step 6 >= num_steps=6: nothing to do." in proc.stdout
    assert snapshot() == before
    assert (
        f"Done: step 6, test BLEU {recorded['test_bleu']:.2f} on 24 sentences (beam_size 1, "
        f"decode_max_len 16), as recorded in {run / 'metrics.jsonl'}: nothing trained, not "
        f"decoded again; translations: {run / recorded['translations']}"
    ) in proc.stdout, proc.stdout
    count = len(bleu())
    proc = run_translate(f"--workdir={run}", "--config.max_test_examples=7")
    assert len(bleu()) == count + 1 and "to decode" in proc.stdout
    assert bleu()[-1].items() >= dict(step=6, test_sentences=7).items()
    proc = run_translate(f"--workdir={run}", "--config.max_test_examples=7")
    assert len(bleu()) == count + 1 and "on 7 sentences" in proc.stdout
    assert "not decoded again; translations:" in proc.stdout


@pytest.mark.slow
def test_a_finished_run_reports_its_bleu_from_a_read_only_folder(
    lstm_run, translate, monkeypatch, tmp_path, capsys
):
    """A rerun of a finished run whose BLEU is recorded writes nothing, so it needs no write
    access (as lm.py's and fit's finished runs); it failed probing the checkpoints folder.
    One with other decode settings, which must record its score, fails before decoding, as
    does --bleu_only."""
    from configs import translate_tiny  # train/ is on sys.path (load_script)

    from jaxattn.training import checkpoint as checkpoint_module
    from jaxattn.training.checkpoint import NotWritableError

    workdir, _ = lstm_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run)

    def unwritable(directory):
        raise NotWritableError(f"cannot write to {directory}: read-only (simulated)")

    # Root ignores chmod, so fail every write probe instead, as a read-only mount would.
    monkeypatch.setattr(checkpoint_module, "check_writable", unwritable)
    monkeypatch.setattr(translate, "check_writable", unwritable)
    decoded = []
    monkeypatch.setattr(translate, "test_bleu", lambda *args: decoded.append(args))
    translate.train(translate_tiny.get_config(), run)
    assert "as recorded in" in capsys.readouterr().out and not decoded
    config = translate_tiny.get_config()
    config.max_test_examples = 7  # not recorded: decoded, then written
    with pytest.raises(NotWritableError, match="read-only"):
        translate.train(config, run)
    assert not decoded
    # --bleu_only as well (it decoded the whole test split, minutes with the CPU configs'
    # beams, and then failed with a traceback). It reads the command line's --config,
    # which absl's global flags do not hold here.
    monkeypatch.setattr(translate, "checkpoint_config_file", lambda *args: None)
    monkeypatch.setattr(translate, "checkpoint_config_overrides", lambda *args: {})
    with pytest.raises(NotWritableError, match="read-only"):
        translate.bleu_only(run)
    assert not decoded


@pytest.mark.slow
def test_sigterm_saves_and_exits_143_without_decoding(lstm_run, tmp_path):
    """A preempted run saves a checkpoint and exits 143 (requeue), skipping the test BLEU."""
    workdir, _ = lstm_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    proc = run_translate.start(f"--workdir={run}", "--config.num_steps=100000")
    try:
        deadline = time.monotonic() + 300
        while not any(r["step"] > 6 for r in read_metrics(run / "metrics.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 143, (out, err)
    assert "Stopped at step" in out and "test BLEU" not in out, out
    records = read_metrics(run / "metrics.jsonl")
    assert [r for r in records if "test_bleu" in r] == [
        r for r in read_metrics(workdir / "metrics.jsonl") if "test_bleu" in r
    ]
    saved = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert f"Stopped at step {saved};" in out


@pytest.mark.slow
def test_transformer_run(tmp_path):
    workdir = tmp_path / "run"
    proc = run_translate(f"--workdir={workdir}", config=f"{TINY}:transformer")
    _check_finished_run(workdir, proc)
    assert not (workdir / "attention.png").exists()  # heat-maps are for the LSTM models


def test_unknown_config_key_is_an_error(tmp_path):
    proc = run_translate(f"--workdir={tmp_path}", "--config.beam_sise=3", check=False)
    assert proc.returncode == 2
    assert "unknown config key 'beam_sise' in --config.beam_sise=3" in proc.stderr
    assert "did you mean 'beam_size'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_decode_settings_are_checked_before_training(tmp_path):
    """A decode setting that cannot work fails at once, not after the training."""
    proc = run_translate(f"--workdir={tmp_path}", "--config.beam_size=0", check=False)
    assert proc.returncode == 1 and "config.beam_size must be an int >= 1, got 0" in proc.stderr
    proc = run_translate(
        f"--workdir={tmp_path}", "--config.decode_max_len=20", config=f"{TINY}:transformer",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "config.model.max_len=16 (the position table) must hold" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_bad_example_counts_and_model_fail_before_anything_is_written(tmp_path):
    """A negative max_*_examples would slice pairs off the end ([:-1]); a bad model field,
    mesh, loop setting or batch size used to fail only after the workdir (or the
    sentencepiece model) was made."""
    for override, message in [
        ("--config.max_train_examples=-1", "config.max_train_examples must be an int >= 0, got -1"),
        ("--config.max_test_examples=-3", "config.max_test_examples must be an int >= 0, got -3"),
        ("--config.model.kind=rnn", "config.model.kind must be one of"),
        ("--config.model.attention=luong", "Seq2SeqConfig.attention must be one of"),
        ("--config.mesh.data=3", "the product must equal the device count"),
        ("--config.eval_every=-1", "LoopConfig.eval_every must be an integer >= 0, got -1"),
        ("--config.max_len=40", "config.max_len=40 keeps train/val pairs longer than the"),
        ("--config.max_len=0", "config.max_len must be an int >= 1, got 0"),  # kept all
        ("--config.max_len=-1", "config.max_len must be an int >= 1, got -1"),  # kept none
        # The LSTM config's fields are not a transformer's (a traceback before).
        ("--config.model.kind=transformer", "translate_tiny.py (model.kind='transformer')"),
        ("--config.buckets=(16,8)", "config.buckets must be increasing lengths >= 1"),
        ("--config.seed=-1", "config.seed must be an int >= 0, got -1"),
        ("--config.split_seed=-2", "config.split_seed must be an int >= 0, got -2"),
        ("--config.learning_rate=-1", "learning rates must be finite float32 values >= 0"),
        # (it made the workdir and its checkpoints folder first)
        ("--config.data_path=/no/such/pairs.tsv", "translation corpus not found: '/no/such/pair"),
        # (the loss refused it inside fit, after the sentencepiece model was trained)
        (
            "--config.label_smoothing=1.5",
            "translate.py: label_smoothing must be in [0, 1), got 1.5",
        ),
        # (named as the model's src_vocab_size, a key the config does not have)
        ("--config.vocab_size=0", "config.vocab_size must be an int >= 1, got 0"),
        # (the dataset refused them after the sentencepiece model was trained)
        (
            "--config.batch_size=5000",
            "config.batch_size=5000 is more than the 2,000 train pairs of the bundled corpus "
            "(config.max_train_examples=2000)",
        ),
        (
            "--config.batch_size=65",
            "config.batch_size=65 is more than the 64 validation pairs of the bundled corpus "
            "(config.max_eval_examples=64)",
        ),
    ]:
        proc = run_translate(f"--workdir={tmp_path / 'run'}", override, check=False)
        assert proc.returncode == 1 and message in proc.stderr, (override, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "run").exists()


@pytest.fixture
def tiny_config(monkeypatch):
    """translate_tiny.py's config, imported as the script imports it (train/ on sys.path)."""
    monkeypatch.syspath_prepend(str(REPO / "train"))
    from configs import translate_tiny

    return translate_tiny.get_config()


def _fake_checkpoint(workdir, metadata):
    """A checkpoint of one leaf with ``metadata`` in ``workdir``; its files' bytes."""
    with Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
        ckpt.save(3, {"w": jnp.zeros(2)}, metadata=metadata)
    return {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


def test_a_checkpoint_of_another_script_is_refused_by_name(tmp_path):
    """lm.py's checkpoints record no model kind: --translate and --bleu_only raised a
    KeyError traceback, and training into the workdir first wrote its sentencepiece model
    there, then refused the restore naming one leaf."""
    workdir = tmp_path / "lm_run"
    before = _fake_checkpoint(workdir, {"config": {"batch_size": 4}, "vocab": "\nabc"})
    says = f"{workdir / 'checkpoints' / '3'} was not saved by train/translate.py"
    for mode, config in [("--translate=Hi.", ""), ("--bleu_only", ""), ("--noprogress", TINY)]:
        proc = run_translate(f"--workdir={workdir}", mode, config=config, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (mode, proc.stderr)
        assert says in proc.stderr, (mode, proc.stderr)
        after = {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}
        assert after == before, mode  # no spm.model either


def test_a_checkpoint_of_other_model_shapes_is_refused_before_anything_is_written(
    tmp_path, tiny_config
):
    """The restore refused it too, but only after the data and the sentencepiece model were
    made (in the workdir), and after a note that called it a resumed run."""
    workdir = tmp_path / "run"
    saved = Seq2SeqConfig(
        src_vocab_size=300, tgt_vocab_size=300, embed_dim=16, hidden_size=32, attention="dot"
    )
    meta_config = tiny_config.to_dict()
    meta_config["model"]["hidden_size"] = 32
    meta = {"config": meta_config, "kind": "seq2seq", "model": dataclasses.asdict(saved)}
    before = _fake_checkpoint(workdir, meta)
    proc = run_translate(f"--workdir={workdir}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        f"{workdir / 'checkpoints' / '3'} holds a seq2seq model of other shapes than this "
        "config's (model.hidden_size 32 -> 16)"
    ) in proc.stderr, proc.stderr
    assert "note:" not in proc.stdout
    assert {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()} == before
    proc = run_translate(f"--workdir={workdir}", config=f"{TINY}:transformer", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "holds a seq2seq model, this config a transformer" in proc.stderr, proc.stderr


def test_a_missing_sentencepiece_model_is_named(tmp_path, tiny_config):
    """--translate in a workdir that lost spm.model said only "train_sentencepiece: no
    sentences to train on"."""
    workdir = tmp_path / "run"
    saved = Seq2SeqConfig(src_vocab_size=300, tgt_vocab_size=300, embed_dim=16, hidden_size=16)
    meta = {"config": tiny_config.to_dict(), "kind": "seq2seq", "model": dataclasses.asdict(saved)}
    _fake_checkpoint(workdir, meta)
    for mode in ("--translate=Hi.", "--bleu_only"):
        proc = run_translate(f"--workdir={workdir}", mode, config="", check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        says = f"error: {workdir / 'spm.model'} not found: a --bleu_only or --translate run"
        assert says in proc.stderr, proc.stderr


def test_translate_without_checkpoint_is_an_error(tmp_path):
    proc = run_translate(f"--workdir={tmp_path / 'none'}", "--translate=hello", check=False)
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_a_corpus_or_max_len_that_leaves_no_pairs_is_named(tmp_path):
    """The run failed in sentencepiece ("no sentences to train on") or in the dataset ("no
    bucket holds a full batch of 8 examples (0 examples ...)"), naming neither cause."""
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("".join(f"I saw {i} dogs.\tVi {i} perros.\n" for i in range(10)))
    proc = run_translate(f"--workdir={tmp_path / 'a'}", f"--config.data_path={corpus}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        f"error: {str(corpus)!r} (config.data_path) is too small: its 10 pairs split 90/5/5 "
        "by English sentence leave 9 train and 0 validation pairs"
    ) in proc.stderr, proc.stderr
    proc = run_translate(f"--workdir={tmp_path / 'b'}", "--config.max_len=1", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        "error: config.max_len=1 drops all 2,000 train pairs of the bundled corpus: each is "
        "longer than that in the 300-piece sentencepiece vocabulary"
    ) in proc.stderr, proc.stderr


def test_a_too_small_corpus_names_the_split_fractions_used(translate, monkeypatch, tmp_path):
    """The error wrote the split's fractions as a literal "90/5/5", which would go stale
    with the default."""
    config = ml_collections.ConfigDict(dict(data_path="", split_seed=0))
    pairs = [(f"I saw {i} dogs.", f"Vi {i} perros.") for i in range(5)]
    monkeypatch.setattr(td, "load_pairs", lambda path: pairs)
    monkeypatch.setattr(td, "SPLIT_FRACTIONS", (0.8, 0.1))
    with pytest.raises(ValueError) as error:
        translate.load_data(config, tmp_path)
    assert (
        "the bundled corpus (config.data_path) is too small: its 5 pairs split 80/10/10 by "
        "English sentence leave 4 train and 0 validation pairs"
    ) in str(error.value)
    monkeypatch.setattr(td, "SPLIT_FRACTIONS", (0.85, 0.075))
    with pytest.raises(ValueError, match=r"its 5 pairs split 85/7\.5/7\.5 by English sentence"):
        translate.load_data(config, tmp_path)


def test_translate_and_bleu_only_together_is_an_error(tmp_path):
    """--bleu_only was ignored without a word: the run only translated."""
    workdir = tmp_path / "run"
    proc = run_translate(f"--workdir={workdir}", "--translate=Hi.", "--bleu_only", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: --translate and --bleu_only are two runs: give one" in proc.stderr
    assert not workdir.exists()


@pytest.mark.slow
def test_two_processes_share_the_test_decoding(tmp_path):
    """Each process decodes a share of the test split and process 0 reassembles it: the
    translations, in order, and the BLEU equal a one-process run on the same 2-device mesh."""

    def launch(workdir, processes, *extra):
        env = cpu_env(devices=2 // processes)
        args = [
            sys.executable, str(run_translate.script), f"--config={TINY}", "--noprogress",
            f"--workdir={workdir}", "--config.mesh.data=2", "--compilation_cache=",
            *extra,
        ]  # fmt: skip
        if processes > 1:
            args += [f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2"]
        ids = [[f"--process_id={i}"] for i in range(processes)] if processes > 1 else [[]]
        pipe = dict(cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return [subprocess.Popen(args + i, **pipe) for i in ids]

    runs = {n: (tmp_path / f"p{n}", launch(tmp_path / f"p{n}", n)) for n in (2, 1)}
    for _, procs in runs.values():
        for proc in procs:
            out = proc.communicate(timeout=900)[0]
            assert proc.returncode == 0, out[-4000:]
    (two, _), (one, _) = runs[2], runs[1]
    tsv = lambda w: (w / "test_translations.tsv").read_text(encoding="utf-8")
    assert tsv(two) == tsv(one) and len(tsv(one).splitlines()) == 24
    bleu = lambda w: [r["test_bleu"] for r in read_metrics(w / "metrics.jsonl") if "test_bleu" in r]
    assert bleu(two) == bleu(one) and len(bleu(one)) == 1
    # A rerun finds the record: no process decodes (or waits for another that does).
    procs = launch(two, 2)
    outs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [out[-4000:] for out in outs]
    assert "not decoded again" in outs[0] and len(bleu(two)) == 1, outs  # (process 0 prints)
    # A cached sentencepiece model of other settings: every process refuses it (process 1
    # must not wait at the barrier for a process 0 that has already stopped).
    for proc in launch(two, 2, "--config.vocab_size=77"):
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 1 and "was trained with vocab_size=" in out, out[-4000:]


def test_processes_given_different_settings_are_refused_naming_them(tmp_path):
    """Each process built its sentencepiece model and batches from its own config: a
    vocab_size given to one process alone was not caught before the runs diverged."""
    workdir, port = tmp_path / "run", free_port()
    args = [
        sys.executable, str(run_translate.script), f"--config={TINY}", "--noprogress",
        f"--workdir={workdir}", "--config.mesh.data=2", "--compilation_cache=",
        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
    ]  # fmt: skip
    own = [[], ["--config.vocab_size=200"]]
    pipe = dict(cwd=REPO, env=cpu_env(devices=1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    procs = [
        subprocess.Popen([*args, *own[i], f"--process_id={i}"], text=True, **pipe) for i in range(2)
    ]
    try:
        outs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    want = (
        "error: process 1 of the run was given other settings than process 0 (process 0 -> "
        "process 1: config.vocab_size 300 -> 200)"
    )
    for proc, out in zip(procs, outs, strict=True):
        assert proc.returncode == 1 and want in out and "Traceback" not in out, out[-3000:]
    assert not workdir.exists()  # Nothing written.


def test_object_store_workdir_is_refused(tmp_path):
    """Path() would fold gs://bucket into a local gs:/bucket folder on each host."""
    proc = run_translate("--workdir=gs://bucket/run", check=False)
    assert proc.returncode != 0 and "--workdir=gs://bucket/run" in proc.stderr
    assert "local or shared-filesystem folder" in proc.stderr
    assert not (Path.cwd() / "gs:").exists() and not (REPO / "gs:").exists()


class FakePieces:  # a sentencepiece stand-in: one piece per character
    def encode(self, s):
        return [4 + ord(ch) % 8 for ch in s]

    def decode(self, ids):
        return " ".join(map(str, ids))

    def id_to_piece(self, i):
        return str(i)


@pytest.fixture
def translate(load_script):
    """train/translate.py imported in process (its flags kept out of absl's global FLAGS)."""
    return load_script("translate")


def test_loop_mesh_and_optimizer_settings_fail_before_the_corpus_is_split(
    translate, monkeypatch, tmp_path, tiny_config
):
    """They were checked after the corpus was read and split (about 1 s), so a bad
    --config of theirs took that long to fail."""

    def split_corpus(config):
        raise AssertionError("the corpus was split before the settings were checked")

    monkeypatch.setattr(translate, "split_corpus", split_corpus)
    for key, value, message in [
        ("eval_every", -1, "LoopConfig.eval_every must be an integer >= 0, got -1"),
        ("learning_rate", -1.0, "learning rates must be finite float32 values >= 0"),
        ("mesh.data", 3, "the product must equal the device count"),
        # None failed as "TypeError: unsupported operand type(s) for %", and 0 only in the
        # dataset, after the workdir and its sentencepiece model were made.
        ("batch_size", None, "train/translate.py: config.batch_size must be an int >= 1, got"),
        ("batch_size", 0, "train/translate.py: config.batch_size must be an int >= 1, got 0"),
    ]:
        config = tiny_config.copy_and_resolve_references()
        *parents, name = key.split(".")
        functools.reduce(getattr, parents, config)[name] = value
        with pytest.raises(ValueError, match=re.escape(message)):
            translate.train(config, tmp_path / "run")
        assert not (tmp_path / "run").exists()


def test_decoding_uses_the_decode_settings_and_stops_at_eos(translate, monkeypatch):
    """translate_ids gives the decoder config.beam_size, decode_max_len and batches of
    decode_batch_size; each hypothesis ends before EOS, in its source's place. test_bleu
    decodes every source the largest bucket holds (a longer one scores as empty)."""
    calls = []

    def fake_translate(params, model, src, src_lengths, *, beam_size, max_len):
        calls.append((src.shape, beam_size, max_len))
        out = np.full((src.shape[0], max_len), 7, np.int32)  # after EOS: to be dropped
        out[:, 0], out[:, 1] = 10 + src_lengths, td.EOS_ID
        return out

    monkeypatch.setitem(translate.MODELS, "fake", (None, None, None, fake_translate, None))
    config = ml_collections.ConfigDict(
        dict(buckets=(4, 8), beam_size=3, decode_max_len=5, decode_batch_size=2)
    )
    sources = [np.arange(4, 4 + n, dtype=np.int32) for n in (6, 2, 3, 8, 1)]
    assert translate.translate_ids(None, "fake", None, config, sources) == [
        [16],
        [12],
        [13],
        [18],
        [11],
    ]
    assert sorted(calls) == [((2, 4), 3, 5), ((2, 4), 3, 5), ((2, 8), 3, 5)]
    pairs = [("abcdefgh", "18"), ("ab", "12"), ("abcdefghi", "19")]  # 8, 2 and 9 pieces
    _, hyps = translate.test_bleu(None, "fake", None, config, FakePieces(), pairs)
    assert hyps == ["18", "12", ""]


def test_bleu_scores_the_hypotheses_against_the_targets(translate, monkeypatch):
    """test_bleu's score is sacrebleu's corpus BLEU of the decoded hypotheses against the
    pairs' targets (not their sources, which the decoding tests above cannot tell)."""
    import sacrebleu

    def echo(params, model, src, src_lengths, *, beam_size, max_len):  # copies the source
        out = np.full((src.shape[0], max_len), td.EOS_ID, np.int32)
        for row, n in enumerate(np.asarray(src_lengths)):
            out[row, :n] = src[row, :n]
        return out

    monkeypatch.setitem(translate.MODELS, "echo", (None, None, None, echo, None))
    config = ml_collections.ConfigDict(
        dict(buckets=(8,), beam_size=1, decode_max_len=8, decode_batch_size=4)
    )
    # FakePieces: "abcd" -> pieces 5 6 7 8, decoded as "5 6 7 8".
    pairs = [("abcd", "5 6 7 8"), ("bcdef", "6 7 8 9 10"), ("abcdefg", "5 6 7 9 9 10 11")]
    score, hyps = translate.test_bleu(None, "echo", None, config, FakePieces(), pairs)
    assert hyps == ["5 6 7 8", "6 7 8 9 10", "5 6 7 8 9 10 11"]
    targets, sources = [[t for _, t in pairs]], [[src for src, _ in pairs]]
    assert score == pytest.approx(sacrebleu.corpus_bleu(hyps, targets).score)
    assert 0 < score < 100 and sacrebleu.corpus_bleu(hyps, sources).score != score


def test_loss_fn_passes_the_label_smoothing_to_the_model_loss(translate, monkeypatch):
    """make_loss_fn hands config.label_smoothing (0.1 in translate_base) to the model's loss,
    and dropout is on exactly when the loop passes a key."""
    calls = []

    def fake_loss(params, batch, model, *, rng, deterministic, label_smoothing):
        calls.append((rng, deterministic, label_smoothing))
        return 1.5

    monkeypatch.setitem(translate.MODELS, "fake", (None, None, fake_loss, None, None))
    loss_fn = translate.make_loss_fn("fake", None, 0.1)
    assert loss_fn(None, None, "key") == (1.5, {}) and loss_fn(None, None, None) == (1.5, {})
    assert calls == [("key", False, 0.1), (None, True, 0.1)]


def test_attention_plot_leaves_out_sources_no_bucket_holds(translate, tmp_path):
    """The heat-map runs after the test BLEU: a long source among its sentences (which
    test_bleu skipped) used to fail the whole run with bucket_of's ValueError."""
    import jax

    from jaxattn.models import seq2seq

    model = seq2seq.Seq2SeqConfig(12, 12, 8, 8, attention="dot")
    params = seq2seq.init_seq2seq(jax.random.key(0), model)
    config = ml_collections.ConfigDict(
        dict(buckets=(16,), beam_size=1, decode_max_len=8, decode_batch_size=4)
    )
    path = tmp_path / "attention.png"
    long = "a sentence of more than sixteen pieces"
    assert translate.plot_attention(params, model, FakePieces(), ["short", long], path, config)
    assert path.is_file()
    assert not translate.plot_attention(params, model, FakePieces(), [long], path, config)
    # An EOS row only for a hypothesis that ended with one (not one cut at decode_max_len).
    assert translate.output_labels(FakePieces(), [3, 4], decode_max_len=3) == ["3", "4", "</s>"]
    assert translate.output_labels(FakePieces(), [3, 4, 5], decode_max_len=3) == ["3", "4", "5"]


def test_example_counts_of_zero_mean_all(translate, monkeypatch, tmp_path):
    """max_*_examples=0 (the base config's default) keeps every pair of its split, and is
    accepted by the checks; -1 is refused."""
    config = ml_collections.ConfigDict(dict(
        data_path="", split_seed=0, max_train_examples=0, max_eval_examples=0,
        max_test_examples=0, vocab_size=50, max_len=64,
    ))  # fmt: skip
    names = ("max_train_examples", "max_eval_examples", "max_test_examples")
    translate.check_example_counts(config, names)
    pairs = [(f"s{i}", f"t{i}") for i in range(200)]

    class Pieces:  # train_sentencepiece's stand-in: one piece per character
        def encode(self, sentences):
            return [[4 + ord(ch) % 8 for ch in s] for s in sentences]

    monkeypatch.setattr(td, "load_pairs", lambda path: pairs)
    monkeypatch.setattr(td, "train_sentencepiece", lambda sentences, prefix, vocab_size: Pieces())
    _, split, train, val, test = translate.load_data(config, tmp_path)
    assert (len(train[0]), len(val[0]), len(test)) == (180, 10, 10)
    assert (len(split.train), len(split.val), len(split.test)) == (180, 10, 10)
    config.max_eval_examples, config.max_test_examples = 4, 3
    _, _, _, val, test = translate.load_data(config, tmp_path)
    assert (len(val[0]), len(test)) == (4, 3)
    # Random subsets in split order, not the first pairs (the corpus is sorted by length),
    # and the same ones on every call; validation draws from the pairs that fit max_len.
    assert test == td.sample(split.test, 3, seed=0) != split.test[:3]
    assert set(test) < set(split.test) and sorted(test, key=split.test.index) == test
    config.max_len, config.max_eval_examples = 4, 2  # "tN" + EOS fits for N < 100 only
    fits = [(s, t) for s, t in split.val if len(t) + 1 <= 4]
    assert 2 < len(fits) < len(split.val)
    _, _, _, val, _ = translate.load_data(config, tmp_path)
    assert len(val[0]) == 2
    config.max_eval_examples = -1
    with pytest.raises(ValueError, match=r"config.max_eval_examples must be an int >= 0, got -1"):
        translate.check_example_counts(config, names)


def test_rescored_translations_file_names_the_sentences_scored(translate, tmp_path):
    """With max_test_examples=0 (all), the file's n is the test split's size, not 0."""
    config = ml_collections.ConfigDict(
        dict(beam_size=4, decode_max_len=16, max_test_examples=0, buckets=(8, 16))
    )
    pairs, hyps = [("a", "x"), ("b", "y"), ("c", "z")], ["x", "w", ""]
    path = translate.record_test_bleu(tmp_path, 6, 12.5, config, pairs, hyps, rescore=True)
    assert path == tmp_path / "test_translations_step6_beam4_len16_n3.tsv"
    assert path.read_text(encoding="utf-8") == "a\tx\tx\nb\ty\tw\nc\tz\t\n"
    (record,) = read_metrics(tmp_path / "metrics.jsonl")
    assert record.items() >= dict(
        step=6, test_bleu=12.5, beam_size=4, decode_max_len=16, max_test_examples=0,
        test_sentences=3, translations=path.name,
    ).items()  # fmt: skip


def test_recorded_bleu_is_reported_only_for_the_same_test(translate, tmp_path, capsys):
    """A finished run's rerun prints the recorded score only for the same step, decode
    settings, largest bucket and test pairs, and names its translations while they exist."""
    config = ml_collections.ConfigDict(
        dict(beam_size=1, decode_max_len=16, max_test_examples=2, buckets=(8, 16))
    )
    pairs = [("a b", "x y"), ("c", "z")]
    path = translate.record_test_bleu(tmp_path, 6, 12.5, config, pairs, ["x y", ""])
    report = lambda step, config, pairs: translate.report_recorded_bleu(
        tmp_path, step, config, pairs
    )
    assert report(6, config, pairs)
    out = capsys.readouterr().out
    assert "test BLEU 12.50 on 2 sentences" in out and f"translations: {path}" in out
    # The same number of other pairs (another sample, an older version's), another
    # largest bucket, another step or beam: not this record.
    assert not report(6, config, [("a b", "x y"), ("d", "z")])
    longer = ml_collections.ConfigDict(config.to_dict() | {"buckets": (8, 32)})
    assert not report(6, longer, pairs)
    assert not report(7, config, pairs)
    beam = ml_collections.ConfigDict(config.to_dict() | {"beam_size": 4})
    assert not report(6, beam, pairs)
    # A record without the pairs' digest (written before it existed) is not trusted.
    record = read_metrics(tmp_path / "metrics.jsonl")[-1]
    old = {k: v for k, v in record.items() if k not in ("test_set", "max_source_len")}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(old) + "\n", encoding="utf-8")
    assert not report(6, config, pairs)
    # Its translations deleted since: the score is reported, the file is not named.
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    path.unlink()
    capsys.readouterr()
    assert report(6, config, pairs)
    out = capsys.readouterr().out
    assert "as recorded in" in out and "translations:" not in out


def test_transformer_position_table_must_hold_the_largest_bucket(translate):
    """Training batches pad to the largest bucket: a longer one than the position table
    would fail only at the first step, after the workdir was made."""
    config = ml_collections.ConfigDict(dict(
        beam_size=1, decode_max_len=8, decode_batch_size=4, max_test_examples=0,
        buckets=(8, 32), model=dict(kind="transformer", max_len=16),
    ))  # fmt: skip
    with pytest.raises(ValueError, match=r"must hold config.decode_max_len=8 and the largest"):
        translate.check_decode_settings(config)
    config.buckets = (8, 16)
    translate.check_decode_settings(config)


def test_a_numpy_integer_of_the_model_config_is_printed_and_saved_as_an_int(
    translate, monkeypatch, tmp_path, capsys
):
    """A config file's NumPy integer (the model configs take it as a size) failed the run's
    model line with a TypeError traceback, before training."""
    from configs import translate_tiny  # train/ is on sys.path (load_script)

    class Stop(Exception):
        pass

    def stop(state, train_step, train_iter, **options):
        raise Stop(options["metadata"])

    monkeypatch.setattr(translate, "fit", stop)
    values = translate_tiny.get_config().to_dict()
    values["model"]["embed_dim"] = np.int64(16)  # (a ConfigDict's int refuses one)
    with pytest.raises(Stop):
        translate.train(ml_collections.ConfigDict(values), tmp_path / "run")
    assert '"embed_dim": 16' in capsys.readouterr().out


@pytest.mark.parametrize("model", ["transformer", "general"])
def test_train_decays_kernels_weighs_val_batches_by_tokens_and_counts_positions(
    translate, monkeypatch, tmp_path, model
):
    """What train hands the loop: an optimizer that decays the model's matrices and tables
    only (optax's ndim >= 2 rule decayed the Transformer's stacked [L, D] layer-norm scales
    and [L, N, H] biases; the name rule alone would miss general attention's bare matrix),
    an evaluation weighing each batch by its target tokens (val_loss the mean over tokens,
    not over bucketed batches), and source + target positions for tokens/s."""
    import jax
    import jax.numpy as jnp
    from configs import translate_tiny  # train/ is on sys.path (load_script)

    class Stop(Exception):
        pass

    built, eval_options, fit_options = [], {}, {}
    translate_optimizer, make_eval_step = translate.translate_optimizer, translate.make_eval_step

    def spy_optimizer(config, kind):
        built.append(translate_optimizer(config, kind))
        return built[-1]

    def spy_eval_step(loss_fn, **options):
        eval_options.update(options)
        return make_eval_step(loss_fn, **options)

    def spy_fit(state, train_step, train_iter, **options):
        fit_options.update(options, state=state, batch=next(train_iter))
        raise Stop

    monkeypatch.setattr(translate, "translate_optimizer", spy_optimizer)
    monkeypatch.setattr(translate, "make_eval_step", spy_eval_step)
    monkeypatch.setattr(translate, "fit", spy_fit)
    config = translate_tiny.get_config(model)
    config.weight_decay = 0.5
    with pytest.raises(Stop):
        translate.train(config, tmp_path / "run")

    optimizer, _ = built[-1]
    params = fit_options["state"].params
    updates, _ = optimizer.update(
        jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params
    )
    decayed = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    if model == "transformer":  # stacked layers: decayed by name (kernels w*, tables)
        assert params.encoder.ln1.scale.ndim == 2 and not decayed.encoder.ln1.scale
        assert not decayed.decoder.self_attn.b_q and decayed.decoder.self_attn.w_q
    else:  # nothing stacked: every matrix and table, general attention's [h, h] included
        want = jax.tree.map(lambda p: p.ndim >= 2, params)
        assert jax.tree.leaves(decayed) == jax.tree.leaves(want) and decayed.attention
    assert decayed.src_embedding.table
    batch = fit_options["batch"]
    assert eval_options["weight_fn"](batch) == np.sum(batch["tgt_mask"]) > 0
    assert fit_options["tokens_per_step"](batch) == batch["src"].size + batch["tgt_in"].size
