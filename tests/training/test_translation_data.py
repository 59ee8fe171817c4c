"""Translation data: corpus, split by source sentence, sentencepiece ids, bucketed batches."""

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.training import data
from jaxattn.training import translation_data as td

SPA_ENG_SHA256 = "6ec60e212f812ee3430f7568ea6f33b6fb080e32193c5952e8da0ee8ba45574c"

# A toy corpus: 60 distinct sources, some with two translations (like Tatoeba).
WORDS = ["go", "run", "eat", "see", "stop", "wait", "look", "sing", "swim", "read"]
PAIRS = [(f"we {a} and {b}.", f"nosotros {b} y {a}.") for a in WORDS for b in WORDS[:6]]
PAIRS += [(s, t.upper()) for s, t in PAIRS[::4]]  # 15 second translations


def test_bundled_corpus_is_the_published_file():
    path = td.default_corpus_path()
    with gzip.open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == SPA_ENG_SHA256
    pairs = td.load_pairs()
    assert len(pairs) == 118_964
    assert pairs[0] == ("Go.", "Ve.")


def test_load_pairs_plain_file_and_errors(tmp_path):
    good = tmp_path / "c.txt"
    good.write_text("Hi.\tHola.\nLet's go!\t¡Vamos!\n", encoding="utf-8")
    assert td.load_pairs(good) == [("Hi.", "Hola."), ("Let's go!", "¡Vamos!")]
    # Only newlines end a line: U+2028 or a form feed inside a pair is text; CRLF is fine.
    odd = tmp_path / "odd.txt"
    odd.write_bytes("A\u2028B\tC\x0cD\r\nE\tF".encode())
    assert td.load_pairs(odd) == [("A\u2028B", "C\x0cD"), ("E", "F")]
    bad = tmp_path / "bad.txt"
    bad.write_text("Hi.\tHola.\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        td.load_pairs(bad)
    with pytest.raises(FileNotFoundError, match="nope"):
        td.load_pairs(tmp_path / "nope.txt")


def test_load_pairs_names_a_file_that_is_not_text(tmp_path):
    """A corrupt .gz or a non-UTF-8 file is a ValueError naming the path, not a raw
    BadGzipFile traceback or a UnicodeDecodeError without the file name."""
    corrupt = tmp_path / "corrupt.txt.gz"
    corrupt.write_bytes(b"not gzip at all\tno\n")
    with pytest.raises(ValueError, match=r"corrupt\.txt\.gz: cannot read"):
        td.load_pairs(corrupt)
    truncated = tmp_path / "truncated.txt.gz"
    truncated.write_bytes(gzip.compress(b"Hi.\tHola.\n" * 100)[:-12])
    with pytest.raises(ValueError, match=r"truncated\.txt\.gz: cannot read"):
        td.load_pairs(truncated)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Espa\u00f1a\tSpain\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: cannot read"):
        td.load_pairs(latin1)


def test_split_is_deterministic_disjoint_and_complete():
    a = td.split_pairs(PAIRS, seed=3, fractions=(0.6, 0.2))
    b = td.split_pairs(list(reversed(PAIRS)), seed=3, fractions=(0.6, 0.2))
    sources = [{s for s, _ in part} for part in a]
    # Disjoint by source sentence: every translation of a sentence is in one split.
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])
    assert sorted(p for part in a for p in part) == sorted(PAIRS)
    assert [len(s) for s in sources] == [36, 12, 12]  # int(60 * 0.6), int(60 * 0.2), rest
    # The assignment depends on the seed, not on the corpus order.
    assert [{s for s, _ in part} for part in b] == sources
    c = td.split_pairs(PAIRS, seed=4, fractions=(0.6, 0.2))
    assert {s for s, _ in c.test} != sources[2]
    with pytest.raises(ValueError, match="fractions"):
        td.split_pairs(PAIRS, seed=0, fractions=(0.9, 0.2))


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    return td.train_sentencepiece([s for p in PAIRS for s in p], prefix, vocab_size=60)


def test_sample_draws_a_seeded_subset_in_order():
    """Subsets of a split are drawn, not cut: the bundled corpus is sorted by length."""
    items = list(range(100))
    drawn = td.sample(items, 10, seed=3)
    assert drawn == sorted(drawn) and len(set(drawn)) == 10 and drawn != items[:10]
    assert drawn == td.sample(items, 10, seed=3) != td.sample(items, 10, seed=4)
    assert td.sample(items, 0, seed=3) == items == td.sample(items, 100, seed=3)
    assert td.sample(items, 500, seed=3) == items
    assert set(td.sample(items, 4, seed=3)) < set(drawn)  # nested
    pairs = td.load_pairs()
    lengths = [len(s.split()) for s, _ in pairs]
    # Why: the corpus runs from short to long, so a prefix is all short sentences.
    assert max(lengths[:2000]) <= 4 < np.mean(lengths)


