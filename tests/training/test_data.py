"""Character data: tokenizer, split, and the deterministic, resumable grain pipeline."""

import hashlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.training import data
from jaxattn.training import translation_data as td

SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_tokenizer_round_trip_and_sorted_vocabulary():
    text = "to be, or not to be:\nthat is the question?"
    tok = data.CharTokenizer.from_text(text)
    assert tok.chars == "".join(sorted(set(text)))
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert [tok.chars[i] for i in ids] == list(text)
    assert tok.decode(ids) == text


def test_tokenizer_handles_non_ascii():
    text = "¿Qué tal? ñandú — 東京"
    tok = data.CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set(text))


def test_unknown_character_is_named():
    tok = data.CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"'z' at position 2"):
        tok.encode("abzc")


def test_tokenizer_names_a_text_that_is_not_a_str():
    """Bytes (a file read in binary mode) failed as "'bytes' object has no attribute
    'encode'" in encode and as "object of type 'int' has no len()" in the constructor,
    naming neither CharTokenizer nor the argument."""
    tok = data.CharTokenizer.from_text("abc")
    for text in [b"abc", None, ["a", "b"]]:
        with pytest.raises(TypeError, match=r"CharTokenizer\.encode: text must be a str"):
            tok.encode(text)
    with pytest.raises(TypeError, match=r"CharTokenizer: chars must be a str.*bytes"):
        data.CharTokenizer.from_text(b"abc")
    with pytest.raises(TypeError, match=r"CharTokenizer: chars must be a str.*int"):
        data.CharTokenizer(123)
    with pytest.raises(ValueError, match=r"CharTokenizer: vocabulary must be non-empty single"):
        data.CharTokenizer(["a", 1])  # (failed in sorted: '<' not supported)
    assert data.CharTokenizer(["b", "a"]).chars == "ab"  # a sequence of characters


def test_decode_rejects_out_of_range_ids():
    tok = data.CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 3\).*first: 3 at"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match=r"token ids .*first: -1 at"):
        tok.decode([-1])
    assert tok.decode([]) == ""


def test_bundled_tinyshakespeare():
    path = data.default_text_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHAKESPEARE_SHA256
    text = data.load_text()
    tok = data.CharTokenizer.from_text(text)
    assert tok.vocab_size == 65
    ids = tok.encode(text)
    train, val = data.train_val_split(ids)
    # nanoGPT's prepare.py: the first int(n * 0.9) characters train, the rest validate.
    assert len(train) == int(len(text) * 0.9) == 1_003_854
    assert len(val) == len(text) - len(train) == 111_540
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)


def test_load_text_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        data.load_text(tmp_path / "nope.txt")


def test_data_files_expand_the_home_folder(tmp_path, monkeypatch):
    # The shell leaves ~ in --config.data_path=~/x.txt (not a word start); it was "not found".
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "x.txt").write_text("hello", encoding="utf-8")
    (tmp_path / "p.txt").write_text("Hi.\tHola.\n", encoding="utf-8")
    assert data.load_text("~/x.txt") == "hello"
    assert td.load_pairs("~/p.txt") == [("Hi.", "Hola.")]


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (None, FileNotFoundError, "text data file is a folder, not a file: '{path}'"),
        (b"", ValueError, "text data file '{path}' is empty"),
        (b"ok\n\xff", ValueError, "text data file '{path}' is not UTF-8: byte 0xff at offset 3"),
        (b"\xef\xbb\xbf", ValueError, "text data file '{path}' is empty"),  # a BOM alone
        (
            b"\xef\xbb\xbfok\n\xff",
            ValueError,
            "text data file '{path}' is not UTF-8: byte 0xff at offset 6",
        ),
    ],
)
def test_load_text_names_the_file_and_what_is_wrong(tmp_path, content, error, message):
    path = tmp_path / "text"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(error) as info:
        data.load_text(path)
    assert str(info.value) == message.format(path=path)


def test_load_text_drops_a_byte_order_mark(tmp_path):
    # Saved as "UTF-8 with BOM" it read as "\ufeffhi": a vocabulary entry of its own.
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhi\r\nthere\n")
    assert data.load_text(path) == "hi\nthere\n"


def _stream(n=1000):
    # Distinct ids (id == position), so a window reveals its offset.
    return np.arange(n, dtype=np.int32)


