"""What a restart or an odd artifact root must not cost: an unusable run folder stops no other
run, and a restarted collector keeps every count as it was (patch metrics, failed writes,
duplicates), repairs torn quarantine files, and a training run again under the same run id
adds to the run instead of vanishing as duplicates."""
from __future__ import annotations

import json
import os
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


# -- a restart reads only what the last manifest does not account for ----------------------
STREAMS = ("loader_stats.jsonl", "activations.jsonl", "gradients.jsonl", "metrics.jsonl", "events.jsonl")
PATCH = {"mae": 0.1, "mse": 0.01, "count": 10, "scaling": "x"}


def _lines(run_dir) -> dict:
    return {f: len((run_dir / f).read_bytes().splitlines()) if (run_dir / f).exists() else 0 for f in STREAMS}


def _send_phase_a(sock, run: str) -> int:
    """Three ranks: a gap, patch metrics, gradients beside metrics, duplicates, and a second
    sender session. Returns the stream lines they leave (158)."""
    for s in range(100):  # rank 0: seq 40..44 never sent (a gap of 5)
        if 40 <= s < 45:
            continue
        if s in (60, 61):  # the second overwrites the first in patch_metrics.json
            sock.send(rec(s, run=run, kind="patch_metrics", name="val_amp", data=PATCH))
        else:
            sock.send(rec(s, run=run, kind="gradients" if 20 <= s < 30 else "metrics"))
    for s in [*range(50), *range(10, 15)]:  # rank 1: 5 duplicates
        sock.send(rec(s, run=run, rank=1))
    for session in (10, 5):  # rank 2: a training run again under the same run id
        sock.send(rec(0, run=run, rank=2, kind="events", name="hello", data={"pid": session}))
        for s in range(1, session):
            sock.send(rec(s, run=run, rank=2))
    return 93 + 50 + 15


def _marked(run_dir) -> dict:
    """Records per file that the manifest's stream marks count."""
    if not (run_dir / "manifest.json").exists():
        return {f: 0 for f in STREAMS}
    files = manifest(run_dir).get("stream_marks", {}).get("files", {})
    return {f: sum(files.get(f, {}).get("ranks", {}).values()) for f in STREAMS}


def _recovered(run_dir, *, marks: bool = True, monkeypatch=None):
    """RunFiles._recover on run_dir, in this process (marks=False: the manifest's stream marks
    removed first, so every file is read whole). Returns (per-rank accounting, stored bytes,
    lines decoded)."""
    import collector.store as store

    if not marks:
        m = manifest(run_dir)
        m.pop("stream_marks", None)
        (run_dir / "manifest.json").write_text(json.dumps(m))
    decoded = [0]
    real = store._decode_seq

    def counting(line):
        decoded[0] += 1
        return real(line)

    monkeypatch.setattr(store, "_decode_seq", counting)
    rf = store.RunFiles(str(run_dir.parent), run_dir.name)
    try:
        return {r: st.as_dict() for r, st in rf.ranks.items()}, dict(rf.stored), decoded[0]
    finally:
        rf.close()
        monkeypatch.setattr(store, "_decode_seq", real)


