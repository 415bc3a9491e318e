#!/usr/bin/env python
"""Same as ``diffmoe bench layers``: see :mod:`diffmoe.bench.layers` for the method and options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout

from diffmoe.bench.layers import main  # noqa: E402

if __name__ == "__main__":
    main()