def test_batches_are_contiguous_windows_with_shifted_targets():
    b, t, n = 7, 13, 500
    ds = data.lm_dataset(_stream(n), batch_size=b, seq_len=t, seed=3, vocab_size=n)
    offsets = []
    for i in range(5):
        batch = ds[i]
        assert set(batch) == {"inputs", "targets"}
        for name in ("inputs", "targets"):
            assert batch[name].shape == (b, t) and batch[name].dtype == np.int32
        start = batch["inputs"][:, :1]  # [B, 1]
        np.testing.assert_array_equal(batch["inputs"], start + np.arange(t))
        np.testing.assert_array_equal(batch["targets"], start + 1 + np.arange(t))
        offsets.append(start.ravel())
    offsets = np.concatenate(offsets)
    # nanoGPT samples offsets in [0, n - T); they vary.
    assert offsets.min() >= 0 and offsets.max() < n - t
    assert len(set(offsets.tolist())) > 20


def test_every_window_offset_is_drawn_including_the_last():
    # n = T + 3 tokens hold exactly the windows at offsets 0, 1, 2 (T + 1 tokens each).
    t = 5
    ds = data.lm_dataset(_stream(t + 3), batch_size=16, seq_len=t, seed=0, vocab_size=t + 3)
    starts = {int(s) for i in range(4) for s in ds[i]["inputs"][:, 0]}
    assert starts == {0, 1, 2}
    # One window exactly: n = T + 1.
    one = data.lm_dataset(_stream(t + 1), batch_size=2, seq_len=t, seed=0, vocab_size=t + 1)
    np.testing.assert_array_equal(one[0]["targets"], [np.arange(1, t + 1)] * 2)


def test_batches_depend_only_on_seed():
    def batches(seed, count=4):
        it = data.batch_iterator(
            data.lm_dataset(_stream(), batch_size=3, seq_len=5, seed=seed, vocab_size=1000)
        )
        return np.stack([next(it)["inputs"] for _ in range(count)])

    np.testing.assert_array_equal(batches(11), batches(11))
    assert not np.array_equal(batches(11), batches(12))


def test_iterator_state_round_trip_resumes_the_same_sequence():
    ds = data.lm_dataset(_stream(), batch_size=4, seq_len=6, seed=5, vocab_size=1000)
    it = data.batch_iterator(ds)
    uninterrupted = [next(it)["inputs"] for _ in range(9)]
    it = data.batch_iterator(ds)
    for _ in range(4):
        next(it)
    saved = it.get_state()
    resumed = data.batch_iterator(ds)  # A fresh process would start here.
    resumed.set_state(saved)
    rest = [next(resumed)["inputs"] for _ in range(5)]
    for want, got in zip(uninterrupted[4:], rest):
        np.testing.assert_array_equal(want, got)


def test_token_ids_are_validated():
    tokens = np.array([0, 1, 2, 9, 3, 4, 5, 6], np.int32)
    with pytest.raises(
        ValueError, match=r"token ids must lie in \[0, 5\).*first: 9 at index \(3,\)"
    ):
        data.lm_dataset(tokens, batch_size=2, seq_len=3, seed=0, vocab_size=5)
    with pytest.raises(ValueError, match="the token stream holds 4 tokens, too short"):
        data.lm_dataset(_stream(4), batch_size=2, seq_len=4, seed=0, vocab_size=4)
    with pytest.raises(ValueError, match=r"validation split: token ids must lie in \[0, 3\)"):
        data.lm_dataset(_stream(8), batch_size=2, seq_len=3, seed=0, vocab_size=3,
                        name="validation split")  # fmt: skip
    with pytest.raises(ValueError, match=r"the validation split holds 4 tokens.* 5 tokens"):
        data.lm_dataset(
            _stream(4), batch_size=2, seq_len=4, seed=0, vocab_size=4, name="validation split"
        )
    with pytest.raises(ValueError, match="1-D"):
        data.lm_dataset(np.zeros((2, 8), np.int32), batch_size=2, seq_len=3, seed=0, vocab_size=4)
    with pytest.raises(ValueError, match="integers"):
        data.lm_dataset(np.zeros(8, np.float32), batch_size=2, seq_len=3, seed=0, vocab_size=4)
    for batch_size, seq_len, bad in [
        (0, 3, "batch_size"),
        (2, 0, "seq_len"),
        (2.0, 3, "batch_size"),
    ]:
        with pytest.raises(ValueError, match=rf"^token stream: {bad} must be an int >= 1"):
            data.lm_dataset(
                _stream(), batch_size=batch_size, seq_len=seq_len, seed=0, vocab_size=1000
            )


