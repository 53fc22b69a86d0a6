"""``zig cc`` (the pip package ``ziglang``) as the C compiler of tinygrad's CPU device.

tinygrad 0.14's CPU device compiles each kernel by running ``$CC`` (default ``clang``) as
``CC -c -x c -O2 -fPIC -ffreestanding -fno-math-errno -nostdlib -fno-ident
--target=<arch>-none-unknown-elf -march=native - -o -``: C source on standard input, an
ELF relocatable object on standard output, which tinygrad links and loads itself. gcc
rejects ``--target``, so a machine without clang has no compiler for that device. The
``ziglang`` package ships a self-contained clang driver (``python -m ziglang cc``) that
takes these arguments once :func:`translate` has rewritten the target and turned debug
information off; :func:`main` runs it with the result.

Usage: ``python -m bnspec.candidates.zig_cc_adapter ARGS...`` or ``python .../zig_cc_adapter.py ARGS...``
with the arguments tinygrad gives ``clang``. Standard input and output are zig's; zig's
errors go to standard error and its exit status is this command's. It is named an adapter
because it is one (zig's driver adapted to the command tinygrad runs) and, like the
framework adapters, its source is part of the tinygrad candidate's fingerprint in a
report, not of the suite's. This module uses the
standard library only and imports nothing of bnspec: the tinygrad adapter's wrapper script
runs this FILE by path, since ``-m`` would import the ``bnspec`` package (and torch with
it) first, over a second for every kernel compiled.

zig's compile cache lives for one compile, in the temporary folder (see :func:`main`):
nothing is written under the home directory and nothing is left behind.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from typing import Sequence

#: tinygrad's architecture names that zig spells differently (LLVM and Apple say arm64).
ZIG_ARCH = {"arm64": "aarch64"}
#: the LLVM target triples of a bare-metal ELF object (tinygrad's is the first).
BARE_METAL = ("none-unknown-elf", "none-elf", "unknown-none-elf")


def translate(args: Sequence[str]) -> list[str]:
    """The arguments of a ``clang`` call by tinygrad, as ``zig cc`` takes them.

    * ``--target=<arch>-none-unknown-elf`` becomes ``-target <arch>-freestanding-none``:
      zig reads targets as its own ``arch-os-abi`` triple and rejects LLVM's (``unable to
      parse target query 'x86_64-none-unknown-elf': UnknownOperatingSystem``); zig's OS
      ``freestanding`` with ABI ``none`` is LLVM's bare-metal ELF (no OS, no C library, as
      tinygrad's ``-ffreestanding -nostdlib`` ask). tinygrad's ``arm64`` is zig's
      ``aarch64``. Any other target (one with an OS) raises ValueError: tinygrad never
      gives one, and guessing zig's name for it could compile for the wrong system.
    * ``-g0`` is appended (last, so it wins over any ``-g``): unlike clang, ``zig cc``
      emits DWARF debug information by default, even at ``-O2``, and the relocations of
      its ``.debug_*`` sections (R_X86_64_32, type 10) are ones tinygrad's ELF loader does
      not implement (``NotImplementedError: Encountered unknown relocation type 10``).

    Everything else passes unchanged, ``- -o -`` included (zig 0.17 reads the source from
    standard input and writes the object to standard output as clang does).
    """
    out: list[str] = []
    for a in args:
        if a.startswith("--target="):
            triple = a.split("=", 1)[1]
            arch, _, rest = triple.partition("-")
            if not arch or rest not in BARE_METAL:
                raise ValueError(f"target {triple!r} is not a bare-metal ELF target (<arch>-none-unknown-elf)")
            out += ["-target", f"{ZIG_ARCH.get(arch, arch)}-freestanding-none"]
        else:
            out.append(a)
    return out + ["-g0"]


def available() -> bool:
    """Whether ``ziglang`` is installed (found without importing it)."""
    return importlib.util.find_spec("ziglang") is not None


def zig_command() -> list[str]:
    """How to run zig: the ``ziglang`` package's ``zig`` binary, which ``python -m ziglang``
    (the package's documented entry point) execs; that entry point itself when the binary is
    not beside the package's ``__init__.py``. Run directly, a compile saves a Python start
    (tinygrad compiles each kernel of each new shape)."""
    spec = importlib.util.find_spec("ziglang")
    if spec is None or spec.origin is None:
        raise LookupError("the ziglang package is not installed (pip install ziglang)")
    exe = os.path.join(os.path.dirname(spec.origin), "zig")
    return [exe] if os.path.isfile(exe) and os.access(exe, os.X_OK) else [sys.executable, "-m", "ziglang"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``zig cc`` with the translated arguments; its exit status, or 2 when it cannot
    be run. Standard input, output and error are zig's.

    zig gets a cache folder of its own for this one compile, removed after it: zig caches
    every object it compiles and a copy of each source read from standard input (in
    ``~/.cache/zig`` by default), about 16 KB a kernel for as long as the folder lives,
    while tinygrad keeps its compiled kernels in a cache of its own already. A cold cache
    costs a ``-c`` compile nothing measurable (nothing of zig's is built for it)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        # the arguments first: a call zig could never take is reported as such, installed or not
        translated = translate(args)
        cmd = [*zig_command(), "cc", *translated]
    except (ValueError, LookupError) as e:
        print(f"zig_cc: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bnspec-zig-cc-") as cache:
        env = {**os.environ, "ZIG_GLOBAL_CACHE_DIR": cache, "ZIG_LOCAL_CACHE_DIR": cache}
        try:
            return subprocess.call(cmd, env=env)
        except OSError as e:
            print(f"zig_cc: cannot run {cmd[0]}: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
