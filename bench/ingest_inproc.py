"""The collector's ingest thread alone: `Ingest.frame` on pre-encoded frames in one process,
no sockets and no writer thread (its hand-offs are dropped), the index on. Microseconds a
record, the minimum over rounds (the VM is shared: the minimum is the least disturbed).
Then the live stream's read of the index: one `since()` poll after each new frame.

    .venv/bin/python bench/ingest_inproc.py [--records 100000] [--rounds 15] [--payload loss|gradients|packed]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ingest import _payload  # noqa: E402  (bench/ingest.py)
from collector.index import Index  # noqa: E402
from collector.ingest import Ingest  # noqa: E402
from collector.wire import Record, encode, encode_many  # noqa: E402


PACKED_RECORDS = 40  # a capture of the demo FNO at every step: 17 activations, 2 fields, 20 layers, total


def _packed_frames(records: int) -> list[bytes]:
    """Packed capture records (collector/packed.py) as the client sends them, one a frame."""
    import numpy as np

    entries = [["activations", [f"blocks.{i}:output"], [[7 * i, 7 * i + 7]],
                ["tensor", [64, 64, 64, 64], "float32", False, None]] for i in range(17)]
    entries += [["loader_stats", [f], [[119 + 7 * j, 126 + 7 * j]],
                 ["tensor", [64, 1, 64, 64], "float32", False, {"split": "train", "batch": 0}]]
                for j, f in enumerate(("images", "target"))]
    entries.append(["gradients", [f"layer.{i}" for i in range(20)] + ["_total"], [[133, 133 + 200 + 80]],
                    ["grads", [4096] * 20, [[2 * i, 2 * i + 2] for i in range(20)], 40, True]])
    values = np.random.default_rng(0).random(133 + 280).astype("<f8").tobytes()
    return [encode(Record(v=1, run="r", rank=0, world=1, seq=PACKED_RECORDS * i, t=time.time(), kind="packed",
                          name="capture", step=i, data={"values": values, "entries": entries}))
            for i in range(max(1, records // PACKED_RECORDS))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--payload", choices=["loss", "gradients", "packed"], default="loss",
                    help="packed: every-step captures of the demo FNO as packed records (40 records each)")
    a = ap.parse_args()
    gc.freeze()  # as the collector does at start (collector/server.py)
    gc.set_threshold(50_000, 20, 100)
    if a.payload == "packed":
        frames = _packed_frames(a.records)
        modes, nrec = {"packed": frames}, len(frames) * PACKED_RECORDS
    else:
        recs = []
        for i in range(a.records):
            kind, name, data = _payload(i, a.payload)
            recs.append(Record(v=1, run="r", rank=0, world=1, seq=i, t=time.time(), kind=kind, name=name,
                               step=i, data=data))
        modes, nrec = {"single": [encode(r) for r in recs],
                       "batch 256": [encode_many(recs[i:i + 256])[0][0] for i in range(0, len(recs), 256)]}, len(recs)
    for mode, frames in modes.items():
        best = float("inf")
        for _ in range(a.rounds):
            with tempfile.TemporaryDirectory(prefix="tt-inproc-") as out:
                ing = Ingest(out, Index())
                ing.queue.put = lambda *args, **kw: None  # no writer: hand-offs dropped
                t0 = time.perf_counter()
                for f in frames:
                    ing.frame(f)
                ing.handoff()
                best = min(best, (time.perf_counter() - t0) / nrec)
                ing.close_files()
        print(f"{mode:>10}: {best * 1e6:.2f} us a record ({1 / best:,.0f} records/s on one core)")
    if a.payload == "packed":
        return
    # the live stream's read: one poll (RunIndex.since) after each new 24-record frame, once
    # the ring is full (what the dashboard's server-sent events do every 25 ms)
    with tempfile.TemporaryDirectory(prefix="tt-inproc-") as out:
        index = Index()
        ing = Ingest(out, index)
        ing.queue.put = lambda *args, **kw: None
        frames = [encode_many(recs[i:i + 24])[0][0] for i in range(0, len(recs), 24)]
        half = len(frames) // 2
        for f in frames[:half]:
            ing.frame(f)
        ri = index.get("r")
        cursor, spent = ri.count, 0.0
        for f in frames[half:]:
            ing.frame(f)
            t0 = time.perf_counter()
            cursor, _ = ri.since(cursor)
            spent += time.perf_counter() - t0
        ing.close_files()
    print(f"live read: {spent / (len(frames) - half) * 1e6:.0f} us a poll (one new 24-record frame, "
          f"{ri.count - len(frames[half:]) * 24:,} records before)")


if __name__ == "__main__":
    main()
