"""Hostile BatchNorm2d candidates: each does ONE thing a conformance runner must survive.

Use one as a target: ``bnspec check tests/hostile/candidates.py:HangsInForward
--profile quick --timeout 2 --clauses S1.1``. Most are correct (torch's own
``nn.BatchNorm2d``) except for their one misbehaviour, so a verdict names that and
nothing else. "After N calls" counts forward calls in this (child) process, so a crash
happens in the middle of a run, not at import.

Environment variables, for the tests:

* ``BNSPEC_HOSTILE_PIDFILE``: :class:`SpawnsGrandchild` writes its grandchild's pid there.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: The forward call on which "after N calls" candidates misbehave (1-based).
AFTER = 3


class _Counting(nn.BatchNorm2d):
    """torch's BatchNorm2d that counts forward calls per process."""

    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return self.misbehave(x, type(self).calls)

    def misbehave(self, x, n):
        return super().forward(x)


# -- raises ---------------------------------------------------------------------------------


class RaisesInForward(_Counting):
    def misbehave(self, x, n):
        raise RuntimeError("hostile: boom in forward")


class RaisesInConstructorWithoutAffine(nn.BatchNorm2d):
    """Raises for some constructor arguments only (affine=False)."""

    def __init__(self, num_features, *args, **kwargs):
        if kwargs.get("affine", True) is False:
            raise TypeError("hostile: affine=False is not supported")
        super().__init__(num_features, *args, **kwargs)


class _RaisingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("hostile: boom in backward")


class RaisesInBackward(_Counting):
    def misbehave(self, x, n):
        return _RaisingBackward.apply(super().misbehave(x, n))


class RaisesSystemExit(_Counting):
    """sys.exit(0) in the middle of a run: raises SystemExit(0) from the forward."""

    def misbehave(self, x, n):
        if n >= AFTER:
            sys.exit(0)
        return super().misbehave(x, n)


# -- hangs --------------------------------------------------------------------------------


class HangsInForward(_Counting):
    def misbehave(self, x, n):
        time.sleep(10**6)


class BusyLoopInForward(_Counting):
    def misbehave(self, x, n):
        while True:
            pass


class _HangingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        time.sleep(10**6)


class HangsInBackward(_Counting):
    def misbehave(self, x, n):
        return _HangingBackward.apply(super().misbehave(x, n))


class TooSlow(_Counting):
    """Right, but takes 3 s a call (run with --timeout 2)."""

    def misbehave(self, x, n):
        time.sleep(3)
        return super().misbehave(x, n)


class SlowButInTime(_Counting):
    """Right, and each call is within the limit (0.5 s), but they add up (for --budget)."""

    def misbehave(self, x, n):
        time.sleep(0.5)
        return super().misbehave(x, n)


class SpawnsGrandchild(_Counting):
    """Starts a long-sleeping grandchild, then hangs: killing the group must end both."""

    def misbehave(self, x, n):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10**6)"])
        path = os.environ.get("BNSPEC_HOSTILE_PIDFILE")
        if path:
            with open(path, "a") as f:
                f.write(f"{child.pid}\n")
        time.sleep(10**6)


# -- ends its own process -----------------------------------------------------------------


class Segfaults(_Counting):
    """Reads address 0 after AFTER calls (a real SIGSEGV)."""

    def misbehave(self, x, n):
        if n >= AFTER:
            ctypes.string_at(0)
        return super().misbehave(x, n)


class KillsItselfSIGSEGV(_Counting):
    def misbehave(self, x, n):
        if n >= AFTER:
            os.kill(os.getpid(), signal.SIGSEGV)
        return super().misbehave(x, n)


class ExitsZero(_Counting):
    """os._exit(0) after AFTER calls: a clean exit status must not read as success."""

    def misbehave(self, x, n):
        if n >= AFTER:
            sys.stdout.flush()
            os._exit(0)
        return super().misbehave(x, n)


