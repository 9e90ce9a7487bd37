"""``python -m bench``: runs the benchmark (bench/harness.py: the arguments, the sections, the table)."""

from __future__ import annotations

import sys

from bench.harness import main

if __name__ == "__main__":
    sys.exit(main())
