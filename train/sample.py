"""Sample from a run of ``train/lm.py``, as nanoGPT's ``sample.py`` does for its ``train.py``.

    python train/sample.py --workdir=DIR --prompt="ROMEO:" --num_samples=3

The same as ``python train/lm.py --workdir=DIR --sample_only ...``, with lm.py's flags
(``--prompt``, ``--num_samples``, ``--sample_tokens``, ``--temperature``, ``--top_k``,
``--sample_seed``): the model and its settings come from the run's latest checkpoint.
"""

import sys

import lm  # train/lm.py (this script's directory)
from absl import app

if __name__ == "__main__":
    # --sample_only last, so that it wins over a --nosample_only given by mistake.
    argv = [*sys.argv, "--sample_only"]
    app.run(lm.main, argv=argv, flags_parser=lm.parse_flags)
