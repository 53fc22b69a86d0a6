"""Parent side: start the candidate's child process and call it with a time limit.

Whatever the candidate does ends as a :class:`CandidateError` with a one-line reason:

* it raises -> :class:`CandidateRaised` (the process stays up);
* it does not answer within the per-call limit, or the whole check's time budget runs
  out -> :class:`CandidateTimeout`, the process group is killed;
* its process ends (signal, ``os._exit``, lost socket) or it writes something that is
  not a bnspec frame into the socket -> :class:`CandidateCrashed`, the group is killed.

After a crash or hang the process is "down": every call fails fast with the same reason
(so hypothesis' shrinking after a crash costs nothing) until :meth:`revive` starts a new
one, at most :data:`MAX_FATAL` times in all. All candidate errors are raised from one
line with no exception context, so hypothesis counts a crash and its fast replays as one
failure, not several "distinct" ones.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time

from bnspec.isolation.launch import ForkedChild, PopenChild, start_child
from bnspec.isolation.wire import WireError, decode, dumps, encode, loads, recv_message, send_message, wait_readable
from bnspec.options import DEFAULT_STARTUP_TIMEOUT as STARTUP_TIMEOUT  # the child's import and load
from bnspec.options import DEFAULT_TIMEOUT

#: After this many crashes or hangs the candidate is not restarted again.
MAX_FATAL = 3
#: What a call made after the candidate was given up says (its clause was never run).
NOT_RETRIED = " (earlier in this check; not retried)"


def printable(text: str, *, newlines: bool = False) -> str:
    """``text`` with control characters escaped (``\\x1b``, ``\\r``), so what a candidate
    says cannot move the cursor, clear a line or start a new line in bnspec's output."""
    keep = "\n" if newlines else ""
    return "".join(ch if ch.isprintable() or ch in keep else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)


class CandidateError(Exception):
    """Something the candidate did; ``reason`` is one line for tables."""

    def __init__(self, reason: str) -> None:
        reason = printable(reason)
        super().__init__(reason)
        self.reason = reason

    def again(self) -> "CandidateError":
        """The same failure, for a call made after it (the process is down)."""
        err = CandidateError.__new__(type(self))
        CandidateError.__init__(err, self.reason if self.reason.endswith(NOT_RETRIED) else self.reason + NOT_RETRIED)
        return err


class CandidateRaised(CandidateError):
    """The candidate raised an exception (its type name, MRO names and message).

    ``WrongOutput`` is the adapter's report that a result is not a tensor (or cannot be
    sent back); its reason says what was returned, not "raised".
    """

    def __init__(self, type_name: str, mro: list[str], message: str, op: str) -> None:
        first = message.strip().splitlines()[0] if message.strip() else ""
        if type_name == "WrongOutput" and "WrongOutput" in mro:
            reason = first if first.startswith(op) else f"{op}: {first}"
        else:
            reason = f"{op} raised {type_name}: {first}"
        super().__init__(reason[:300])
        self.type_name, self.mro, self.message, self.op = type_name, mro, message, op

    def is_a(self, name: str) -> bool:
        return name in self.mro


class CandidateTimeout(CandidateError):
    """The candidate did not answer within the time limit (a hang, or too slow)."""


class CandidateCrashed(CandidateError):
    """The candidate's process ended (crash, signal, os._exit, sys.exit) or spoke garbage."""


class TargetUnusable(CandidateError):
    """The target cannot be loaded at all (exit status 2 for the CLI)."""


def _raise(err: CandidateError):
    raise err  # the one raise site of every CandidateError (see the module docstring)


