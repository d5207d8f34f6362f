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
    "InvalidClientInput",
    "fisher_averaging",
    "remove_client",
    "task_arithmetic",
    "ugm_merge",
    "weighted_average",
]
__version__ = "0.1.0"
