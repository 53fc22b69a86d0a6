"""``tinygrad``: ``tinygrad.nn.BatchNorm`` (torch's formulas, channel axis 1).

Translated (never patched): the train/eval switch (tinygrad defaults to inference mode:
its ``TRAINING`` context variable is set per call from torch's ``training`` flag),
``momentum`` (same convention as torch, given per call, so momentum=None's factor
``1/num_batches_tracked`` passes through), ``eps``, ``affine``, ``track_running_stats``,
and ``dtype=`` (tinygrad's BatchNorm has no dtype argument: its tensors are cast to it, as a
user casting a model would). ``bias=False`` has no tinygrad switch: the bias is None, which
tinygrad's ``Tensor.batchnorm`` accepts. Gradients via ``Tensor.gradient``.

Device, chosen once at import and recorded in the capabilities' notes (so reports say
which ran), the first that applies of:

1. ``DEV`` set by the user: tinygrad's device as given (``CC`` left alone too);
2. tinygrad's CPU device with the first C compiler that compiles a probe the way tinygrad
   calls it (``--target=<arch>-none-unknown-elf``, object on standard output): ``$CC`` set
   by the user (gcc, for one, rejects ``--target``, and is then passed over), ``clang`` on
   PATH, then ``zig cc`` from the pip package ``ziglang`` (part of the ``tinygrad`` extra)
   through :mod:`bnspec.candidates.zig_cc_adapter`, run by a small shell script this module writes
   once under the temporary folder;
3. the PYTHON device (an interpreter; correct but slow: seconds per call).

tinygrad reads ``CC`` once (its ``getenv`` is cached) when it compiles its first kernel, so
the choice is put in this process's environment (``os.environ["CC"]``, inherited by its
subprocesses) at import, before tinygrad computes anything. tinygrad keeps a compile cache
under ``$XDG_CACHE_HOME`` or ``~/.cache``: the adapter points ``CACHEDB`` at a file under
the system's temporary folder, in this process's environment, which tinygrad's compile
workers inherit (zig's cache lasts one compile, in the temporary folder too:
:func:`bnspec.candidates.zig_cc_adapter.main`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from importlib import metadata

import bnspec.candidates.zig_cc_adapter as zig_cc
from bnspec.candidates.functional import BNState, FunctionalAdapter, from_numpy, private_path, to_numpy
from bnspec.candidates.protocol import DTYPES, Capabilities, native_facts


_CACHEDB = private_path("tinygrad") + ".db"
#: tinygrad's CPU device names the target architecture this way (tinygrad/runtime/ops_cpu.py).
_ARCH = {"amd64": "x86_64", "aarch64": "arm64"}.get(platform.machine().lower(), platform.machine().lower())
#: a kernel-sized C source, compiled as tinygrad compiles its kernels (arguments below).
_PROBE = b"float probe(float x) { return __builtin_sqrtf(x) * 2.0f; }\n"


def probe_compiler(cc: str) -> str | None:
    """None when ``cc`` compiles C for tinygrad's CPU device, else why not (one line).

    The arguments are tinygrad 0.14's (``ClangCompiler.compile``) less ``-march``: the parts
    a compiler other than clang trips on are ``--target`` and the object written to
    standard output."""
    cmd = [cc, "-c", "-x", "c", "-O2", "-fPIC", "-ffreestanding", "-fno-math-errno", "-nostdlib", "-fno-ident",
           f"--target={_ARCH}-none-unknown-elf", "-", "-o", "-"]
    try:
        # A compile takes well under a second (zig's first, cache empty, too): the limit only
        # keeps a compiler that hangs from hanging the import.
        done = subprocess.run(cmd, input=_PROBE, capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"
    if done.returncode != 0 or not done.stdout.startswith(b"\x7fELF"):
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        return f"exit status {done.returncode}" + (f": {lines[0][:160]}" if lines else "")
    return None


def zig_wrapper() -> str:
    """The path of an executable script that runs :mod:`bnspec.candidates.zig_cc_adapter` with this
    Python, written once (its name is a hash of its text, so interpreters and checkouts
    each get theirs and concurrent writers write the same bytes)."""
    text = ("#!/bin/sh\n"
            "# Written by bnspec.candidates.tinygrad_adapter: zig cc as tinygrad's C compiler.\n"
            # The file by path, not -m: -m imports the bnspec package (torch), 1-2 s a kernel.
            f'exec {shlex.quote(sys.executable)} {shlex.quote(zig_cc.__file__)} "$@"\n')
    folder = private_path("tinygrad-cc")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        # Someone else's (or a link): a script run as a compiler must be ours alone.
        folder = tempfile.mkdtemp(prefix="bnspec-tinygrad-cc-")
    path = os.path.join(folder, "cc-" + hashlib.sha256(text.encode()).hexdigest()[:16])
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o700)
        os.replace(tmp, path)
    return path


def choose_device() -> tuple[dict, str]:
    """The tinygrad context every call runs in (its ``DEV``) and a note saying why.

    Sets ``os.environ["CC"]`` to the compiler chosen for the CPU device."""
    if "DEV" in os.environ:
        return {}, f"device DEV={os.environ['DEV']}, set by the user (tinygrad's device as given)"
    passed_over = []  # why each compiler tried before zig's is not used
    options = []
    user_cc = os.environ.get("CC")
    if user_cc is None:
        passed_over.append("CC unset")
    else:
        options.append((user_cc, f"CC={user_cc} set by the user"))
    if shutil.which("clang") is None:
        passed_over.append("no clang on PATH")
    else:
        options.append(("clang", "clang on PATH"))
    for cc, what in options:
        why_not = probe_compiler(cc)
        if why_not is None:
            os.environ["CC"] = cc
            tried = [p for p in passed_over if "does not compile" in p]
            return {"DEV": "CPU"}, f"tinygrad's CPU device, compiled by {what}" + "".join(f"; {p}" for p in tried)
        passed_over.append(f"{what} does not compile for it ({why_not})")
    if not zig_cc.available():
        passed_over.append("ziglang not installed")
    elif os.name != "posix":
        passed_over.append("zig cc is run through a POSIX shell script")
    else:
        wrapper = zig_wrapper()
        why_not = probe_compiler(wrapper)
        if why_not is None:
            os.environ["CC"] = wrapper
            zig = f"zig cc (ziglang {metadata.version('ziglang')}, bnspec.candidates.zig_cc_adapter)"
            return {"DEV": "CPU"}, f"tinygrad's CPU device, compiled by {zig}: {'; '.join(passed_over)}"
        passed_over.append(f"zig cc does not compile for it ({why_not})")
    return {"DEV": "PYTHON"}, f"the PYTHON device (an interpreter; slow): no C compiler: {'; '.join(passed_over)}"


def _import_tinygrad():
    # CACHEDB stays in this process's environment (not only while importing): on the CPU
    # device tinygrad compiles in spawned worker processes, which import tinygrad afresh and
    # would otherwise open a cache under the home directory.
    os.environ["CACHEDB"] = _CACHEDB
    import tinygrad
    from tinygrad import helpers
    from tinygrad import nn as tnn
    return tinygrad, helpers, tnn


tinygrad, helpers, tnn = _import_tinygrad()
Tensor, dtypes, Context = tinygrad.Tensor, tinygrad.dtypes, helpers.Context
#: The context every call runs in: the device chosen above (DEVICE_NOTE says why); no disk
#: cache when tinygrad was imported before this module (its cache file is then wherever the
#: importer's environment put it, by default under the home directory).
CONTEXT, DEVICE_NOTE = choose_device()
if CONTEXT.get("DEV") == "CPU" and helpers.getenv("CC", "clang") != os.environ["CC"]:
    # tinygrad compiled for its CPU device before this module was imported and keeps the CC
    # it read then (its getenv is cached): that compiler, not the one chosen, would run.
    CONTEXT, DEVICE_NOTE = {"DEV": "PYTHON"}, (f"the PYTHON device (an interpreter; slow): tinygrad had read "
                                               f"CC={helpers.getenv('CC', 'clang')} before the adapter chose one")
if getattr(helpers, "CACHEDB", _CACHEDB) != _CACHEDB:
    CONTEXT["CACHELEVEL"] = 0


def tinygrad_momentum(factor: float | None) -> float:
    """tinygrad's momentum for torch's factor f: the same direction; 0.1 where nothing is kept."""
    return 0.1 if factor is None else factor


class TinygradAdapter(FunctionalAdapter):
    framework = "tinygrad"
    capabilities = Capabilities(
        double_backward=False, module_contract=False, errors=True, devices=("cpu",),
        dtypes=DTYPES,
        notes=("tinygrad defaults to inference mode: TRAINING is set per call from torch's flag",
               DEVICE_NOTE,
               "second-order gradients not wired (not provided)",
               "counter num_batches_tracked is the adapter's bookkeeping"),
    )

    def native(self) -> dict:
        return native_facts("tinygrad.nn.BatchNorm", tnn.BatchNorm, eps="eps", momentum="momentum",
                            translate=tinygrad_momentum)

    # Every operation runs in CONTEXT (device and cache choice), tensors created included.
    def construct(self, dims, num_features, kwargs):
        with Context(**CONTEXT):
            return super().construct(dims, num_features, kwargs)

    def forward(self, h, x, layout="contiguous", dy=None):
        with Context(**CONTEXT):
            return super().forward(h, x, layout, dy)

    def time_forward(self, *args, **kwargs):
        with Context(**CONTEXT):
            return super().time_forward(*args, **kwargs)

    def to_native(self, t):
        if t is None:
            return None
        a = to_numpy(t.contiguous())
        if a.dtype.name == "bfloat16":  # no NumPy bfloat16 in tinygrad: go through float32
            return Tensor(a.astype("float32")).cast(dtypes.bfloat16)
        return Tensor(a.copy())

    def to_torch(self, a):
        if a.dtype == dtypes.bfloat16:
            import ml_dtypes

            return from_numpy(a.cast(dtypes.float32).numpy().astype(ml_dtypes.bfloat16))
        return from_numpy(a.numpy())

    def _bn(self, st: BNState, w, b, rm, rv, momentum):
        bn = tnn.BatchNorm(st.num_features, eps=st.eps, affine=st.affine,
                           track_running_stats=st.track_running_stats, momentum=momentum)
        bn.weight, bn.bias = w, b
        if st.track_running_stats:
            # tinygrad updates with assign(): give it realized buffers of its own
            bn.running_mean, bn.running_var = rm.contiguous().realize(), rv.contiguous().realize()
        return bn

    def forward_train(self, st, x, w, b, rm, rv, factor):
        bn = self._bn(st, w, b, rm, rv, tinygrad_momentum(factor))
        with Context(TRAINING=int(st.training), **CONTEXT):
            y = bn(x).realize()
        if factor is None:
            return y, rm, rv
        return y, bn.running_mean.realize(), bn.running_var.realize()

    def forward_eval(self, st, x, w, b, rm, rv):
        bn = self._bn(st, w, b, rm, rv, tinygrad_momentum(st.momentum))
        with Context(TRAINING=0, **CONTEXT):
            return bn(x).realize()

    def backward(self, st, x, dy, w, b, rm, rv, training):
        bn = self._bn(st, w, b, rm, rv, tinygrad_momentum(st.momentum))
        with Context(TRAINING=int(st.training), **CONTEXT):
            y = bn(x)
            targets = [x] + [p for p in (w, b) if p is not None]
            grads = [g.realize() for g in y.gradient(*targets, gradient=dy.cast(y.dtype))]
        out = {"x": grads[0]}
        rest = iter(grads[1:])
        if w is not None:
            out["weight"] = next(rest)
        if b is not None:
            out["bias"] = next(rest)
        return out

    def init_state(self, st: BNState) -> dict:
        bn = tnn.BatchNorm(st.num_features, eps=st.eps, affine=st.affine,
                           track_running_stats=st.track_running_stats)
        dt = getattr(dtypes, st.dtype)
        cast = lambda t: None if t is None else self.to_torch(t.cast(dt).realize())  # noqa: E731
        return {
            "weight": cast(bn.weight),
            "bias": cast(bn.bias) if st.use_bias else None,
            "running_mean": cast(bn.running_mean) if st.track_running_stats else None,
            "running_var": cast(bn.running_var) if st.track_running_stats else None,
        }


def tinygrad_batchnorm(device: str = "cpu") -> TinygradAdapter:
    return TinygradAdapter(device=device)
