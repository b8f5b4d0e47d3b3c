"""The end-to-end telemetry path: real sender -> real collector subprocess -> JSONL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import zmq

from client_hooks.sender import Sender
from collector.wire import Record, encode
from tests.procs import CollectorProc, manifest, read_jsonl, run_records, wait_for, ROOT


def rec(seq: int, run: str = "r1", rank: int = 0, kind: str = "metrics", name: str = "loss", **kw) -> bytes:
    return encode(Record(v=1, run=run, rank=rank, world=1, seq=seq, t=time.time(), kind=kind,
                         name=name, step=seq, data=kw.get("data", {"value": float(seq)})))


def push_socket(endpoint: str):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 2000)
    s.connect(endpoint)
    return s


def test_collector_writes_every_record_a_sender_sends(tmp_path):
    col = CollectorProc(str(tmp_path))
    try:
        s = Sender(col.endpoint, "run-a", rank=0, batch=64)
        n = 5000
        for i in range(n):
            s.send("metrics", "loss", {"value": i * 0.5}, step=i)
            if i % 500 == 0:
                s.send("gradients", "layer.0", {"norm": 1.0, "mean": 0.0}, step=i)
        s.close()
        run_dir = tmp_path / "run-a"
        assert wait_for(lambda: len(read_jsonl(run_dir / "metrics.jsonl")) == n)
    finally:
        assert col.stop() == 0
    lines = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["data"]["value"] for r in lines] == [i * 0.5 for i in range(n)]
    assert len(read_jsonl(run_dir / "gradients.jsonl")) == 10
    m = manifest(run_dir)["ranks"]["0"]
    assert m["gaps"] == 0 and m["duplicates"] == 0
    assert m["written"] == m["received"] == n + 10 + 2  # + hello and bye
    assert m["dropped_by_sender"] == 0 and m["sent_by_sender"] == n + 11  # bye counts what came before it
    names = [e["name"] for e in read_jsonl(run_dir / "events.jsonl")]
    assert names == ["hello", "bye"]


def test_single_record_frames_are_written_as_they_arrived(tmp_path):
    col = CollectorProc(str(tmp_path))
    try:
        sock = push_socket(col.endpoint)
        frames = [rec(i) for i in range(3)]
        for f in frames:
            sock.send(f)
        sock.close()
        path = tmp_path / "r1" / "metrics.jsonl"
        assert wait_for(lambda: len(read_jsonl(path)) == 3)
    finally:
        col.stop()
    assert path.read_bytes() == b"".join(f + b"\n" for f in frames)


def test_a_sequence_gap_and_a_duplicate_are_counted_exactly(tmp_path):
    col = CollectorProc(str(tmp_path))
    try:
        sock = push_socket(col.endpoint)
        for seq in [0, 1, 2, 5, 6, 6, 7, 3, 10]:  # withheld: 3,4 (3 arrives late: a duplicate by order), 8, 9
            sock.send(rec(seq))
        sock.close()
        run_dir = tmp_path / "r1"
        assert wait_for(lambda: manifest(run_dir)["ranks"]["0"]["received"] == 9
                        if (run_dir / "manifest.json").exists() else False)
    finally:
        col.stop()
    m = manifest(run_dir)["ranks"]["0"]
    assert m["gaps"] == 4  # 3, 4, 8, 9
    assert m["duplicates"] == 2  # the second 6 and the late 3
    assert m["written"] == 7
    assert [r["seq"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2, 5, 6, 7, 10]


def test_bad_frames_are_quarantined_and_the_collector_keeps_serving(tmp_path):
    out = tmp_path / "out"
    col = CollectorProc(str(out), extra=["--max-frame", "4096"])
    try:
        sock = push_socket(col.endpoint)
        sock.send(b"\x00\xffgarbage")
        sock.send(b'{"v":1,"run":"r1","rank":"zero","world":1,"seq":0,"t":1,"kind":"metrics","name":"x"}')
        sock.send(rec(0, data={"blob": "x" * 5000}))  # over --max-frame
        sock.send(b'{"v":1,"run":"../../etc","rank":0,"world":1,"seq":0,"t":1,"kind":"metrics","name":"x","data":{}}')
        sock.send(b'{"v":1,"run":"r1","rank":0,"world":1,"seq":0,"t":1,"kind":"nope","name":"x","data":{}}')
        sock.send(rec(0))  # a good record after all that
        sock.close()
        assert wait_for(lambda: len(read_jsonl(out / "r1" / "metrics.jsonl")) == 1)
    finally:
        assert col.stop() == 0
    rejected = read_jsonl(out / "r1" / "rejected.jsonl") + read_jsonl(out / "_rejected.jsonl")
    reasons = " | ".join(r["reason"] for r in rejected)
    assert len(rejected) == 5, reasons
    assert "malformed JSON" in reasons and "exceeds" in reasons and "$.run" in reasons
    assert "$.rank" in reasons and "$.kind" in reasons
    # nothing escaped the artifact root
    assert not (tmp_path / "etc").exists() and not os.path.exists(tmp_path.parent / "etc" / "metrics.jsonl")
    assert sorted(p.name for p in out.iterdir()) == ["_rejected.jsonl", "r1"]
    # frames naming a usable run are quarantined in its folder; the rest (no run, a bad run
    # id, too large to look inside) at the root
    assert manifest(out / "r1")["rejected"] == 2 == len(read_jsonl(out / "r1" / "rejected.jsonl"))


def test_a_stopped_collector_says_what_each_run_got_and_lost(tmp_path):
    """Ctrl-C on `tensortap collect`: a line per run with what was written and lost, runs with
    loss or findings first; frames that named no run are counted apart. Quiet: nothing. The
    command it gives is quoted for the shell (an --out with a space could not be pasted)."""
    tmp_path = tmp_path / "my runs"
    col = CollectorProc(str(tmp_path), quiet=False)
    try:
        sock = push_socket(col.endpoint)
        for seq in [0, 1, 2, 5, 6, 6, 7]:  # 3 and 4 never come; the second 6 is a duplicate
            sock.send(rec(seq, run="lossy"))
        sock.send(rec(8, run="lossy", data={"value": None}))  # a NaN loss: a finding
        sock.send(b'{"v":1,"run":"lossy","rank":"zero"}')  # rejected, in lossy's folder
        sock.send(b"\x00garbage")  # rejected, names no run
        for seq in range(3):
            sock.send(rec(seq, run="clean"))
        sock.close()
        assert wait_for(lambda: len(read_jsonl(tmp_path / "clean" / "metrics.jsonl")) == 3
                        and len(read_jsonl(tmp_path / "lossy" / "metrics.jsonl")) == 7
                        and len(read_jsonl(tmp_path / "_rejected.jsonl")) == 1)
    finally:
        assert col.stop(signal.SIGINT) == 0
    lines = col.output().strip().splitlines()
    stop = next(i for i, line in enumerate(lines) if "stopped after" in line)
    assert lines[stop].endswith(f"2 runs received, under {tmp_path}"), lines[stop]
    lossy, clean, root = lines[stop + 1:stop + 4]
    assert lossy.split()[0] == "lossy" and clean.split()[0] == "clean"
    assert ("7 records written, 2 lost (2 gaps), 1 duplicate, 1 frame rejected, 1 finding"
            f"  -> tensortap report '{tmp_path / 'lossy'}'") in lossy, lossy
    assert clean.endswith("3 records written, none lost, 0 findings"), clean
    assert root.strip() == f"1 frame rejected that named no usable run: {tmp_path / '_rejected.jsonl'}"
    assert len(lines) == stop + 4

    quiet = CollectorProc(str(tmp_path / "q"))
    push_socket(quiet.endpoint).send(rec(0, run="x"))
    assert wait_for(lambda: len(read_jsonl(tmp_path / "q" / "x" / "metrics.jsonl")) == 1)
    assert quiet.stop(signal.SIGINT) == 0
    assert "stopped" not in quiet.output()


def test_a_killed_collector_restarts_and_the_sender_resumes_with_exact_gap_counts(tmp_path):
    """SIGKILL mid-stream, a torn last line, restart on the same port: the sender (another
    process, never restarted) resumes, every line parses, gaps equal what is missing."""
    col = CollectorProc(str(tmp_path))
    port = col.zmq_port
    code = f"""