def test_sentencepiece_special_ids_and_round_trip(sp):
    assert sp.pad_id() == td.PAD_ID == 0
    assert sp.bos_id() == td.BOS_ID == 1
    assert sp.eos_id() == td.EOS_ID == 2
    assert sp.unk_id() == td.UNK_ID == 3
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    text = "we swim and stop."
    ids = sp.encode(text)
    assert min(ids) > td.UNK_ID and sp.decode(ids) == text


def test_sentencepiece_is_cached(sp, tmp_path_factory):
    prefix = tmp_path_factory.getbasetemp() / "spm0" / "spm"  # the fixture's directory
    model = prefix.with_suffix(".model")
    before = model.read_bytes()
    again = td.train_sentencepiece([], prefix, vocab_size=60)  # no sentences: must load
    assert model.read_bytes() == before
    assert again.encode("we go and run.") == sp.encode("we go and run.")
    # A cached model of another size is refused, not silently reused.
    with pytest.raises(ValueError, match="trained with vocab_size=60, not 80"):
        td.train_sentencepiece([], prefix, vocab_size=80)


def test_cached_sentencepiece_of_other_sentences_is_refused(tmp_path):
    """A workdir's spm.model trained on other sentences (another data_path, split_seed or
    max_train_examples) is refused, not silently reused; a json of a model cached before
    the hash was recorded is not checked."""
    sentences = [s for p in PAIRS for s in p]
    prefix = tmp_path / "spm"
    td.train_sentencepiece(sentences, prefix, vocab_size=60)
    record = json.loads(prefix.with_suffix(".json").read_text(encoding="utf-8"))
    want = hashlib.sha256("\n".join(sentences).encode("utf-8")).hexdigest()
    assert record == {"vocab_size": 60, "sentences_sha256": want}
    td.train_sentencepiece(sentences, prefix, vocab_size=60)  # the same sentences: loads
    td.train_sentencepiece([], prefix, vocab_size=60)  # none given: nothing to compare
    with pytest.raises(ValueError, match="was trained on other sentences") as e:
        td.train_sentencepiece(sentences[:-1], prefix, vocab_size=60)
    assert "training data changed" in str(e.value) and "delete" in str(e.value)
    assert "another workdir" in str(e.value)
    with pytest.raises(ValueError, match="vocab_size=60, not 80"):  # still checked first
        td.train_sentencepiece(sentences[:-1], prefix, vocab_size=80)
    # An older workdir's json records only the vocab_size: no hash, no check.
    prefix.with_suffix(".json").write_text(json.dumps({"vocab_size": 60}), encoding="utf-8")
    td.train_sentencepiece(sentences[:-1], prefix, vocab_size=60)


def test_a_vocabulary_smaller_than_the_characters_is_named_and_nothing_is_cached(tmp_path):
    sentences = [s for p in PAIRS for s in p]
    with pytest.raises(
        ValueError, match=r"could not train a vocabulary of vocab_size=5: .*smaller"
    ):
        td.train_sentencepiece(sentences, tmp_path / "spm", vocab_size=5)
    assert not any(tmp_path.iterdir())


def test_unknown_pieces_names_what_encodes_as_unk(sp):
    assert td.unknown_pieces(sp, "we swim and stop.") == []
    sentence = "we 日本語 swim © and 日本語 stop Ω"
    assert td.UNK_ID in sp.encode(sentence)
    assert td.unknown_pieces(sp, sentence) == ["日本語", "©", "Ω"]  # each once, in order


def test_encode_pairs_keeps_each_side_and_drops_by_max_len(sp):
    """Sources and targets stay on their side; ``max_len`` counts the target's EOS (the
    ``+ 1``) but not the source's, keeps a pair at exactly the limit, and empty sides go."""
    pairs = [("we go and run.", "nosotros run y go."), ("we eat and see.", "NOSOTROS SEE Y EAT.")]
    src, tgt = td.encode_pairs(sp, pairs)
    assert [s.tolist() for s in src] == [sp.encode(s) for s, _ in pairs]
    assert [t.tolist() for t in tgt] == [sp.encode(t) for _, t in pairs]
    assert all(a.dtype == np.int32 for a in (*src, *tgt))
    long_src, long_tgt = ("we go and run.", "y"), ("we go.", "nosotros run y go.")
    n = {x: len(sp.encode(x)) for x in (*long_src, *long_tgt)}
    assert n[long_src[0]] > n[long_src[1]] + 1 and n[long_tgt[1]] + 1 > n[long_tgt[0]]
    limits = n[long_src[0]], n[long_tgt[1]] + 1  # the source; the target + EOS
    for pair, limit in zip((long_src, long_tgt), limits, strict=True):
        assert len(td.encode_pairs(sp, [pair], max_len=limit)[0]) == 1  # exactly at it
        assert len(td.encode_pairs(sp, [pair], max_len=limit - 1)[0]) == 0
    for bad in (0, -1, 2.0):  # 0 kept every pair, -1 none
        with pytest.raises(
            ValueError, match=rf"encode_pairs: max_len must be an int >= 1, got {bad}"
        ):
            td.encode_pairs(sp, pairs, max_len=bad)
    src, tgt = td.encode_pairs(sp, [("", "hola."), ("we go.", ""), pairs[0]])
    assert [s.tolist() for s in src] == [sp.encode(pairs[0][0])]
    assert [t.tolist() for t in tgt] == [sp.encode(pairs[0][1])]


