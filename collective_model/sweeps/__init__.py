"""Sweeps: the local SQLite store, the search over W&B's sweeps engine, the local agent and
the W&B backend.

Modules:
- ``spec``: load, validate and pin a sweep file.
- ``store``: the versioned SQLite store of sweeps and runs (local backend).
- ``search``: suggestions from W&B's open-source ``sweeps`` engine, fed with every run of the
  project that fits the sweep (cross-sweep learning).
- ``agent``: the local agent that runs a sweep's trials as subprocesses.
- ``wandb_backend``: sweep creation and agents on W&B.
"""
