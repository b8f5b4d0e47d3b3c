"""Helpers for the dashboard tests: free ports, a uvicorn server in a thread, a filled index,
and a real `tensortap collect` subprocess."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from collector.index import Index
from collector.wire import Record

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
XSS = "<img src=x onerror=alert(1)>"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(app, port: int = 0):
    """Run `app` with uvicorn on 127.0.0.1 in a thread; yields the base URL."""
    import uvicorn

    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                            access_log=False, timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def rec(run: str, kind: str, name: str, data: dict, step=None, *, rank=0, seq=0, t=None,
        epoch=None, world=1) -> Record:
    return Record(v=1, run=run, rank=rank, world=world, seq=seq, t=t or time.time(), kind=kind,
                  name=name, step=step, epoch=epoch, data=data)


def stats(mean: float, std: float = 1.0, **extra) -> dict:
    return {"min": mean - 2 * std, "max": mean + 2 * std, "mean": mean, "std": std, "count": 64,
            "nan": 0, "inf": 0, **extra}


def fill_run(index: Index, run: str, steps: int = 20, layers=("enc.0", "dec.3"), t0=None) -> None:
    """A small but complete run: loss, gradients, activations (one complex), loader stats,
    patch metrics, lifecycle events, a manifest and a finding."""
    t0 = t0 or time.time() - steps
    seq = iter(range(10**9))
    add = lambda *a, **k: index.add(rec(run, *a, seq=next(seq), **k))  # noqa: E731
    add("events", "hello", {"pid": 1, "host": "h", "world": 1}, t=t0)
    add("loader_stats", "images", stats(0.5, 0.2), step=0, epoch=0, t=t0)
    add("loader_stats", "probe", {"real": stats(0.1), "imag": stats(-0.1), "abs": stats(1.0),
                                   "dtype": "complex64", "shape": [64, 64]}, step=0, epoch=0, t=t0)
    add("loader_stats", "val_loader", {"present": True, "length": 10}, step=0, epoch=0, t=t0)
    for i in range(steps):
        t = t0 + i * 0.5
        add("metrics", "loss", {"value": 1.0 / (i + 1)}, step=i, epoch=0, t=t)
        for j, layer in enumerate(layers):
            add("gradients", layer, {"mean": 1e-4 * (j + 1), "std": 1e-3, "norm": 0.1 / (i + 1),
                                     "max_abs": 0.01, "nan": 0, "inf": 0, "zero_frac": 0.0}, step=i, t=t)
        add("activations", "model_input", stats(0.0, 1.0), step=i, t=t)
        add("activations", "generator_output", stats(0.3, 0.5), step=i, t=t)
        add("activations", "x_combined", {"abs": stats(1.0), "angle": stats(0.0, 3.0)}, step=i, t=t)
    add("patch_metrics", "amplitude", {"mae": 0.2, "mse": 0.05, "scaling": "none (raw amplitude)",
                                       "optimal_scale": 1.7, "mae_after_scale": 0.05}, step=steps, t=t0 + steps)
    add("events", "bye", {"sent": 100, "dropped": 0}, t=t0 + steps)
    ri = index.get(run)
    ri.manifest = {"run": run, "schema": 1, "ranks": {"0": {"received": ri.count, "written": ri.count,
                                                            "gaps": 0, "duplicates": 0, "dropped_by_sender": 0}}}
    ri.findings = [{"rule": "flat_loss", "severity": "warning", "message": "loss barely moves",
                    "evidence": {"first": 1.0, "last": 0.05}}]


@pytest.fixture
def index() -> Index:
    idx = Index(health=lambda: {"status": "ok", "received": 10, "written": 10, "rejected": 0,
                                "gaps": 0, "dropped_by_sender": 0, "queue_bytes": 0})
    fill_run(idx, "run-a")
    return idx


@contextlib.contextmanager
def collector_process(out: str, *extra: str):
    """A real `python -m collector collect` on free loopback ports; yields its ready info."""
    ready = os.path.join(out, ".ready.json")
    cmd = [sys.executable, "-m", "collector", "collect", "--zmq", "tcp://127.0.0.1:0", "--http",
           "127.0.0.1:0", "--out", out, "--ready-file", ready, "--quiet", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"collector did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        with open(ready) as f:
            info = json.load(f)
        info["proc"] = proc
        yield info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stderr.close()


def two_ranks(endpoint: str, steps: int = 20, activations: bool = True) -> list:
    """Senders of ranks 0 and 1 of run "ddp" (world 2), each having sent, per step, loss
    1 + rank, gradient layer enc.0 of norm 0.1 * (rank + 1) and (activations) model_input of
    mean rank; flushed. The caller closes them."""
    from client_hooks.sender import Sender

    senders = [Sender(endpoint, "ddp", rank=r, world=2, batch=16) for r in (0, 1)]
    for step in range(steps):
        for r, s in enumerate(senders):
            s.send("metrics", "loss", {"value": 1.0 + r}, step=step)
            s.send("gradients", "enc.0", {"mean": 0.0, "std": 1e-3, "norm": 0.1 * (r + 1)}, step=step)
            if activations:
                s.send("activations", "model_input", {"mean": float(r), "std": 1.0}, step=step)
    for s in senders:
        s.flush()
    return senders


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)
