"""Deliberately broken BatchNorms: each is the correct base with exactly ONE bug.

``MUTANTS`` maps a name in this file (a suite target ``tests/zoo/mutants.py:Name``) to
``(clause, description)``: the clause whose tests MUST fail on it. A mutant may fail
other clauses too (a wrong variance also breaks the golden examples); the meta test
``tests/test_zoo.py`` only insists on the named one.

Every mutant is a BatchNorm2d (the default ``--dims 2`` family of a class target).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from torch import nn
from torch.autograd.function import once_differentiable

if __package__:
    from .base import LOW_PRECISION, BaseBatchNorm2d, count, per_channel, reduce_axes
else:  # loaded by file path as a suite target (bnspec.candidates.targets): no package
    _name = "bnspec_zoo_base"
    if _name not in sys.modules:
        _spec = importlib.util.spec_from_file_location(_name, os.path.join(os.path.dirname(__file__), "base.py"))
        sys.modules[_name] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules[_name])
    _base = sys.modules[_name]
    LOW_PRECISION, BaseBatchNorm2d, count = _base.LOW_PRECISION, _base.BaseBatchNorm2d, _base.count
    per_channel, reduce_axes = _base.per_channel, _base.reduce_axes

MUTANTS: dict[str, tuple[str, str]] = {}
#: mutant -> the bnspec.conventions name its failure must name ("what it does instead")
NAMED: dict[str, str] = {}


def mutant(clause: str, description: str, *, convention: str | None = None):
    """Register a mutant class under its own name (and the known convention it follows)."""

    def register(cls):
        MUTANTS[cls.__name__] = (clause, description)
        if convention is not None:
            NAMED[cls.__name__] = convention
        return cls

    return register


# ----------------------------------------------------------------------------- S1 training forward


@mutant("S1.1", "eps added outside the square root: (x - mean) / (sqrt(var) + eps)", convention="eps_outside_root")
class EpsOutsideRoot(BaseBatchNorm2d):
    def _invstd(self, var):
        return 1 / (var.sqrt() + self.eps)


@mutant("S1.1", "normalizes with the unbiased variance (n - 1) instead of the biased one",
        convention="unbiased_normalization")
class UnbiasedVarInNormalization(BaseBatchNorm2d):
    def _normalizing_var(self, var, n):
        return var * (n / max(n - 1, 1))


@mutant("S1.1", "the mean is reduced over the channel axis too (one mean for all channels)")
class MeanOverChannelsToo(BaseBatchNorm2d):
    def _mean(self, xc):
        return xc.mean().expand(xc.shape[1])


@mutant("S1.1", "weight and bias swapped: xhat * bias + weight")
class WeightBiasSwapped(BaseBatchNorm2d):
    def _affine(self, xhat):
        if self.weight is None or self.bias is None:
            return super()._affine(xhat)
        return xhat * per_channel(self.bias.to(xhat.dtype), xhat) + per_channel(self.weight.to(xhat.dtype), xhat)


@mutant("S1.1", "bias ignored: y = xhat * weight")
class BiasIgnored(BaseBatchNorm2d):
    def _affine(self, xhat):
        return xhat if self.weight is None else xhat * per_channel(self.weight.to(xhat.dtype), xhat)


@mutant("S1.1", "off-by-one n: the batch variance divides by n + 1")
class OffByOneCount(BaseBatchNorm2d):
    def _divisor(self, n):
        return n + 1


@mutant("S1.2", "returns float32 for float16/bfloat16 input (no cast back to the input dtype)")
class Float32OutputForHalf(BaseBatchNorm2d):
    def _output_dtype(self, input, y):
        return y.dtype


@mutant("S1.2", "returns a view of the wrong shape (N, C*H*W)")
class WrongShapeView(BaseBatchNorm2d):
    def _output(self, y, input):
        return super()._output(y, input).reshape(input.shape[0], -1)


@mutant("S1.3", "returns a contiguous output for channels_last input")
class ContiguousForChannelsLast(BaseBatchNorm2d):
    def _layout(self, y, input):
        return y.contiguous()


@mutant("S1.4", "centers the input in place when no gradient is needed (x.sub_(mean))")
class CentersInputInPlace(BaseBatchNorm2d):
    def _center(self, xc, mean):
        if xc.requires_grad:
            return super()._center(xc, mean)
        return xc.sub_(per_channel(mean, xc))


@mutant("S1.5", "crashes on N = 0: views the input as (N, C, -1), ambiguous for 0 elements")
class EmptyBatchCrash(BaseBatchNorm2d):
    def _batch_stats(self, xc):
        flat = xc.reshape(xc.shape[0], xc.shape[1], -1)  # RuntimeError when N = 0
        mean = flat.mean(dim=(0, 2))
        d = flat - mean[None, :, None]
        return mean, (d * d).mean(dim=(0, 2))


# ----------------------------------------------------------------------------- S2 eval forward


@mutant("S2.1", "normalizes with the batch statistics in eval mode")
class BatchStatsInEval(BaseBatchNorm2d):
    def _eval_statistics(self, xc, rm, rv):
        return self._batch_stats(xc)


@mutant("S2.1", "eval turns the running variance into a biased one: running_var * (n - 1) / n")
class BiasedRunningVarInEval(BaseBatchNorm2d):
    def _eval_statistics(self, xc, rm, rv):
        n = count(xc)
        return rm.to(xc.dtype), rv.to(xc.dtype) * ((n - 1) / n if n > 1 else 1.0)


@mutant("S2.1", "eps ignored in eval: 1 / sqrt(running_var)")
class EpsIgnoredInEval(BaseBatchNorm2d):
    def _eval_invstd(self, var):
        return torch.rsqrt(var)


@mutant("S2.2", "eval without running statistics normalizes with mean 0, var 1 instead of the batch's")
class EvalWithoutBuffersUsesDefaults(BaseBatchNorm2d):
    def _uses_batch_stats(self):
        return self.training

    def _eval_statistics(self, xc, rm, rv):
        c = xc.shape[1]
        rm = torch.zeros(c, dtype=xc.dtype, device=xc.device) if rm is None else rm
        rv = torch.ones(c, dtype=xc.dtype, device=xc.device) if rv is None else rv
        return super()._eval_statistics(xc, rm, rv)


@mutant("S2.3", "eval blends 10% of the batch statistics into the running ones (outputs depend on the batch)")
class EvalBlendsBatchStats(BaseBatchNorm2d):
    def _eval_statistics(self, xc, rm, rv):
        if count(xc) < 2:
            return super()._eval_statistics(xc, rm, rv)
        mean, var = self._batch_stats(xc)
        return 0.9 * rm.to(xc.dtype) + 0.1 * mean, 0.9 * rv.to(xc.dtype) + 0.1 * var


@mutant("S2.1", "statistics chosen by torch.is_grad_enabled() instead of self.training (a textbook's layer)",
        convention="stats_by_grad_mode")
class StatsByGradMode(BaseBatchNorm2d):
    def _uses_batch_stats(self):
        return torch.is_grad_enabled() or (self.running_mean is None and self.running_var is None)

    def _counts_step(self, input):
        return torch.is_grad_enabled() and self.track_running_stats


# ----------------------------------------------------------------------------- S3 running statistics


@mutant("S3.1", "momentum weights the old value: (1 - m) * new + m * old", convention="momentum_on_old")
class MomentumOnOldValue(BaseBatchNorm2d):
    def _blend(self, old, new, factor):
        return factor * old + (1 - factor) * new


@mutant("S3.1", "running_var tracks the biased batch variance", convention="biased_running_var")
class BiasedRunningVar(BaseBatchNorm2d):
    def _unbiased(self, var, n):
        return var


@mutant("S1.1", "normalizes with the running statistics in training too and never updates them (a frozen layer)",
        convention="running_stats_in_training")
class FrozenInTraining(BaseBatchNorm2d):
    def _uses_batch_stats(self):
        return self.running_mean is None and self.running_var is None

    def _counts_step(self, input):
        return False


@mutant("S3.2", "momentum=None treated as momentum 0.1")
class CumulativeAsMomentum01(BaseBatchNorm2d):
    def _blend_factor(self):
        return 0.1 if self.momentum is None else self.momentum


@mutant("S3.2", "cumulative factor 1 / (num_batches_tracked + 1) (off by one)")
class CumulativeOffByOne(BaseBatchNorm2d):
    def _blend_factor(self):
        if self.momentum is None:
            return 1.0 / (float(self.num_batches_tracked) + 1)
        return self.momentum


@mutant("S3.3", "num_batches_tracked never incremented")
class CounterNotIncremented(BaseBatchNorm2d):
    def _increment_counter(self):
        pass


@mutant("S3.3", "num_batches_tracked incremented in eval too")
class CounterIncrementedInEval(BaseBatchNorm2d):
    def _counts_step(self, input):
        return self.track_running_stats


@mutant("S3.3", "num_batches_tracked is a float32 tensor, not int64")
class CounterFloat(BaseBatchNorm2d):
    def _new_counter(self, device):
        return torch.tensor(0.0, device=device)


@mutant("S3.4", "eval mode updates the running statistics (after normalizing with them)")
class UpdatesInEval(BaseBatchNorm2d):
    def _normalize_running(self, input, rm, rv):
        y = super()._normalize_running(input, rm, rv)
        if count(input) > 1:
            _, mean, var = self._normalize_batch(input)
            self._update_running(mean, var, count(input), 0.1 if self.momentum is None else self.momentum)
        return y


@mutant("S3.5", "running statistics keep autograd history (updated outside no_grad, not detached)")
class RunningStatsKeepHistory(BaseBatchNorm2d):
    def _update_running(self, mean, var, n, factor):
        if self._skips_update(n):
            return
        self.running_mean = self._blend(self.running_mean, mean.to(self.running_mean.dtype), factor)
        self.running_var = self._blend(self.running_var, self._unbiased(var, n).to(self.running_var.dtype), factor)


@mutant("S3.6", "an empty batch updates the running statistics (with NaN)", convention="nan_stats_empty_batch")
class EmptyBatchNaNStats(BaseBatchNorm2d):
    def _skips_update(self, n):
        return False


@mutant("S3.6", "an empty batch is not counted in num_batches_tracked")
class EmptyBatchNotCounted(BaseBatchNorm2d):
    def _counts_step(self, input):
        return self.training and self.track_running_stats and input.numel() > 0


@mutant("S3.7", "reset_running_stats sets running_var to 0 instead of 1")
class ResetSetsVarZero(BaseBatchNorm2d):
    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.zero_()
            self.num_batches_tracked.zero_()


# ----------------------------------------------------------------------------- S4 backward


class _FlipGrad(torch.autograd.Function):
    """Identity forward; negated gradient (differentiable, so double backward still runs)."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return -g


