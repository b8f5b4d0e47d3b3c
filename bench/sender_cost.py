"""Sender-thread work for an every-step capture: making the queued items' payloads (since the
seventh session a capture's statistics are one packed record, decoded by the collector), then
building, encoding and handing the frame to ZeroMQ. The demo FNO (width 8, modes 4) on CPU, the
torch path; the sender's thread is stopped and its two stages are timed directly (thread CPU
time) on the queue of each step; the frames go to a drain process.

    python bench/sender_cost.py [--steps 30] [--tree DIR]

--tree: import client_hooks (and collector) from another checkout, to compare trees.
"""
from __future__ import annotations

import argparse
import atexit
import os
import statistics
import subprocess
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--steps", type=int, default=30)
ap.add_argument("--tree", default=os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
a = ap.parse_args()
sys.path[:0] = [a.tree, os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))]

import torch  # noqa: E402

from client_hooks.engine import Engine, Options  # noqa: E402
from client_hooks.sender import Sender  # noqa: E402

_DRAIN = ("import sys, zmq; s = zmq.Context().socket(zmq.PULL); "
          "print(s.bind_to_random_port('tcp://127.0.0.1'), flush=True)\n"
          "while True: s.recv()")


def main() -> None:
    from examples.grid_lines.models import FNOGenerator

    drain = subprocess.Popen([sys.executable, "-c", _DRAIN], stdout=subprocess.PIPE, text=True)
    atexit.register(drain.kill)
    sender = Sender(f"tcp://127.0.0.1:{int(drain.stdout.readline())}", "sender-cost")
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
        t0 = time.thread_time()
        recs = sender._records(items)
        t1 = time.thread_time()
        sender._send_records(recs, None)
        t2 = time.thread_time()
        decode.append(t1 - t0)
        send.append(t2 - t1)
    nrec = sum(r[1] if isinstance(r, tuple) else 1 for r in recs)  # (record, records it holds) since packing
    print(f"{nrec} records a capture in {len(items)} queued items; median per capture: payloads "
          f"{statistics.median(decode) * 1e6:.1f} us, frame + encode + ZeroMQ {statistics.median(send) * 1e6:.1f} us "
          f"({(statistics.median(decode) + statistics.median(send)) / nrec * 1e6:.2f} us a record)")


if __name__ == "__main__":
    main()
