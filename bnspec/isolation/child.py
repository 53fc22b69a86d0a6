"""The child process: load the candidate, then answer operations until told to stop.

Started by :class:`bnspec.isolation.proxy.CandidateProcess`: forked by the fork server
(:mod:`bnspec.isolation.forkserver`), which then calls :func:`main`, or where there is
none as ``python -m bnspec.isolation.child FD CONFIG_JSON``; either way with stdout/stderr
sent to a log file. FD is a private socket: what the candidate prints never reaches it.

The child ends with ``os._exit``: no interpreter teardown (fast, and no candidate
``atexit`` hook or ``__del__`` runs after the last answer). Exit status 0 after the
parent's "exit", 3 when the connection to the parent was lost (for example because the
candidate closed or wrote into the socket); the parent reports how the process ended.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback

from bnspec.isolation.wire import WireError, decode, dumps, encode, loads, recv_message, send_message

OPS = ("signature", "discover", "set_option", "construct", "release", "describe", "set_training", "set_attr", "set_state", "reset",
       "state_dict", "load_state_dict", "forward", "double_backward", "time_forward")
EXIT_LOST, EXIT_INTERNAL = 3, 4


def _log(text: str) -> None:
    try:
        os.write(2, (text.rstrip() + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


def _text(fn, default: str) -> str:
    """``fn()`` as a str; a hostile ``__str__`` or ``__qualname__`` gives ``default``."""
    try:
        value = fn()
        return value if type(value) is str else default
    except BaseException:  # noqa: BLE001 - candidate code
        return default


def _raised(exc: BaseException, op: str) -> dict:
    mro = getattr(type(exc), "__mro__", ())
    return {"raised": {
        "type": _text(lambda: type(exc).__qualname__, "<unnamed>"),
        "mro": [_text(lambda c=c: c.__qualname__, "<unnamed>") for c in mro],
        "message": _text(lambda: str(exc), "<unprintable>")[:4000],
        "op": op,
    }}


def _unsendable(exc: BaseException, op: str) -> dict:
    """The candidate's result could not be encoded: reported like a wrong output."""
    why = _text(lambda: str(exc), "<unprintable>")
    return {"raised": {"type": "WrongOutput", "mro": ["WrongOutput", "Exception", "BaseException", "object"],
                       "message": f"the result could not be sent back: {why}"[:4000], "op": op}}


def _versions(target: str) -> dict:
    """The versions the candidate runs with, as its own process sees them (recorded in
    the results): torch, a built-in's framework, a module target's distribution."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from bnspec.candidates.targets import BUILTINS

    out = {"torch": torch.__version__}
    builtin = BUILTINS.get(target)
    path = target.rpartition(":")[0]
    dist = builtin.extra if builtin is not None else (
        path.split(".")[0] if path and not path.endswith(".py") and path.split(".")[0].isidentifier() else "")
    if dist:
        try:
            out["framework" if builtin is not None else "candidate"] = f"{dist} {version(dist)}"
        except (PackageNotFoundError, ValueError):
            v = getattr(sys.modules.get(dist), "__version__", None)
            if isinstance(v, str):
                out["framework" if builtin is not None else "candidate"] = f"{dist} {v}"
    return out


def _warm_up() -> None:
    """Pay torch's one-time lazy set-up while loading, so it does not eat into the first
    call's time limit: ``autograd.grad`` with explicit output gradients imports
    ``torch.fx``'s symbolic shapes (and sympy) on first use, about 0.5-1.5 s."""
    import torch

    a = torch.ones(2, 3, requires_grad=True)
    y = a * a
    (g,) = torch.autograd.grad(y, a, torch.ones_like(y), create_graph=True)
    g.sum().backward()


def serve(sock: socket.socket, config: dict) -> None:
    from bnspec.candidates.targets import UnusableTarget, capabilities_of, load_adapter, native_of

    _warm_up()
    try:
        adapter = load_adapter(config["target"], dims=config["dims"], device=config["device"])
        hello = {"hello": {"capabilities": capabilities_of(adapter).to_dict(),
                           "dims": sorted(getattr(adapter, "factories", {config["dims"]: None})),
                           "native": native_of(adapter),
                           "versions": _versions(config["target"])}}
        hello = {"hello": encode(hello["hello"])}
    except UnusableTarget as exc:
        hello = {"unusable": _text(lambda: str(exc), "<unprintable>")}
    except BaseException as exc:  # importing the candidate ran its code
        hello = {"unusable": f"loading {config['target']!r} raised {_text(lambda: type(exc).__name__, '?')}: "
                             f"{_text(lambda: str(exc), '<unprintable>')}"}
    send_message(sock, dumps(hello))
    if "unusable" in hello:
        return
    while True:
        try:
            msg = loads(recv_message(sock))
        except EOFError:
            return
        op = msg.get("op") if isinstance(msg, dict) else None
        if op == "exit":
            return
        if op not in OPS:
            reply = _raised(ValueError(f"unknown op {op!r}"), str(op))
        else:
            try:
                result = getattr(adapter, op)(**decode(msg.get("args", {})))
            except BaseException as exc:  # SystemExit and KeyboardInterrupt from a candidate too
                reply = _raised(exc, op)
            else:
                try:
                    reply = {"ok": encode(result)}
                except BaseException as exc:  # noqa: BLE001 - e.g. a meta tensor, a non-tensor object
                    reply = _unsendable(exc, op)
        try:
            data = dumps(reply)
        except BaseException as exc:  # noqa: BLE001
            data = dumps(_unsendable(exc, op))
        send_message(sock, data)


def main(argv: list[str]) -> None:
    code = 0
    try:
        sock = socket.socket(fileno=int(argv[1]))
        serve(sock, json.loads(argv[2]))
    except (OSError, EOFError, WireError) as exc:
        _log(f"bnspec child: lost the connection to the suite: {type(exc).__name__}: {exc}")
        code = EXIT_LOST
    except BaseException:  # noqa: BLE001 - a bug in the child itself: say so in the log
        _log("bnspec child: internal error\n" + traceback.format_exc())
        code = EXIT_INTERNAL
    finally:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - the candidate may have replaced or closed them
                pass
        os._exit(code)


if __name__ == "__main__":
    main(sys.argv)
