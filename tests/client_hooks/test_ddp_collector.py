"""With the real collector: gate on writes the run folder; 2-rank DDP on CPU lands in one run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

APP = os.path.join(os.path.dirname(__file__), "lightning_app.py")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture
def collector(tmp_path):
    ready = tmp_path / "ready.json"
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "collector", "collect", "--zmq", "tcp://127.0.0.1:0",
                             "--http", "off", "--out", str(out), "--ready-file", str(ready), "--quiet"],
                            cwd=ROOT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "collector did not start"
        time.sleep(0.05)
    time.sleep(0.05)
    yield json.loads(ready.read_text())["zmq"], out, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("ddp", [False, True], ids=["one-process", "ddp-2-ranks"])
def test_a_fit_fills_one_run_folder_from_every_rank_without_gaps(collector, ddp):
    endpoint, out, proc = collector
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORTAP")}
    env.update(TENSORTAP="1", TENSORTAP_ENDPOINT=endpoint, PYTHONPATH=ROOT)
    cmd = [sys.executable, APP, "--epochs", "2"] + (["--ddp"] if ddp else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    proc.send_signal(signal.SIGTERM)
    proc.wait(15)
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # rank 0 resolved the run id; rank 1 inherited it
    run = runs[0]
    for name in ("loader_stats", "activations", "gradients", "metrics", "events"):
        assert (run / f"{name}.jsonl").exists(), name
    assert (run / "patch_metrics.json").exists()
    ranks = {0, 1} if ddp else {0}
    recs = [r for k in ("loader_stats", "activations", "gradients", "metrics", "events")
            for r in read_jsonl(run / f"{k}.jsonl")]
    assert {r["rank"] for r in recs} == ranks
    assert {r["world"] for r in recs} == {len(ranks)}
    manifest = json.loads((run / "manifest.json").read_text())
    for rank in ranks:
        mine = [r for r in recs if r["rank"] == rank]
        seqs = [r["seq"] for r in mine]
        assert len(set(seqs)) == len(seqs)
        assert any(r["name"] == "bye" for r in mine)
        assert len([r for r in mine if r["kind"] == "metrics" and r["name"] == "loss"]) == 8 // len(ranks)
        assert {r["epoch"] for r in mine if r["kind"] == "loader_stats" and r["name"] == "images"} == {0, 1}
        m = manifest["ranks"][str(rank)]
        assert (m["gaps"], m["duplicates"], m["dropped_by_sender"]) == (0, 0, 0), m
        assert m["received"] == m["next_seq"] == m["sent_by_sender"] + 1, m  # + the bye itself
        # every seq below next_seq is in a JSONL file, except patch_metrics.json's overwritten ones
        n_patch = 8 // len(ranks)
        assert len(seqs) == m["received"] - n_patch, (len(seqs), m)
