"""A training-like sender process for the reliability tests and benchmarks.

    python -m tests.sender_proc ENDPOINT RUN RANK --rate R --seconds S [--batch B]

Pushes metrics records at R records/s (0: as fast as it can) for S seconds through the real
client Sender, then closes it and prints one JSON line: sent, dropped, enqueue latency
percentiles (the training thread's cost of each `send`).
"""
from __future__ import annotations

import argparse
import json
import time

from client_hooks.sender import Sender


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("endpoint")
    ap.add_argument("run")
    ap.add_argument("rank", type=int)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--queue-bytes", type=int, default=32 << 20)
    a = ap.parse_args()
    s = Sender(a.endpoint, a.run, rank=a.rank, world=a.world, batch=a.batch,
               max_queue_bytes=a.queue_bytes)
    lat = []
    t0 = time.monotonic()
    i = 0
    payload = {"count": 4096, "mean": 0.1, "std": 1.0, "min": -3.0, "max": 3.0, "nan": 0, "inf": 0}
    while True:
        now = time.monotonic()
        if now - t0 >= a.seconds:
            break
        if a.rate and i >= (now - t0) * a.rate:
            time.sleep(0.001)
            continue
        t = time.perf_counter()
        s.send("gradients", f"layer{i % 50}", payload, step=i // 50)
        lat.append(time.perf_counter() - t)
        i += 1
    s.flush(5.0)
    s.close(2.0)
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else 0.0  # noqa: E731
    print(json.dumps({"rank": a.rank, "attempted": i, "sent": s.sent, "dropped": s.dropped, "reports": s.reports,
                      "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": lat[-1] * 1000 if lat else 0}), flush=True)


if __name__ == "__main__":
    main()
