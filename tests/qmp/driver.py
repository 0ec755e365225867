#!/usr/bin/env python3
"""A thin, line-oriented driver over the qemu.qmp library, for vublk's control-plane tests.

The tests (Rust) start this script and write one JSON object per line to its stdin; it answers
each with one JSON line on stdout. All QMP framing, capability negotiation, id matching and
event parsing is done by qemu.qmp (the independent client): this script only maps requests to
its API and opens the files whose fds it passes with send_fd_scm.

Requests:
  {"op": "connect", "path": P}
  {"op": "execute", "cmd": C, "args": {...}, "fd": {"path": P, "mode": "ro"|"rw"|"rw-direct"}}
  {"op": "events", "names": [N, ...], "timeout": S}   -> the events seen (waits for each name)
  {"op": "greeting"}                                  -> the server's greeting
  {"op": "disconnect"}
Answers: {"ok": true, "return": R} | {"ok": false, "class": C, "desc": D} | {"ok": false, "error": E}
"""

import asyncio
import json
import os
import sys

from qemu.qmp import ExecuteError, QMPClient

MODES = {
    "ro": os.O_RDONLY,
    "rw": os.O_RDWR,
    "rw-direct": os.O_RDWR | os.O_DIRECT,
    "ro-direct": os.O_RDONLY | os.O_DIRECT,
}


async def main():
    qmp = QMPClient("vublk-test")
    listener = None
    loop = asyncio.get_running_loop()

    def answer(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    while True:
        # Blocking reads in a worker thread: stdin may be a pipe or a file.
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "connect":
                await qmp.connect(req["path"])
                listener = qmp.events
                answer({"ok": True, "return": {}})
            elif op == "greeting":
                answer({"ok": True, "return": qmp.greeting._raw})
            elif op == "execute":
                fd = None
                spec = req.get("fd")
                if spec:
                    fd = os.open(spec["path"], MODES[spec["mode"]])
                    qmp.send_fd_scm(fd)
                    os.close(fd)
                try:
                    ret = await qmp.execute(req["cmd"], req.get("args") or {})
                    answer({"ok": True, "return": ret})
                except ExecuteError as e:
                    answer({"ok": False, "class": e.error.error.class_, "desc": e.error.error.desc})
            elif op == "events":
                want = list(req["names"])
                deadline = loop.time() + float(req.get("timeout", 5))
                got = []
                while want:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        ev = await asyncio.wait_for(listener.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                    got.append({"event": ev["event"], "data": ev.get("data")})
                    if ev["event"] in want:
                        want.remove(ev["event"])
                answer({"ok": not want, "return": got, "missing": want})
            elif op == "disconnect":
                await qmp.disconnect()
                answer({"ok": True, "return": {}})
                break
            else:
                answer({"ok": False, "error": f"unknown op {op}"})
        except Exception as e:  # noqa: BLE001 - every failure is reported to the test
            answer({"ok": False, "error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    asyncio.run(main())
