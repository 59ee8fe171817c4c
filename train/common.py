"""Helpers shared by the training scripts in ``train/`` (flag parsing)."""

from __future__ import annotations

import re
import sys

from absl import app


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a clear message for an unknown ``--config.<key>`` override."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:  # How ml_collections reports an unknown field.
        message = re.sub(r"\\+", "", str(e))  # The key arrives quoted and escaped.
        key = re.search(r"'(\w+)'", message)
        key = key.group(1) if key else message
        hint = re.search(r'Did you mean "(\w+)"', message)
        overrides = [a for a in argv if a.startswith("--config.") and key in a]
        print(
            f"error: unknown config key {key!r} in {overrides[0] if overrides else argv}"
            + (f" (did you mean {hint.group(1)!r}?)" if hint else ""),
            file=sys.stderr,
        )
        sys.exit(2)