def test_load_pairs_strips_each_side(tmp_path):
    path = tmp_path / "spaces.txt"
    path.write_text(" Hi. \t Hola.  \n", encoding="utf-8")
    assert td.load_pairs(path) == [("Hi.", "Hola.")]
    path.write_text("Hi.\t  \n", encoding="utf-8")  # a blank side is no pair
    with pytest.raises(ValueError, match=r"spaces\.txt:1"):
        td.load_pairs(path)


def test_load_pairs_drops_a_byte_order_mark(tmp_path):
    """A file saved as "UTF-8 with BOM" (plain or gzipped): the BOM is not part of the first
    source, which would otherwise be a distinct sentence from the same text on a later line
    (and could land in another split than its other translations)."""
    for name, opener in (("bom.txt", open), ("bom.txt.gz", gzip.open)):
        path = tmp_path / name
        with opener(path, "wt", encoding="utf-8-sig") as f:
            f.write("Go.\tVe.\nGo.\tVete.\n")
        pairs = td.load_pairs(path)
        assert pairs == [("Go.", "Ve."), ("Go.", "Vete.")]
        split = td.split_pairs(pairs * 20 + [(f"s{i}", "t") for i in range(40)], seed=0)
        assert sum(("Go.", "Ve.") in part for part in split) == 1


