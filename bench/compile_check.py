"""A torch.compile'd model under a Tap: the time of each step (a capture every other step)
and whether the captured activation statistics equal the eager model's.

    python bench/compile_check.py [--tree PATH] [--backend inductor|aot_eager] [--mode MODE] [--steps 6] [--calls 1]

--tree: import client_hooks from another checkout (e.g. a `git archive` of an earlier commit),
to compare. Compiled code keeps the module hooks it was compiled with; tensortap's hooks
hand their values over without a statistic in the graph (client_hooks.hooks.Traced), so the
model should stay whole graphs (one for capture steps, one for the others), and a capture
step should cost no new compilation after the first of each kind. Prints dynamo's counts at
the end: graphs compiled, graph breaks, and the graphs' operator calls (a whole forward of
this MLP: 3). Runs on CUDA when there is a GPU (the fused statistics path), else on CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--tree", default=os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
ap.add_argument("--backend", default="inductor")
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--calls", type=int, default=1, help="compiled calls a step (a rollout, micro-batches: "
                "each step's loss sums them; the records are the last call's)")
ap.add_argument("--mode", default=None, help="torch.compile's mode, e.g. reduce-overhead (CUDA graphs)")
a = ap.parse_args()
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path[:0] = [os.path.abspath(a.tree), ROOT]

from tests.client_hooks.conftest import Pull  # noqa: E402  (a PULL socket that decodes records)

pull = Pull()
os.environ.update(TENSORTAP="1", TENSORTAP_ENDPOINT=pull.endpoint, TENSORTAP_RUN="compile-check")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import client_hooks  # noqa: E402
from client_hooks import Tap  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
print(f"client_hooks from {os.path.dirname(client_hooks.__file__)}; torch {torch.__version__}; "
      f"backend {a.backend}, mode {a.mode}; {torch.cuda.get_device_name() if dev == 'cuda' else 'CPU'}")
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).to(dev)
compiled = torch.compile(model, backend=a.backend, mode=a.mode)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
want = {}
try:
    with Tap(first_n=0, every_n_steps=2, all_leaves=True) as tap:
        tap.watch(model, optimizer=opt)
        for i in range(a.steps):
            x = torch.randn(5, 8, device=dev)
            with torch.no_grad():
                h = model[1](model[0](x)).double()
                want[i] = h.mean().item()
            tap.log_batch({"x": x}, epoch=0, batch_idx=i)
            t = time.perf_counter()
            xs = [torch.randn(5, 8, device=dev) for _ in range(a.calls - 1)] + [x]  # (x last: `want`)
            sum(compiled(xi).pow(2).mean() for xi in xs).backward()
            opt.step()
            opt.zero_grad()
            if dev == "cuda":
                torch.cuda.synchronize()
            print(f"step {i} ({'capture' if i % 2 == 0 else 'plain'}): {(time.perf_counter() - t) * 1e3:.1f} ms",
                  flush=True)
except Exception as e:
    print(f"raised into training: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
time.sleep(1)
got = {r["step"]: r["data"]["mean"] for r in pull.records if r["name"] == "1:output"}
bad = [s for s, m in got.items() if abs(m - want[s]) > 1e-5 * (1 + abs(want[s]))]
print(f"records of 1:output at steps {sorted(got)}; differing from the eager model's: {bad or 'none'}")
from torch._dynamo.utils import counters  # noqa: E402  (imported by torch.compile already)

print(f"dynamo: {counters['stats']['unique_graphs']} graphs compiled, {sum(counters['graph_break'].values())} "
      f"graph breaks, {counters['stats']['calls_captured']} operator calls in the graphs")
pull.close()
