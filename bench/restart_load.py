"""A restarted collector loading a big stored run while ingest goes on (a benchmark, not a test).

    .venv/bin/python bench/restart_load.py [--stored 1000000] [--baseline-s 4] [--prime]

Plants a run folder as a collector leaves it (`--stored` gradient records of 50 layers,
seq 0..n-1, and its manifest), starts a real collector (`tensortap collect`, web view on),
and has one sender process push batched frames (256 loss records each, blocking sends: as
fast as the collector takes them) to another run without pause. The ingest rate comes from
/api/health's `written`, sampled every 50 ms:
- baseline: `--baseline-s` seconds before the stored run sends again;
- during the load: from one frame of the stored run (its next seq: the restart case) until
  /api/health says no run is loading (`runs_loading` 0), which is also the load's time;
- longest stall: the longest time between two samples with no new record written, and
  the longest time the ingest thread took records in (/api/health's `received`) at under
  10% of its baseline rate: the ingest thread opening the stored run (RunFiles._recover)
  stops taking records in while the writer may still drain its queue, and /api/health may
  answer only once it is done (consecutive slow sample intervals are added up).
Run it from a checkout of older code (no load) to compare: there the "load" ends once the
stored run's frame is written.

--prime: before that, a collector takes one record of the stored run and stops (SIGTERM), so
the run is as a collector leaves it, its manifest written by the collector (with the stream
marks that let a restart read only what the manifest does not count); then the time
RunFiles(root, run) takes in this process (what the ingest thread does at the run's first
record after a restart) is printed, and the restart is measured as above.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.procs import CollectorProc, plant_run  # noqa: E402

T0 = 1_700_000_000.0


def _grad(seq: int, run: str):
    from collector.wire import Record

    x = seq * 1e-3
    return Record(v=1, run=run, rank=0, world=1, seq=seq, t=T0 + seq * 1e-3, kind="gradients",
                  name=f"layer.{seq % 50}", step=seq // 50, data={
                      "count": 4096, "mean": x, "std": 1.0 + x, "norm": 64.0 + x, "max_abs": 3.0 + x,
                      "nan": 0, "inf": 0, "zero_frac": 0.0, "weight_norm": 10.0 + x, "update_ratio": 1e-3})


def plant(run_dir: str, n: int) -> int:
    return plant_run(run_dir, n, _grad, "gradients.jsonl", T0)


def prime(out: str, n: int) -> int:
    """A collector takes record n of the stored run and stops: the run's manifest is then its
    own. Returns the run's next seq."""
    import zmq

    from collector.wire import encode
    col = CollectorProc(out)
    try:
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(col.endpoint)
        push.send(encode(_grad(n, "big")))
        push.close(linger=5000)
        mpath = os.path.join(out, "big", "manifest.json")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with open(mpath) as f:
                if json.load(f)["ranks"]["0"].get("written") == n + 1:
                    break
            time.sleep(0.1)
        else:
            raise SystemExit("the priming collector did not write the record: " + col.output())
    finally:
        col.stop()
    with open(os.path.join(out, "big", "manifest.json")) as f:
        m = json.load(f)
    print(f"primed: a collector wrote the run's manifest ({'with' if 'stream_marks' in m else 'without'} "
          f"stream marks)", flush=True)
    return n + 1


def sender(endpoint: str, stop) -> None:
    """Loss records of run `live`, 256 a frame, without pause; each round of 100k records
    under a new rank (its own sequence), so the frames are encoded once."""
    import zmq

    from collector.wire import Record, encode_many

    recs = [Record(v=1, run="live", rank=0, world=1, seq=i, t=time.time(), kind="metrics", name="loss",
                   step=i, data={"value": i * 1e-3}) for i in range(100_352)]
    frames = [encode_many(recs[i:i + 256])[0][0] for i in range(0, len(recs), 256)]
    sock = zmq.Context().socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.connect(endpoint)
    rank = 0
    while not stop.is_set():
        tag = b'"rank":%d,' % rank
        for f in frames:
            sock.send(f.replace(b'"rank":0,', tag))
            if stop.is_set():
                break
        rank += 1
    sock.close(linger=0)


def longest_stall(samples: list) -> float:
    """The longest time between two (time, count) samples with the same count."""
    return max((t2 - t1 for (t1, c1), (t2, c2) in zip(samples, samples[1:]) if c2 == c1), default=0.0)