def test_make_batch_places_bos_eos_and_masks():
    src = [np.array([5, 6, 7], np.int32), np.array([8], np.int32)]
    tgt = [np.array([9, 10], np.int32), np.array([11, 12, 13, 14], np.int32)]
    b = td.make_batch(src, tgt, 6)
    np.testing.assert_array_equal(b["src"], [[5, 6, 7, 0, 0, 0], [8, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b["src_lengths"], [3, 1])
    np.testing.assert_array_equal(b["tgt_in"], [[1, 9, 10, 0, 0, 0], [1, 11, 12, 13, 14, 0]])
    np.testing.assert_array_equal(b["tgt_out"], [[9, 10, 2, 0, 0, 0], [11, 12, 13, 14, 2, 0]])
    np.testing.assert_array_equal(
        b["tgt_mask"], [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    )  # n + 1 real positions
    assert b["tgt_mask"].dtype == bool and b["src"].dtype == np.int32
    with pytest.raises(ValueError, match=r"make_batch: target 1 has 4 tokens \+ 1 \(BOS or"):
        td.make_batch(src, tgt, 4)
    with pytest.raises(ValueError, match=r"make_batch: source 0 has 3 tokens, more than the "):
        td.make_batch(src, None, 2)


def _examples(n, rng):
    lengths = rng.integers(1, 15, size=(n, 2))
    src = [rng.integers(4, 50, size=a).astype(np.int32) for a, _ in lengths]
    tgt = [rng.integers(4, 50, size=b).astype(np.int32) for _, b in lengths]
    return src, tgt


def test_batches_are_bucketed_and_cover_each_epoch_once(np_rng):
    src, tgt = _examples(101, np_rng)
    buckets = (4, 8, 16)
    ds = td.translation_dataset(src, tgt, batch_size=5, buckets=buckets, seed=0, vocab_size=50)
    per_epoch = sum(
        sum(1 for s, t in zip(src, tgt) if td.bucket_of(max(len(s), len(t) + 1), buckets) == k) // 5
        for k in range(3)
    )
    seen = []
    for i in range(per_epoch):
        b = ds[i]
        length = b["src"].shape[1]
        assert length in buckets and b["tgt_in"].shape == (5, length)
        for row in range(5):
            s_len = int(b["src_lengths"][row])
            n_tgt = int(b["tgt_mask"][row].sum())  # y + EOS
            need = max(s_len, n_tgt)
            smaller = buckets[buckets.index(length) - 1] if length > buckets[0] else 0
            assert smaller < need <= length  # the smallest bucket that fits
            assert b["tgt_in"][row, 0] == td.BOS_ID and b["tgt_out"][row, n_tgt - 1] == td.EOS_ID
            seen.append((tuple(b["src"][row, :s_len]), tuple(b["tgt_out"][row, : n_tgt - 1])))
    # Each example at most once per epoch; only each bucket's remainder (< 5) left out.
    assert len(seen) == len(set(seen)) == per_epoch * 5
    assert len(src) - len(seen) < 5 * len(buckets)
    assert set(seen) <= {(tuple(s), tuple(t)) for s, t in zip(src, tgt)}
    # The next epoch is a different order of the same kind of batches.
    first = [ds[i]["src"].tobytes() for i in range(per_epoch)]
    second = [ds[per_epoch + i]["src"].tobytes() for i in range(per_epoch)]
    assert first != second


def test_each_epoch_mixes_buckets_and_regroups_examples(np_rng):
    """An epoch's batches are not ordered by bucket (short ones first), and an example
    meets other examples in the next epoch (the batches are not the same groups)."""
    src, tgt = _examples(101, np_rng)
    ds = td.translation_dataset(src, tgt, batch_size=5, buckets=(4, 8, 16), seed=0, vocab_size=50)
    keys = [td.bucket_of(max(len(s), len(t) + 1), (4, 8, 16)) for s, t in zip(src, tgt)]
    per_epoch = sum(keys.count(k) // 5 for k in range(3))

    def epoch(e):
        batches = [ds[e * per_epoch + i] for i in range(per_epoch)]
        lengths = [b["src"].shape[1] for b in batches]
        groups = {frozenset(row.tobytes() for row in b["src"]) for b in batches}
        return lengths, groups

    lengths0, groups0 = epoch(0)
    lengths1, groups1 = epoch(1)
    assert len(set(lengths0)) == 3
    assert lengths0 != sorted(lengths0) and lengths1 != sorted(lengths1)
    assert groups0 != groups1


def test_batches_are_deterministic_and_resume_exactly(np_rng):
    src, tgt = _examples(60, np_rng)
    kw = dict(batch_size=4, buckets=(8, 16), vocab_size=50)
    it = data.batch_iterator(td.translation_dataset(src, tgt, seed=7, **kw))
    for _ in range(9):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(30)]  # crosses epoch boundaries (~13 batches each)
    fresh = data.batch_iterator(td.translation_dataset(src, tgt, seed=7, **kw))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    other = td.translation_dataset(src, tgt, seed=8, **kw)
    assert any(other[i]["src"].tobytes() != expected[i - 9]["src"].tobytes() for i in range(9, 14))


def test_buckets_that_are_not_a_sequence_are_named():
    """``--config.buckets=None`` (or one length, as in ``max_len``) failed as "TypeError:
    'NoneType' object is not iterable", naming neither the setting nor the function; a
    string was read as lengths character by character."""
    for buckets in (None, 16, "16"):
        with pytest.raises(
            ValueError, match=r"^train/translate.py: config.buckets must be increasing lengths"
        ) as e:
            td.check_buckets(buckets, "train/translate.py", "config.buckets")
        assert str(e.value).endswith(f"got {buckets!r}")
        with pytest.raises(ValueError, match=r"^decode_batches: buckets must be increasing"):
            td.decode_batches([np.array([5, 6])], batch_size=2, buckets=buckets)
    assert td.check_buckets(np.array([8, 16]), "f") == (8, 16)


def test_dataset_validates_inputs(np_rng):
    src, tgt = _examples(20, np_rng)
    with pytest.raises(ValueError, match=r"must lie in \[0, 40\)"):
        td.translation_dataset(src, tgt, batch_size=2, buckets=(16,), seed=0, vocab_size=40)
    with pytest.raises(ValueError, match="exceeds the largest bucket 8"):
        td.translation_dataset(src, tgt, batch_size=2, buckets=(8,), seed=0, vocab_size=50)
    for buckets in ((16, 8), (), (0, 8), (8.0, 16), (8, 8)):
        with pytest.raises(ValueError, match=r"^data: buckets must be increasing lengths >= 1"):
            td.translation_dataset(
                src, tgt, batch_size=2, buckets=buckets, seed=0, vocab_size=50, name="data"
            )
    with pytest.raises(ValueError, match=r"^data: batch_size must be an int >= 1, got 0"):
        td.translation_dataset(
            src, tgt, batch_size=0, buckets=(16,), seed=0, vocab_size=50, name="data"
        )
    with pytest.raises(ValueError, match=r"^train split: seed must be an int >= 0, got -1"):
        td.translation_dataset(
            src, tgt, batch_size=2, buckets=(16,), seed=-1, vocab_size=50, name="train split"
        )
    with pytest.raises(ValueError, match=r"^validation split: no bucket holds a full batch"):
        td.translation_dataset(
            src, tgt, batch_size=64, buckets=(16,), seed=0, vocab_size=50, name="validation split"
        )
    # Enough examples for a batch, but spread over buckets that each hold fewer: the error
    # gives each bucket's count and says what to change.
    lengths = [td.pair_length(s, t) for s, t in zip(src, tgt)]
    short = sum(n <= 8 for n in lengths)
    message = r"per bucket length \{8: \d+, 16: \d+\}\); lower batch_size"
    with pytest.raises(ValueError, match=message):
        td.translation_dataset(
            src,
            tgt,
            batch_size=max(short, 20 - short) + 1,
            buckets=(8, 16),
            seed=0,
            vocab_size=50,
            name="validation split",
        )


def test_decode_batches_cover_every_source_once(np_rng):
    src, _ = _examples(23, np_rng)
    batches = td.decode_batches(src, batch_size=4, buckets=(4, 8, 16))
    rows = np.concatenate([r for r, _ in batches])
    assert sorted(rows.tolist()) == list(range(23))
    for r, b in batches:
        assert b["src"].shape[0] == 4 and set(b) == {"src", "src_lengths"}
        for i, row in enumerate(r):
            np.testing.assert_array_equal(b["src"][i, : len(src[row])], src[row])
            assert b["src_lengths"][i] == len(src[row])


def test_a_length_equal_to_a_bucket_goes_in_that_bucket():
    """The smallest bucket >= the length: a source of exactly 4 tokens pads to 4, not 8,
    and one as long as the largest bucket fits it (hand-computed cases)."""
    buckets = (4, 8, 16)
    for length, want in [(1, 0), (4, 0), (5, 1), (8, 1), (9, 2), (16, 2)]:
        assert td.bucket_of(length, buckets) == want, length
    with pytest.raises(ValueError, match="length 17 exceeds the largest bucket 16"):
        td.bucket_of(17, buckets)
    src = [np.arange(4, 8, dtype=np.int32), np.arange(4, 20, dtype=np.int32)]  # 4 and 16 tokens
    batches = td.decode_batches(src, batch_size=1, buckets=buckets)
    assert [(r.tolist(), b["src"].shape) for r, b in batches] == [([0], (1, 4)), ([1], (1, 16))]


@pytest.mark.parametrize("wrap", [np.int64, np.array, jnp.int32], ids=["np.int64", "0-d", "jax"])
def test_translation_dataset_takes_the_integer_scalars_its_checks_accept(np_rng, wrap):
    """A 0-d NumPy or JAX batch size or seed passes the checks and must then work as the
    int it is (NumPy's default_rng((seed, epoch))` and reshape refused them at the first
    batch: "len() of unsized object")."""
    src, tgt = _examples(60, np_rng)
    kw = dict(buckets=(8, 16), vocab_size=50)
    want = td.translation_dataset(src, tgt, batch_size=4, seed=7, **kw)
    got = td.translation_dataset(src, tgt, batch_size=wrap(4), seed=wrap(7), **kw)
    for i in (0, 20):  # (20: the second epoch)
        for key, value in want[i].items():
            np.testing.assert_array_equal(got[i][key], value)


def test_translation_dataset_errors_name_the_data_and_the_example(np_rng):
    """In a split of 100,000 pairs the index inside one sentence is no help: the errors
    name the split (``name``) and which example, and the side, is wrong."""
    src, tgt = _examples(20, np_rng)
    src[13] = np.arange(4, 30, dtype=np.int32)  # 26 tokens
    kw = dict(batch_size=2, seed=0, name="train split")
    with pytest.raises(
        ValueError,
        match=r"^train split: example 13 \(source 26 tokens, target \d+ \+ EOS\) exceeds the "
        r"largest bucket 16$",
    ):
        td.translation_dataset(src, tgt, buckets=(8, 16), vocab_size=50, **kw)
    src[13] = np.array([4, 5], np.int32)
    tgt[7] = np.array([4, 60, 5], np.int32)
    with pytest.raises(
        ValueError, match=r"^train split: target 7: token ids must lie in \[0, 50\).*first: 60"
    ):
        td.translation_dataset(src, tgt, buckets=(8, 16), vocab_size=50, **kw)
    # (None failed with a TypeError from a comparison; 7.0 and True passed as sizes)
    for vocab_size in (None, 7.0, True, 0):
        with pytest.raises(ValueError, match=r"^train split: vocab_size must be an int >= 1"):
            td.translation_dataset(src, tgt, buckets=(8, 16), vocab_size=vocab_size, **kw)


def test_make_batch_refuses_more_sources_than_targets():
    src = [np.array([5, 6], np.int32), np.array([7], np.int32)]
    with pytest.raises(ValueError, match="make_batch: 2 sources but 1 targets"):
        td.make_batch(src, src[:1], 4)  # (the second row's target stayed padding, unmasked)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.array([4, 3.5]), "must be integers, got dtype float64"),  # was truncated to 3
        ([4.0, 5.0], "must be integers, got dtype float64"),  # even whole floats
        (np.array([True, False]), "must be integers, got dtype bool"),  # was 1, 0
        (np.array(["4", "5"]), "must be integers, got dtype <U1"),  # was parsed to 4, 5
        (np.array([4, -1], np.int32), r"must be in \[0, 2\*\*31\), got -1"),
        ([4, -1], r"must be in \[0, 2\*\*31\), got -1"),
        (np.array([4, 2**32 + 5]), r"must be in \[0, 2\*\*31\), got 4294967301"),  # was 5
    ],
)
def test_make_batch_refuses_ids_the_int32_batch_would_cast(bad, message):
    """make_batch wrote each row into an int32 array with NumPy's unsafe cast: ids that are
    not ints >= 0 came out as other (or negative) ids, silently (decode_batches' sources are
    not checked before it)."""
    good = np.array([5, 6], np.int32)
    with pytest.raises(ValueError, match=rf"^make_batch: source 1 token ids {message}"):
        td.make_batch([good, bad], [good, good], 4)
    with pytest.raises(ValueError, match=rf"^make_batch: target 1 token ids {message}"):
        td.make_batch([good, good], [good, bad], 4)
    with pytest.raises(ValueError, match=rf"^decode_batches: source 1 token ids {message}"):
        td.decode_batches([good, bad], batch_size=2, buckets=(4,))
    # decode_batches groups the sources by bucket: make_batch's row was not the source's
    # index (source 3 here was named "source 0", the first row of bucket 4's batch).
    sources = [np.arange(5, 10, dtype=np.int32), good, good, bad]
    with pytest.raises(ValueError, match=rf"^decode_batches: source 3 token ids {message}"):
        td.decode_batches(sources, batch_size=2, buckets=(4, 8))


def test_make_batch_takes_int_lists_and_types_as_int32_arrays():
    """The checks change no valid batch: Python lists, int64, uint8 and empty rows."""
    rows = [
        np.array([5, 6, 7], np.int32),
        [8, 9],
        np.array([10], np.int64),
        np.array([11], np.uint8),
    ]
    want = td.make_batch([np.asarray(r, np.int32) for r in rows], [np.array([12], np.int32)] * 4, 5)
    got = td.make_batch(rows, [[12]] * 4, 5)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
        assert got[key].dtype == want[key].dtype
    empty = td.make_batch([[], np.array([5], np.int32)], None, 2)
    np.testing.assert_array_equal(empty["src"], [[0, 0], [5, 0]])
    np.testing.assert_array_equal(empty["src_lengths"], [0, 1])


@pytest.mark.parametrize("n", [-1, 2.0])
def test_sample_refuses_a_negative_or_fractional_count(n):
    # -1 drew all items but one (a slice end), silently.
    with pytest.raises(ValueError, match=rf"sample: n must be an int >= 0, got {n}"):
        td.sample(list(range(10)), n, seed=0)


@pytest.mark.parametrize("seed", [None, True, 1.5, -1, "3"])
def test_split_and_sample_refuse_a_seed_that_is_not_an_int(seed):
    """None made NumPy draw a fresh split (and subset) on every call, so two runs "with the
    same seed" trained and tested on different sentences; True passed as 1; 1.5 and -1 failed
    inside NumPy naming neither the function nor the seed."""
    with pytest.raises(ValueError, match=r"split_pairs: seed must be an int >= 0"):
        td.split_pairs(PAIRS, seed=seed)
    with pytest.raises(ValueError, match=r"sample: seed must be an int >= 0"):
        td.sample(PAIRS, 3, seed=seed)


def test_decode_batches_refuses_a_batch_size_below_one():
    with pytest.raises(ValueError, match="decode_batches: batch_size must be an int >= 1"):
        td.decode_batches([np.array([5], np.int32)], batch_size=0, buckets=(4,))


@pytest.mark.parametrize("buckets", [(16, 8), (24, 8, 16), (8, 8), (), (0, 16), (8.0, 16)])
def test_decode_batches_refuses_buckets_translation_dataset_refuses(buckets):
    """Unsorted buckets padded a 3-token source to 24 (not the smallest bucket) or refused a
    10-token one as longer than "the largest bucket 8" with 16 there; () was an IndexError."""
    src = [np.arange(4, 4 + n, dtype=np.int32) for n in (3, 10)]
    with pytest.raises(ValueError, match=r"^decode_batches: buckets must be increasing"):
        td.decode_batches(src, batch_size=2, buckets=buckets)


@pytest.mark.parametrize("content", ["", '{"vocab_size": 6', '{"sentences_sha256": "x"}', "[]"])
def test_an_unreadable_sentencepiece_settings_file_is_named(tmp_path, content):
    """An empty or cut spm.json (a run killed while writing it) was a bare JSONDecodeError
    ("Expecting value: line 1 column 1 (char 0)") or KeyError naming no file."""
    prefix = tmp_path / "spm"
    td.train_sentencepiece([s for p in PAIRS for s in p], prefix, vocab_size=60)
    prefix.with_suffix(".json").write_text(content, encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"spm\.json, the settings .*spm\.model was trained with, is unreadable"
    ):
        td.train_sentencepiece([], prefix, vocab_size=60)


@pytest.mark.parametrize("special", [td.PAD_ID, td.BOS_ID, td.EOS_ID], ids=["pad", "bos", "eos"])
def test_translation_dataset_refuses_special_ids_in_a_target(np_rng, special):
    """The batches add BOS and EOS themselves, and decoding never emits pad or BOS: a target
    that already ends in EOS trained on "y EOS EOS", and a BOS or pad inside one made it a
    label the decoder can never produce; all were accepted silently."""
    src, tgt = _examples(20, np_rng)
    tgt[5] = np.array([4, 5, special], np.int32)
    kw = dict(batch_size=2, buckets=(8, 16), seed=0, vocab_size=50, name="train split")
    with pytest.raises(
        ValueError,
        match=rf"^train split: target 5: token ids must not hold pad, BOS or EOS.*"
        rf"got {special} at index 2",
    ):
        td.translation_dataset(src, tgt, **kw)


def test_a_sentencepiece_training_cut_short_leaves_no_model(tmp_path, monkeypatch):
    """A run killed while sentencepiece wrote spm.model left a cut-off model, which every
    later run refused until it was deleted by hand; the model is now written under a
    temporary name and renamed when whole, and the next run trains it."""
    import sentencepiece as spm

    sentences = [s for p in PAIRS for s in p]
    train = spm.SentencePieceTrainer.train

    def killed(*, model_prefix, **kwargs):  # a model half written, then the signal
        Path(f"{model_prefix}.model").write_bytes(b"\x0a\x05half")
        raise KeyboardInterrupt

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", killed)
    prefix = tmp_path / "spm"
    with pytest.raises(KeyboardInterrupt):
        td.train_sentencepiece(sentences, prefix, vocab_size=60)
    assert not prefix.with_suffix(".model").exists() and not prefix.with_suffix(".json").exists()
    monkeypatch.setattr(spm.SentencePieceTrainer, "train", train)
    sp = td.train_sentencepiece(sentences, prefix, vocab_size=60)
    assert sp.decode(sp.encode("we swim and stop.")) == "we swim and stop."
    # (and the killed run's partial files are gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spm.json", "spm.model", "spm.vocab"]


def test_sentencepiece_leaves_the_partial_files_of_a_run_still_training(tmp_path):
    """Every partial file was deleted as a killed run's, also those of a second run in the
    same workdir that was still training."""
    sentences = [s for p in PAIRS for s in p]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".spm.{sleeper.pid}.partial.model"
        live.write_bytes(b"being written")
        # Above Linux's largest pid; 0 (os.kill(0, 0) asks about this process's group); too
        # large for a C int (os.kill's OverflowError): none is a running process.
        dead = [tmp_path / f".spm.{pid}.partial.model" for pid in (2**22 + 1, 0, 10**20)]
        for path in dead:
            path.write_bytes(b"killed")
        td.train_sentencepiece(sentences, tmp_path / "spm", vocab_size=60)
        assert live.exists() and not any(path.exists() for path in dead)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_failed_sentencepiece_training_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="could not train a vocabulary of vocab_size=5"):
        td.train_sentencepiece([s for p in PAIRS for s in p], tmp_path / "spm", vocab_size=5)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"garbage"])
