"""With the real collector: gate on writes the run folder; 2-rank DDP on CPU lands in one run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.procs import free_port

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
    cmd = [sys.executable, APP, "--epochs", "2", "--eval-records"] + (["--ddp"] if ddp else [])
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
        # each rank's validation records (the sanity check's, then each epoch's) say "val", at the
        # global step; the one after each epoch's validation is a training value
        val = [r for r in mine if r["kind"] == "activations" and r["name"] == "val_x"]
        assert {r["data"].get("split") for r in val} == {"val"}
        assert {r["step"] for r in val} == ({0, 2, 4} if ddp else {0, 4, 8}), sorted(r["step"] for r in val)
        after = [r for r in mine if r["kind"] == "activations" and r["name"] == "epoch_out"]
        assert len(after) == 2 and all("split" not in r["data"] for r in after)
    if ddp:  # the ranks' batches differ (DistributedSampler); the averaged gradients do not
        total = {(r["rank"], r["step"]): r["data"]["norm"] for r in recs
                 if r["kind"] == "gradients" and r["name"] == "_total"}
        steps = sorted({s for _, s in total})
        assert steps and all((0, s) in total and (1, s) in total for s in steps), sorted(total)
        for s in steps:
            assert total[(0, s)] == pytest.approx(total[(1, s)], rel=1e-5), (s, total)
        x0 = [r["data"]["mean"] for r in recs if r["kind"] == "loader_stats" and r["name"] == "images"
              and r["rank"] == 0]
        x1 = [r["data"]["mean"] for r in recs if r["kind"] == "loader_stats" and r["name"] == "images"
              and r["rank"] == 1]
        assert x0 and x0 != x1  # (so equal norms are not equal batches)


TAP_APP = os.path.join(os.path.dirname(__file__), "tap_ddp_app.py")


@pytest.mark.parametrize("front", ["tap", "lightning"])
def test_torchrun_ranks_with_no_endpoint_share_rank_0s_embedded_collector(tmp_path, front):
    """torchrun starts the ranks together, so none inherits the endpoint another chose: rank 0
    announces its embedded collector, the other waits for it and takes its run id. One
    collector, one run; rank 0's process exits first (Tap) and its collector waits for rank
    1's last records and bye."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORTAP")}
    env.update(TENSORTAP="1", TENSORTAP_OUT=str(tmp_path), PYTHONPATH=ROOT)
    app = [TAP_APP] if front == "tap" else [APP, "--epochs", "2", "--ddp"]
    port = str(free_port())  # (port 0 would reach the ranks as such, and they would not meet)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, *app]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("dashboard at http://127.0.0.1:") == 1, res.stderr[-3000:]  # one collector
    runs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    assert sorted(manifest["ranks"]) == ["0", "1"]
    for rank, m in manifest["ranks"].items():
        assert m["closed"] and (m["gaps"], m["duplicates"], m["dropped_by_sender"]) == (0, 0, 0), (rank, m)
        assert m["received"] == m["next_seq"] == m["sent_by_sender"] + 1, (rank, m)
    metrics = read_jsonl(runs[0] / "metrics.jsonl")
    if front == "tap":
        assert [(r["rank"], r["name"]) for r in metrics if r["name"] == "late"] == [(1, "late")]
        # the gradients recorded are those DDP averaged (what the optimizer steps with), not
        # each rank's own: equal on both ranks, and to the norm each rank read after backward
        after = {(r["rank"], r["step"]): r["data"]["value"] for r in metrics if r["name"] == "grad_norm"}
        grads = read_jsonl(runs[0] / "gradients.jsonl")
        total = {(r["rank"], r["step"]): r["data"]["norm"] for r in grads if r["name"] == "_total"}
        assert sorted(total) == [(0, 0), (0, 4), (1, 0), (1, 4)], sorted(total)
        for (rank, step), norm in total.items():
            assert norm == pytest.approx(after[(rank, step)], rel=1e-5), (rank, step, norm, after)
            assert norm == pytest.approx(total[(1 - rank, step)], rel=1e-5)
        assert sorted(line.split()[1] for line in res.stdout.splitlines() if line.startswith("RANK")) == ["0", "1"]
    assert not list(tmp_path.parent.glob("tensortap-job-*"))

