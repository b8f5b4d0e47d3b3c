"""A restarted collector shows the whole run: when a run with records on disk takes its first
new record, its stored records are read into its live index by a thread of its own, before
the new ones, with no point twice, while ingest goes on (real collector subprocesses, real
ZeroMQ sockets, the dashboard's HTTP API)."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

from client_hooks.sender import Sender
from collector.wire import Record, encode, encode_many
from tests.collector.test_collector import push_socket
from tests.procs import CollectorProc, manifest, plant_run, wait_for


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
    plant_run(str(run_dir), n, _r)


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


def _sse_events(col: CollectorProc, path: str, until, timeout: float = 10.0) -> list[dict]:
    """The data of a live stream's events (server-sent events), read until `until(events)`."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    with urllib.request.urlopen(col.http + path, timeout=timeout) as r:
        while time.monotonic() < deadline:
            line = r.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
                if until(events):
                    break
    return events


def _listed(col: CollectorProc) -> dict[str, dict]:
    runs = _get(col, "api/runs")
    names = [s["run"] for s in runs]
    assert len(names) == len(set(names)), f"a run listed twice: {names}"
    return {s["run"]: s for s in runs}


def test_a_restarted_collector_lists_the_stored_runs_and_a_resumed_one_once_live_and_whole(tmp_path):
    """Two runs stored by a first collector (one closed, one whose training stopped without
    closing); a second collector on the same root lists both (not live), serves every view
    of them from their files, and when the unclosed one's training resumes, lists it once,
    live, with its stored and new points (none twice), not the stored copy it had read.
    A run new to this collector stays listed once after the stored runs are listed again."""
    from collector.load import RESCAN_S

    col = CollectorProc(str(tmp_path), http=True)
    try:
        s = Sender(col.endpoint, "done")
        for i in range(10):
            s.send("metrics", "loss", {"value": float(i)}, step=i)
            s.send("gradients", "layer.0", {"mean": 0.5 * i, "std": 1.0, "norm": float(i)}, step=i)
        s.flush(5)
        s.close(3)
        sock = push_socket(col.endpoint)
        sock.send(encode(_r(0, "cut", "events", "hello", {"world": 1})))
        sock.send(_batch([_r(i, "cut") for i in range(1, 6)]))  # no bye: stopped without closing
        sock.close()
        assert wait_for(lambda: _written(tmp_path / "done") == 22 and _written(tmp_path / "cut") == 6), col.output()
    finally:
        assert col.stop() == 0
    findings_doc = json.loads((tmp_path / "done" / "findings.json").read_text())

    col = CollectorProc(str(tmp_path), http=True)
    try:
        runs = _listed(col)
        assert {r: (s["live"], s["state"], s["records"], s["ranks"]) for r, s in runs.items()} == {
            "done": (False, "finished", 22, [0]), "cut": (False, "unclosed", 6, [0])}, runs
        assert _get(col, "api/runs/done")["state"] == "finished"
        assert _get(col, "api/runs/done/manifest") == manifest(tmp_path / "done")
        streams = _get(col, "api/runs/done/streams")
        assert {k: [(x["name"], x["points"]) for x in v] for k, v in streams.items() if k != "events"} == {
            "metrics": [("loss", 10)], "gradients": [("layer.0", 10)]}, streams
        loss = _get(col, "api/runs/done/series", kind="metrics", name="loss", stat="value")
        assert loss["step"] == list(range(10)) and loss["value"] == [float(i) for i in range(10)], loss
        drawn = _get(col, "api/runs/done/kind/gradients", stat=["mean"])["series"]["layer.0"]
        assert drawn["step"] == list(range(10)) and drawn["mean"] == [0.5 * i for i in range(10)]
        assert [e["name"] for e in _get(col, "api/runs/done/records/events")] == ["hello", "bye"]
        want = findings_doc.get("findings") if isinstance(findings_doc, dict) else findings_doc
        assert _get(col, "api/runs/done/findings") == want
        ev = _sse_events(col, "api/runs/done/live", lambda evs: len(evs) >= 2)
        assert [(e["items"], e["live"], e["records"]) for e in ev] == [([], False, 22)] * 2, ev
        cut = _get(col, "api/runs/cut/series", kind="metrics", name="loss", stat="value")
        assert cut["step"] == [1, 2, 3, 4, 5], cut  # (the stored copy is read now)

        sock = push_socket(col.endpoint)  # the training of "cut" resumes; a new run "fresh"
        sock.send(_batch([_r(i, "cut") for i in range(6, 10)]))
        sock.send(_batch([_r(i, "fresh") for i in range(3)]))
        assert wait_for(lambda: _written(tmp_path / "cut") == 10 and _written(tmp_path / "fresh") == 3), col.output()
        assert wait_for(lambda: _loaded(col, "cut")), col.output()
        runs = _listed(col)
        assert {r: (s["live"], s["records"]) for r, s in runs.items()} == {
            "done": (False, 22), "cut": (True, 10), "fresh": (True, 3)}, runs
        cut = _get(col, "api/runs/cut/series", kind="metrics", name="loss", stat="value")
        assert cut["step"] == list(range(1, 10)) and cut["value"] == [float(i) for i in range(1, 10)], cut
        assert _get(col, "api/runs/cut/manifest")["totals"]["written"] == 10
        # its live stream is the live index's: from the cursor 0, the records taken in since
        # the restart (a stored copy's would be its stored records)
        ev = _sse_events(col, "api/runs/cut/live?cursor=0", lambda evs: any(e["items"] for e in evs))
        items = [it for e in ev for it in e["items"]]
        assert [(it[1], it[2], it[4]) for it in items] == [("metrics", "loss", i) for i in range(6, 10)], ev
        assert ev[-1]["live"] is True and ev[-1]["records"] == 10, ev
        sock.close()
        deadline = time.monotonic() + RESCAN_S + 1.5  # the stored runs are listed again meanwhile
        while time.monotonic() < deadline:
            runs = _listed(col)
            assert set(runs) == {"done", "cut", "fresh"} and runs["fresh"]["live"] and runs["cut"]["live"], runs
            time.sleep(0.5)
    finally:
        assert col.stop() == 0


