"""Fixtures shared by the model tests."""

import functools

import jax
import numpy as np
import pytest

from jaxattn.models import beam_search


@pytest.fixture
def search_calls(monkeypatch):
    """The settings each traced call hands to ``beam_search.decode_sequences``, in order
    (the search itself still runs): a setting dropped on the way (the tokens a translation
    may never produce, PAD and BOS) shows here even where random weights never pick it.

    A traced ``length_penalty`` (not compiled in) shows as the float it holds once the
    program has run (``jax.effects_barrier()``), None until then.
    """
    calls = []
    real = beam_search.decode_sequences

    def spy(*args, **kw):
        settings = ("beam_size", "max_len", "length_penalty", "forbidden")
        call = {key: kw[key] for key in settings}
        if isinstance(call["length_penalty"], jax.core.Tracer):
            record = lambda alpha: call.__setitem__("length_penalty", float(alpha))
            jax.debug.callback(record, call["length_penalty"])
            call["length_penalty"] = None
        calls.append(call)
        return real(*args, **kw)

    monkeypatch.setattr(beam_search, "decode_sequences", spy)
    return calls


@pytest.fixture
def check_length_penalty_reuses_translate():
    """``check(module, weights, config, src, lengths, beam_size)``: ``module.translate``
    (seq2seq or transformer) takes ``length_penalty`` traced, so new values reuse the
    compiled program, and translates as the value compiled in as a constant once did."""

    def check(module, weights, config, src, lengths, beam_size):
        run = functools.partial(
            module.translate, weights, config, src, lengths, beam_size=beam_size, max_len=6
        )
        run(length_penalty=0.6)
        compiled = module._translate._cache_size()
        for alpha in (0.0, 1.0, 2.5):
            got = run(length_penalty=alpha)
            if alpha != 2.5:  # The program as it was: alpha a constant compiled in.
                constant = functools.partial(
                    module._translate.__wrapped__,
                    config=config,
                    beam_size=beam_size,
                    max_len=6,
                    length_penalty=alpha,
                )
                np.testing.assert_array_equal(got, jax.jit(constant)(weights, src, lengths))
        assert module._translate._cache_size() == compiled  # three new values, no compile

    return check