def longest_slow(samples: list, rate: float) -> float:
    """The longest time over consecutive (time, count) sample intervals each under `rate`."""
    best = cur = 0.0
    for (t1, c1), (t2, c2) in zip(samples, samples[1:]):
        cur = cur + (t2 - t1) if (c2 - c1) < rate * (t2 - t1) else 0.0
        best = max(best, cur)
    return best


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "api/health", timeout=60) as r:
        return json.load(r)


def loading(url: str, run: str) -> bool:
    try:
        with urllib.request.urlopen(url + f"api/runs/{run}", timeout=10) as r:
            return bool(json.load(r).get("loading"))
    except urllib.error.HTTPError:  # not known yet: the ingest thread is opening it
        return True
    except (TimeoutError, urllib.error.URLError):  # too busy to answer in 10 s: still at it
        return True


def main() -> None:
    out = tempfile.mkdtemp(prefix="tt-restart-")
    try:
        run(out)
    finally:
        import shutil
        shutil.rmtree(out, ignore_errors=True)


def run(out: str) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stored", type=int, default=1_000_000)
    ap.add_argument("--baseline-s", type=float, default=4.0)
    ap.add_argument("--prime", action="store_true",
                    help="a collector writes the stored run's manifest first; time RunFiles() in process")
    a = ap.parse_args()
    t = time.perf_counter()
    size = plant(os.path.join(out, "big"), a.stored)
    print(f"planted {a.stored:,} gradient records, {size / 2**20:.0f} MiB, "
          f"in {time.perf_counter() - t:.1f} s", flush=True)
    nxt = a.stored
    if a.prime:
        nxt = prime(out, a.stored)
        from collector.store import RunFiles
        for i in range(3):
            t = time.perf_counter()
            RunFiles(out, "big").close()
            print(f"RunFiles(root, 'big') in this process ({i + 1}/3): "
                  f"{(time.perf_counter() - t) * 1000:.1f} ms", flush=True)
    col = CollectorProc(out, http=True)
    stop = mp.Event()
    p = mp.Process(target=sender, args=(col.endpoint, stop))
    p.start()
    samples = []  # (monotonic, written)
    taken = []  # (monotonic, received)

    def sample() -> dict:
        h = health(col.http)
        samples.append((time.monotonic(), h["written"]))
        taken.append((samples[-1][0], h["received"]))
        return h

    try:
        while sample()["written"] < 100_000:  # warm: the sender connected, the run opened
            time.sleep(0.05)
        b0 = samples[-1]
        while time.monotonic() - b0[0] < a.baseline_s:
            time.sleep(0.05)
            sample()
        b1 = samples[-1]
        import zmq

        from collector.wire import encode
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(col.endpoint)
        push.send(encode(_grad(nxt, "big")))  # the stored run sends again
        t_go = time.monotonic()
        i_go = len(samples)
        while True:
            time.sleep(0.05)
            h = sample()
            if time.monotonic() - t_go > 0.2 and not h.get("runs_loading") and not loading(col.http, "big"):
                break
            if time.monotonic() - t_go > 600:
                print("gave up waiting for the load", flush=True)
                break
        t_done = samples[-1][0]
        d1 = samples[-1]
        push.close(linger=1000)
        stall = longest_stall(samples[i_go - 1:])
        base_taken = (taken[i_go - 1][1] - taken[0][1]) / (taken[i_go - 1][0] - taken[0][0])
        ingest_stall = longest_slow(taken[i_go - 1:], 0.1 * base_taken)
        with urllib.request.urlopen(col.http + "api/runs/big", timeout=10) as r:
            summary = json.load(r)
    finally:
        stop.set()
        p.join(10)
        col.stop()
        if "could not load" in col.output():
            print(col.output(), flush=True)
    base = (b1[1] - b0[1]) / (b1[0] - b0[0])
    during = (d1[1] - b1[1]) / (d1[0] - b1[0])
    print(f"baseline ingest: {base:,.0f} records/s over {b1[0] - b0[0]:.1f} s")
    print(f"during the load: {during:,.0f} records/s over {t_done - t_go:.1f} s "
          f"({during / base:.0%} of baseline); longest stall {stall * 1000:.0f} ms "
          f"(written), {ingest_stall * 1000:.0f} ms (the ingest thread under 10% of its rate)")
    print(f"load: {a.stored:,} records ({size / 2**20:.0f} MiB) in {t_done - t_go:.1f} s "
          f"({a.stored / (t_done - t_go):,.0f} records/s, {size / 2**20 / (t_done - t_go):.0f} MiB/s); "
          f"the run's summary: {summary.get('records'):,} records")


if __name__ == "__main__":
    main()
