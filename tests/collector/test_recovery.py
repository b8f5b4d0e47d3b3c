"""What a restart or an odd artifact root must not cost: an unusable run folder stops no other
run, and a restarted collector keeps every count as it was (patch metrics, failed writes,
duplicates), repairs torn quarantine files, and a training run again under the same run id
adds to the run instead of vanishing as duplicates."""
from __future__ import annotations

import json
import urllib.request

from client_hooks.sender import Sender
from tests.collector.test_collector import push_socket, rec
from tests.procs import CollectorProc, manifest, read_jsonl, run_records, wait_for


def _health(col: CollectorProc) -> dict:
    with urllib.request.urlopen(col.http + "api/health", timeout=5) as r:
        return json.load(r)


def _totals(run_dir) -> dict:
    return manifest(run_dir)["totals"] if (run_dir / "manifest.json").exists() else {}


def test_an_unusable_run_folder_costs_its_frames_and_ingest_goes_on(tmp_path):
    """A file where a run's folder would go, and a run whose manifest.json is JSON but not an
    object: their frames are quarantined (the root's _rejected.jsonl when the folder cannot
    be used) and the records of other runs keep arriving."""
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "manifest.json").write_text("[]")
    col = CollectorProc(str(tmp_path), http=True)
    try:
        sock = push_socket(col.endpoint)
        sock.send(rec(0, run="notes.txt"))
        sock.send(b"[" + rec(1, run="notes.txt") + b"," + rec(0, run="good") + b"]")  # all-or-nothing
        sock.send(rec(0, run="odd"))
        for i in range(5):
            sock.send(rec(i, run="good"))
        sock.close()
        assert wait_for(lambda: _totals(tmp_path / "good").get("written") == 5), col.output()
        h = _health(col)
        assert h["rejected"] == 2 and h["rejected_by_reason"] == {"run folder unusable": 2}, h
        assert h["status"] == "ok" and h["written"] == 6
    finally:
        assert col.stop() == 0
    rejected = read_jsonl(tmp_path / "_rejected.jsonl")
    assert len(rejected) == 2 and all("notes.txt" in r["reason"] for r in rejected)
    assert (tmp_path / "notes.txt").read_text() == "my notes\n"
    assert [r["seq"] for r in read_jsonl(tmp_path / "good" / "metrics.jsonl")] == list(range(5))
    assert manifest(tmp_path / "odd")["totals"]["written"] == 1  # rebuilt from its files
    out = col.output()
    assert out.count("run folder unusable") == 1, out  # said once
    assert out.count("odd/manifest.json is not a manifest") == 1, out


def _send_patch_run(endpoint: str) -> None:
    s = Sender(endpoint, "pm", rank=0)
    for i in range(3):  # patch_metrics.json keeps only the last of these
        s.send("patch_metrics", "val_amp", {"mae": 0.1 * i, "mse": 0.01, "count": 10, "scaling": "x"}, step=i)
        s.send("metrics", "loss", {"value": 1.0}, step=i)
    s.flush(5)
    s.close(3)


def test_a_restart_keeps_the_counts_of_a_run_with_patch_metrics(tmp_path):
    col = CollectorProc(str(tmp_path))
    try:
        _send_patch_run(col.endpoint)
        assert wait_for(lambda: _totals(tmp_path / "pm").get("written") == 8)  # + hello, bye
    finally:
        col.stop()
    before = manifest(tmp_path / "pm")["ranks"]["0"]
    assert before["gaps"] == 0 and before["written"] == 8
    for legacy in (False, True):  # True: a manifest of an earlier version, without patch_written
        if legacy:
            m = manifest(tmp_path / "pm")
            m["ranks"]["0"].pop("patch_written", None)
            (tmp_path / "pm" / "manifest.json").write_text(json.dumps(m))
        col = CollectorProc(str(tmp_path))
        try:
            nxt = manifest(tmp_path / "pm")["ranks"]["0"]["next_seq"]
            sock = push_socket(col.endpoint)
            sock.send(rec(nxt, run="pm"))
            sock.close()
            assert wait_for(lambda: _totals(tmp_path / "pm").get("written") == 9 + legacy)
        finally:
            col.stop()
        m = manifest(tmp_path / "pm")["ranks"]["0"]
        assert (m["written"], m["gaps"], m.get("patch_written")) == (9 + legacy, 0, 3), (legacy, m)


def test_a_duplicate_reaches_the_manifest_while_the_collector_runs(tmp_path):
    col = CollectorProc(str(tmp_path), http=True)
    try:
        sock = push_socket(col.endpoint)
        for i in range(5):
            sock.send(rec(i, run="d"))
        assert wait_for(lambda: _totals(tmp_path / "d").get("written") == 5)
        for i in range(5):
            sock.send(rec(i, run="d"))
        sock.close()
        assert wait_for(lambda: _totals(tmp_path / "d").get("duplicates") == 5, 5), _totals(tmp_path / "d")
        with urllib.request.urlopen(col.http + "api/runs/d/manifest", timeout=5) as r:
            assert json.load(r)["totals"]["duplicates"] == 5
    finally:
        col.stop()


