"""`tensortap serve` over a folder of many stored runs (not a timed test): how long until it
serves, its memory, the runs list, the first read of a run, and the memory after 20 runs
have been opened. Figures go to docs/BENCHMARKS.md.

    .venv/bin/python bench/serve_many.py [--runs 150] [--steps 300] [--tree PATH]

The runs are copies of one synthetic run (per step: the loss, 20 gradient layers and 3
activations, as JSONL lines, with a manifest) in a temporary folder. --tree PATH: serve with
another checkout (e.g. a `git archive` of an earlier commit), to compare.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import httpx  # noqa: E402
import psutil  # noqa: E402

from collector.wire import STREAM_FILES, Record, encode  # noqa: E402


def make_run(path: str, steps: int, layers: int = 20) -> int:
    """One synthetic run folder; returns its record count."""
    os.makedirs(path)
    files = {k: open(os.path.join(path, STREAM_FILES[k]), "wb") for k in ("metrics", "gradients", "activations")}
    seq, t0 = 0, time.time() - steps
    for step in range(steps):
        recs = [("metrics", "loss", {"value": 1.0 / (step + 1)})]
        recs += [("gradients", f"layer.{j}", {"count": 4096, "mean": 1e-4 * j, "std": 1e-3, "norm": 0.1 / (step + 1),
                                              "max_abs": 0.01, "nan": 0, "inf": 0, "zero_frac": 0.0,
                                              "weight_norm": 3.0, "update_ratio": 1e-3}) for j in range(layers)]
        recs += [("activations", a, {"count": 4096, "nan": 0, "inf": 0, "min": -2.0, "max": 2.0, "mean": 0.1,
                                     "std": 1.0}) for a in ("model_input", "generator_output", "x_combined")]
        for kind, name, data in recs:
            files[kind].write(encode(Record(v=1, run=os.path.basename(path), rank=0, world=1, seq=seq,
                                            t=t0 + step, kind=kind, name=name, step=step, data=data)) + b"\n")
            seq += 1
    for f in files.values():
        f.close()
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump({"run": os.path.basename(path), "schema": 1, "created": t0, "updated": t0 + steps, "world": 1,
                   "ranks": {"0": {"received": seq, "written": seq}}, "totals": {"received": seq, "written": seq}}, f)
    return seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=150)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tree", default=os.path.dirname(HERE))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        n = make_run(os.path.join(root, "run-000"), a.steps)
        for i in range(1, a.runs):
            shutil.copytree(os.path.join(root, "run-000"), os.path.join(root, f"run-{i:03d}"))
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
        ready = os.path.join(root, ".ready.json")
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "collector", "serve", root, "--http", "127.0.0.1:0",
                                 "--ready-file", ready], cwd=a.tree, stderr=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONPATH": a.tree})
        try:
            while not os.path.exists(ready):
                if proc.poll() is not None:
                    sys.exit("serve exited before it was ready")
                time.sleep(0.02)
            t_ready = time.perf_counter() - t0
            url = json.load(open(ready))["http"]
            mem = psutil.Process(proc.pid)
            rss0 = mem.memory_info().rss
            t1 = time.perf_counter()
            listed = httpx.get(url + "api/runs", timeout=60).json()
            t_list = time.perf_counter() - t1
            t1 = time.perf_counter()
            httpx.get(url + f"api/runs/run-{a.runs // 2:03d}/streams", timeout=60).raise_for_status()
            t_open = time.perf_counter() - t1
            for i in range(min(20, a.runs)):
                httpx.get(url + f"api/runs/run-{i:03d}/streams", timeout=60).raise_for_status()
            rss1 = mem.memory_info().rss
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"tree {a.tree}: {a.runs} runs of {n} records ({size / 2**20:.0f} MiB on disk); load average "
          f"{os.getloadavg()[0]:.2f}\n  serving after {t_ready:.2f} s, RSS {rss0 / 2**20:.0f} MiB; /api/runs "
          f"({len(listed)} runs) {t_list * 1e3:.0f} ms; a run's first read {t_open * 1e3:.0f} ms; RSS after "
          f"20 runs opened {rss1 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
