"""Replay and stored runs, through real collector subprocesses: a replayed copy holds the same
records as the original (ignoring run id and sequence numbers), with the original pacing;
`tensortap serve` shows stored runs; a torn last line is skipped, not fatal."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from collector.load import LoadStats, load_root, run_records
from collector.replay import LIFECYCLE, ReplayError, replay, replay_main
from tests.dashboard.conftest import REPO, XSS, collector_process, free_port, wait_for

SPAN_S = 1.0  # the original run's duration


def comparable(run_dir: str) -> list[tuple]:
    """Records of a stored run without run id, seq and lifecycle events, in a fixed order."""
    out = []
    for r in run_records(run_dir):
        if r.kind == "events" and r.name in LIFECYCLE:
            continue
        out.append((r.rank, r.world, r.t, r.kind, r.name, r.step, r.epoch, repr(r.data)))
    return sorted(out)


def indexed(http: str, run: str) -> int:
    r = httpx.get(f"{http}api/runs/{run}", timeout=5)
    return r.json()["records"] if r.status_code == 200 else -1


def record_original(root: str) -> str:
    """Two ranks send a small run over SPAN_S seconds into a real collector; returns its folder."""
    from client_hooks.sender import Sender

    with collector_process(root) as info:
        senders = [Sender(info["zmq"], "orig", rank=r, world=2, batch=8) for r in range(2)]
        steps = 20
        for step in range(steps):
            for r, s in enumerate(senders):
                s.send("metrics", "loss", {"value": 1.0 / (step + 1) + r}, step=step, epoch=0)
                s.send("gradients", XSS if r else "enc.0", {"mean": 1e-4, "std": 1e-3, "norm": 0.1 * step,
                                                            "nan": 0, "bad": math.nan}, step=step)
                s.send("activations", "x_combined", {"abs": {"mean": 1.0}, "angle": {"mean": 0.5}}, step=step)
            if step == 0:
                senders[0].send("loader_stats", "probe", {"real": {"mean": 0.1}, "imag": {"mean": -0.2},
                                                          "dtype": "complex64"}, step=0, epoch=0)
            time.sleep(SPAN_S / (steps - 1))
        senders[0].send("patch_metrics", "amplitude", {"mae": 0.2, "scaling": "none"}, step=steps)
        senders[0].send("events", "epoch_end", {"epoch": 0}, step=steps, epoch=0)
        for s in senders:
            s.close()
        sent = sum(s.sent for s in senders)
        assert wait_for(lambda: indexed(info["http"], "orig") == sent, timeout=10)
    return os.path.join(root, "orig")


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> str:
    return record_original(str(tmp_path_factory.mktemp("orig")))


def test_replay_round_trip_gives_the_same_records_with_the_original_pacing(original, tmp_path):
    want = comparable(original)
    assert len(want) == 2 * 20 * 3 + 3  # every record of the original is on disk
    with collector_process(str(tmp_path)) as info:
        res = replay(original, info["zmq"])
        assert res["source"] == "orig" and res["run"].startswith("orig-replay-")
        assert res["records"] == len(want) and res["ranks"] == 2 and res["dropped"] == 0
        assert SPAN_S * 0.9 <= res["seconds"] <= SPAN_S + 1.5
        assert wait_for(lambda: indexed(info["http"], res["run"]) == res["sent"], timeout=10)
        manifest = httpx.get(f"{info['http']}api/runs/{res['run']}/manifest", timeout=5).json()
    assert comparable(os.path.join(str(tmp_path), res["run"])) == want
    assert manifest["ranks"]["0"]["gaps"] == 0 and manifest["ranks"]["1"]["gaps"] == 0


def test_replay_cli_as_fast_as_possible_under_a_given_run_id(original, tmp_path):
    with collector_process(str(tmp_path)) as info:
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "collector", "replay", original, "--to", info["zmq"],
                            "--max", "--run", "copy-1"], cwd=REPO, capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - t0
        assert p.returncode == 0, p.stderr
        assert len(p.stdout.strip().splitlines()) == 1 and "copy-1" in p.stdout and "0 dropped" in p.stdout
        assert wait_for(lambda: indexed(info["http"], "copy-1") == len(comparable(original)) + 4, timeout=10)
    assert elapsed < SPAN_S + 5  # no pacing sleeps (the interpreter start is most of it)
    assert comparable(os.path.join(str(tmp_path), "copy-1")) == comparable(original)


def test_replay_speed_scales_the_pacing(original, tmp_path):
    with collector_process(str(tmp_path)) as info:
        res = replay(original, info["zmq"], speed=4.0, run="fast")
    assert SPAN_S / 4 * 0.9 <= res["seconds"] < SPAN_S * 0.75


@pytest.mark.parametrize("make,msg", [
    (lambda d: os.path.join(d, "missing"), "no such run folder"),
    (lambda d: d, "no records"),
])
def test_replay_bad_input_is_one_line(tmp_path, capsys, make, msg):
    args = argparse.Namespace(run_dir=make(str(tmp_path)), to="tcp://127.0.0.1:1", speed=1.0,
                              max=False, run=None)
    assert replay_main(args) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


def test_replay_rejects_a_bad_run_id_and_speed(original):
    with pytest.raises(ReplayError, match="bad run id"):
        replay(original, "tcp://127.0.0.1:1", run="../etc")
    with pytest.raises(ReplayError, match="speed"):
        replay(original, "tcp://127.0.0.1:1", speed=0)


def test_load_root_skips_a_torn_last_line(original, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(original, root / "orig")
    (root / "not-a-run").mkdir()
    with open(root / "orig" / "gradients.jsonl", "ab") as f:
        f.write(b'{"v":1,"run":"orig","rank":0,"wor')  # a killed writer
    index = load_root(str(root))
    assert [s["run"] for s in index.summaries()] == ["orig"]
    ri = index.get("orig")
    assert index.health()["torn_lines"] == 1 and index.health()["mode"] == "serve"
    stats = LoadStats()
    assert ri.count == len(run_records(str(root / "orig"), stats)) and stats.torn == 1
    assert ri.manifest["run"] == "orig" and not ri.live()
    assert ri.get_series("gradients", XSS, "norm")["total"] == 20


def test_serve_lists_runs_from_their_manifests_and_holds_few_read(original, tmp_path, monkeypatch):
    """A folder of many runs: listed from manifests at start (none read), a run read when
    asked for, at most MAX_LOADED_RUNS held (the least recently asked for goes, and is read
    again when asked for again)."""
    from collector import load

    monkeypatch.setattr(load, "MAX_LOADED_RUNS", 2)
    for name in ("a", "b", "c"):
        shutil.copytree(original, tmp_path / name)
    (tmp_path / "nomanifest").mkdir()
    shutil.copy(os.path.join(original, "metrics.jsonl"), tmp_path / "nomanifest")
    index = load_root(str(tmp_path))
    assert sorted(index.runs) == ["nomanifest"]  # (no manifest: read at start to be listed)
    listed = {s["run"]: s for s in index.summaries()}
    with open(os.path.join(original, "manifest.json")) as f:
        written = json.load(f)["totals"]["written"]
    assert sorted(listed) == ["a", "b", "c", "nomanifest"] and listed["a"]["records"] == written
    assert listed["a"]["ranks"] == [0, 1] and listed["a"]["findings"] == 0 and not listed["a"]["live"]
    assert {s["state"] for s in listed.values()} == {"finished"}  # (both ranks said bye)
    count = index.get("a").count
    assert count == len(run_records(original)) and index.get("zzz") is None
    index.get("b")
    index.get("a")  # a: asked for last, so b goes when c comes
    index.get("c")
    assert sorted(index.runs) == ["a", "c"]
    assert index.get("b").count == count and sorted(index.runs) == ["b", "c"]
    assert index.health()["runs"] == 4 and index.health()["runs_read"] == 2
    assert index.summaries() == sorted(listed.values(), key=lambda s: s["first_t"])
    # a run written after the start: listed at the next look once it has a manifest
    monkeypatch.setattr(load, "RESCAN_S", 0.0)
    (tmp_path / "d").mkdir()
    shutil.copy(os.path.join(original, "metrics.jsonl"), tmp_path / "d")
    assert "d" not in {s["run"] for s in index.summaries()}  # no manifest yet: being written
    shutil.copy(os.path.join(original, "manifest.json"), tmp_path / "d")
    assert "d" in {s["run"] for s in index.summaries()} and index.get("d").count > 0
    # a run whose rank 1 never said bye (a killed training): "unclosed", not "finished"
    shutil.copytree(original, tmp_path / "e")
    with open(tmp_path / "e" / "manifest.json") as f:
        m = json.load(f)
    m["ranks"]["1"]["closed"] = False
    with open(tmp_path / "e" / "manifest.json", "w") as f:
        json.dump(m, f)
    assert {s["run"]: s["state"] for s in index.summaries()}["e"] == "unclosed"


@contextlib.contextmanager
def serving(folder, tmp_path):
    """`tensortap serve FOLDER` in a subprocess; yields its base URL once it is ready."""
    ready = str(tmp_path / "ready.json")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "collector", "serve", str(folder), "--http",
                             f"127.0.0.1:{port}", "--ready-file", ready], cwd=REPO,
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: os.path.exists(ready), timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(20)


def _orig_loss(base: str) -> dict:
    assert [r["run"] for r in httpx.get(f"{base}/api/runs").json()] == ["orig"]
    return httpx.get(f"{base}/api/runs/orig/series", params={"kind": "metrics", "name": "loss",
                                                            "stat": "value"}).json()


def test_serve_shows_stored_runs_without_ingest(original, tmp_path):
    shutil.copytree(original, tmp_path / "orig")
    with serving(tmp_path, tmp_path) as base:
        s = _orig_loss(base)
        assert s["total"] == 20  # rank 0's 20 steps (each rank is its own series)
        s1 = httpx.get(f"{base}/api/runs/orig/series", params={"kind": "metrics", "name": "loss · rank 1",
                                                              "stat": "value"}).json()
        assert s1["total"] == 20 and s1["rank"] == 1


def test_serve_of_the_folder_above_the_runs_says_where_they_are(original, tmp_path):
    shutil.copytree(original, tmp_path / "artifacts" / "orig")
    ready = str(tmp_path / "ready.json")
    proc = subprocess.Popen([sys.executable, "-m", "collector", "serve", str(tmp_path), "--http",
                             f"127.0.0.1:{free_port()}", "--ready-file", ready], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: os.path.exists(ready), timeout=30)  # it serves (an empty root) all the same
    finally:
        proc.terminate()
        err = proc.communicate(timeout=20)[1]
    note = [line for line in err.splitlines() if "note:" in line]
    assert note == [f"tensortap serve: note: {str(tmp_path)!r} holds no run; runs are one level down, in "
                    f"{str(tmp_path / 'artifacts')!r} (1): serve one of those"]


def test_a_replayed_run_is_live_while_it_is_being_replayed(tmp_path):
    """Replay re-sends the original wall times (here an hour old): the collector judges
    liveness by when records arrive, so the copy is live while it comes, as a training is."""
    src = tmp_path / "old"
    src.mkdir()
    t0 = time.time() - 3600
    with open(src / "metrics.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"v": 1, "run": "old", "rank": 0, "world": 1, "seq": i, "t": t0 + 0.1 * i,
                                "kind": "metrics", "name": "loss", "step": i, "data": {"value": 1.0}}) + "\n")
    with collector_process(str(tmp_path / "out")) as info:
        import threading

        done = []
        th = threading.Thread(target=lambda: done.append(replay(str(src), info["zmq"], run="copy")), daemon=True)
        th.start()  # 3 s at the original pacing
        try:
            seen = wait_for(lambda: any(r["run"] == "copy" and r["live"]  # (not after its bye)
                                        for r in httpx.get(f"{info['http']}api/runs", timeout=5).json()),
                            timeout=10)
        finally:
            th.join(30)
        assert seen and done and done[0]["records"] == 30


def test_serve_of_one_runs_folder_serves_that_run(original, tmp_path):
    """`tensortap serve RUN_DIR`: the cli says ROOT may be one run's folder; it showed none."""
    run_dir = tmp_path / "orig"
    shutil.copytree(original, run_dir)
    with serving(run_dir, tmp_path) as base:
        assert _orig_loss(base)["total"] == 20


def test_serve_drops_a_run_whose_folder_is_deleted(original, tmp_path, monkeypatch):
    from collector import load

    for name in ("a", "b"):
        shutil.copytree(original, tmp_path / name)
    index = load_root(str(tmp_path))
    assert index.get("a").count > 0 and index.get("b").count > 0
    shutil.rmtree(tmp_path / "a")
    assert index.get("a") is None and "a" not in index.runs  # read before: not served any more
    shutil.rmtree(tmp_path / "b")
    monkeypatch.setattr(load, "RESCAN_S", 0.0)
    assert index.summaries() == [] and index.health()["runs"] == 0
