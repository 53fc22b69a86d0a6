"""The clauses of the specification, each with a stable id. SPEC.md (at the repository root)
states each clause's rule, its formula and edge cases, and the tests that check it.

Tests carry these ids (``@pytest.mark.clause("S1.1")``), results and reports group by
them. One primary test per clause.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Clause:
    id: str
    title: str
    needs: tuple[str, ...] = ()  #: capabilities (bnspec.candidates.protocol) it requires


CLAUSES: dict[str, Clause] = {c.id: c for c in (
    Clause("S1.1", "training forward: values match the float64 oracle within the bound", ("forward",)),
    Clause("S1.2", "training forward: output has the input's shape, dtype and device", ("forward",)),
    Clause("S1.3", "training forward: channels_last input gives channels_last output", ("forward",)),
    Clause("S1.4", "input is never modified", ("forward",)),
    Clause("S1.5", "empty batch (N=0) gives an empty output", ("forward",)),
    Clause("S2.1", "eval forward normalizes with the running statistics", ("forward",)),
    Clause("S2.2", "eval without running statistics uses batch statistics", ("forward",)),
    Clause("S2.3", "eval: each sample's output depends only on that sample, deterministically", ("forward",)),
    Clause("S3.1", "running statistics: momentum average of mean and unbiased variance", ("running_stats",)),
    Clause("S3.2", "running statistics: momentum=None is the cumulative average", ("running_stats", "cumulative")),
    Clause("S3.3", "num_batches_tracked: int64, +1 per training forward, untouched in eval", ("running_stats",)),
    Clause("S3.4", "eval never changes the running statistics", ("running_stats",)),
    Clause("S3.5", "running statistics carry no autograd history", ("running_stats",)),
    Clause("S3.6", "empty batch leaves the statistics unchanged and counts the step", ("running_stats",)),
    Clause("S3.7", "reset_running_stats: mean 0, var 1, counter 0", ("running_stats", "module_contract")),
    Clause("S4.1", "training backward: dx, dweight, dbias", ("backward",)),
    Clause("S4.2", "eval backward: dx, dweight, dbias", ("backward",)),
    Clause("S4.3", "second-order gradients, training mode", ("double_backward",)),
    Clause("S4.4", "second-order gradients, eval mode", ("double_backward",)),
    Clause("S5.1", "constructor: torch's signature and defaults", ("module_contract",)),
    Clause("S5.2", "initial values, parameters and buffers per affine/bias/tracking switch", ("module_contract",)),
    Clause("S5.3", "state_dict: torch's keys, loadable from torch and back", ("module_contract",)),
    Clause("S6.1", "one value per channel in training raises ValueError", ("errors",)),
    Clause("S6.2", "wrong input rank raises ValueError", ("errors",)),
    Clause("S6.3", "wrong channel count raises", ("errors",)),
    Clause("S6.4", "eps <= 0 in training and eps < 0 in eval raise ValueError", ("errors",)),
    Clause("S6.5", "integer input raises", ("errors",)),
    Clause("S6.6", "legal edge cases do not raise (momentum outside [0,1], N=0, eps=0 in eval)", ("forward",)),
    Clause("S7.1", "float16/bfloat16 reduced in float32, output in the input dtype", ("forward",)),
    Clause("S7.2", "ill-conditioned data within the bound (offset, tiny or near-eps variance)", ("forward",)),
    Clause("S7.3", "special values stay in their channel", ("forward",)),
    Clause("S7.4", "float16 input with float32 parameters", ("forward",)),
    Clause("S9.1", "synced over K processes: forward equals single process on the concatenated batch", ("forward",)),
    Clause("S9.2", "synced: running statistics (global unbiased variance) and counter, on every rank", ("running_stats",)),
    Clause("S9.3", "synced: gradients of input, weight and bias (parameter gradients summed over ranks)", ("backward",)),
    Clause("S9.4", "synced: unequal shards and an empty shard", ("forward",)),
    Clause("G1", "the source document's worked examples", ("forward",)),
    Clause("ST1", "stateful sequences match the reference step by step", ("running_stats",)),
)}


def clause(cid: str) -> Clause:
    try:
        return CLAUSES[cid]
    except KeyError:
        raise KeyError(f"unknown clause {cid!r}; known: {', '.join(CLAUSES)}") from None