def test_an_unreadable_sentencepiece_model_is_named(tmp_path, content):
    """A cut or overwritten spm.model was sentencepiece's RuntimeError ("could not parse
    ModelProto") with a traceback through train/translate.py, for training, --bleu_only and
    --translate alike."""
    prefix = tmp_path / "spm"
    td.train_sentencepiece([s for p in PAIRS for s in p], prefix, vocab_size=60)
    prefix.with_suffix(".model").write_bytes(content)
    with pytest.raises(ValueError, match=r"spm\.model is not a sentencepiece model \("):
        td.train_sentencepiece([], prefix, vocab_size=60)


def test_train_sentencepiece_checks_vocab_size_before_training(tmp_path):
    """A config's np.int64(60) trained, then failed writing the settings file ("Object of
    type int64 is not JSON serializable"); a string "60" trained and recorded "60", so the
    next run's 60 was refused as "trained with vocab_size=60, not 60"; None and 60.0 failed
    in sentencepiece ("cannot parse") naming neither the function nor the argument."""
    sentences = [s for p in PAIRS for s in p]
    sp = td.train_sentencepiece(sentences, tmp_path / "a" / "spm", vocab_size=np.int64(60))
    record = json.loads((tmp_path / "a" / "spm.json").read_text(encoding="utf-8"))
    assert record["vocab_size"] == 60 and type(record["vocab_size"]) is int
    again = td.train_sentencepiece(sentences, tmp_path / "a" / "spm", vocab_size=60)  # loads
    assert again.get_piece_size() == sp.get_piece_size()
    for bad in ["60", None, 60.0, True, 0]:
        with pytest.raises(
            ValueError, match=r"^train_sentencepiece: vocab_size must be an int >= 1"
        ):
            td.train_sentencepiece(sentences, tmp_path / "b" / "spm", vocab_size=bad)
    assert not (tmp_path / "b").exists()  # nothing trained, nothing cached


