"""A restarted collector shows the whole run: when a run with records on disk takes its first
new record, its stored records are read into its live index by a thread of its own, before
the new ones, with no point twice, while ingest goes on (real collector subprocesses, real
ZeroMQ sockets, the dashboard's HTTP API)."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request

from collector.wire import Record, encode, encode_many
from tests.collector.test_collector import push_socket
from tests.procs import CollectorProc, manifest, wait_for


def _get(col: CollectorProc, path: str, **params):
    url = col.http + path + ("?" + urllib.parse.urlencode(params, doseq=True) if params else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def _r(seq: int, run: str, kind: str = "metrics", name: str = "loss", data=None) -> Record:
    return Record(v=1, run=run, rank=0, world=1, seq=seq, t=1_700_000_000.0 + seq, kind=kind, name=name,
                  step=seq, data={"value": float(seq)} if data is None else data)


def _grad(seq: int, run: str) -> Record:
    return _r(seq, run, "gradients", f"layer.{seq % 2}", {"mean": float(seq), "std": 1.0, "norm": 2.0 * seq})


def _batch(recs: list[Record]) -> bytes:
    (frame, n), = encode_many(recs)
    assert n == len(recs)
    return frame


def _loaded(col: CollectorProc, run: str) -> bool:
    try:
        s = _get(col, f"api/runs/{run}")
    except urllib.error.HTTPError as e:  # not yet known: its first frame is still coming in
        if e.code == 404:
            return False
        raise
    return not s.get("loading") and not _get(col, "api/health").get("runs_loading")


def _written(run_dir) -> int:
    try:
        return manifest(run_dir)["totals"]["written"]
    except (OSError, ValueError, KeyError):
        return -1


def test_a_restarted_collector_shows_the_records_from_before_and_after_the_restart(tmp_path):
    """Single records and batches of two kinds, an event, before the restart; after it, five of
    them sent again (duplicates: counted, not shown), then new ones of each kind. The series,
    the full records, the run's summary and the live diagnosis's input (the files) hold all of
    them once, in order."""
    run, run_dir = "rs", tmp_path / "rs"
    col = CollectorProc(str(tmp_path), http=True)
    try:
        sock = push_socket(col.endpoint)
        sock.send(encode(_r(0, run, "events", "epoch_start", {"epoch": 0})))
        for i in range(1, 20):
            sock.send(encode(_r(i, run)))
        sock.send(_batch([_grad(i, run) for i in range(20, 40)]))
        sock.close()
        assert wait_for(lambda: _written(run_dir) == 40), col.output()
        assert _get(col, f"api/runs/{run}/series", kind="metrics", name="loss", stat="value")["total"] == 19
    finally:
        assert col.stop() == 0
    col = CollectorProc(str(tmp_path), http=True)
    try:
        sock = push_socket(col.endpoint)
        sock.send(_batch([_grad(i, run) for i in range(35, 40)]))  # sent again: duplicates
        for i in range(40, 60):
            sock.send(encode(_r(i, run)))
        sock.send(_batch([_grad(i, run) for i in range(60, 80)]))
        sock.close()
        assert wait_for(lambda: _written(run_dir) == 80), col.output()
        assert wait_for(lambda: _loaded(col, run)), col.output()
        loss = _get(col, f"api/runs/{run}/series", kind="metrics", name="loss", stat="value")
        assert loss["step"] == list(range(1, 20)) + list(range(40, 60)), loss["step"]
        assert loss["value"] == [float(s) for s in loss["step"]] and loss["total"] == 39
        for layer in (0, 1):
            g = _get(col, f"api/runs/{run}/series", kind="gradients", name=f"layer.{layer}", stat="norm")
            want = [s for s in [*range(20, 40), *range(60, 80)] if s % 2 == layer]
            assert g["step"] == want and g["value"] == [2.0 * s for s in want], g
        drawn = _get(col, f"api/runs/{run}/kind/gradients", stat=["mean"])["series"]
        assert drawn["layer.0"]["step"] == [s for s in [*range(20, 40), *range(60, 80)] if s % 2 == 0]
        streams = _get(col, f"api/runs/{run}/streams")
        assert {s["name"]: s["points"] for s in streams["gradients"]} == {"layer.0": 20, "layer.1": 20}
        events = _get(col, f"api/runs/{run}/records/events")
        assert [(e["name"], e["seq"]) for e in events] == [("epoch_start", 0)]
        summary = _get(col, f"api/runs/{run}")
        assert summary["records"] == 80 and summary["loading"] is False, summary
        assert summary["first_t"] == 1_700_000_000.0, summary  # the run began before the restart
        assert _get(col, f"api/runs/{run}/manifest")["totals"]["duplicates"] == 5
    finally:
        assert col.stop() == 0
    assert manifest(run_dir)["totals"]["written"] == 80 and manifest(run_dir)["totals"]["gaps"] == 0


def _plant_run(run_dir, n: int) -> None:
    """A run folder as a collector leaves it: n loss records (seq = step = 0..n-1) and its
    manifest, written here directly (fast)."""
    os.makedirs(run_dir)
    run = os.path.basename(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "wb") as f:
        for i in range(0, n, 4096):
            for frame, _ in encode_many([_r(s, run) for s in range(i, min(n, i + 4096))]):
                f.write(frame[1:-1].replace(b'},{"v"', b'}\n{"v"') + b"\n")
    ranks = {"0": {"received": n, "written": n, "next_seq": n, "world": 1}}
    with open(os.path.join(run_dir, "manifest.json"), "w") as f:
        json.dump({"run": run, "schema": 1, "created": 1_700_000_000.0, "ranks": ranks}, f)


def test_a_big_stored_run_is_loaded_while_ingest_goes_on_and_no_point_comes_twice(tmp_path):
    """200,000 stored loss records (more than a series keeps: thinned); new records are sent
    while they are read. Ingest writes new records while the load runs (it is not stalled
    until the load ends), and the series is the whole run, in order, with no step twice."""
    run, stored = "big", 200_000
    run_dir = tmp_path / run
    _plant_run(str(run_dir), stored)
    col = CollectorProc(str(tmp_path), http=True)
    try:
        sock = push_socket(col.endpoint)
        seq, overlapped, t0 = stored, False, time.monotonic()
        while time.monotonic() - t0 < 60:
            sock.send(_batch([_r(s, run) for s in range(seq, seq + 100)]))
            seq += 100
            time.sleep(0.01)
            h = _get(col, "api/health")
            if h.get("runs_loading") and h["written"] >= 1000:
                overlapped = True  # new records were written while the load ran
            if seq - stored >= 2000 and _loaded(col, run):
                break
        sent = seq - stored
        sock.close()
        assert wait_for(lambda: _get(col, "api/health")["written"] == sent), col.output()
        loss = _get(col, f"api/runs/{run}/series", kind="metrics", name="loss", stat="value")
        steps = loss["step"]
        assert steps[0] == 0 and all(a < b for a, b in zip(steps, steps[1:])), "out of order or twice"
        assert loss["value"] == [float(s) for s in steps]
        assert seq - 1 - 64 < steps[-1] <= seq - 1  # the newest, within the series' stride
        assert loss["total"] < 10_000  # thinned, as a live series of that length is
        assert _get(col, f"api/runs/{run}")["records"] == stored + sent
        drawn = _get(col, f"api/runs/{run}/kind/metrics", stat=["value"])["series"]["loss"]["step"]
        assert drawn[0] == 0 and drawn[-1] == steps[-1]  # the newest point too
        assert overlapped, "the load never overlapped ingest (or ingest waited for it)"
    finally:
        assert col.stop() == 0
    m = manifest(str(run_dir))["totals"]
    assert (m["written"], m["gaps"], m["duplicates"]) == (stored + sent, 0, 0), m