import time, sys
from client_hooks.sender import Sender
s = Sender({col.endpoint!r}, "crash", rank=0, batch=16)
t0 = time.monotonic(); i = 0
while time.monotonic() - t0 < 4.0:
    s.send("metrics", "loss", {{"value": float(i)}}, step=i); i += 1
    time.sleep(0.0005)
s.flush(3.0); s.close(2.0)
print(s.sent, s.dropped)
"""
    sender = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE)
    time.sleep(1.2)
    col.kill()
    path = tmp_path / "crash" / "metrics.jsonl"
    with open(path, "ab") as f:  # what a crash in the middle of a write would leave
        f.write(b'{"v":1,"run":"crash","rank":0,"wor')
    time.sleep(0.5)
    col2 = CollectorProc(str(tmp_path), zmq_port=port)
    try:
        out, _ = sender.communicate(timeout=30)
    finally:
        col2.stop()
    sent, dropped = map(int, out.split())
    read_jsonl(path)  # raises if any line does not parse
    rejected = read_jsonl(tmp_path / "crash" / "rejected.jsonl")
    assert any("torn" in r["reason"] for r in rejected)
    seqs = sorted(r["seq"] for r in run_records(tmp_path / "crash"))
    assert len(seqs) == len(set(seqs))
    m = manifest(tmp_path / "crash")["ranks"]["0"]
    missing = (max(seqs) + 1) - len(seqs)
    assert m["gaps"] == missing
    assert m["written"] == len(seqs)
    # the sender's `sent` includes its bye; the bye reports what was sent before it
    assert m["sent_by_sender"] == sent - 1 and m["dropped_by_sender"] == dropped
    # the sender kept going after the restart: its last records (bye included) are on disk
    assert max(seqs) + 1 == sent
    assert len([s for s in seqs if s > sent * 0.8]) > 0


def test_a_process_whose_collector_is_down_exits_within_two_seconds(tmp_path):
    from tests.procs import free_port
    code = f"""
