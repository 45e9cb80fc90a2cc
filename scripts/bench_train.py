#!/usr/bin/env python
"""Benchmark training speed; the same as `collective bench` (see --help for the options).

Runs from a checkout without installing: the repository root is put on the import path.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collective_model.cli.bench import bench_command  # noqa: E402

if __name__ == "__main__":
    bench_command(prog_name="bench_train.py")
