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
A run id this process made up belongs to the Taps and TapCallbacks that use it: once the last
of them has closed, the next one (a notebook cell run again, a second model trained after
the first) starts a new run instead of continuing the finished one's steps from 0 in the same
series. A run id given by the user (`run=`, TENSORTAP_RUN set beforehand, or inherited from
a launcher) is kept for every Tap, and a job of several processes keeps one run.
Ranks started together (torchrun: each has MASTER_ADDR/PORT, RANK and WORLD_SIZE) cannot
inherit them: with no endpoint set, rank 0 starts the embedded collector and announces it
in a file of this host's temporary folder named after the job's MASTER_ADDR:MASTER_PORT; the
other ranks of node 0 wait for it (at most JOIN_WAIT_S) and take its endpoint and run id.
"""
from __future__ import annotations

import atexit
import hashlib
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
JOIN_WAIT_S = 60.0  # a rank > 0 waits this long at most for rank 0's embedded collector


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
_own_run: Optional[str] = None  # the run id this process made up and wrote into TENSORTAP_RUN
_holders = 0  # open Taps and TapCallbacks writing to _own_run


def resolve(run: Optional[str] = None, rank: Optional[int] = None, world: Optional[int] = None,
            fresh: bool = False) -> Session:
    """Effective run id, endpoint and artifact root; starts the embedded collector if needed
    (rank 0 of a job of several processes announces it; the others join it: module docstring).
    rank, world: this process's; None reads RANK and WORLD_SIZE. fresh: for a new Tap or
    TapCallback, which does not continue a run of this process's own making that every
    earlier holder has closed (see `hold`)."""
    global _own_run
    out = os.environ.setdefault("TENSORTAP_OUT", DEFAULT_OUT)
    endpoint = os.environ.get("TENSORTAP_ENDPOINT")
    dashboard = os.environ.get("TENSORTAP_DASHBOARD")
    rank = _env_int("RANK", 0) if rank is None else rank
    world = _env_int("WORLD_SIZE", 1) if world is None else world
    job = job_key() if world > 1 and not endpoint else None
    if job is not None and rank != 0:
        info = join_job(job)
        endpoint, dashboard = info["endpoint"], info.get("dashboard")
        run = run or os.environ.get("TENSORTAP_RUN") or info["run"]
        os.environ["TENSORTAP_ENDPOINT"] = endpoint
        os.environ["TENSORTAP_DASHBOARD"] = dashboard or ""
    current = os.environ.get("TENSORTAP_RUN")
    finished = (fresh and world == 1 and current is not None and current == _own_run and _holders == 0)
    run = run or (None if finished else current) or new_run_id()
    from collector.wire import RUN_ID  # (only with the gate on: msgspec is imported with it)

    if not isinstance(run, str) or not RUN_ID.fullmatch(run):  # (fullmatch: "$" lets "x\n" through)
        raise SetupError(f"run id {run!r} (run= or TENSORTAP_RUN) is not a valid one: 1 to 128 letters, "
                         "digits, '_', '.' or '-', the first a letter or digit; nothing would be recorded")
    if current is None or finished:  # the user's (or a launcher's) run id is never replaced
        os.environ["TENSORTAP_RUN"] = _own_run = run
    if not endpoint:
        if os.path.isfile(out):  # (else the embedded collector would name its own --out option)
            raise SetupError(f"TENSORTAP_OUT={out!r} is a file; the artifact root is a folder")
        from collector.store import make_writable

        try:  # (likewise: the collector's own line named --out, and this one TENSORTAP_ENDPOINT)
            make_writable(out)
        except OSError as e:
            raise SetupError(f"TENSORTAP_OUT={out!r}: cannot write there ({e.strerror or e}); "
                             "give a folder this process can write") from None
        endpoint, dashboard = start_embedded(out)
        os.environ["TENSORTAP_ENDPOINT"] = endpoint
        os.environ["TENSORTAP_DASHBOARD"] = dashboard or ""
        if job is not None:
            announce_job(job, endpoint, dashboard, run)
    return Session(run=run, endpoint=endpoint, out=out, dashboard=dashboard)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def job_key() -> Optional[str]:
    """What every process of one distributed job shares (None outside one): the rendezvous
    address that torchrun and Lightning give each of them. A later job may reuse it, so an
    announcement counts only while the process that wrote it is alive."""
    port = os.environ.get("MASTER_PORT")
    if not port:
        return None
    return f"{os.environ.get('MASTER_ADDR', '')}:{port}:{os.environ.get('TORCHELASTIC_RUN_ID', '')}"


def job_file(job: str) -> str:
    digest = hashlib.sha256(job.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"tensortap-job-{os.getuid()}-{digest}.json")


_announced: Optional[str] = None  # the job file this process wrote (removed at exit)


def announce_job(job: str, endpoint: str, dashboard: Optional[str], run: str) -> None:
    """Rank 0: say where the embedded collector is, for the job's other ranks."""
    global _announced
    path = job_file(job)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"job": job, "pid": os.getpid(), "endpoint": endpoint, "dashboard": dashboard,
                   "run": run}, f)
    os.replace(tmp, path)
    _announced = path


