"""Fixtures shared by the model tests."""

import pytest

from jaxattn.models import beam_search


@pytest.fixture
def search_calls(monkeypatch):
    """The settings each traced call hands to ``beam_search.decode_sequences``, in order
    (the search itself still runs): a setting dropped on the way (the tokens a translation
    may never produce, PAD and BOS) shows here even where random weights never pick it."""
    calls = []
    real = beam_search.decode_sequences

    def spy(*args, **kw):
        settings = ("beam_size", "max_len", "length_penalty", "forbidden")
        calls.append({key: kw[key] for key in settings})
        return real(*args, **kw)

    monkeypatch.setattr(beam_search, "decode_sequences", spy)
    return calls
