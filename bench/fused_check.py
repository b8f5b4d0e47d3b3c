"""Fused CUDA statistics (client_hooks.fused) against the torch path and NumPy; launch counts.

    python bench/fused_check.py              # CUDA: fused vs torch vs NumPy, then launches/step
    python bench/fused_check.py --device cpu # dry run: the torch path vs NumPy only

Part 1 prints one line per tensor and every mismatch (the 10-vector [nan, inf, nfinite, min,
max, mean, std, nzero, norm, max_abs] over finite elements; counts exact, the rest within
1e-5 of the finite max-abs scale or 1e-5 relative). Part 2 (CUDA only) profiles a few steps
of the demo FNO with and without the every-step Tap and counts GPU kernels per step.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from client_hooks import stats  # noqa: E402

KEYS = ("nan", "inf", "nfin", "min", "max", "mean", "std", "nzero", "norm", "max_abs")


def reference(t: torch.Tensor) -> list:
    a = t.detach().to("cpu", torch.float64).numpy().reshape(-1)
    fin = np.isfinite(a)
    x = a[fin]
    n = int(fin.sum())
    if n == 0:
        return [int(np.isnan(a).sum()), int(np.isinf(a).sum()), 0] + [None] * 4 + [int((a == 0).sum()), None, None]
    return [int(np.isnan(a).sum()), int(np.isinf(a).sum()), n, x.min(), x.max(), x.mean(), x.std(),
            int((a == 0).sum()), float(np.sqrt((x * x).sum())), float(np.abs(x).max())]


def torch_path(x: torch.Tensor) -> list:
    saved = dict(stats._fused_state)
    stats._fused_state["off"] = "forced off by fused_check"
    try:
        return stats._real10(x.reshape(-1), extra=True).tolist()
    finally:
        stats._fused_state.clear()
        stats._fused_state.update(saved)


def compare(got: list, ref: list) -> list:
    bad = []
    nfin = ref[2]
    scale = ref[9] if nfin else 1.0
    for i, k in enumerate(KEYS):
        g, r = got[i], ref[i]
        if k in ("nan", "inf", "nfin", "nzero"):
            if int(g) != r:
                bad.append(f"{k}: got {g} want {r}")
        elif nfin == 0:
            continue  # no finite element: the payload says None, the vector value is unused
        elif not abs(g - r) <= 1e-5 * (scale if k != "norm" else abs(r)) + 1e-5 * abs(r) + 1e-30:
            bad.append(f"{k}: got {g!r} want {r!r}")
    return bad


def cases(device: str) -> list:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    special = r(3000)
    special[::97] = math.nan
    special[5::131] = math.inf
    special[7::151] = -math.inf
    special[11::50] = 0.0
    out = {
        "fp32 randn 1000": r(1000),
        "fp32 nan/inf/zeros 3000": special,
        "fp16 nan/inf/zeros 3000": special.half(),
        "bf16 nan/inf/zeros 3000": special.bfloat16(),
        "fp64 randn 5000": r(5000).double() * 1e3,
        "fp32 one element": torch.tensor([2.5]),
        "fp32 all nan 17": torch.full((17,), math.nan),
        "fp32 3 blocks + 5 (12293)": r(4097 * 3 + 5),
        "fp32 non-contiguous 300x200 .T": r(300, 200).t(),
        "fp32 large 16M mean 100 std 0.01": r(1 << 24) * 0.01 + 100.0,
        "fp32 large 64x64x64x64 activation": r(64, 64, 64, 64),
        "fp16 large 4M": r(1 << 22).half(),
    }
    return [(k, v.to(device)) for k, v in out.items()]


def correctness(device: str) -> int:
    failures = 0
    for name, t in cases(device):
        ref = reference(t)
        results = {"torch": torch_path(t)}
        if device == "cuda":
            f = stats._fused(t.reshape(-1).contiguous() if not t.is_contiguous() else t.reshape(-1))
            if f is None:
                print(f"FAIL {name}: fused path not used ({stats._fused_state.get('off')})")
                failures += 1
            else:
                results["fused"] = f.tolist()
        for path, got in results.items():
            bad = compare(got, ref)
            failures += bool(bad)
            rel = abs(got[6] - ref[6]) / abs(ref[6]) if ref[2] and ref[6] else 0.0
            print(f"{'FAIL' if bad else 'ok  '} {path:5s} {name} (std rel err {rel:.1e})"
                  + (": " + "; ".join(bad) if bad else ""))
    # the public entry points on the same device (empty, complex, a gradient layer)
    e = stats.tensor_stats_dict(stats.tensor_stats_vector(torch.empty(0, device=device)).tolist(), [0], "float32", False)
    ok = e["count"] == 0 and e["min"] is None
    z = torch.complex(torch.randn(100), torch.randn(100)).to(device)
    zc = stats.tensor_stats_dict(stats.tensor_stats_vector(z).tolist(), [100], "complex64", True)
    ok &= abs(zc["abs"]["mean"] - float(z.abs().double().mean())) < 1e-5
    g1 = torch.tensor([[0.0, 1.0], [-3.0, math.nan]], device=device)
    g2 = torch.tensor([0.0, 2.0, math.inf], device=device)
    d = stats.grad_stats_dict(stats.grad_stats_vector([g1, g2], [torch.ones(2, 2, device=device)]).tolist(), 7, None)
    ok &= d["nan"] == 1 and d["inf"] == 1 and abs(d["norm"] - math.sqrt(14)) < 1e-6 and d["zero_frac"] == 2 / 7
    ok &= abs(d["max_abs"] - 3.0) < 1e-7 and abs(d["weight_norm"] - 2.0) < 1e-6
    print(f"{'ok  ' if ok else 'FAIL'} entry points (empty, complex, gradient layer): {d}")
    failures += not ok
    print(f"correctness: {failures} failure(s); fused state: {stats._fused_state.get('off', 'on')}")
    return failures


def speed(device: str) -> None:
    """Per-tensor cost, fused vs torch path (CUDA events around 20 calls)."""
    for name, t in (("fp32 4096", torch.randn(4096, device=device)),
                    ("fp32 64x64x64x64", torch.randn(64, 64, 64, 64, device=device))):
        for path in ("torch", "fused"):
            f = (lambda: stats._real10(t.reshape(-1), extra=True)) if path == "fused" else (lambda: torch_path(t))
            f()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                f()
            cpu = (time.perf_counter() - t0) / 20
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / 20
            print(f"speed {path:5s} {name}: {wall * 1e6:.0f} us/call wall, {cpu * 1e6:.0f} us/call host")


def batch_speed(device: str) -> None:
    """Host cost of the engine's pattern: a capture's tensors one `Batch.add` each, its
    gradient layers one `add_group`, one `finish` (host time per call; wall time to done)."""
    from client_hooks import fused

    acts = [torch.randn(64, 64, 64, 64, device=device) for _ in range(14)]
    layers = [[torch.randn(64, 64, device=device), torch.randn(64, device=device)] for _ in range(20)]
    for _ in range(2):  # the first compiles
        b = fused.Batch(torch.device(device))
        for a in acts:
            b.add(a)
        b.add_group(layers)
        b.finish()
    torch.cuda.synchronize()
    reps, t_add, t_group, t_fin = 20, 0.0, 0.0, 0.0
    t0 = time.perf_counter()
    for _ in range(reps):
        b = fused.Batch(torch.device(device))
        t1 = time.perf_counter()
        for a in acts:
            b.add(a)
        t2 = time.perf_counter()
        b.add_group(layers)
        t3 = time.perf_counter()
        b.finish()
        t4 = time.perf_counter()
        t_add, t_group, t_fin = t_add + t2 - t1, t_group + t3 - t2, t_fin + t4 - t3
    host = (time.perf_counter() - t0) / reps
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / reps
    print(f"batch: {t_add / reps / len(acts) * 1e6:.0f} us host per add (64x64x64x64), "
          f"{t_group / reps * 1e6:.0f} us per add_group (20 layers), {t_fin / reps * 1e6:.0f} us per finish; "
          f"a capture of 14 tensors + 20 layers: {host * 1e3:.2f} ms host, {wall * 1e3:.2f} ms to done")


def launches(device: str, steps: int = 5, width: int = 64, modes: int = 16, batch: int = 64) -> None:
    """GPU kernels per training step, demo FNO (width 64, modes 16, batch 64), none vs every_step."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import overhead as B
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with tempfile.TemporaryDirectory() as tmp:
        endpoint, proc = B.start_collector(tmp)
        try:
            os.environ.update(TENSORTAP_BENCH_ON="1", TENSORTAP_ENDPOINT=endpoint, TENSORTAP_RUN="fused-check")
            torch.manual_seed(0)
            base = B.build_fno(width, modes)
            g = torch.Generator().manual_seed(1)
            batches = [(torch.randn(batch, 1, 64, 64, generator=g).to(device),
                        torch.randn(batch, 2, 64, 64, generator=g).to(device)) for _ in range(steps)]
            for name in ("none", "every_step"):
                v = B.make_variant(name, base, device, 1e-4)
                B.run_epoch(v, batches, device)  # warm-up (Triton compiles here)
                with profile(activities=acts) as p:
                    B.run_epoch(v, batches, device)
                # kernels and copies (not the spans of annotations such as Optimizer.step#Adam.step)
                gpu = {e.key: e for e in p.key_averages()
                       if e.device_type == torch.autograd.DeviceType.CUDA and "#" not in e.key}
                n = sum(e.count for e in gpu.values())
                busy = sum(e.self_device_time_total for e in gpu.values()) / steps / 1e3  # ms a step
                print(f"launches {name}: {n / steps:.0f} GPU ops per step (kernels and copies), "
                      f"{busy:.2f} ms of GPU time a step")
                if name == "none":
                    base_k = {k: (e.count, e.self_device_time_total) for k, e in gpu.items()}
                else:  # what the capture adds, kernel by kernel
                    diff = [(e.self_device_time_total - base_k.get(k, (0, 0))[1], e.count - base_k.get(k, (0, 0))[0], k)
                            for k, e in gpu.items()]
                    for us, cnt, k in sorted(diff, reverse=True)[:14]:
                        print(f"    +{us / steps / 1e3:6.3f} ms/step {cnt / steps:+6.1f} a step  {k[:100]}")
                # host calls that wait for the device or pin memory, all threads (a step must have none
                # of its own; the sender thread's cudaEventSynchronize is expected)
                waits = {e.key: e.count for e in p.key_averages()
                         if any(w in e.key for w in ("Synchronize", "HostAlloc", "FreeHost", "cudaMalloc", "cudaFree"))
                         or e.key in ("cudaMemcpy", "cudaMemset")}
                print(f"host waits/allocations {name}, {steps} steps: {waits or 'none'}")
                if v["tap"] is not None:
                    v["tap"].close()
            from client_hooks import session

            for s in list(session._senders.values()):
                s.close()
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-launches", action="store_true")
    a = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name() if a.device == 'cuda' else 'CPU'}; torch {torch.__version__}")
    fails = correctness(a.device)
    if a.device == "cuda":
        try:
            import triton

            print(f"triton {triton.__version__}")
        except ImportError:
            print("triton: not importable")
        speed(a.device)
        batch_speed(a.device)  # (the grouped kernel's bandwidth: bench/partials_bandwidth.py)
        if not a.no_launches:
            launches(a.device)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