@mutant("S4.1", "dweight has the wrong sign")
class DweightSignFlipped(BaseBatchNorm2d):
    def _affine(self, xhat):
        if self.weight is None:
            return super()._affine(xhat)
        y = xhat * per_channel(_FlipGrad.apply(self.weight).to(xhat.dtype), xhat)
        return y if self.bias is None else y + per_channel(self.bias.to(xhat.dtype), xhat)


@mutant("S4.1", "no gradient reaches bias (bias.detach())")
class DbiasMissing(BaseBatchNorm2d):
    def _affine(self, xhat):
        y = xhat if self.weight is None else xhat * per_channel(self.weight.to(xhat.dtype), xhat)
        return y if self.bias is None else y + per_channel(self.bias.detach().to(xhat.dtype), xhat)


@mutant("S4.1", "backward treats the batch mean and variance as constants (detached statistics)")
class DetachedStatistics(BaseBatchNorm2d):
    def _batch_stats(self, xc):
        mean, var = super()._batch_stats(xc)
        return mean.detach(), var.detach()


@mutant("S4.3", "variance computed around a detached mean (tf.nn.moments's stop_gradient): first order right",
        convention="variance_stop_gradient")
class VarianceAroundDetachedMean(BaseBatchNorm2d):
    def _batch_stats(self, xc):
        mean = self._mean(xc)
        return mean, self._variance(xc, mean.detach())


