"""Sender-thread work for an every-step capture, in one process: making the queued items'
payloads (a capture's statistics are one packed record, decoded by the collector), then
building, encoding and handing the frame to ZeroMQ. The demo FNO on CPU; the sender's thread
is stopped and its two stages are timed directly. (The receiving thread shares this
process's GIL.)

    python bench/sender_cost.py [--steps 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402

from client_hooks.engine import Engine, Options  # noqa: E402
from client_hooks.sender import Sender  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    import zmq

    from examples.grid_lines.models import FNOGenerator

    pull = zmq.Context.instance().socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    threading.Thread(target=lambda: [pull.recv() for _ in iter(int, 1)], daemon=True).start()
    sender = Sender(f"tcp://127.0.0.1:{port}", "sender-cost")
    sender._closing.set()  # stop its thread: the two stages run here, timed
    sender._thread.join()
    eng = Engine(sender, Options(every_n_steps=1, all_leaves=True, gradients="all"))
    torch.manual_seed(0)
    model = FNOGenerator(channels=1, width=8, modes=4, depth=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    eng.watch(model, param_hooks=True)

    def step() -> list:
        eng.begin_step()
        x = torch.randn(2, 1, 16, 16)
        eng.log_batch({"images": x}, "train", None)
        out = model(x)
        eng.record("x_combined", out)
        out.abs().mean().backward()
        opt.step()
        opt.zero_grad()
        eng.end_step()
        items = list(sender._queue)
        sender._queue.clear()
        return items

    for _ in range(5):
        step()
    decode, send = [], []
    for _ in range(a.steps):
        items = step()
        t0 = time.perf_counter()
        recs = sender._records(items)
        t1 = time.perf_counter()
        sender._send_records(recs, None)
        t2 = time.perf_counter()
        decode.append(t1 - t0)
        send.append(t2 - t1)
    nrec = sum(n for _, n in recs)
    print(f"{nrec} records a capture in {len(items)} queued items; median per capture: payloads "
          f"{statistics.median(decode) * 1e6:.1f} us, frame + encode + ZeroMQ {statistics.median(send) * 1e6:.1f} us "
          f"({(statistics.median(decode) + statistics.median(send)) / nrec * 1e6:.2f} us a record)")


if __name__ == "__main__":
    main()
