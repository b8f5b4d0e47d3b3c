"""The sender: never blocks, drops newest and counts, reconnects, bounded close."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import zmq

from client_hooks.sender import Sender
from collector.wire import decode
from tests.procs import ROOT, CollectorProc, free_port, manifest, read_jsonl, wait_for


def test_send_never_blocks_and_drops_the_newest_when_the_queue_is_full():
    port = free_port()  # nobody listens: every frame waits, the queue fills
    s = Sender(f"tcp://127.0.0.1:{port}", "full", max_queue_bytes=64 * 1024)
    worst = 0.0
    accepted = []
    for i in range(5000):
        t0 = time.perf_counter()
        accepted.append(s.send("metrics", "loss", {"value": float(i)}, step=i))
        worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.05  # generous: no call waits on the network (p99 is in bench/)
    # the first records fit, then everything newer is dropped
    first_drop = accepted.index(False)
    assert first_drop > 10 and not any(accepted[first_drop:])
    assert s.dropped == accepted.count(False)
    t0 = time.monotonic()
    s.close(timeout=0.5)
    assert time.monotonic() - t0 < 1.5


def test_a_sender_that_no_collector_takes_from_says_so_while_running_and_at_close(monkeypatch):
    """Nobody at the endpoint (no collector, or one refusing this client's CURVE key): a
    warning once nothing has been taken for NO_PEER_S, and at close the count of records that
    never left (a training finished with nothing said, every record lost)."""
    from client_hooks import sender as sender_mod

    monkeypatch.setattr(sender_mod, "NO_PEER_S", 0.3)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        s = Sender(endpoint, "nobody")
        for i in range(10):
            s.send("metrics", "loss", {"value": float(i)}, step=i)
        assert wait_for(lambda: any("nothing has taken a record" in str(w.message) for w in seen), timeout=5)
        s.close(timeout=0.2)
    msgs = [str(w.message) for w in seen]
    (running,) = [m for m in msgs if "nothing has taken a record" in m]
    (closing,) = [m for m in msgs if "no record of run nobody" in m]
    assert endpoint in running and "tensortap collect" in running
    assert f"at {endpoint} (11 dropped)" in closing  # the hello and the 10 losses
    assert s.sent == 0 and s.dropped == 12  # (and the bye, which could not go either)


def test_a_sender_whose_records_are_taken_says_nothing_of_it(monkeypatch, tmp_path):
    from client_hooks import sender as sender_mod

    monkeypatch.setattr(sender_mod, "NO_PEER_S", 0.3)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            s = Sender(f"tcp://127.0.0.1:{port}", "taken")
            s.send("metrics", "loss", {"value": 1.0}, step=0)
            time.sleep(0.6)
            s.close(timeout=0.5)
        assert s.sent == 3 and not [w for w in seen if "tensortap" in str(w.message)]
    finally:
        pull.close(linger=0)
        ctx.term()


def test_send_many_queues_a_step_at_once_and_drops_and_counts_what_does_not_fit():
    port = free_port()  # nobody listens: the queue only fills
    s = Sender(f"tcp://127.0.0.1:{port}", "many", max_queue_bytes=10 * 1024)
    step = [("gradients", f"layer{i}", {"norm": float(i)}, 500) for i in range(30)]  # 660 bytes each
    first = s.send_many(step, step=0, epoch=0)
    assert 0 < first < 30 and s.dropped == 30 - first  # the newest records of the step are dropped
    assert s.send_many(step, step=1) == 0 and s.dropped == 60 - first  # full: all of the next
    s.close(timeout=0.2)
    assert s.send_many(step[:2], step=2) == 0 and s.dropped >= 62 - first  # closed: counted too


def test_records_reach_a_pull_socket_with_consecutive_seqs():
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    s = Sender(f"tcp://127.0.0.1:{port}", "seqs", rank=3, world=4, batch=7)
    for i in range(50):
        s.send("gradients", f"layer{i % 3}", {"norm": float(i)}, step=i, epoch=0)
    s.send_many([("gradients", f"layer{i % 3}", {"norm": float(i)}, 64) for i in range(50, 100)], step=50, epoch=0)
    s.close()
    recs = []
    while pull.poll(1000):
        recs += decode(pull.recv())[0]
    pull.close()
    assert [r.seq for r in recs] == list(range(102))
    assert recs[0].name == "hello" and recs[-1].name == "bye"
    assert recs[-1].data == {"sent": 101, "dropped": 0}
    assert {r.rank for r in recs} == {3} and {r.world for r in recs} == {4}


def test_a_payload_that_fails_on_the_sender_thread_is_dropped_and_counted(recwarn):
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    s = Sender(f"tcp://127.0.0.1:{port}", "bad", batch=1)
    s.send("metrics", "ok", {"value": 1.0})
    s.send("metrics", "broken", lambda: 1 / 0)
    s.send("metrics", "ok2", lambda: {"value": 2.0})
    s.close()
    names = []
    while pull.poll(500):
        names += [r.name for r in decode(pull.recv())[0]]
    pull.close()
    assert names == ["hello", "ok", "ok2", "bye"]
    assert s.dropped == 1
    assert any("could not be read" in str(w.message) for w in recwarn)


@pytest.mark.parametrize("batch", [1, 64])
def test_a_value_json_cannot_hold_is_dropped_alone_and_the_thread_lives_on(recwarn, batch):
    """A record that does not encode drops alone (counted, warned once); the records sent
    with it and after it arrive live, numbered without a gap, and close() does not raise."""
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    s = Sender(f"tcp://127.0.0.1:{port}", "unencodable", batch=batch)
    s.send("metrics", "ok", {"value": 1.0})
    s.send("metrics", "odd", {"value": object()})
    s.send("metrics", "ok2", {"value": 2.0})
    got = []

    def arrived(n):
        while pull.poll(10):
            got.extend(decode(pull.recv())[0])
        return len(got) >= n

    assert wait_for(lambda: arrived(3), 5)  # live, before close
    assert s._thread.is_alive()
    s.send("metrics", "later", {"value": 3.0})
    s.close()
    while pull.poll(500):
        got += decode(pull.recv())[0]
    pull.close()
    assert [r.name for r in got] == ["hello", "ok", "ok2", "later", "bye"]
    assert [r.seq for r in got] == list(range(5))
    assert s.dropped == 1 and got[-1].data == {"sent": 4, "dropped": 1}
    assert sum("'odd' could not be encoded" in str(w.message) for w in recwarn) == 1


def test_the_sender_reconnects_by_itself_when_the_collector_restarts(tmp_path):
    col = CollectorProc(str(tmp_path))
    s = Sender(col.endpoint, "reconn", batch=8)
    for i in range(50):
        s.send("metrics", "loss", {"value": float(i)}, step=i)
    assert s.flush(5)
    col.stop()
    col2 = CollectorProc(str(tmp_path), zmq_port=col.zmq_port)
    try:
        t0 = time.monotonic()
        i = 50
        # keep sending until the new collector has something: that is the resume time
        while not wait_for(lambda: len(read_jsonl(tmp_path / "reconn" / "metrics.jsonl")) > 50, 0.05):
            s.send("metrics", "loss", {"value": float(i)}, step=i)
            i += 1
            assert time.monotonic() - t0 < 5
        resumed = time.monotonic() - t0
        s.close()
    finally:
        col2.stop()
    assert resumed < 1.0
    m = manifest(tmp_path / "reconn")["ranks"]["0"]
    lines = read_jsonl(tmp_path / "reconn" / "metrics.jsonl")
    seqs = sorted(r["seq"] for r in lines + read_jsonl(tmp_path / "reconn" / "events.jsonl"))
    assert m["gaps"] == seqs[-1] + 1 - len(seqs)  # whatever was lost is counted exactly


def test_the_embedded_default_starts_a_collector_and_stops_it_cleanly(tmp_path):
    code = """
import os
from client_hooks import session
s = session.open_sender(rank=0)
for i in range(100):
    s.send("metrics", "loss", {"value": float(i)}, step=i)
print(os.environ["TENSORTAP_RUN"], os.environ["TENSORTAP_ENDPOINT"], flush=True)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORTAP")}
    env["TENSORTAP_OUT"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    run, endpoint = r.stdout.split()
    assert endpoint.startswith("tcp://127.0.0.1:")
    assert "dashboard at http://127.0.0.1:" in r.stderr
    run_dir = tmp_path / run
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 100
    m = manifest(run_dir)["ranks"]["0"]
    assert m["closed"] and m["gaps"] == 0 and m["written"] == 102
    # at exit the collector says what it got: the run, nothing lost, and (a rising loss) a
    # finding, with the command that prints it
    tail = r.stderr.strip().splitlines()[-2:]
    assert tail[0].startswith("tensortap collector: stopped after") and tail[0].endswith(f"1 run received, under {tmp_path}")
    assert tail[1] == f"  {run}  102 records written, none lost, 1 finding  -> tensortap report {run_dir}", tail
    # the collector subprocess is gone: its port is free again
    ctx = zmq.Context.instance()
    probe = ctx.socket(zmq.PULL)
    probe.bind(endpoint)
    probe.close()


SENDING = """
import os, sys, time
from client_hooks import session
s = session.open_sender(rank=0)
print(os.environ["TENSORTAP_RUN"], session._embedded.pid, flush=True)
i = 0
try:
    while True:
        s.send("metrics", "loss", {"value": float(i)}, step=i)
        i += 1
        if i == 200:
            s.flush(5.0)
            print("SENT", flush=True)
            if sys.argv[1] == "kill":
                os.kill(os.getpid(), 9)
        time.sleep(0.001)
except KeyboardInterrupt:  # as a trainer does: a checkpoint saved, a last record
    time.sleep(1.0)
    s.send("events", "interrupted", {"step": i}, step=i)
    raise
"""


def _sending(tmp_path, how: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORTAP")}
    env["TENSORTAP_OUT"] = str(tmp_path)
    # a session of its own: a Ctrl-C reaches the whole group, as a terminal's does
    proc = subprocess.Popen([sys.executable, "-c", SENDING, how], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    run, collector = proc.stdout.readline().split()
    assert proc.stdout.readline().strip() == "SENT"
    return proc, tmp_path / run, int(collector)


def test_a_ctrl_c_stops_the_training_first_and_its_bye_still_arrives(tmp_path):
    """Ctrl-C in the terminal reaches the training process and its embedded collector alike.
    The collector ignores it and goes on until the training process, closing, stops it: the
    records sent meanwhile and the bye arrive."""
    import signal

    proc, run_dir, _ = _sending(tmp_path, "ctrl-c")
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "KeyboardInterrupt" in err and "stopped after" in err, err[-2000:]
    m = manifest(run_dir)["ranks"]["0"]
    assert m["closed"] and m["gaps"] == 0 and m["written"] == m["received"] == m["sent_by_sender"] + 1, m
    assert m["received"] > 200
    assert [e["name"] for e in read_jsonl(run_dir / "events.jsonl")] == ["hello", "interrupted", "bye"]


def test_a_killed_training_process_leaves_its_collector_to_finish_the_files_and_exit(tmp_path):
    """SIGKILL (the OOM killer, say) gives the training process no time to stop its embedded
    collector: the collector notices its parent is gone, writes what it holds, the manifest
    and the diagnosis, and exits instead of running on."""
    import psutil

    proc, run_dir, pid = _sending(tmp_path, "kill")
    proc.wait(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        psutil.Process(pid).kill()
        raise AssertionError("the embedded collector outlived its training process by 30 s")
    m = manifest(run_dir)["ranks"]["0"]
    assert not m["closed"] and m["gaps"] == 0 and m["written"] == m["received"] >= 201, m
    assert (run_dir / "findings.json").exists()
    assert "rank 0 never closed" in proc.stderr.read()


def test_a_rank_joins_only_a_live_announcement_of_its_own_job(tmp_path, monkeypatch):
    """The job file of rank 0's embedded collector: one written by a process that has ended (an
    earlier job on the same address) or for another job is not taken, and the wait ends in one
    clear error; a rank on another node is told at once that loopback cannot reach it."""
    from client_hooks import session

    monkeypatch.setattr(session.tempfile, "gettempdir", lambda: str(tmp_path))
    for k in ("GROUP_RANK", "NODE_RANK", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29511")
    job = session.job_key()
    path = session.job_file(job)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        info = {"job": job, "endpoint": "tcp://127.0.0.1:1", "dashboard": None, "run": "r0"}
        for stale in ({**info, "pid": int(gone.stdout)}, {**info, "pid": live.pid, "job": "other:1:"}):
            with open(path, "w") as f:
                json.dump(stale, f)
            t0 = time.monotonic()
            with pytest.raises(RuntimeError, match="rank 0 announced no embedded collector within 1 s"):
                session.join_job(job, wait_s=1.0)
            assert time.monotonic() - t0 < 3
        with open(path, "w") as f:
            json.dump({**info, "pid": live.pid}, f)
        assert session.join_job(job, wait_s=1.0)["endpoint"] == "tcp://127.0.0.1:1"
        monkeypatch.setenv("GROUP_RANK", "1")
        with pytest.raises(RuntimeError, match="another node than rank 0"):
            session.join_job(job, wait_s=30.0)  # at once
        monkeypatch.delenv("GROUP_RANK")
        monkeypatch.setenv("LOCAL_RANK", "0")
        monkeypatch.setenv("RANK", "4")
        with pytest.raises(RuntimeError, match="another node than rank 0"):
            session.join_job(job, wait_s=30.0)
    finally:
        live.kill()
        live.wait()


def test_the_sender_sleeps_between_rounds_and_wakes_early_for_a_burst_or_a_flush(monkeypatch):
    """A record waits for the sender's next round (IDLE_WAIT_S; here 30 s, so it waits);
    a burst past WAKE_FRACTION of the queue's bound, WAKE_ITEMS records, or flush(), wakes
    the sender at once."""
    from client_hooks import sender as sender_mod

    monkeypatch.setattr(sender_mod, "IDLE_WAIT_S", 30.0)
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    s = Sender(f"tcp://127.0.0.1:{port}", "rounds", max_queue_bytes=40_000, drop_report_s=60.0)
    try:
        assert wait_for(lambda: s.sent == 1, 5)  # hello, taken in the thread's first round
        time.sleep(0.2)  # the thread is asleep now
        s.send("metrics", "loss", {"value": 1.0}, step=0)
        time.sleep(0.5)
        assert s.sent == 1  # waits for the next round
        assert s.flush(5.0)  # wakes it
        assert s.sent == 2 or wait_for(lambda: s.sent == 2, 5)
        time.sleep(0.2)
        # a burst: 5 records of ~2.2 kB each pass a quarter of the 40 kB bound
        burst = [("gradients", f"layer{i}", {"norm": float(i)}, 2000) for i in range(5)]
        t0 = time.monotonic()
        assert s.send_many(burst, step=1) == 5
        assert wait_for(lambda: s.sent == 7, 5)
        assert time.monotonic() - t0 < 5
        s.send("metrics", "loss", {"value": 2.0}, step=2)  # below the mark: waits again
        time.sleep(0.5)
        assert s.sent == 7
        time.sleep(0.2)
        for i in range(sender_mod.WAKE_ITEMS - 1):  # small records: a frame's worth of them
            s.send("metrics", "lr", {"value": float(i)}, step=3)
        assert wait_for(lambda: s.sent == 8 + sender_mod.WAKE_ITEMS - 1, 5)
    finally:
        t0 = time.monotonic()
        s.close(timeout=1.0)
        assert time.monotonic() - t0 < 2.0  # close() wakes it too
    recs = []
    while pull.poll(1000):
        recs += decode(pull.recv())[0]
    pull.close()
    assert [r.name for r in recs] == (["hello", "loss"] + [f"layer{i}" for i in range(5)] + ["loss"]
                                      + ["lr"] * (sender_mod.WAKE_ITEMS - 1) + ["bye"])


def test_a_curve_server_key_given_itself_may_hold_a_slash_and_a_run_id_no_newline(monkeypatch, tmp_path):
    """TENSORTAP_CURVE_SERVER_KEY may be the Z85 key itself: '/' is one of its characters
    (about a third of public keys have one), and such a key was taken for a missing file. A
    run id with a trailing newline passed the pattern's "$" (a folder name ending in one)."""
    from client_hooks import session
    from collector.wire import valid_run_id

    pub = next(p for p, _ in iter(zmq.curve_keypair, None) if b"/" in p)
    monkeypatch.setenv("TENSORTAP_CURVE_SERVER_KEY", pub.decode())
    assert session.curve_options()["curve_server_key"] == pub
    monkeypatch.setenv("TENSORTAP_CURVE_SERVER_KEY", str(tmp_path / "srv.pub"))
    with pytest.raises(session.SetupError, match="no such file"):
        session.curve_options()
    assert valid_run_id("abc") and not valid_run_id("abc\n")