@mutant("S4.2", "eval backward uses the training formula (batch statistics); forward is right")
class EvalBackwardUsesBatchStats(BaseBatchNorm2d):
    def _normalize_running(self, input, rm, rv):
        y = super()._normalize_running(input, rm, rv)
        yb, _, _ = self._normalize_batch(input)
        return y.detach() + (yb - yb.detach())


class _OnceTrain(torch.autograd.Function):
    """Training normalization with a closed-form backward marked @once_differentiable."""

    @staticmethod
    def forward(ctx, xc, weight, eps):
        axes = reduce_axes(xc)
        mean = xc.mean(dim=axes)
        d = xc - per_channel(mean, xc)
        var = (d * d).mean(dim=axes)
        invstd = torch.rsqrt(var + eps)
        xhat = d * per_channel(invstd, xc)
        ctx.save_for_backward(xhat, invstd, weight)
        y = xhat if weight is None else xhat * per_channel(weight, xc)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar):
        xhat, invstd, weight = ctx.saved_tensors
        axes = reduce_axes(xhat)
        n = max(count(xhat), 1)
        s1, s2 = dy.sum(dim=axes), (dy * xhat).sum(dim=axes)
        scale = invstd if weight is None else invstd * weight
        dx = per_channel(scale, xhat) * (dy - per_channel(s1, xhat) / n - xhat * per_channel(s2, xhat) / n)
        return dx, (s2 if weight is not None else None), None


