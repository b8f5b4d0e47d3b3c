"""GPU time of the grouped partials kernel over a forward's activations, for one tree.

    python bench/partials_bandwidth.py [--tree PATH] [--tensors 17] [--numel 16777216] [--reps 10] [--sweep]

One `Batch.add_group` over TENSORS float32 tensors of NUMEL elements (the default: the demo
FNO's 17 activations at batch 64, 64x64x64x64 each, 1.14 GB), timed with CUDA events over REPS
launches, in three cases:
- finite: normal values (nearly every block of a training's activations);
- a NaN a block: every block holds one NaN (the general way, worst case);
- a NaN a tensor: one NaN in each tensor's first block (the rest finite).
Each case's rows are checked against torch's float64 count, min, max and mean of the same
values. --tree imports client_hooks from another checkout (e.g. `.prev`, a `git archive`
of an earlier commit), so that two trees compare in one device call (bench/device_run.sh).
Needs CUDA with Triton; on CPU, `TRITON_INTERPRET=1` with a small --numel checks that it runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--tree", default=os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
ap.add_argument("--tensors", type=int, default=17)
ap.add_argument("--numel", type=int, default=64 * 64 * 64 * 64)
ap.add_argument("--reps", type=int, default=10)
ap.add_argument("--sweep", action="store_true",
                help="then the finite case at other block sizes and warps (fused.BLOCK, fused.WARPS)")
a = ap.parse_args()
sys.path.insert(0, a.tree)

import torch  # noqa: E402

from client_hooks import stats  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
fused = stats.fused_module(torch.ones(1, device=DEV))
if fused is None:
    sys.exit("partials_bandwidth: needs CUDA with Triton (or TRITON_INTERPRET=1 TENSORTAP_FUSED_ON_CPU=1 on CPU)")
if os.path.dirname(os.path.abspath(fused.__file__)) != os.path.join(os.path.abspath(a.tree), "client_hooks"):
    sys.exit(f"partials_bandwidth: client_hooks came from {fused.__file__}, not from --tree {a.tree}")


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(xs: list) -> tuple[float, torch.Tensor]:
    """ms a launch (CUDA events over the reps; wall time on CPU), and the rows of the last."""
    for _ in range(2):  # the first compiles
        b = fused.Batch(torch.device(DEV))
        b.add_group([[x] for x in xs])
        rows = b.finish()
    sync()
    if DEV == "cuda":
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
    t0 = time.perf_counter()
    for _ in range(a.reps):
        b = fused.Batch(torch.device(DEV))
        b.add_group([[x] for x in xs])
    if DEV == "cuda":
        e1.record()
    sync()
    ms = e0.elapsed_time(e1) / a.reps if DEV == "cuda" else (time.perf_counter() - t0) * 1e3 / a.reps
    return ms, rows


def wrong(xs: list, rows: torch.Tensor) -> int:
    """Rows whose count, min, max or mean differ from torch's float64 ones."""
    bad = 0
    for x, r in zip(xs, rows.double().cpu()):
        y = x.double()
        fin = torch.isfinite(y)
        f = y[fin]
        want = torch.tensor([float(torch.isnan(y).sum()), float(fin.sum()), float(f.min()), float(f.max()),
                             float(f.mean())], dtype=torch.float64)
        got = r[[0, 2, 3, 4, 5]]
        scale = float(f.abs().max())
        bad += int(not torch.allclose(got, want, rtol=1e-6, atol=1e-5 * scale))
    return bad


def main() -> None:
    name = torch.cuda.get_device_name() if DEV == "cuda" else "CPU (Triton interpreter)"
    g = torch.Generator(device=DEV).manual_seed(0)
    xs = [torch.randn(a.numel, device=DEV, generator=g) for _ in range(a.tensors)]
    gb = sum(x.numel() * x.element_size() for x in xs) / 1e9
    rev = os.path.join(a.tree, "REV")  # .prev/REV: the commit that tree came from
    rev = open(rev).read().strip() if os.path.exists(rev) else "this checkout"
    print(f"client_hooks from {a.tree} ({rev}); {name}; {a.tensors} float32 tensors of {a.numel} elements "
          f"({gb:.2f} GB), BLOCK {fused.BLOCK}, {fused.WARPS} warps, {a.reps} launches a case")
    cases = [("finite", xs)]
    every = [x.clone() for x in xs]
    for x in every:
        x[:: fused.BLOCK] = float("nan")
    cases.append(("a NaN a block", every))
    first = [x.clone() for x in xs]
    for x in first:
        x[7] = float("nan")
    cases.append(("a NaN a tensor", first))
    for what, ys in cases:
        ms, rows = timed(ys)
        bad = wrong(ys, rows)
        print(f"  {what:15s} {ms:8.3f} ms  {gb / ms:6.2f} TB/s" + (f"  {bad} ROWS WRONG" if bad else ""))
    if a.sweep:
        sweep(xs, gb)


SWEEP = ((2048, 4), (4096, 8), (8192, 4), (8192, 8), (16384, 8), (16384, 16))


def sweep(xs: list, gb: float) -> None:
    """The finite case at other block sizes and warps than the engine's (the index tables
    depend on the block size: made again for each)."""
    block0, warps0 = fused.BLOCK, fused.WARPS
    try:
        for block, warps in SWEEP:
            fused.BLOCK, fused.WARPS = block, warps
            fused._layouts.clear()
            ms, rows = timed(xs)
            bad = wrong(xs, rows)
            print(f"  finite, BLOCK {block:5d} warps {warps:2d} {ms:8.3f} ms  {gb / ms:6.2f} TB/s"
                  + (f"  {bad} ROWS WRONG" if bad else ""))
    finally:
        fused.BLOCK, fused.WARPS = block0, warps0
        fused._layouts.clear()


if __name__ == "__main__":
    main()
