"""fl_ugm: uncertainty-based gradient matching (UGM) merging for federated learning.

The math (``fl_ugm.merge``, ``fl_ugm.fisher``) imports no Flower; ``FedUGM`` and
``RemovalError`` import Flower on first use. docs/design.md maps every concept to its module.
"""

from fl_ugm.merge import (
    InvalidClientInput,
    fisher_averaging,
    remove_client,
    task_arithmetic,
    ugm_merge,
    ugm_shares,
    weighted_average,
)

__all__ = [
    "FedUGM",
    "InvalidClientInput",
    "RemovalError",
    "fisher_averaging",
    "remove_client",
    "task_arithmetic",
    "ugm_merge",
    "ugm_shares",
    "weighted_average",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``from fl_ugm import FedUGM`` imports Flower lazily: the math layer stays Flower-free."""
    if name == "FedUGM":
        from fl_ugm.strategy import FedUGM

        return FedUGM
    if name == "RemovalError":
        from fl_ugm.server_removal import RemovalError

        return RemovalError
    raise AttributeError(f"module 'fl_ugm' has no attribute {name!r}")
