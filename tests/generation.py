"""Expected outputs of generation, shared by the tests of ``gpt.generate`` and ``nn.GPT``."""

import numpy as np


def ended_at_eos(out, new_from, n, eos_id):
    """What eos_id should give: each row's n new tokens (from ``new_from[b]``) after its
    first eos_id replaced by eos_id, the rest (the padding too) as without it."""
    out = np.array(out)
    for row, start in zip(out, new_from):
        hits = np.flatnonzero(row[start : start + n] == eos_id)
        if hits.size:
            row[start + hits[0] : start + n] = eos_id
    return out