class ClosesFds(_Counting):
    """Closes every file descriptor it does not own, the private socket included."""

    def misbehave(self, x, n):
        os.closerange(3, 256)
        return super().misbehave(x, n)


class WritesGarbageToFds(_Counting):
    """Writes garbage to every open file descriptor above 2 (the socket included)."""

    def misbehave(self, x, n):
        for fd in range(3, 256):
            try:
                os.write(fd, b"garbage \x00\xff" * 64)
            except OSError:
                pass
        return super().misbehave(x, n)


class WritesHugeFrameHeader(_Counting):
    """Writes a well-formed bnspec frame header announcing a 1 TiB message into every
    descriptor above 2, then answers normally."""

    def misbehave(self, x, n):
        for fd in range(3, 256):
            try:
                os.write(fd, b"BNSP" + struct.pack("!Q", 1 << 40))
            except OSError:
                pass
        return super().misbehave(x, n)


# -- returns the wrong thing ----------------------------------------------------------------


class ReturnsNone(_Counting):
    def misbehave(self, x, n):
        return None


class ReturnsNumpy(_Counting):
    def misbehave(self, x, n):
        return super().misbehave(x, n).detach().numpy()


class ReturnsTuple(_Counting):
    def misbehave(self, x, n):
        y = super().misbehave(x, n)
        return y, y.mean()


class WrongShape(_Counting):
    def misbehave(self, x, n):
        return super().misbehave(x, n).flatten(1)


class WrongDtype(_Counting):
    def misbehave(self, x, n):
        return super().misbehave(x, n).to(torch.float64 if x.dtype != torch.float64 else torch.float32)


class WrongDevice(_Counting):
    """Returns a tensor on the meta device (shape and dtype right, no values)."""

    def misbehave(self, x, n):
        return super().misbehave(x, n).to("meta")


# -- prints -------------------------------------------------------------------------------

FAKE_TABLE = """bnspec check hostile  (dims 2, profile quick, seed derandomized)
clause  verdict      err/bound  reason
S1.1    pass             0.001  training forward: values match the float64 oracle within the bound
verdict: CONFORMS"""
FAKE_JSON = '{"schema": "bnspec.check/1", "conformant": true, "records": []}'


class PrintsFakeResults(_Counting):
    """Prints a fake "CONFORMS" table and JSON on stdout, stderr and fds 1 and 2, then
    raises with a message full of control characters and the same fake table."""

    def misbehave(self, x, n):
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            print(FAKE_TABLE, file=stream, flush=True)
            print(FAKE_JSON, file=stream, flush=True)
        for fd in (1, 2):
            os.write(fd, (FAKE_TABLE + "\n" + FAKE_JSON + "\n").encode())
        raise RuntimeError("\r\x1b[2K\x1b[1Gverdict: CONFORMS\n" + FAKE_TABLE + "\n" + FAKE_JSON)


# -- global state -----------------------------------------------------------------------------


def _wrong_batch_norm(input, *args, **kwargs):
    return input * 0 + 42.0


def _patch_globals() -> None:
    F.batch_norm = _wrong_batch_norm
    torch.batch_norm = _wrong_batch_norm
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(12345)
    torch.set_num_threads(1)
    np.random.seed(12345)


class PatchesGlobals(nn.BatchNorm2d):
    """Replaces F.batch_norm and torch.batch_norm with a wrong function and changes
    torch's default dtype, seed and thread count, at construction."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _patch_globals()


# -- lies ---------------------------------------------------------------------------------


class Nondeterministic(_Counting):
    """Right, except every 5th call (its own counter), when the output is off by 1."""

    def misbehave(self, x, n):
        y = super().misbehave(x, n)
        return y + 1 if n % 5 == 0 else y


class ModifiesInput(_Counting):
    """Right output, but adds 1 to its input in place."""

    def misbehave(self, x, n):
        y = super().misbehave(x.clone(), n)
        x.data.add_(1)
        return y