def test_train_sentencepiece_records_the_hash_of_sentences_from_a_generator(tmp_path):
    """A generator was used up by the training, so the settings file recorded the hash of
    no sentences, and the next run with the very same sentences was refused as "trained on
    other sentences"; a str trained on its characters."""
    sentences = [s for p in PAIRS for s in p]
    prefix = tmp_path / "spm"
    td.train_sentencepiece((s for s in sentences), prefix, vocab_size=60)
    record = json.loads(prefix.with_suffix(".json").read_text(encoding="utf-8"))
    want = hashlib.sha256("\n".join(sentences).encode("utf-8")).hexdigest()
    assert record["sentences_sha256"] == want
    td.train_sentencepiece(sentences, prefix, vocab_size=60)  # the same sentences: loads
    td.train_sentencepiece(None, prefix, vocab_size=60)  # none given: loads
    with pytest.raises(ValueError, match=r"^train_sentencepiece: sentences must be a sequence"):
        td.train_sentencepiece("we go and run.", tmp_path / "s", vocab_size=60)


def test_decode_batches_names_a_source_longer_than_the_largest_bucket():
    """It failed as bucket_of's "length 5 exceeds the largest bucket 4", naming neither
    decode_batches nor which source."""
    src = [np.array([4, 5], np.int32), np.arange(4, 9, dtype=np.int32)]
    with pytest.raises(
        ValueError, match=r"^decode_batches: source 1 has 5 tokens, more than the largest bucket 4"
    ):
        td.decode_batches(src, batch_size=2, buckets=(2, 4))