def test_a_failed_write_is_counted_once_after_a_restart(tmp_path):
    flag = tmp_path / "enospc"
    out, run_dir = tmp_path / "out", tmp_path / "out" / "wf"
    col = CollectorProc(str(out), http=True, env={"TENSORTAP_FAULT_ENOSPC": str(flag)})
    try:
        sock = push_socket(col.endpoint)
        for i in range(10):
            sock.send(rec(i, run="wf"))
        assert wait_for(lambda: _health(col)["written"] == 10)
        flag.write_text("1")
        for i in range(10, 20):
            sock.send(rec(i, run="wf"))
        assert wait_for(lambda: _health(col)["write_failed"] == 10)
        flag.unlink()
        for i in range(20, 25):
            sock.send(rec(i, run="wf"))
        sock.close()
        assert wait_for(lambda: _totals(run_dir).get("written") == 15)
    finally:
        col.stop()
    col = CollectorProc(str(out))
    try:
        sock = push_socket(col.endpoint)
        sock.send(rec(25, run="wf"))
        sock.close()
        assert wait_for(lambda: _totals(run_dir).get("written") == 16)
    finally:
        col.stop()
    t = manifest(run_dir)["totals"]
    assert (t["written"], t["write_failed"], t["gaps"]) == (16, 10, 0), t


def _session(endpoint: str, n: int, t0: int) -> Sender:
    s = Sender(endpoint, "fixed", rank=0)
    for i in range(n):
        s.send("metrics", "loss", {"value": float(t0 + i)}, step=t0 + i)
    s.flush(5)
    s.close(3)
    return s


def test_a_training_run_again_under_the_same_run_id_is_added_to_the_run(tmp_path):
    """TENSORTAP_RUN fixed, the training started again: the new sender numbers its records
    from 0 again; they are stored after the first ones (none counted as duplicates), and the
    senders' counts add up. After a restart of the collector, a third session does the same."""
    run_dir = tmp_path / "fixed"
    col = CollectorProc(str(tmp_path))
    try:
        _session(col.endpoint, 5, 0)
        assert wait_for(lambda: _totals(run_dir).get("written") == 7)
        _session(col.endpoint, 4, 100)
        assert wait_for(lambda: _totals(run_dir).get("written") == 13)
    finally:
        col.stop()
    col = CollectorProc(str(tmp_path))
    try:
        _session(col.endpoint, 3, 200)
        assert wait_for(lambda: _totals(run_dir).get("written") == 18)
    finally:
        col.stop()
    m = manifest(run_dir)["ranks"]["0"]
    assert (m["written"], m["gaps"], m["duplicates"], m["sessions"]) == (18, 0, 0, 3), m
    assert m["sent_by_sender"] == 6 + 5 + 4 and m["closed"]  # each bye counts what came before it
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 4, 100, 101, 102, 103, 200, 201, 202]
    seqs = sorted(r["seq"] for r in run_records(run_dir))
    assert seqs == list(range(18))  # stored: one sequence per rank, as for one sender
    names = [e["name"] for e in read_jsonl(run_dir / "events.jsonl")]
    assert names == ["hello", "bye"] * 3


def test_torn_last_lines_of_quarantine_files_are_repaired_at_start(tmp_path):
    (tmp_path / "rr").mkdir()
    (tmp_path / "rr" / "metrics.jsonl").write_bytes(rec(0, run="rr") + b"\n")
    (tmp_path / "rr" / "rejected.jsonl").write_bytes(b'{"t": 1, "reason": "x", "bytes": 3, "he')
    (tmp_path / "_rejected.jsonl").write_bytes(b'{"t": 1, "reason": "y"}\n{"t": 2, "rea')
    col = CollectorProc(str(tmp_path))
    try:
        sock = push_socket(col.endpoint)
        sock.send(b'{"v":1,"run":"rr","rank":0,"bad":1}')
        sock.send(b"garbage")
        sock.close()
        assert wait_for(lambda: len((tmp_path / "_rejected.jsonl").read_bytes().splitlines()) == 3
                        and len((tmp_path / "rr" / "rejected.jsonl").read_bytes().splitlines()) == 2)
    finally:
        col.stop()
    run_rej = read_jsonl(tmp_path / "rr" / "rejected.jsonl")  # raises on a torn line
    root_rej = read_jsonl(tmp_path / "_rejected.jsonl")
    assert [r["reason"] for r in run_rej][0] == "torn line repaired at startup"
    assert [r["reason"] for r in root_rej][:2] == ["y", "torn line repaired at startup"]
    assert manifest(tmp_path / "rr")["rejected"] == 1  # the torn line was counted when it came
