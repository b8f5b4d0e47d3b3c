"""Collector ingest throughput and memory (a benchmark, not a test).

    .venv/bin/python bench/ingest.py [--records 400000] [--senders 2]

For each mode, starts a real collector subprocess (`tensortap collect`, validation and JSONL
write on), pushes records from sender processes, and measures records/s from the first send
until the collector reports them all written (polling /api/health), plus the collector's
peak RSS (psutil, sampled every 20 ms). Modes:
- single:  one record per frame (the collector's per-frame path)
- batched: 256 records per frame (the client's default)
Two sender kinds: `raw` processes push frames encoded up front (measures the collector
alone); `client` processes push through client_hooks.sender.Sender (the whole path).
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
from tests.procs import CollectorProc, PeakRSS  # noqa: E402


def _payload(i: int) -> dict:
    return {"value": i * 0.001}


def raw_sender(endpoint: str, run: str, rank: int, n: int, batch: int, go) -> None:
    import zmq

    from collector.wire import Record, encode, encode_many

    recs = [Record(v=1, run=run, rank=rank, world=1, seq=i, t=time.time(), kind="metrics",
                   name="loss", step=i, data=_payload(i)) for i in range(n)]
    if batch == 1:
        frames = [encode(r) for r in recs]
    else:
        frames = [encode_many(recs[i:i + batch])[0][0] for i in range(0, n, batch)]
    sock = zmq.Context().socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.connect(endpoint)
    go.wait()
    for f in frames:
        sock.send(f)  # blocking send: the benchmark wants every record delivered
    sock.close(linger=-1)


def client_sender(endpoint: str, run: str, rank: int, n: int, batch: int, go) -> None:
    from client_hooks.sender import Sender

    s = Sender(endpoint, run, rank=rank, batch=batch, max_queue_bytes=1 << 30)
    payloads = [_payload(i) for i in range(n)]
    go.wait()
    for i, p in enumerate(payloads):
        s.send("metrics", "loss", p, step=i)
        if i % 4096 == 0:
            while len(s._queue) > 200_000:  # keep the queue bounded without dropping
                time.sleep(0.001)
    s.flush(120)
    s.close(5)
    print(f"  sender rank {rank}: sent {s.sent} dropped {s.dropped}", flush=True)


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "api/health", timeout=5) as r:
        return json.load(r)


def run_mode(kind: str, batch: int, total: int, senders: int) -> dict:
    out = tempfile.mkdtemp(prefix="tt-bench-")
    col = CollectorProc(out, http=True)
    rss = PeakRSS(col.proc.pid)
    go = mp.Event()
    target = raw_sender if kind == "raw" else client_sender
    per = total // senders
    ps = [mp.Process(target=target, args=(col.endpoint, f"bench-{kind}-{batch}", r, per, batch, go))
          for r in range(senders)]
    for p in ps:
        p.start()
    time.sleep(2.0)  # let senders build their frames and connect
    expected = per * senders + (2 * senders if kind == "client" else 0)  # + hello/bye
    t0 = time.perf_counter()
    go.set()
    while True:
        h = health(col.http)
        if h["written"] >= expected:
            break
        if time.perf_counter() - t0 > 300:
            break
        time.sleep(0.02)
    dt = time.perf_counter() - t0
    for p in ps:
        p.join(30)
    peak = rss.stop()
    h = health(col.http)
    col.stop()
    return {"mode": f"{kind} {'single' if batch == 1 else f'batch {batch}'}", "records": h["written"],
            "seconds": dt, "rate": h["written"] / dt, "gaps": h["gaps"], "rejected": h["rejected"],
            "peak_rss_mib": peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=400_000)
    ap.add_argument("--senders", type=int, default=2)
    a = ap.parse_args()
    rows = []
    for kind, batch in [("raw", 1), ("raw", 256), ("client", 1), ("client", 256)]:
        r = run_mode(kind, batch, a.records, a.senders)
        print(f"{r['mode']:>18}: {r['rate']:>10,.0f} records/s  ({r['records']} in {r['seconds']:.2f} s, "
              f"gaps {r['gaps']}, peak RSS {r['peak_rss_mib']:.0f} MiB)", flush=True)
        rows.append(r)
    print("\n| mode | records | seconds | records/s | gaps | collector peak RSS |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['records']:,} | {r['seconds']:.2f} | {r['rate']:,.0f} | {r['gaps']} | {r['peak_rss_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
