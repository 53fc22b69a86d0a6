"""Where results go: files written whole or not at all, and lines printed to a reader that
may have gone away.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from bnspec.options import UsageProblem


def _umask() -> int:
    mask = os.umask(0)  # reading it means setting it: put it back at once
    os.umask(mask)
    return mask


def write_json_atomic(path: str, data: object) -> None:
    """Write JSON so a reader never sees a half-written file (rename is atomic). The file
    gets the permissions any new file of this user gets (0666 less the umask), not the
    0600 of the temporary file it is written through."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_output_path(path: str, option: str, *, directory: bool = False) -> None:
    """Fail now, not after the run, when the results could not be written there."""
    target_dir = path if directory else (os.path.dirname(os.path.abspath(path)) or ".")
    if not directory and os.path.isdir(path):
        raise UsageProblem(f"{option} {path!r} is a directory; give a file name")
    if os.path.exists(target_dir) and not os.path.isdir(target_dir):
        raise UsageProblem(f"{option} {path!r}: {target_dir!r} is not a directory")
    try:
        os.makedirs(target_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".bnspec-probe-", dir=target_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageProblem(f"{option} {path!r}: cannot write there ({exc.strerror or exc})") from None


def silence_stdout() -> None:
    """Point stdout at /dev/null: its reader went away (``| head``), and Python's own
    flush at exit must not fail on it."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError:
        pass


def emit(text: str) -> None:
    """Print to stdout; a reader that went away (``| head``) does not stop the run."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        silence_stdout()


def one_line(text: str, limit: int = 500) -> str:
    """``text`` as one printable line of at most ``limit`` characters (a reason on stderr)."""
    from bnspec.isolation.proxy import printable

    text = printable(" ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."