class CandidateProcess:
    """One candidate in one child process; :meth:`call` runs an operation there.

    ``timeout`` bounds each call, ``startup_timeout`` each start; ``budget`` (seconds,
    None = no limit) bounds the time spent waiting for the candidate's answers over the
    whole check: when it runs out the process is killed and not restarted. Starts are
    not counted (each has its own limit, and there are at most ``MAX_FATAL + 1``), so a
    check waits at most ``budget + timeout + (MAX_FATAL + 1) * startup_timeout``.
    """

    def __init__(self, target: str, *, dims: int = 2, device: str = "cpu",
                 timeout: float = DEFAULT_TIMEOUT, startup_timeout: float = STARTUP_TIMEOUT,
                 budget: float | None = None) -> None:
        self.target, self.dims, self.device = target, dims, device
        self.timeout, self.startup_timeout, self.budget = timeout, startup_timeout, budget
        self.proc: PopenChild | ForkedChild | None = None
        self.sock: socket.socket | None = None
        self.down: CandidateError | None = None
        self.fatal = 0
        self.used = 0.0  #: seconds spent waiting for the candidate's answers to calls
        self.hello: dict = {}
        self.contracts: dict = {}  #: rank family -> what the candidate was found to have (bnspec.runner.discover)
        self.log_path: str | None = None  #: the child's stdout and stderr, while it runs

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> dict:
        """Start (or restart) the child and load the candidate; its hello message."""
        self.close()
        self.down = None
        fd, self.log_path = tempfile.mkstemp(prefix="bnspec-candidate-", suffix=".log")
        os.close(fd)
        parent_sock, child_sock = socket.socketpair()
        try:
            with open(self.log_path, "ab") as log:
                self.proc = start_child(child_sock, log.fileno(),
                                        {"target": self.target, "dims": self.dims, "device": self.device})
        except OSError as exc:
            parent_sock.close()
            self._fail(CandidateCrashed(f"the candidate process could not be started: {exc}"))
        finally:
            child_sock.close()
        self.sock = parent_sock
        reply = self._receive(self.startup_timeout, "loading the candidate", ("hello", "unusable"), budgeted=False)
        if "unusable" in reply:
            self.close()
            err = TargetUnusable(str(reply["unusable"]))
            self.fatal += 1
            self.down = err
            _raise(err)
        self.hello = reply["hello"] if isinstance(reply["hello"], dict) else {}
        return self.hello

    @property
    def given_up(self) -> bool:
        """Down after MAX_FATAL crashes or hangs: no call reaches the candidate any more."""
        return self.down is not None and self.fatal >= MAX_FATAL

    def revive(self) -> None:
        """Start a fresh child after a crash or hang (no-op when up or given up).

        A failed restart leaves the process down with the new reason: the next call fails
        with it (a verdict), instead of an error in the suite's set-up.
        """
        if self.down is not None and self.fatal < MAX_FATAL:
            try:
                self.start()
            except CandidateError:
                pass

    def close(self) -> None:
        """Ask the child to exit, then kill what is left of its process group; remove its log."""
        proc, sock, log = self.proc, self.sock, self.log_path
        self.proc, self.sock, self.log_path = None, None, None
        if proc is not None and sock is not None and proc.exited(0) is None:
            try:
                send_message(sock, dumps({"op": "exit"}), timeout=1.0)
            except OSError:
                pass
        if proc is not None:
            proc.exited(2.0)
            proc.kill_group()
        if sock is not None:
            sock.close()
        if log is not None:
            try:
                os.unlink(log)
            except OSError:
                pass

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill_group()

    def output_tail(self, limit: int = 1500) -> str:
        """The end of what the candidate printed (stdout and stderr together)."""
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - limit))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- calls ----------------------------------------------------------------------------
    def call(self, op: str, **args):
        """Run ``op`` in the child; return its decoded result or raise a CandidateError."""
        if self.down is not None:
            _raise(self.down.again())
        if self.proc is None:
            self.start()
        err = None
        try:
            send_message(self.sock, dumps({"op": op, "args": encode(args)}), timeout=self.timeout)
        except TimeoutError:
            err = CandidateTimeout(f"{op}: the candidate process did not read its input within {self.timeout:g} s; "
                                   "process killed")
        except OSError:
            err = CandidateCrashed(self._ended(f"{op}: the candidate process had already ended"))
        if err is not None:
            self._fail(err)
        reply = self._receive(self.timeout, op, ("ok", "raised"))
        if "raised" in reply:
            r = reply["raised"] if isinstance(reply["raised"], dict) else {}
            mro = r.get("mro") if isinstance(r.get("mro"), list) else []
            _raise(CandidateRaised(str(r.get("type")), [str(m) for m in mro], str(r.get("message")), op))
        try:
            return decode(reply["ok"])
        except (WireError, RecursionError, ValueError, TypeError, RuntimeError) as exc:
            err = CandidateCrashed(f"{op}: unreadable reply: {type(exc).__name__}: {exc}")
        self._fail(err)

    def _receive(self, timeout: float, what: str, expect: tuple[str, ...], *, budgeted: bool = True) -> dict:
        """The next message, within ``timeout`` (and, for calls, what is left of the budget)."""
        start = time.monotonic()
        limit, by_budget = timeout, False
        if budgeted and self.budget is not None and self.budget - self.used < timeout:
            limit, by_budget = max(0.0, self.budget - self.used), True
        deadline = start + limit
        err: CandidateError | None = None
        reply = None
        try:
            while err is None and reply is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    err = self._timed_out(what, timeout, by_budget)
                    break
                try:
                    if wait_readable(self.sock, min(remaining, 0.25)):
                        reply = loads(recv_message(self.sock, deadline=deadline))
                        if not isinstance(reply, dict) or len(reply) != 1 or next(iter(reply)) not in expect:
                            raise WireError(f"unexpected message (expected one of {', '.join(expect)})")
                        break
                except TimeoutError:  # a partial message, then silence
                    err = self._timed_out(what, timeout, by_budget)
                except (EOFError, OSError):
                    err = CandidateCrashed(self._ended(f"{what}: the candidate process ended"))
                except WireError as exc:
                    err = CandidateCrashed(f"{what}: unreadable reply: {exc}")
                if err is None and self.proc.exited(0) is not None and not wait_readable(self.sock, 0):
                    err = CandidateCrashed(self._ended(f"{what}: the candidate process ended"))
        finally:
            if budgeted:
                self.used += time.monotonic() - start
        if err is not None:
            self._fail(err)
        return reply

    def _timed_out(self, what: str, timeout: float, by_budget: bool) -> CandidateTimeout:
        if by_budget:
            self.fatal = MAX_FATAL  # never restarted: the budget is spent
            return CandidateTimeout(f"{what}: the time budget of {self.budget:g} s for this candidate ran out "
                                    f"(per-call limit {timeout:g} s); process killed")
        return CandidateTimeout(f"{what}: no answer within {timeout:g} s (hang or too slow); process killed")

    def _ended(self, what: str) -> str:
        """``what`` plus how the process ended and the last line it printed."""
        code = None if self.proc is None else self.proc.exited(1.0)
        if code is None:
            self._kill()
            how = "it closed its end of the connection but kept running; killed"
        elif code < 0:
            try:
                how = f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit status {code}"
        tail = [ln for ln in self.output_tail(400).strip().splitlines() if ln.strip()]
        last = f"; last output: {tail[-1].strip()[:200]}" if tail else ""
        return f"{what} ({how}){last}"

    def _fail(self, err: CandidateError):
        self._kill()
        if self.down is None:
            self.fatal += 1
        self.down = err
        _raise(err)

