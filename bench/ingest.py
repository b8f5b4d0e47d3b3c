"""Collector ingest throughput and memory (a benchmark, not a test).

    .venv/bin/python bench/ingest.py [--records 400000] [--senders 2] [--payload loss|gradients]

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


def _payload(i: int, payload: str = "loss") -> tuple[str, str, dict]:
    """(kind, name, data) of record i: the loss, or one of 50 layers' gradient statistics
    (the client's payload: 10 numbers; a capture step's frame holds many series)."""
    if payload == "loss":
        return "metrics", "loss", {"value": i * 0.001}
    x = i * 1e-3
    return "gradients", f"layer.{i % 50}", {
        "count": 4096, "mean": x, "std": 1.0 + x, "norm": 64.0 + x, "max_abs": 3.0 + x, "nan": 0,
        "inf": 0, "zero_frac": 0.0, "weight_norm": 10.0 + x, "update_ratio": 1e-3}


def raw_sender(endpoint: str, run: str, rank: int, n: int, batch: int, go, payload: str) -> None:
    import zmq

    from collector.wire import Record, encode, encode_many

    recs = []
    for i in range(n):
        kind, name, data = _payload(i, payload)
        recs.append(Record(v=1, run=run, rank=rank, world=1, seq=i, t=time.time(), kind=kind,
                           name=name, step=i // 50 if payload == "gradients" else i, data=data))
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


def client_sender(endpoint: str, run: str, rank: int, n: int, batch: int, go, payload: str) -> None:
    from client_hooks.sender import Sender

    s = Sender(endpoint, run, rank=rank, batch=batch, max_queue_bytes=1 << 30)
    payloads = [_payload(i, payload) for i in range(n)]
    go.wait()
    for i, (kind, name, data) in enumerate(payloads):
        s.send(kind, name, data, step=i // 50 if payload == "gradients" else i)
        if i % 4096 == 0:
            while len(s._queue) > 200_000:  # keep the queue bounded without dropping
                time.sleep(0.001)
    s.flush(120)
    s.close(5)
    print(f"  sender rank {rank}: sent {s.sent} dropped {s.dropped}", flush=True)


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "api/health", timeout=5) as r:
        return json.load(r)


def run_mode(kind: str, batch: int, total: int, senders: int, payload: str = "loss") -> dict:
    out = tempfile.mkdtemp(prefix="tt-bench-")
    col = CollectorProc(out, http=True)
    rss = PeakRSS(col.proc.pid)
    go = mp.Event()
    target = raw_sender if kind == "raw" else client_sender
    per = total // senders
    ps = [mp.Process(target=target, args=(col.endpoint, f"bench-{kind}-{batch}", r, per, batch, go, payload))
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
    ap.add_argument("--payload", choices=["loss", "gradients"], default="loss",
                    help="every record the loss (one series), or gradient statistics of 50 layers")
    ap.add_argument("--modes", default="raw:1,raw:256,client:1,client:256",
                    help="comma-separated sender:batch pairs")
    a = ap.parse_args()
    rows = []
    modes = [(m.split(":")[0], int(m.split(":")[1])) for m in a.modes.split(",")]
    print(f"payload: {a.payload}", flush=True)
    for kind, batch in modes:
        r = run_mode(kind, batch, a.records, a.senders, a.payload)
        print(f"{r['mode']:>18}: {r['rate']:>10,.0f} records/s  ({r['records']} in {r['seconds']:.2f} s, "
              f"gaps {r['gaps']}, peak RSS {r['peak_rss_mib']:.0f} MiB)", flush=True)
        rows.append(r)
    print("\n| mode | records | seconds | records/s | gaps | collector peak RSS |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['records']:,} | {r['seconds']:.2f} | {r['rate']:,.0f} | {r['gaps']} | {r['peak_rss_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