@pytest.mark.parametrize(
    "fractions", [(0.8, 0.1, 0.05), (0.9, None), ("0.8", "0.1"), None, 0.9, (0.5, True)]
)
def test_split_pairs_names_fractions_it_cannot_use(fractions):
    """Three fractions failed as "too many values to unpack", a None or a string from a
    config as "'<' not supported between instances", a number as "cannot unpack non-iterable
    float": none named split_pairs or fractions."""
    with pytest.raises(ValueError, match=r"^split_pairs: fractions must be two numbers"):
        td.split_pairs(PAIRS, seed=0, fractions=fractions)
    # A list, NumPy and JAX scalars are fine.
    split = td.split_pairs(PAIRS, seed=0, fractions=[np.float64(0.6), jnp.float32(0.2)])
    assert split == td.split_pairs(PAIRS, seed=0, fractions=(0.6, 0.2))


@pytest.mark.parametrize("length", [4.0, -1, 0, None])
def test_make_batch_names_a_length_that_is_not_a_size(length):
    """4.0 failed in NumPy as "'float' object cannot be interpreted as an integer", -1 as
    "negative dimensions are not allowed", naming neither make_batch nor length."""
    with pytest.raises(ValueError, match=r"^make_batch: length must be an int >= 1"):
        td.make_batch([np.array([4, 5])], [np.array([6])], length)


