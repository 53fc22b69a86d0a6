"""bnspec: the executable specification of Batch Normalization.

``bnspec.reference`` holds the formulas as pure functions; ``BatchNorm1d/2d/3d`` are
drop-in replacements for torch's modules built on them, and ``SyncBatchNorm`` (from
``bnspec.sync``) syncs their statistics over a process group.
"""

from bnspec import reference
from bnspec.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnspec.sync import SyncBatchNorm

__version__ = "0.1.0"
__all__ = ["reference", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "__version__"]