@mutant("S4.3", "training backward is a @once_differentiable custom Function: no double backward")
class OnceDifferentiable(BaseBatchNorm2d):
    def _normalize_batch(self, input):
        xc = self._to_compute(input)
        w = None if self.weight is None else self.weight.to(xc.dtype)
        y, mean, var = _OnceTrain.apply(xc, w, self.eps)
        return (y if self.bias is None else y + per_channel(self.bias.to(xc.dtype), xc)), mean, var


class _OnceEval(torch.autograd.Function):
    """Eval normalization with a closed-form backward marked @once_differentiable."""

    @staticmethod
    def forward(ctx, xc, mean, invstd, weight):
        xhat = (xc - per_channel(mean, xc)) * per_channel(invstd, xc)
        ctx.save_for_backward(xhat, invstd, weight)
        return xhat if weight is None else xhat * per_channel(weight, xc)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xhat, invstd, weight = ctx.saved_tensors
        scale = invstd if weight is None else invstd * weight
        dw = None if weight is None else (dy * xhat).sum(dim=reduce_axes(xhat))
        return dy * per_channel(scale, xhat), None, None, dw


@mutant("S4.4", "eval backward is a @once_differentiable custom Function: no double backward")
class OnceDifferentiableEval(BaseBatchNorm2d):
    def _normalize_running(self, input, rm, rv):
        xc = self._to_compute(input)
        mean, var = self._eval_statistics(xc, rm, rv)
        w = None if self.weight is None else self.weight.to(xc.dtype)
        y = _OnceEval.apply(xc, mean, self._eval_invstd(var), w)
        return y if self.bias is None else y + per_channel(self.bias.to(xc.dtype), xc)


# ----------------------------------------------------------------------------- S5 module contract


@mutant("S5.1", "default eps is 1e-3 (Keras' default), not 1e-5")
class DefaultEps1e3(BaseBatchNorm2d):
    def __init__(self, num_features, eps=1e-3, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)


@mutant("S5.1", "the keyword-only bias argument is missing (pre-2.x signature)")
class NoBiasKeyword(BaseBatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)


@mutant("S5.2", "weight initialised to zeros")
class WeightInitZeros(BaseBatchNorm2d):
    def _init_weight(self, weight):
        nn.init.zeros_(weight)


@mutant("S5.2", "track_running_stats=False still registers running buffers (not None)")
class UntrackedKeepsBuffers(BaseBatchNorm2d):
    def _make_buffers(self, **factory):
        self.register_buffer("running_mean", torch.zeros(self.num_features, **factory))
        self.register_buffer("running_var", torch.ones(self.num_features, **factory))
        self.register_buffer("num_batches_tracked", self._new_counter(factory.get("device")))