def test_collect_view_lists_stored_runs_from_their_manifests_and_holds_few_read(tmp_path):
    """collect's index over a root of stored runs: listing reads no records, opening them
    holds at most MAX_LOADED_RUNS read, and a run that gets a live index is that one
    (listed once, also after the root is scanned again), its stored copy dropped."""
    from collector.load import MAX_LOADED_RUNS, CollectIndex

    names = [f"r{i:02d}" for i in range(MAX_LOADED_RUNS + 4)]
    for i, name in enumerate(names):
        _plant_run(str(tmp_path / name), 5)
        m = manifest(tmp_path / name)  # as a collector writes it: with its totals
        m.update(totals={"written": 5}, created=1_700_000_000.0 + i)
        (tmp_path / name / "manifest.json").write_text(json.dumps(m))
    idx = CollectIndex(str(tmp_path))
    listed = idx.summaries()
    assert [(s["run"], s["live"], s["state"], s["records"]) for s in listed] == [
        (n, False, "finished", 5) for n in names]
    assert not idx.stored.runs, "listing read records"
    for name in names:
        assert idx.get(name).get_series("metrics", "loss", "value")["step"] == [0, 1, 2, 3, 4]
        assert len(idx.stored.runs) <= MAX_LOADED_RUNS
    live = idx.run(names[-1])  # (the ingest side: its first record since the start)
    live.add(_r(5, names[-1]))
    assert idx.get(names[-1]) is live and names[-1] not in idx.stored.runs
    for rescan in (False, True):
        if rescan:
            idx.stored._scanned = 0.0  # (the root is listed again at the next listing)
        runs = [s["run"] for s in idx.summaries()]
        assert sorted(runs) == names, runs
        assert [s["live"] for s in idx.summaries() if s["run"] == names[-1]] == [True]
    assert idx.get("nope") is None