def _read_job(path: str, job: str) -> Optional[dict]:
    """The announcement at `path` if it is this job's and its writer still runs, else None."""
    try:
        with open(path) as f:
            info = json.load(f)
        if info.get("job") != job or not isinstance(info.get("endpoint"), str) or not info.get("run"):
            return None
        pid = int(info["pid"])
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a finished job's (the same address, used again)
    except PermissionError:
        pass  # alive, another user's
    return info


def join_job(job: str, wait_s: Optional[float] = None) -> dict:
    """A rank > 0: rank 0's announcement (waits for it, bounded). RuntimeError (one line)
    when this rank is on another node, or none comes in time."""
    node = os.environ.get("GROUP_RANK") or os.environ.get("NODE_RANK")  # torchrun's, Lightning's
    local, global_ = os.environ.get("LOCAL_RANK"), os.environ.get("RANK")
    if node is not None:
        other_node = node != "0"
    else:  # node 0 holds ranks 0..n-1: there a rank's global and local numbers agree
        other_node = local is not None and global_ is not None and local != global_
    if other_node:
        raise RuntimeError("tensortap: this rank runs on another node than rank 0, whose embedded "
                           "collector listens on loopback only: set TENSORTAP_ENDPOINT to a "
                           "`tensortap collect` that every node reaches")
    wait_s = JOIN_WAIT_S if wait_s is None else wait_s
    path, deadline = job_file(job), time.monotonic() + wait_s
    while True:
        info = _read_job(path, job)
        if info is not None:
            return info
        if time.monotonic() > deadline:
            raise RuntimeError(f"tensortap: rank 0 announced no embedded collector within {wait_s:.0f} s "
                               f"({path}); set TENSORTAP_ENDPOINT to a running `tensortap collect`")
        time.sleep(0.05)


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


def stop_embedded(timeout: float = 12.0) -> None:
    """Close our senders (bye), then ask the embedded collector to drain and exit."""
    global _embedded, _announced
    for s in list(_senders.values()):
        s.close()
    if _announced is not None:
        try:
            os.unlink(_announced)
        except OSError:
            pass
        _announced = None
    proc, _embedded = _embedded, None
    if proc is None or proc.poll() is not None:
        return
    # SIGTERM: wait (at most 5 s) for the byes of ranks still sending (DDP ranks > 0 may end
    # after this one), stop accepting, drain, flush, fsync, exit
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def hold(run: str) -> None:
    """A Tap or TapCallback writes to `run` (until its `release`)."""
    global _holders
    with _lock:
        if run == _own_run:
            _holders += 1


def release(run: str) -> bool:
    """A holder of `run` is done; True when that was the last one of a run this process made
    up: no later Tap continues it (the next one starts a new run)."""
    global _holders
    with _lock:
        if run != _own_run or _holders <= 0:
            return False
        _holders -= 1
        return _holders == 0


def close_run(run: str) -> None:
    """Close this process's senders of `run` (their bye tells the collector it is complete)."""
    with _lock:
        done = [k for k in _senders if k[0] == run]
        senders = [_senders.pop(k) for k in done]
    for s in senders:
        s.close()


def open_sender(run: Optional[str] = None, rank: int = 0, world: int = 1, fresh: bool = False, **kw):
    """The process-wide sender for a run (one per process, so (run, rank, seq) is unique).
    fresh: see `resolve`."""
    from client_hooks.sender import Sender

    session = resolve(run, rank, world, fresh)
    kw = {**curve_options(), **kw}
    key = (session.run, session.endpoint, rank)
    with _lock:
        s = _senders.get(key)
        if s is None or s._closed:
            s = Sender(session.endpoint, session.run, rank=rank, world=world, **kw)
            _senders[key] = s
    return s


class SetupError(ValueError):
    """A setting of the environment (or a Tap's `run=`) that telemetry cannot start with;
    its message says which and why, in one line."""


def curve_options() -> dict:
    """Sender keyword arguments for CURVE, from the environment (empty when not set). A
    server key that is no public key (a missing file, a secret .key file, a mistyped key) is
    a SetupError naming the variable."""
    server = os.environ.get("TENSORTAP_CURVE_SERVER_KEY")
    if not server:
        return {}
    var = "TENSORTAP_CURVE_SERVER_KEY"
    if os.path.isfile(server):
        with open(server, "rb") as f:
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
        if len(lines) != 1:
            raise SetupError(f"{var}={server!r} holds {len(lines)} lines: give the collector's public "
                             "key, its one-line .pub file of `tensortap keys` (a .key file holds the secret)")
        server_key = lines[0]
    elif len(server) == 40:  # the key itself (Z85: '/' and '.' are among its characters)
        server_key = server.encode()
    elif os.sep in server or server.endswith((".pub", ".key")):
        raise SetupError(f"{var}={server!r}: no such file (the collector's .pub file of `tensortap keys`)")
    else:
        server_key = server.encode()  # (not 40 characters: said below)
    if len(server_key) != 40:
        raise SetupError(f"{var}: {len(server_key)} characters where a public key (Z85) has 40: "
                         "give the collector's .pub file of `tensortap keys`")
    opts = {"curve_server_key": server_key}
    client = os.environ.get("TENSORTAP_CURVE_CLIENT_KEY")
    if client:
        from collector.security import read_keypair
        opts["curve_keypair"] = read_keypair(client)
    return opts
