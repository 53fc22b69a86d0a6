"""A kernel author's project: a hand-tuned BatchNorm2d (what bnspec checks).

``MyBatchNorm2d`` keeps torch's bookkeeping by subclassing ``torch.nn.BatchNorm2d``
but lets its momentum weight the OLD running value (``new = m*old + (1-m)*batch``, as
Keras and ONNX do), where torch's momentum weights the batch. bnspec names that
convention ``momentum_on_old``.
"""

from torch import nn


class MyBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x):
        if self.momentum is None:  # the cumulative average is torch's
            return super().forward(x)
        on_the_batch = self.momentum
        self.momentum = 1.0 - on_the_batch  # torch's update then weights the old value by m
        try:
            return super().forward(x)
        finally:
            self.momentum = on_the_batch