def test_train_val_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="train_fraction"):
        data.train_val_split(_stream(), 1.0)
    # --config.train_fraction=None failed as "TypeError: '<' not supported between
    # instances of 'float' and 'NoneType'"; True passed as a fraction of 1 would not.
    for bad in (None, "0.9", True, np.array([0.5, 0.9]), float("nan")):
        with pytest.raises(
            ValueError, match=r"^train_val_split: train_fraction must be a number in \(0, 1\)"
        ):
            data.train_val_split(_stream(), bad)
    for fraction in (np.float32(0.75), jnp.float32(0.75)):  # (NumPy and JAX scalars)
        train, val = data.train_val_split(np.arange(10), fraction)
        assert (len(train), len(val)) == (7, 3)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_lm_dataset_refuses_a_seed_grain_cannot_use_when_built(seed):
    # grain refuses a negative seed only when the first batch is drawn, naming nothing.
    with pytest.raises(ValueError, match=r"train split: seed must be an int >= 0"):
        data.lm_dataset(
            np.arange(20) % 5, batch_size=2, seq_len=4, seed=seed, vocab_size=5, name="train split"
        )


def test_tokenizer_encodes_every_character_of_its_own_vocabulary():
    # Lone surrogates (text read with errors="surrogateescape") are characters the
    # constructor accepts; encoding them must not raise UnicodeEncodeError.
    tok = data.CharTokenizer.from_text("ab\udc80\ud800")
    text = "a\ud800b\udc80"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("dtype", [np.uint16, np.int64])
def test_batches_are_int32_whatever_the_stream_dtype(dtype):
    # Token files are often uint16 (nanoGPT's .bin); the batches are int32 all the same.
    n = 300
    ds = data.lm_dataset(_stream(n).astype(dtype), batch_size=2, seq_len=4, seed=0, vocab_size=n)
    batch = ds[0]
    for name in ("inputs", "targets"):
        assert batch[name].dtype == np.int32
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])


@pytest.mark.parametrize("wrap", [np.int64, np.array, jnp.int32], ids=["np.int64", "0-d", "jax"])
def test_lm_dataset_takes_the_integer_scalars_its_checks_accept(wrap):
    """A 0-d NumPy or JAX integer passes the size and seed checks; the pipeline must then
    use it as the int it is (grain's generator refused a 0-d seed at the first batch, with
    "len() of unsized object" or "SeedSequence expects int", naming nothing)."""
    kw = dict(vocab_size=1000)
    want = data.lm_dataset(_stream(), batch_size=3, seq_len=5, seed=7, **kw)[4]
    got = data.lm_dataset(_stream(), batch_size=wrap(3), seq_len=wrap(5), seed=wrap(7), **kw)[4]
    for name in ("inputs", "targets"):
        np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.parametrize("vocab_size", [None, 7.0, True, 0])
def test_lm_dataset_refuses_a_vocab_size_that_is_not_a_size(vocab_size):
    # None failed with "TypeError: '>=' not supported between instances of 'int' and
    # 'NoneType'"; 7.0 and True were taken as sizes.
    with pytest.raises(ValueError, match=r"train split: vocab_size must be an int >= 1"):
        data.lm_dataset(
            np.arange(20) % 5,
            batch_size=2,
            seq_len=4,
            seed=0,
            vocab_size=vocab_size,
            name="train split",
        )


def test_tokenizer_and_lm_dataset_errors_name_the_function():
    """A float id in decode ("token ids must be integers"), 2-D tokens ("tokens must be
    1-D") and an int process_rows ("object of type 'int' has no len()") named no function."""
    tok = data.CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"^CharTokenizer\.decode: token ids must be integers"):
        tok.decode(np.array([1.0]))
    with pytest.raises(ValueError, match=r"^CharTokenizer\.decode: ids must be 1-D"):
        tok.decode([[1]])
    kw = dict(batch_size=2, seq_len=3, seed=0, vocab_size=3)
    with pytest.raises(ValueError, match=r"^lm_dataset: the train split's tokens must be 1-D"):
        data.lm_dataset(np.zeros((2, 8), np.int32), name="train split", **kw)
    tokens = np.arange(20, dtype=np.int32) % 3
    for rows in [1, [0, 1], slice(0.0, 1.0), slice(0, 2, 0)]:
        with pytest.raises(ValueError, match=r"^token stream: process_rows must be a slice"):
            data.lm_dataset(tokens, process_rows=rows, **kw)
