"""Start a candidate's child process: forked by the fork server, or a fresh interpreter.

Both kinds of handle have what the proxy uses: ``pid``, :meth:`exited` (the exit code
once the process ended, without reaping it, so its pid, the process group id, cannot be
reused before the group is killed) and :meth:`kill_group` (SIGKILL the group, then reap).

The fork server (:mod:`bnspec.isolation.forkserver`) is used on Linux. One runs per
working directory and environment (as they are when a child starts, so a child sees what
a fresh interpreter would; a change starts another server), started on first use and
stopped when the suite's process exits. Where it cannot start, each child is a fresh
``python -m bnspec.isolation.child``, as before the server existed.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from bnspec.isolation.forkserver import MAX_MESSAGE, peek_exit

#: Seconds the fork server may take to start (import torch) before children are started
#: without it; the candidate's own start-up limit counts from the fork.
SERVER_START_TIMEOUT = 120.0
#: Set to "0" in the environment to start every child as a fresh interpreter.
FORKSERVER_ENV = "BNSPEC_FORKSERVER"
#: Variables that change from test to test (pytest sets the first): a change does not
#: start a new server; the child gets them from the fork request instead.
VOLATILE_ENV = ("PYTEST_CURRENT_TEST",)


class PopenChild:
    """A child started as a fresh interpreter (this process is its parent)."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.pid = popen.pid

    def exited(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the end; the exit code, or None (not reaped)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.returncode is not None:
                return self.popen.returncode
            try:
                code = peek_exit(self.pid)
            except (AttributeError, ChildProcessError, OSError):  # no waitid: reap it
                try:
                    return self.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    return None
            if code is not None or time.monotonic() >= deadline:
                return code
            time.sleep(0.01)

    def kill_group(self) -> None:
        """SIGKILL the child's process group (the child and what it started), then reap it."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.popen.kill()
        except OSError:
            pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class ForkedChild:
    """A child the fork server forked (the server is its parent and waits on it)."""

    def __init__(self, server: "ForkServer", pid: int) -> None:
        self.server, self.pid = server, pid
        self.code: int | None = None
        self.killed = False

    def exited(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.code is None and not self.killed:
            self.code = self.server.request({"op": "status", "pid": self.pid}).get("code")
            if self.code is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        return self.code

    def kill_group(self) -> None:
        if self.killed:
            return
        self.killed = True
        reply = self.server.request({"op": "kill", "pid": self.pid})
        if "code" in reply:
            self.code = reply["code"] if self.code is None else self.code
        else:  # no answer (the server is gone, or busy with this thread): kill the group from here
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass


class ForkServer:
    """The suite's end of one fork server; requests are answered one at a time."""

    def __init__(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "bnspec.isolation.forkserver", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)
        finally:
            theirs.close()
        self.conn = mine
        self.lock = threading.Lock()
        self.owner: int | None = None  #: the thread waiting for an answer
        mine.settimeout(SERVER_START_TIMEOUT)
        try:
            ready = json.loads(mine.recv(MAX_MESSAGE) or b"{}")
        except (OSError, ValueError):
            ready = {}
        if "ready" not in ready:
            self.close()
            raise OSError("the fork server did not start")
        mine.settimeout(None)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def fork(self, sock: socket.socket, log_fd: int, config: dict) -> ForkedChild:
        reply = self.request({"op": "fork", "config": config, "environ": dict(os.environ)},
                             fds=(sock.fileno(), log_fd))
        if "pid" not in reply:
            raise OSError(f"the fork server did not start the candidate: {reply}")
        return ForkedChild(self, reply["pid"])

    def request(self, message: dict, fds: tuple[int, ...] = ()) -> dict:
        """The server's answer to ``message``; ``{}`` when the server is gone, or when this
        thread is already waiting for an answer (a ``CandidateProcess.__del__`` run by the
        garbage collector inside a request: its answer would be read as the other's)."""
        if self.owner == threading.get_ident():
            return {}
        with self.lock:
            self.owner = threading.get_ident()
            try:
                socket.send_fds(self.conn, [json.dumps(message).encode()], list(fds))
                return json.loads(self.conn.recv(MAX_MESSAGE) or b"{}")
            except (OSError, ValueError):
                return {}
            finally:
                self.owner = None

    def close(self) -> None:
        """Close our end: the server kills its remaining children and exits."""
        self.conn.close()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


_servers: dict[tuple, ForkServer] = {}
_servers_lock = threading.Lock()
_broken: set[tuple] = set()  #: keys whose server could not start: fresh interpreters there


def _server() -> ForkServer | None:
    """The running fork server for this working directory and environment, started if needed."""
    if not sys.platform.startswith("linux") or os.environ.get(FORKSERVER_ENV) == "0":
        return None
    key = (os.getcwd(), sys.executable,
           tuple(sorted((k, v) for k, v in os.environ.items() if k not in VOLATILE_ENV)))
    with _servers_lock:
        server = _servers.get(key)
        if server is not None and not server.alive():
            del _servers[key]
            server = None
        if server is None and key not in _broken:
            try:
                server = _servers[key] = ForkServer()
            except OSError:
                _broken.add(key)
        return server


@atexit.register
def stop_servers() -> None:
    """Stop this process' fork servers (they kill the children they still have). Their
    children's CPU time is then counted in this process' ``RUSAGE_CHILDREN``."""
    with _servers_lock:
        for server in _servers.values():
            server.close()
        _servers.clear()


def start_child(sock: socket.socket, log_fd: int, config: dict) -> PopenChild | ForkedChild:
    """Start the child process for ``config`` (target, dims, device), talking over ``sock``
    and writing its stdout and stderr to ``log_fd``. OSError when it cannot be started."""
    server = _server()
    if server is not None:
        try:
            return server.fork(sock, log_fd, config)
        except OSError:
            pass  # e.g. the server died just now: a fresh interpreter instead
    popen = subprocess.Popen(
        [sys.executable, "-m", "bnspec.isolation.child", str(sock.fileno()), json.dumps(config)],
        pass_fds=(sock.fileno(),), stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
        start_new_session=True)
    return PopenChild(popen)
