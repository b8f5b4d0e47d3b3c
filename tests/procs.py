"""Test helpers: real collector subprocesses on free ports, JSONL readers."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CollectorProc:
    """`python -m collector collect` in a subprocess; waits for its ready file."""

    def __init__(self, out: str, zmq_port: int | None = None, http: bool = False,
                 extra: list[str] | None = None, env: dict | None = None, quiet: bool = True) -> None:
        self.out = out
        self.zmq_port = zmq_port or free_port()
        self.ready = os.path.join(out, f".ready-{self.zmq_port}-{time.monotonic_ns()}")
        os.makedirs(out, exist_ok=True)
        http_arg = "127.0.0.1:0" if http else "off"
        cmd = [sys.executable, "-m", "collector", "collect", "--zmq", f"tcp://127.0.0.1:{self.zmq_port}",
               "--http", http_arg, "--out", out, "--ready-file", self.ready, *(["--quiet"] if quiet else []),
               *(extra or [])]
        # output to a file, not a pipe: a pipe nobody reads can fill and stall the collector
        self.log = tempfile.NamedTemporaryFile(prefix="tensortap-collector-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})},
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
                self.proc.wait()
                raise RuntimeError("collector did not become ready: " + self.output())
            time.sleep(0.02)
        with open(self.ready) as f:
            info = json.load(f)
        os.unlink(self.ready)
        self.endpoint, self.http = info["zmq"], info["http"]

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self.log.close()
        return rc

    def output(self) -> str:
        with open(self.log.name, "rb") as f:
            return f.read().decode(errors="replace")[-4000:]

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        return [json.loads(line) for line in f]


def run_records(run_dir: str, kinds=("loader_stats", "activations", "gradients", "metrics", "events")) -> list[dict]:
    out = []
    for k in kinds:
        out += read_jsonl(os.path.join(run_dir, k + ".jsonl"))
    return out


def manifest(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "manifest.json")) as f:
        return json.load(f)


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    return pred()


class PeakRSS:
    """Samples a process's resident memory on a thread; `.peak` (bytes) until `.stop()`."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        import threading

        import psutil

        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._interval = interval
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except Exception:  # the process ended
                return
            time.sleep(self._interval)

    def stop(self) -> int:
        self._stop.set()
        return self.peak


def plant_run(run_dir: str, n: int, make, fname: str = "metrics.jsonl",
              created: float = 1_700_000_000.0) -> int:
    """A run folder as a collector leaves it, written here directly (fast): n records
    make(seq, run) of rank 0 in `fname`, one JSON line each, and a manifest that counts them.
    Returns the stream file's size."""
    from collector.wire import encode_many

    os.makedirs(run_dir)
    run = os.path.basename(run_dir)
    path = os.path.join(run_dir, fname)
    with open(path, "wb") as f:
        for i in range(0, n, 4096):
            for frame, _ in encode_many([make(s, run) for s in range(i, min(n, i + 4096))]):
                f.write(frame[1:-1].replace(b'},{"v"', b'}\n{"v"') + b"\n")
    ranks = {"0": {"received": n, "written": n, "next_seq": n, "world": 1}}
    with open(os.path.join(run_dir, "manifest.json"), "w") as f:
        json.dump({"run": run, "schema": 1, "created": created, "ranks": ranks}, f)
    return os.path.getsize(path)
