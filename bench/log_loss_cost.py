"""Training-thread cost of `tap.log_loss` on a step that captures nothing (the default cadence's
every other step), CPU. A Tap watches a small model; each round logs a fresh CPU loss tensor on
--calls non-capture steps (a log_batch each, as a loop makes) and times the log_loss calls
alone; records go to a drain process (a PULL socket), so the sender keeps up as with a
collector. Prints the median over rounds of the mean per call, and the same loop with
log_loss left out (the log_batch calls alone) for scale.

    python bench/log_loss_cost.py [--calls 2000] [--rounds 9] [--tree PATH]

--tree: import client_hooks from another checkout (e.g. a `git archive` of an earlier commit).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--calls", type=int, default=2000)
ap.add_argument("--rounds", type=int, default=9)
ap.add_argument("--tree", default=os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
a = ap.parse_args()
sys.path.insert(0, a.tree)


def drain(endpoint_q) -> None:
    import zmq

    sock = zmq.Context().socket(zmq.PULL)
    endpoint_q.put(f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}")
    while True:
        sock.recv()


def main() -> None:
    q = mp.Queue()
    proc = mp.Process(target=drain, args=(q,), daemon=True)
    proc.start()
    os.environ.update(TENSORTAP="1", TENSORTAP_ENDPOINT=q.get(), TENSORTAP_RUN="log-loss-cost")
    import torch

    from client_hooks import Tap

    torch.set_num_threads(1)
    model = torch.nn.Linear(8, 8)
    tap = Tap(first_n=1)  # the default cadence: step 0 of the epoch captures, the rest do not
    tap.watch(model)
    tap.log_batch(None, step=0, epoch=0)
    tap.step_end()
    losses = [model(torch.randn(4, 8)).pow(2).mean() for _ in range(16)]
    per_call, bare = [], []
    step = 1
    for _ in range(a.rounds):
        spent = 0.0
        for i in range(a.calls):
            tap.log_batch(None, step=step, epoch=0)
            t = time.perf_counter()
            tap.log_loss(losses[i % 16])
            spent += time.perf_counter() - t
            step += 1
        per_call.append(spent / a.calls * 1e6)
        t = time.perf_counter()
        for i in range(a.calls):
            tap.log_batch(None, step=step, epoch=0)
            step += 1
        bare.append((time.perf_counter() - t) / a.calls * 1e6)
        tap.sender.flush(5)
    print(f"client_hooks from {a.tree}; torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"log_loss on a non-capture step: median {statistics.median(per_call):.1f} us a call "
          f"(rounds {min(per_call):.1f}-{max(per_call):.1f}); log_batch alone {statistics.median(bare):.1f} us; "
          f"sender dropped {tap.sender.dropped}")
    tap.close()
    proc.terminate()


if __name__ == "__main__":
    main()
