"""Parent side: start the candidate's child process and call it with a time limit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection

from bnspec.isolation.wire import WireError, decode, dumps, encode, loads

#: After this many crashes or hangs the candidate is not restarted again.
MAX_FATAL = 3


class CandidateError(Exception):
    """Something the candidate did; ``reason`` is one line for tables."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CandidateRaised(CandidateError):
    """The candidate raised an exception (its type name, MRO names and message)."""

    def __init__(self, type_name: str, mro: list[str], message: str, op: str) -> None:
        first = message.strip().splitlines()[0] if message.strip() else ""
        super().__init__(f"{op} raised {type_name}: {first}"[:300])
        self.type_name, self.mro, self.message, self.op = type_name, mro, message, op

    def is_a(self, name: str) -> bool:
        return name in self.mro


class CandidateTimeout(CandidateError):
    """The candidate did not answer within the time limit (a hang, or too slow)."""


class CandidateCrashed(CandidateError):
    """The candidate's process ended (crash, signal, os._exit, sys.exit) or spoke garbage."""


class TargetUnusable(CandidateError):
    """The target cannot be loaded at all (exit status 2 for the CLI)."""


class CandidateProcess:
    """One candidate in one child process; :meth:`call` runs an operation there.

    After a crash or a hang the process is "down": every call fails fast with the same
    reason until :meth:`revive` starts a new one (the suite does that between tests), at
    most :data:`MAX_FATAL` times.
    """

    def __init__(self, target: str, *, dims: int = 2, device: str = "cpu",
                 timeout: float = 20.0, startup_timeout: float = 120.0) -> None:
        self.target, self.dims, self.device = target, dims, device
        self.timeout, self.startup_timeout = timeout, startup_timeout
        self.proc: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.down: CandidateError | None = None
        self.fatal = 0
        self.hello: dict = {}
        self._log = tempfile.NamedTemporaryFile(prefix="bnspec-candidate-", suffix=".log", delete=False)
        self._log.close()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> dict:
        parent_sock, child_sock = socket.socketpair()
        config = json.dumps({"target": self.target, "dims": self.dims, "device": self.device})
        with open(self._log.name, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bnspec.isolation.child", str(child_sock.fileno()), config],
                pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )
        child_sock.close()
        self.conn = Connection(os.dup(parent_sock.fileno()))
        parent_sock.close()
        reply = self._receive(self.startup_timeout, "loading the candidate")
        if "unusable" in reply:
            self.close()
            raise TargetUnusable(str(reply["unusable"]))
        self.hello = reply.get("hello", {})
        self.down = None
        return self.hello

    def revive(self) -> None:
        """Start a fresh child after a crash or hang (no-op when up or given up)."""
        if self.down is not None and self.fatal < MAX_FATAL:
            self.close()
            self.start()

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.send_bytes(dumps({"op": "exit"}))
            except OSError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._kill()
        if self.conn is not None:
            self.conn.close()
        self.proc, self.conn = None, None

    def _kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def output_tail(self, limit: int = 1500) -> str:
        """The end of what the candidate printed (stdout and stderr together)."""
        try:
            with open(self._log.name, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - limit))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def __del__(self) -> None:
        try:
            self.close()
            os.unlink(self._log.name)
        except Exception:
            pass

    # -- calls ----------------------------------------------------------------------------
    def call(self, op: str, **args):
        """Run ``op`` in the child; return its decoded result or raise a CandidateError."""
        if self.down is not None:
            raise type(self.down)(self.down.reason + " (earlier in this check; not retried)")
        if self.proc is None:
            self.start()
        try:
            self.conn.send_bytes(dumps({"op": op, "args": encode(args)}))
        except OSError:
            return self._fail(CandidateCrashed(self._ended(f"{op}: the candidate process had already ended")))
        reply = self._receive(self.timeout, op)
        if "raised" in reply:
            r = reply["raised"]
            raise CandidateRaised(str(r.get("type")), list(r.get("mro", [])), str(r.get("message")), op)
        return decode(reply["ok"])

    def _receive(self, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill()
                self._fail(CandidateTimeout(f"{what}: no answer within {timeout:g} s (hang or too slow); process killed"))
            try:
                if self.conn.poll(min(remaining, 0.5)):
                    reply = loads(self.conn.recv_bytes())
                    if not isinstance(reply, dict) or not ({"ok", "raised", "hello", "unusable"} & set(reply)):
                        raise WireError("unexpected message shape")
                    return reply
            except (EOFError, OSError):
                self._fail(CandidateCrashed(self._ended(f"{what}: the candidate process ended")))
            except WireError as exc:
                self._kill()
                self._fail(CandidateCrashed(f"{what}: unreadable reply from the candidate process ({exc})"))
            if self.proc.poll() is not None and not self.conn.poll(0):
                self._fail(CandidateCrashed(self._ended(f"{what}: the candidate process ended")))

    def _ended(self, what: str) -> str:
        code = self.proc.wait(timeout=10) if self.proc is not None else None
        how = (f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exit status {code}")
        tail = self.output_tail(300).strip().splitlines()
        last = f"; last output: {tail[-1][:200]}" if tail else ""
        return f"{what} ({how}){last}"

    def _fail(self, err: CandidateError):
        if self.down is None:
            self.fatal += 1
        self.down = err
        raise err
