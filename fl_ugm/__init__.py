"""fl_ugm: uncertainty-based gradient matching (UGM) merging for federated learning."""

from fl_ugm.merge import (
    InvalidClientInput,
    fisher_averaging,
    remove_client,
    task_arithmetic,
    ugm_merge,
    weighted_average,
)

__all__ = [
    "FedUGM",
    "InvalidClientInput",
    "fisher_averaging",
    "remove_client",
    "task_arithmetic",
    "ugm_merge",
    "weighted_average",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``from fl_ugm import FedUGM`` imports Flower lazily: the math layer stays Flower-free."""
    if name == "FedUGM":
        from fl_ugm.strategy import FedUGM

        return FedUGM
    raise AttributeError(f"module 'fl_ugm' has no attribute {name!r}")
