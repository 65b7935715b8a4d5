"""tests/fuzz on sys.path, so the tests and benchmarks/fuzz.py import the same ``fuzzkit``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
