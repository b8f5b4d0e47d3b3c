"""Step time of a torch.compile'd demo FNO with a Tap against the same compiled FNO without
one (CPU, one torch thread). A compiled model keeps calling the hooks it was compiled with at
every step: with the default cadence (the model's children hooked, the first batch of every
20-step epoch captured) and with all_leaves (every leaf hooked). tap.record() of the model's
output comes after the compiled call.

    python bench/compile_cost.py [--backend aot_eager|inductor] [--rounds 6] [--tree PATH]

Prints each variant's median step time over alternated rounds of 20 steps, and its ratio to
the untapped model's; then dynamo's counts for the whole run (graphs compiled, graph breaks).
--tree: client_hooks from another checkout (a `git archive` of an earlier commit).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--backend", default="aot_eager")
ap.add_argument("--rounds", type=int, default=6)
ap.add_argument("--tree", default=os.path.dirname(HERE))
a = ap.parse_args()
sys.path.insert(0, os.path.abspath(a.tree))
import client_hooks  # noqa: E402,F401  (first: from --tree, before overhead adds this checkout)
from tests.client_hooks.conftest import Pull  # noqa: E402  (a PULL socket that decodes records)
pull = Pull()
os.environ.update(TENSORTAP_COMPILE_COST="1", TENSORTAP_ENDPOINT=pull.endpoint, TENSORTAP_RUN="compile-cost")

import torch  # noqa: E402

import overhead as B  # noqa: E402
from client_hooks import Tap  # noqa: E402

torch.set_num_threads(1)
EPOCH = 20
OPTIONS = {"none": None, "default": {},
           "all_leaves": {"all_leaves": True, "gradients": "all"}}


def make(name: str, base) -> dict:
    """Variant `name`: a copy of `base` whose class is its own. Compiled code is kept per code
    object and does not check a module's hooks (torch's skip_nnmodule_hook_guards): with one
    class, the untapped model's compiled code would also run for the tapped ones, hooks
    ignored. Each class is a guard of its own."""
    model = copy.deepcopy(base)
    model.__class__ = type(f"{type(base).__name__}_{name}", (type(base),), {})
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    tap = None
    if OPTIONS[name] is not None:
        tap = Tap(gate="TENSORTAP_COMPILE_COST", pairs={"x_combined": "real_imag"}, **OPTIONS[name])
        tap.watch(model, optimizer=opt)
    return {"compiled": torch.compile(model, backend=a.backend), "opt": opt, "tap": tap, "step": 0}


def run(v: dict, batches: list, steps: int) -> float:
    """Mean seconds a step over `steps` steps."""
    tap, t0 = v["tap"], time.perf_counter()
    for i in range(steps):
        x, y = batches[i % EPOCH]
        if tap is not None:
            tap.log_batch({"images": x}, epoch=v["step"] // EPOCH, batch_idx=i)
        out = v["compiled"](x)
        if tap is not None:
            tap.record("x_combined", out)
        loss = (out - y).abs().mean()
        v["opt"].zero_grad()
        loss.backward()
        v["opt"].step()
        if tap is not None:
            tap.log_loss(loss)
        v["step"] += 1
    return (time.perf_counter() - t0) / steps


def main() -> None:
    torch.manual_seed(0)
    base = B.build_fno(16, 6)
    batches = [(torch.randn(4, 1, 32, 32), torch.randn(4, 2, 32, 32)) for _ in range(EPOCH)]
    vs = {n: make(n, base) for n in OPTIONS}
    for v in vs.values():  # the compilation; a Tap's first step is a capture: its hooks are compiled in
        run(v, batches, 3)
    times: dict = {n: [] for n in vs}
    names = list(vs)
    for r in range(a.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(run(vs[n], batches, EPOCH))
    base_t = statistics.median(times["none"])
    from torch._dynamo.utils import counters

    print(f"client_hooks from {os.path.dirname(client_hooks.__file__)}; torch {torch.__version__}, "
          f"backend {a.backend}, demo FNO width 16, batch 4, 32x32, CPU")
    for n in vs:
        m = statistics.median(times[n])
        print(f"{n:<10} median {m * 1e3:.2f} ms/step, {m / base_t:.3f}x")
    print(f"dynamo, the three models together: {counters['stats']['unique_graphs']} graphs compiled, "
          f"{sum(counters['graph_break'].values())} graph breaks")
    time.sleep(0.5)
    acts = {r["name"] for r in pull.records if r["kind"] == "activations"}
    print(f"activation records: {len(acts)} names (x_combined is recorded after the compiled call)")
    pull.close()


if __name__ == "__main__":
    main()
