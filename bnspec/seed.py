r"""The source document's worked examples, as data (one source for docs, notebooks, tests).

The document (a write-up of ``torch.nn.BatchNorm2d``) runs ``nn.BatchNorm2d(3)`` with
default arguments in training mode on two inputs and prints the outputs to 4 decimals.
It then checks one channel by hand with

.. math:: \frac{x - \mu}{\sqrt{\sigma^2} + \epsilon}

which puts ``eps`` outside the square root. BatchNorm divides by
:math:`\sqrt{\sigma^2 + \epsilon}`; the two agree to 4 decimals here because the
variances (1.25 and 37.25) are far above ``eps = 1e-5``. :func:`seed_hand_check` keeps the
document's formula under its own name so the difference can be shown, never used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["WorkedExample", "EXAMPLES", "EPS", "seed_hand_check"]

EPS = 1e-5  #: nn.BatchNorm2d's default, used by the document


@dataclass(frozen=True)
class WorkedExample:
    """One worked example: input, the document's printed values, channel-0 statistics."""

    name: str
    shape: tuple[int, ...]
    printed_output: tuple  #: nested lists, 4 decimals, as printed (every channel alike)
    channel0_mean: float
    channel0_var: float  #: biased: torch.var(unbiased=False), as the document computes
    printed_hand_check: tuple  #: the document's sqrt(var)+eps check of channel 0, printed

    def input(self) -> Tensor:
        """``torch.arange(0, numel, dtype=float32).view(shape)``, as in the document."""
        numel = 1
        for s in self.shape:
            numel *= s
        return torch.arange(0, numel, dtype=torch.float32).view(self.shape)

    def expected_output(self) -> Tensor:
        """The printed output (4 decimals) as a float64 tensor of ``shape``."""
        return torch.tensor(self.printed_output, dtype=torch.float64)


_CHANNEL_1 = [[-1.3416, -0.4472], [0.4472, 1.3416]]
_SAMPLE_0 = [[-1.2288, -1.0650], [-0.9012, -0.7373]]
_SAMPLE_1 = [[0.7373, 0.9012], [1.0650, 1.2288]]

EXAMPLES = (
    WorkedExample(
        name="one sample: arange(12).view(1, 3, 2, 2)",
        shape=(1, 3, 2, 2),
        printed_output=([_CHANNEL_1] * 3,),
        channel0_mean=1.5,
        channel0_var=1.25,
        # The document prints only the first element of its hand check.
        printed_hand_check=(-1.3416,),
    ),
    WorkedExample(
        name="two samples: arange(24).view(2, 3, 2, 2)",
        shape=(2, 3, 2, 2),
        printed_output=([_SAMPLE_0] * 3, [_SAMPLE_1] * 3),
        channel0_mean=7.5,
        channel0_var=37.25,
        printed_hand_check=(_SAMPLE_0, _SAMPLE_1),
    ),
)


def seed_hand_check(x: Tensor, mean: Tensor | float, var: Tensor | float, eps: float = EPS) -> Tensor:
    r"""The document's hand check, eps OUTSIDE the root: ``(x - mean) / (sqrt(var) + eps)``.

    Kept to show how it differs from BatchNorm's ``(x - mean) / sqrt(var + eps)``; not a
    reference formula. ``weight = 1`` and ``bias = 0`` as in the document.
    """
    mean = torch.as_tensor(mean, dtype=torch.float64)
    var = torch.as_tensor(var, dtype=torch.float64)
    return (x.to(torch.float64) - mean) / (torch.sqrt(var) + eps)
