"""bnspec: the executable specification of Batch Normalization.

``bnspec.reference`` holds the formulas as pure functions; ``BatchNorm1d/2d/3d`` are
drop-in replacements for torch's modules built on them (subclasses of torch's, so
isinstance-based tools see them), and ``SyncBatchNorm`` (from ``bnspec.sync``) syncs
their statistics over a process group. ``bnspec.swap`` puts them into a model in place
of its BatchNorms and back; ``bnspec.testing`` runs ``bnspec check`` from another
project's tests.
"""

from bnspec import reference
from bnspec.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnspec.sync import SyncBatchNorm
from bnspec import swap

# bnspec.testing (import it as such) is a front of the bnspec check command; importing
# it here would load the results and isolation machinery into every model using bnspec.

__version__ = "0.1.0"
__all__ = ["reference", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "swap", "__version__"]
