"""The child process: load the candidate, then answer operations until told to stop.

Started by :class:`bnspec.isolation.proxy.CandidateProcess` as
``python -m bnspec.isolation.child FD CONFIG_JSON`` with stdout/stderr sent to a log
file. FD is a private socket: what the candidate prints never reaches it.
"""

from __future__ import annotations

import json
import sys
from multiprocessing.connection import Connection

from bnspec.isolation.wire import decode, dumps, encode, loads

OPS = ("signature", "construct", "release", "describe", "set_training", "set_attr", "set_state", "reset",
       "state_dict", "load_state_dict", "forward", "double_backward")


def _raised(exc: BaseException, op: str) -> dict:
    try:
        message = str(exc)
    except Exception:  # a hostile __str__
        message = "<unprintable>"
    return {"raised": {
        "type": type(exc).__qualname__,
        "mro": [c.__qualname__ for c in type(exc).__mro__],
        "message": message[:4000],
        "op": op,
    }}


def serve(conn: Connection, config: dict) -> None:
    from bnspec.candidates.targets import UnusableTarget, capabilities_of, load_adapter

    try:
        adapter = load_adapter(config["target"], dims=config["dims"], device=config["device"])
        hello = {"hello": {"capabilities": capabilities_of(adapter).to_dict(),
                           "dims": sorted(getattr(adapter, "factories", {config["dims"]: None}))}}
    except UnusableTarget as exc:
        hello = {"unusable": str(exc)}
    except BaseException as exc:  # importing the candidate ran its code
        hello = {"unusable": f"loading {config['target']!r} raised {type(exc).__name__}: {exc}"}
    conn.send_bytes(dumps(hello))
    if "unusable" in hello:
        return
    while True:
        try:
            msg = loads(conn.recv_bytes())
        except EOFError:
            return
        op = msg.get("op")
        if op == "exit":
            return
        if op not in OPS:
            conn.send_bytes(dumps(_raised(ValueError(f"unknown op {op!r}"), str(op))))
            continue
        try:
            result = getattr(adapter, op)(**decode(msg.get("args", {})))
            reply = dumps({"ok": encode(result)})
        except BaseException as exc:  # SystemExit and KeyboardInterrupt from a candidate too
            reply = dumps(_raised(exc, op))
        conn.send_bytes(reply)


def main(argv: list[str]) -> None:
    conn = Connection(int(argv[1]))
    serve(conn, json.loads(argv[2]))
    conn.close()


if __name__ == "__main__":
    main(sys.argv)