@mutant("S5.3", "an extra persistent buffer 'running_std' in the state_dict")
class ExtraStateDictKey(BaseBatchNorm2d):
    def _make_buffers(self, **factory):
        super()._make_buffers(**factory)
        self.register_buffer("running_std", torch.ones(self.num_features, **factory))


# ----------------------------------------------------------------------------- S6 errors


@mutant("S6.1", "no error for one value per channel in training (normalizes to the bias)",
        convention="no_error_one_value")
class NoErrorOneValuePerChannel(BaseBatchNorm2d):
    def _check_batch_size(self, input):
        pass


@mutant("S6.2", "no rank check: a BatchNorm2d accepts 2-D, 3-D and 5-D input")
class NoRankCheck(BaseBatchNorm2d):
    def _check_input_dim(self, input):
        pass


@mutant("S6.3", "no channel-count check (a module with C = 1 broadcasts over any C)")
class NoChannelCheck(BaseBatchNorm2d):
    def _check_channels(self, input, **named):
        pass


@mutant("S6.4", "eps <= 0 accepted in training (only the eval rule eps >= 0 is checked)")
class EpsZeroAcceptedInTraining(BaseBatchNorm2d):
    def _check_eps(self, training):
        super()._check_eps(False)


@mutant("S6.5", "integer input accepted (computed in float32)")
class IntegerInputAccepted(BaseBatchNorm2d):
    def _check_dtype(self, input):
        if input.is_floating_point():
            super()._check_dtype(input)

    def _compute_dtype(self, input):
        return super()._compute_dtype(input) if input.is_floating_point() else torch.float32


@mutant("S6.6", "momentum outside [0, 1] rejected with ValueError in the constructor")
class MomentumRangeRejected(BaseBatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True):
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)


@mutant("S6.6", "eps = 0 rejected in eval too (the training rule applied everywhere)")
class EpsZeroRejectedInEval(BaseBatchNorm2d):
    def _check_eps(self, training):
        super()._check_eps(True)


# ----------------------------------------------------------------------------- S7 numerics


@mutant("S7.1", "float16/bfloat16 reduced in their own dtype with a naive running sum")
class HalfAccumulation(BaseBatchNorm2d):
    def _to_compute(self, input):
        return input  # no upcast to float32

    def _sum(self, t, axes):
        if t.dtype not in LOW_PRECISION:
            return super()._sum(t, axes)
        flat = t.movedim(1, 0).reshape(t.shape[1], -1)
        acc = torch.zeros(t.shape[1], dtype=t.dtype, device=t.device)
        for i in range(flat.shape[1]):  # one rounding to the input dtype per element
            acc = acc + flat[:, i]
        return acc


@mutant("S7.2", "one-pass variance E[x^2] - E[x]^2 (clamped at 0)", convention="one_pass_variance")
class OnePassVariance(BaseBatchNorm2d):
    def _variance(self, xc, mean):
        n = count(xc)
        return (self._sum(xc * xc, reduce_axes(xc)) / n - mean * mean).clamp_min(0)


@mutant("S7.3", "statistics computed around one global shift (mean of the whole batch): a NaN anywhere spreads")
class NaNLeaksAcrossChannels(BaseBatchNorm2d):
    def _batch_stats(self, xc):
        shift = xc.detach().mean()  # over every channel
        mean, var = super()._batch_stats(xc - shift)
        return mean + shift, var


@mutant("S7.4", "float16 input with float32 parameters returns float32 (type promotion)")
class MixedOutputInParamDtype(BaseBatchNorm2d):
    def _output_dtype(self, input, y):
        if self.weight is not None:
            return torch.promote_types(input.dtype, self.weight.dtype)
        return input.dtype


# ----------------------------------------------------------------------------- ST1 stateful


@mutant("ST1", "switching from eval back to train resets the running statistics")
class TrainAfterEvalForgets(BaseBatchNorm2d):
    def train(self, mode: bool = True):
        if mode and not self.training:
            self.reset_running_stats()
        return super().train(mode)