def test_make_batch_and_translation_dataset_name_rows_that_are_not_1d():
    """A [1, n] row failed in NumPy as "could not broadcast input array", and one flat list of
    ids given as src as "object of type 'int' has no len()": neither named the function."""
    with pytest.raises(ValueError, match=r"^make_batch: source 0 token ids must be 1-D"):
        td.make_batch([np.array([[4, 5]])], [np.array([6])], 4)
    with pytest.raises(ValueError, match=r"^make_batch: target 0 token ids must be 1-D"):
        td.make_batch([np.array([4, 5])], [np.array([[6]])], 4)
    kw = dict(batch_size=1, buckets=(4,), seed=0, vocab_size=10)
    with pytest.raises(ValueError, match=r"^toy: source 0: token ids must be 1-D"):
        td.translation_dataset([4, 5], [6, 7], name="toy", **kw)
    with pytest.raises(ValueError, match=r"^toy: src and tgt differ in length: 2 vs 1"):
        td.translation_dataset([np.array([4]), np.array([5])], [np.array([6])], name="toy", **kw)
    with pytest.raises(ValueError, match=r"^toy: process_rows must be a slice"):
        td.translation_dataset([np.array([4])], [np.array([6])], name="toy", process_rows=0, **kw)


def test_load_pairs_names_an_empty_file_and_a_folder(tmp_path):
    """An empty file read as no pairs (load_text refuses one), and a folder as "not found"."""
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"translation corpus '.*empty\.txt' is empty"):
        td.load_pairs(empty)
    with pytest.raises(FileNotFoundError, match=r"translation corpus is a folder, not a file"):
        td.load_pairs(tmp_path)
