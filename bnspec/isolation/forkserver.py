"""The fork server: candidate processes forked from an interpreter that has imported torch.

A fresh ``python -m bnspec.isolation.child`` per candidate pays for starting Python and
importing torch every time (about 1.5 s of CPU); a check starts one per candidate and
again after each crash or hang. The server pays it once: started as
``python -m bnspec.isolation.forkserver FD`` (FD: a private SOCK_SEQPACKET socket to the
suite) with the suite's working directory and environment, it imports what every child
imports and then forks one child per request. It never runs a tensor operation: a fork of
a process whose torch/OpenMP thread pool has run work can deadlock in the child.

A forked child is what ``python -m bnspec.isolation.child`` would be: its own session and
process group (``setsid``), stdin from /dev/null, stdout and stderr to its log file, no
file descriptor but those and its socket, fresh random seeds, then :func:`child.main`,
which ends with ``os._exit``.

Requests (JSON, one per message; the suite waits for each answer):

* ``{"op": "fork", "config": ..., "environ": ...}`` with the candidate's socket and log
  file attached -> ``{"pid": PID}``;
* ``{"op": "status", "pid": PID}`` -> ``{"code": CODE}``: the exit code (``-N`` for
  signal N), or None while it runs, WITHOUT reaping: the pid (the process group id)
  cannot be reused before the suite has killed the group;
* ``{"op": "kill", "pid": PID}`` -> ``{"code": CODE}``: SIGKILL the process group, then
  reap the child.

When the suite's end of FD closes, the server kills the groups of the children it has not
reaped and exits.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import sys

#: The largest request or answer (a config and the environment; a larger one fails to
#: send, and the child is then started as a fresh interpreter).
MAX_MESSAGE = 1 << 20
#: Modules every child imports: the wire (torch), the adapters' loader, and what
#: ``child._warm_up``'s first ``autograd.grad`` imports (sympy; importing runs no op).
PRELOAD = ("torch", "bnspec.isolation.child", "bnspec.candidates.targets", "bnspec.candidates.builtin",
           "torch.fx.experimental.symbolic_shapes")


def exit_code(info: os.waitid_result | None) -> int | None:
    """A ``waitid`` result as Popen's returncode: the exit status, or -N for signal N."""
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def peek_exit(pid: int) -> int | None:
    """The exit code of child ``pid`` once it ended, None while it runs; does not reap."""
    return exit_code(os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT))


def kill_and_reap(pid: int) -> int | None:
    """SIGKILL the process group of child ``pid`` (it and what it started), then reap it."""
    for kill, target in ((os.killpg, pid), (os.kill, pid)):
        try:
            kill(target, signal.SIGKILL)
        except OSError:  # already gone, or the group is empty
            pass
    try:
        return exit_code(os.waitid(os.P_PID, pid, os.WEXITED))
    except ChildProcessError:
        return None


def _become_candidate(conn: socket.socket, sock_fd: int, log_fd: int, config: dict, environ: dict) -> None:
    """In the forked child: the process ``python -m bnspec.isolation.child`` would be."""
    from bnspec.isolation import child

    code = child.EXIT_INTERNAL
    try:
        os.setsid()
        conn.detach()  # its descriptor is closed below; the object must not close a reused number
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        keep = sorted({0, 1, 2, sock_fd})
        for low, high in zip(keep, keep[1:] + [os.sysconf("SC_OPEN_MAX")]):
            os.closerange(low + 1, high)
        _reseed()
        # Files written since the server started (a candidate's module) must be found as a fresh
        # interpreter finds them: the import system's directory caches are the server's.
        importlib.invalidate_caches()
        os.environ.clear()  # the suite's environment now (it differs in volatile variables only)
        os.environ.update(environ)
        argv = [child.__file__, str(sock_fd), json.dumps(config)]
        sys.argv = argv
        child.main(argv)  # ends with os._exit
    except BaseException:  # noqa: BLE001 - never return into the server's loop
        pass
    os._exit(code)


def _reseed() -> None:
    """Fresh seeds, as a new interpreter draws them (Python's ``random`` reseeds itself
    after a fork; NumPy's global generator, seeded when the server imported it, does not)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _answer(conn: socket.socket, request: dict, fds: list[int], children: set[int]) -> dict:
    op, pid = request.get("op"), request.get("pid")
    if op == "fork" and len(fds) == 2:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _become_candidate(conn, fds[0], fds[1], request["config"], request.get("environ", dict(os.environ)))
        children.add(pid)
        return {"pid": pid}
    if op in ("status", "kill") and pid in children:
        try:
            code = peek_exit(pid) if op == "status" else kill_and_reap(pid)
        except ChildProcessError:
            code = None
        if op == "kill":
            children.discard(pid)
        return {"code": code}
    return {"error": f"bad request {op!r} for pid {pid!r}"}


def serve(conn: socket.socket) -> None:
    """Answer requests until the suite closes its end; then kill what is left."""
    children: set[int] = set()
    conn.sendall(json.dumps({"ready": os.getpid()}).encode())
    try:
        while True:
            data, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, 2)
            if not data:
                break
            try:
                reply = _answer(conn, json.loads(data), fds, children)
            finally:
                for fd in fds:
                    os.close(fd)
            conn.sendall(json.dumps(reply).encode())
    except OSError:
        pass
    finally:
        for pid in children:
            kill_and_reap(pid)


def main(argv: list[str]) -> None:
    conn = socket.socket(fileno=int(argv[1]))
    for name in PRELOAD:
        __import__(name)
    serve(conn)


if __name__ == "__main__":
    main(sys.argv)
