"""Results of a project's runs: best run of each sweep, Pareto frontier, deployment choice.

``sources`` reads the runs from the local store or W&B, ``frontier`` contains the pure trade-off
logic, ``analysis`` combines them, and ``report``, ``plot`` and ``export`` present the outcome.
"""

from .analysis import Analysis, analyse
from .sources import ResultRun, RunSet, SweepInfo, load_local, load_wandb, resolve_backend

__all__ = ["Analysis", "ResultRun", "RunSet", "SweepInfo", "analyse", "load_local", "load_wandb", "resolve_backend"]
