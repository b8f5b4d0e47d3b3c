"""Where records go: the gate, the environment variables of DESIGN.md, the embedded collector.

- gate variable (default `TENSORTAP`): "1" turns capture on; anything else leaves no trace.
- `TENSORTAP_ENDPOINT`: collector to push to; unset: start an embedded collector subprocess.
- `TENSORTAP_OUT`: artifact root (default `.artifacts/debug_fno_loss`).
- `TENSORTAP_RUN`: run id (default: timestamp plus a short random suffix).
- `TENSORTAP_CURVE_SERVER_KEY` (the collector's .pub file or its Z85 key) and
  `TENSORTAP_CURVE_CLIENT_KEY` (this client's .key file from `tensortap keys`): for a
  CURVE-authenticated remote collector.

Resolving writes the run id and endpoint back into os.environ so that processes started
later (DDP ranks launched by Lightning, dataloader workers) join the same run and collector.
"""
from __future__ import annotations

import atexit
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

DEFAULT_GATE = "TENSORTAP"
DEFAULT_OUT = ".artifacts/debug_fno_loss"


def enabled(gate: str = DEFAULT_GATE) -> bool:
    """True only when the gate variable is exactly "1"."""
    return os.environ.get(gate) == "1"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


@dataclass
class Session:
    run: str
    endpoint: str
    out: str
    dashboard: Optional[str] = None


_lock = threading.Lock()
_embedded: Optional[subprocess.Popen] = None
_senders: dict = {}


def resolve(run: Optional[str] = None) -> Session:
    """Effective run id, endpoint and artifact root; starts the embedded collector if needed."""
    out = os.environ.setdefault("TENSORTAP_OUT", DEFAULT_OUT)
    run = run or os.environ.get("TENSORTAP_RUN") or new_run_id()
    os.environ.setdefault("TENSORTAP_RUN", run)
    endpoint = os.environ.get("TENSORTAP_ENDPOINT")
    dashboard = os.environ.get("TENSORTAP_DASHBOARD")
    if not endpoint:
        endpoint, dashboard = start_embedded(out)
        os.environ["TENSORTAP_ENDPOINT"] = endpoint
        os.environ["TENSORTAP_DASHBOARD"] = dashboard or ""
    return Session(run=run, endpoint=endpoint, out=out, dashboard=dashboard)


def start_embedded(out: str, timeout: float = 30.0) -> tuple[str, Optional[str]]:
    """Start `tensortap collect` on loopback with free ports; return (zmq endpoint, http url).

    The collector writes a ready file with its bound addresses; we wait for it (bounded)."""
    global _embedded
    with _lock:
        fd, ready = tempfile.mkstemp(prefix="tensortap-ready-", suffix=".json")
        os.close(fd)
        os.unlink(ready)
        cmd = [sys.executable, "-m", "collector", "collect", "--zmq", "tcp://127.0.0.1:0",
               "--http", "127.0.0.1:0", "--out", out, "--ready-file", ready, "--embedded"]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not os.path.exists(ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("tensortap: the embedded collector did not start; "
                                   "set TENSORTAP_ENDPOINT to a running `tensortap collect`")
            time.sleep(0.05)
        with open(ready) as f:
            info = json.load(f)
        os.unlink(ready)
        _embedded = proc
        atexit.register(stop_embedded)
        print(f"tensortap: artifacts in {os.path.abspath(out)}; dashboard at {info.get('http')}",
              file=sys.stderr, flush=True)
        return info["zmq"], info.get("http")


def stop_embedded(timeout: float = 5.0) -> None:
    """Close our senders (bye), then ask the embedded collector to drain and exit."""
    global _embedded
    for s in list(_senders.values()):
        s.close()
    proc, _embedded = _embedded, None
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()  # SIGTERM: stop accepting, drain, flush, fsync, exit
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def open_sender(run: Optional[str] = None, rank: int = 0, world: int = 1, **kw):
    """The process-wide sender for a run (one per process, so (run, rank, seq) is unique)."""
    from client_hooks.sender import Sender

    session = resolve(run)
    kw = {**curve_options(), **kw}
    key = (session.run, session.endpoint, rank)
    with _lock:
        s = _senders.get(key)
        if s is None or s._closed:
            s = Sender(session.endpoint, session.run, rank=rank, world=world, **kw)
            _senders[key] = s
    return s


def curve_options() -> dict:
    """Sender keyword arguments for CURVE, from the environment (empty when not set)."""
    server = os.environ.get("TENSORTAP_CURVE_SERVER_KEY")
    if not server:
        return {}
    if os.path.exists(server):
        with open(server, "rb") as f:
            server_key = f.read().strip()
    else:
        server_key = server.encode()
    opts = {"curve_server_key": server_key}
    client = os.environ.get("TENSORTAP_CURVE_CLIENT_KEY")
    if client:
        from collector.security import read_keypair
        opts["curve_keypair"] = read_keypair(client)
    return opts