import time, sys
from client_hooks.sender import Sender
s = Sender("tcp://127.0.0.1:{free_port()}", "nobody", rank=0)
for i in range(20000):
    s.send("metrics", "loss", {{"value": float(i)}}, step=i)
print("done", flush=True)
"""
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "done"
    t0 = time.monotonic()
    p.wait(10)
    assert time.monotonic() - t0 <= 2.0
    assert p.returncode == 0


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "collector", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_bad_cli_arguments_give_one_line_and_a_nonzero_exit(tmp_path):
    (tmp_path / "afile").write_text("x")
    cases = [
        ["collect", "--zmq", "tcp//nonsense", "--out", str(tmp_path)],
        ["collect", "--zmq", "tcp://127.0.0.1:99999", "--out", str(tmp_path)],
        ["collect", "--http", "localhost", "--out", str(tmp_path)],
        ["collect", "--out", str(tmp_path / "afile" / "sub")],
        ["collect", "--zmq", "tcp://0.0.0.0:5557", "--out", str(tmp_path)],
        ["collect", "--http", "0.0.0.0:8050", "--out", str(tmp_path)],
        ["report", str(tmp_path / "missing")],
        ["replay", str(tmp_path / "missing"), "--to", "tcp://127.0.0.1:1"],
        ["demo", "--architectures", "nope", "--output-dir", str(tmp_path / "demo")],
    ]
    for args in cases:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"tensortap {args[0]}: error: "), (args, r.stderr)


def test_report_and_replay_of_a_folder_that_is_not_a_run_say_so_and_write_nothing(tmp_path):
    """replay of a folder of runs (the artifact root) names its newest runs; report or replay
    of a folder with no run says that; neither gets a findings.json."""
    root, empty = tmp_path / "root", tmp_path / "empty"
    for name in ("old-run", "new-run"):
        (root / name).mkdir(parents=True)
        (root / name / "metrics.jsonl").write_text("")
    os.utime(root / "old-run", (1, 1))
    empty.mkdir()
    of_runs = "is a folder of 2 runs, not a run: pass one of them (newest first: new-run, old-run)"
    for folder, says in ((root, of_runs),
                         (empty, "holds no tensortap run")):
        for args in (["report", str(folder)], ["replay", str(folder), "--to", "tcp://127.0.0.1:1"]):
            if args[0] == "report" and folder == root:
                continue  # a line per run: the next test
            r = _cli(*args)
            assert r.returncode == 2 and r.stdout == "", (args, r.stdout, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and says in lines[0], (args, r.stderr)
        assert sorted(p.name for p in folder.iterdir()) == (["new-run", "old-run"] if folder == root else [])
    r = _cli("report", str(root / "new-run"))  # a run folder: reported (no findings in an empty stream)
    assert r.returncode == 0 and "new-run" in r.stdout, r.stderr


def test_report_of_a_folder_of_runs_gives_a_line_per_run_from_what_is_stored(tmp_path):
    """`tensortap report ROOT`: newest first, what each run wrote and lost, its stored
    findings' rules; a run without a manifest or findings says so; nothing is written."""
    col = CollectorProc(str(tmp_path))
    try:
        sock = push_socket(col.endpoint)
        for seq in [0, 1, 2, 5]:  # 3 and 4 never come
            sock.send(rec(seq, run="lossy"))
        sock.send(rec(6, run="lossy", data={"value": None}))  # a NaN loss: a finding
        sock.close()
        assert wait_for(lambda: len(read_jsonl(tmp_path / "lossy" / "metrics.jsonl")) == 5)
    finally:
        assert col.stop() == 0
    (tmp_path / "bare").mkdir()  # a run whose collector was killed before any manifest
    (tmp_path / "bare" / "metrics.jsonl").write_bytes(rec(0, run="bare") + b"\n")
    os.utime(tmp_path / "bare", (1, 1))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    r = _cli("report", str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith(f"{tmp_path}: 2 runs, newest first")
    assert lines[1].split()[0] == "lossy" and lines[1].endswith(
        "5 records written, 2 lost (2 gaps), 1 finding: nonfinite"), lines[1]
    assert lines[2].split()[0] == "bare" and "manifest.json missing (its collector was killed?)" in lines[2]
    assert len(lines) == 3
    assert json.loads(_cli("report", str(tmp_path), "--json").stdout)[0]["findings"] == ["nonfinite"]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    (tmp_path / "odd").mkdir()  # a manifest edited by hand: still a line, no traceback
    (tmp_path / "odd" / "manifest.json").write_text('{"created": "yesterday", "totals": {"written": "x", "gaps": "y"}}')
    r = _cli("report", str(tmp_path))
    assert r.returncode == 0 and r.stderr == "" and "odd" in r.stdout, r.stderr
    (tmp_path / "odd" / "manifest.json").write_text("xx{")
    line = [x for x in _cli("report", str(tmp_path)).stdout.splitlines() if x.split()[0] == "odd"][0]
    assert "manifest.json unreadable or empty: `tensortap report` it to see" in line, line
    # counts of another shape: not "0 records written, none lost" (its files hold records)
    (tmp_path / "odd" / "manifest.json").write_text('{"ranks": {"0": "x"}, "totals": [1]}')
    line = [x for x in _cli("report", str(tmp_path)).stdout.splitlines() if x.split()[0] == "odd"][0]
    assert "manifest.json not a manifest's shape: `tensortap report` it to see" in line, line
    # JSON of the right shape with values no collector writes: a rank "²" (isdigit, but no
    # int) and a `created` no clock shows were tracebacks in report ROOT, serve and a restart
    (tmp_path / "odd" / "manifest.json").write_text(
        '{"created": 1e300, "totals": {"written": 1}, "ranks": {"\u00b2": {"hello": 1}}}')
    r = _cli("report", str(tmp_path))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert [x for x in r.stdout.splitlines() if x.split()[0] == "odd"][0].split()[1] == "????-??-??"
    from collector.load import StoredIndex

    assert "odd" in [x["run"] for x in StoredIndex(str(tmp_path)).summaries()]
    col = CollectorProc(str(tmp_path))  # the run sends again: its manifest is read back
    try:
        sock = push_socket(col.endpoint)
        sock.send(rec(0, run="odd"))
        sock.close()
        assert wait_for(lambda: len(read_jsonl(tmp_path / "odd" / "metrics.jsonl")) == 1)
    finally:
        assert col.stop() == 0, col.output()


def test_report_of_a_run_says_how_many_records_it_read_and_skipped(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b"garbage\n{\"v\": 1}\n")
    r = _cli("report", str(run))
    assert r.returncode == 0 and r.stdout == (
        "run: no record could be read (2 lines skipped: torn or not a record): nothing to diagnose\n"), r.stdout
    (run / "metrics.jsonl").write_bytes(b"".join(rec(i) + b"\n" for i in range(3)) + b"torn")
    r = _cli("report", str(run))
    assert r.stdout == "run: 3 records read (1 line skipped: torn or not a record); no findings\n", r.stdout


def test_report_into_a_pipe_closed_early_ends_quietly(tmp_path):
    """`tensortap report RUN | head -1`: the reader leaves before the report is written."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    p = subprocess.Popen([sys.executable, "-m", "collector", "report", str(tmp_path / "run")], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # before it has written anything: its first write meets a closed pipe
    err = p.stderr.read()
    assert p.wait(60) == 0 and err == ""


def test_an_address_in_use_is_a_one_line_error(tmp_path):
    col = CollectorProc(str(tmp_path))
    try:
        r = _cli("collect", "--zmq", col.endpoint, "--http", "off", "--out", str(tmp_path))
    finally:
        col.stop()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _batch(*recs: bytes) -> bytes:
    return b"[" + b",".join(recs) + b"]"


def test_batched_frames_are_accounted_written_and_streamed_like_single_records(tmp_path):
    """A batch as one sender sends it (one rank, the next seqs in order) is accounted as a
    whole; any other batch (overlapping seqs, seqs out of order, two ranks, an event inside)
    record by record. A batch's records are written as they were sent, each on its own line,
    unless the frame holds a newline (then they are encoded again). Every way gives the same
    counts, files and live stream."""
    col = CollectorProc(str(tmp_path), http=True)
    try:
        sock = push_socket(col.endpoint)
        sock.send(_batch(rec(0), rec(1), rec(2)))
        sock.send(_batch(rec(5, kind="gradients", name="enc.0", data={"norm": 5.0}), rec(6)))  # gap: 3, 4
        sock.send(_batch(rec(6), rec(7)))  # overlaps: 6 is a duplicate
        sock.send(_batch(rec(8), rec(10), rec(9)))  # gap 9, then 9 late: a duplicate
        sock.send(_batch(rec(0, rank=1), rec(11), rec(1, rank=1)))  # two ranks in one frame
        sock.send(_batch(rec(12, kind="events", name="hello", data={"pid": 1}), rec(13)))
        sock.send(b" [ " + rec(14) + b" ,\t" + rec(15) + b" ] ")  # blanks, no newline: lines as sent
        sock.send(b"[" + rec(16) + b",\n" + rec(17) + b"]")  # a newline: the records are encoded again
        sock.close()
        run_dir = tmp_path / "r1"
        assert wait_for(lambda: (run_dir / "manifest.json").exists()
                        and manifest(run_dir)["ranks"].get("1", {}).get("written") == 2
                        and manifest(run_dir)["ranks"]["0"]["written"] == 15)
        import httpx

        with httpx.Client(timeout=10) as c, c.stream("GET", col.http + "api/runs/r1/live?cursor=0") as r:
            items = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    items += json.loads(line[6:])["items"]
                    if len(items) >= 17:
                        break
        series = httpx.get(col.http + "api/runs/r1/series", params={"kind": "metrics", "name": "loss",
                                                                  "stat": "value"}).json()
        series1 = httpx.get(col.http + "api/runs/r1/series", params={"kind": "metrics", "name": "loss",
                                                                   "stat": "value", "rank": 1}).json()
    finally:
        assert col.stop() == 0
    m = manifest(run_dir)["ranks"]
    assert (m["0"]["received"], m["0"]["gaps"], m["0"]["duplicates"], m["0"]["written"]) == (17, 3, 2, 15)
    assert (m["1"]["received"], m["1"]["gaps"], m["1"]["written"]) == (2, 0, 2)
    assert [(r["rank"], r["seq"]) for r in read_jsonl(run_dir / "metrics.jsonl")] == [
        (0, 0), (0, 1), (0, 2), (0, 6), (0, 7), (0, 8), (0, 10), (1, 0), (0, 11), (1, 1), (0, 13),
        (0, 14), (0, 15), (0, 16), (0, 17)]
    lines = (run_dir / "metrics.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line)["kind"] == "metrics" for line in lines[:-1])
    assert [r["seq"] for r in read_jsonl(run_dir / "gradients.jsonl")] == [5]
    assert [r["name"] for r in read_jsonl(run_dir / "events.jsonl")] == ["hello"]
    # the live stream: every record that was not a duplicate, numbered 1.. in arrival order
    assert [it[0] for it in items] == list(range(1, 18))
    assert [(it[3], it[4]) for it in items] == [
        (0, 0), (0, 1), (0, 2), (0, 5), (0, 6), (0, 7), (0, 8), (0, 10), (1, 0), (0, 11), (1, 1),
        (0, 12), (0, 13), (0, 14), (0, 15), (0, 16), (0, 17)]
    assert [it[1] for it in items].count("gradients") == 1 and items[11][1:3] == ["events", "hello"]
    # a series per rank: rank 0's (the default) and rank 1's
    assert series["step"] == [0, 1, 2, 6, 7, 8, 10, 11, 13, 14, 15, 16, 17]
    assert series1["step"] == [0, 1]