def test_a_restart_after_a_kill_reads_only_what_the_manifest_does_not_count(tmp_path, monkeypatch):
    """A real collector killed (SIGKILL) after it wrote more records than its last manifest
    counts, a torn line left behind: the restart reads only the bytes after the manifest's
    stream marks, and its counts are those of reading every file whole."""
    import shutil

    out, run = tmp_path / "out", "big"
    run_dir = out / run
    col = CollectorProc(str(out))
    port = col.zmq_port
    try:
        sock = push_socket(col.endpoint)
        lines = _send_phase_a(sock, run)
        assert wait_for(lambda: sum(_marked(run_dir).values()) == lines), (_lines(run_dir), col.output())
        nxt, extra = {0: 100, 1: 50}, 0
        for attempt in range(5):
            for s in range(nxt[0], nxt[0] + 40):  # rank 0: 3 more never sent
                if s % 13 != 5:
                    sock.send(rec(s, run=run, kind="activations" if s % 2 else "metrics"))
                    extra += 1
            for s in range(nxt[1], nxt[1] + 20):
                sock.send(rec(s, run=run, rank=1, kind="gradients"))
                extra += 1
            nxt = {0: nxt[0] + 40, 1: nxt[1] + 20}
            assert wait_for(lambda: sum(_lines(run_dir).values()) == lines + extra, interval=0.002)
            col.kill()  # within a few ms of the write: the manifest (every second) rarely has it
            sock.close(linger=0)
            if sum(_marked(run_dir).values()) < lines + extra:
                break
            col = CollectorProc(str(out), zmq_port=port)  # it had: again
            sock = push_socket(col.endpoint)
        else:
            raise AssertionError("every manifest counted every record written")
    finally:
        col.stop()
    marked, on_disk = _marked(run_dir), _lines(run_dir)
    torn = b'{"v":1,"run":"big","rank":0,"wor'
    with open(run_dir / "metrics.jsonl", "ab") as f:  # what a kill in the middle of a write leaves
        f.write(torn)
    assert sum(marked.values()) >= lines  # the marks count phase A at least

    for name in ("fast", "whole"):
        shutil.copytree(run_dir, tmp_path / name / run)
    fast, fast_stored, fast_read = _recovered(tmp_path / "fast" / run, monkeypatch=monkeypatch)
    whole, whole_stored, whole_read = _recovered(tmp_path / "whole" / run, marks=False, monkeypatch=monkeypatch)
    assert whole_read == sum(on_disk.values())
    assert fast_read == sum(on_disk.values()) - sum(marked.values()), (fast_read, on_disk, marked)
    assert fast == whole and fast_stored == whole_stored
    sizes = {f: os.path.getsize(run_dir / f) for f in STREAMS if (run_dir / f).exists()}
    # (the torn line cut off)
    assert whole_stored == {f: n - (len(torn) if f == "metrics.jsonl" else 0) for f, n in sizes.items()}
    gaps = 3 * (attempt + 1) + 5  # the seqs never sent
    assert (whole[0]["gaps"], whole[0]["patch_written"], whole[1]["duplicates"], whole[2]["seq_offset"],
            whole[2]["sessions"]) == (gaps, 2, 5, 10, 2), whole

    # the restarted collector itself: its manifest after one more record
    col = CollectorProc(str(out), zmq_port=port)
    try:
        sock = push_socket(col.endpoint)
        sock.send(rec(whole[0]["next_seq"], run=run))
        sock.close()
        assert wait_for(lambda: manifest(run_dir)["ranks"]["0"]["written"] == whole[0]["written"] + 1)
    finally:
        assert col.stop() == 0
    got = manifest(run_dir)
    want = {str(r): d for r, d in whole.items()}
    for k in ("written", "received", "next_seq"):
        want["0"][k] += 1
    assert got["ranks"] == want
    # the torn line: quarantined once, and not counted a frame rejected (its record is a gap;
    # the stop summary said "1 frame rejected" after a restart)
    assert got["rejected"] == 0
    assert [r["reason"] for r in read_jsonl(run_dir / "rejected.jsonl")] == ["torn line repaired at startup"]
    assert sum(_marked(run_dir).values()) == sum(_lines(run_dir).values())  # a clean stop counts all


def test_a_mark_the_file_no_longer_holds_makes_the_restart_read_the_file_whole(tmp_path, monkeypatch):
    """A manifest whose stream mark is beyond the file's end (a file cut shorter, or a mark
    edited), not at a line boundary, or over other bytes than the writer's (a file cut and
    written again past the mark): that file is read whole, with the same counts as without
    marks. (A guard of the fallback: reading every file whole, as before, passes it too.)"""
    import shutil

    out, run = tmp_path / "out", "fb"
    col = CollectorProc(str(out))
    try:
        sock = push_socket(col.endpoint)
        lines = _send_phase_a(sock, run)
        sock.close()
        assert wait_for(lambda: sum(_marked(out / run).values()) == lines)
    finally:
        assert col.stop() == 0
    src = out / run
    size = os.path.getsize(src / "metrics.jsonl")
    metric_lines = (src / "metrics.jsonl").read_bytes().splitlines(keepends=True)

    def mark(bytes_):
        def edit(d):
            m = manifest(d)
            m["stream_marks"]["files"]["metrics.jsonl"]["bytes"] = bytes_
            (d / "manifest.json").write_text(json.dumps(m))
        return edit

    def cut(d, n=3):
        (d / "metrics.jsonl").write_bytes(b"".join(metric_lines[:-n]))

    other = b"".join(rec(s, run=run, rank=3) + b"\n" for s in range(5))

    def cut_and_rewrite(d):
        cut(d)
        with open(d / "metrics.jsonl", "ab") as f:
            f.write(other)
        assert os.path.getsize(d / "metrics.jsonl") > size

    variants = {"beyond the end": mark(size + 100), "file cut": cut, "mid-line": mark(size - 7),
                "cut and written again": cut_and_rewrite}
    for name, change in variants.items():
        for how in ("marks", "whole"):
            shutil.copytree(src, tmp_path / name / how / run)
            change(tmp_path / name / how / run)
        got, got_stored, read = _recovered(tmp_path / name / "marks" / run, monkeypatch=monkeypatch)
        want, want_stored, _ = _recovered(tmp_path / name / "whole" / run, marks=False, monkeypatch=monkeypatch)
        assert read == _lines(tmp_path / name / "whole" / run)["metrics.jsonl"], name  # that file whole, no other
        assert (got, got_stored) == (want, want_stored), name
    cut_counts = _recovered(tmp_path / "file cut" / "whole" / run, marks=False, monkeypatch=monkeypatch)[0]
    whole_counts = _recovered(src, marks=False, monkeypatch=monkeypatch)[0]
    assert cut_counts[2]["written"] == whole_counts[2]["written"] - 3  # the last 3 lines: rank 2's
    assert cut_counts[2]["gaps"] == whole_counts[2]["gaps"] + 3
