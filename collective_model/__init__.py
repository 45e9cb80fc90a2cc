"""collective: train and sweep the Collective Model for accuracy per parameter.

The package root stays light (no torch, no wandb) so that the CLI starts quickly.
``load_model(run_dir)`` rebuilds a trained model from a run folder.
"""

__version__ = "0.1.0"


def load_model(run_dir, map_location="cpu"):
    """Rebuild the model saved in a run folder and load its best checkpoint (eval mode)."""
    from .checkpoint import load_model as _load_model

    return _load_model(run_dir, map_location=map_location)
