"""Memory a capture step holds beyond training's own, on the demo FNO: bench/overhead.py's
variants and step. On CUDA the deferred values (client_hooks.engine) are held from their
hook to the grouped launch at the end of the model's forward. Those that autograd saves for
backward cost nothing more; the others (an output that feeds only an addition) live longer
than training alone would keep them.

    TRITON_INTERPRET=1 TENSORTAP_FUSED_ON_CPU=1 python bench/capture_memory.py
    python bench/capture_memory.py --device cuda --width 64 --modes 16 --batch 64 --size 64

Prints, for each step of an every-step capture: the bytes deferred at the first launch point
(the end of the forward, unless `engine.defer_cap` came first), the part of them that autograd
does not save (what the capture adds to the forward's peak), what autograd saves (training's
own saved tensors, weights included), and what captures every few steps keep between them:
the weight snapshot (for the update ratios), or on CUDA the flat buffer that holds a copy of
the watched gradients and the weight snapshot (client_hooks.flat). On CUDA also, for `none`,
`every_step` and `every_step` with each value launched in its hook (no grouping: nothing
held), the peak allocated memory of a step over the memory at its start
(torch.cuda.max_memory_allocated), and that start. On CPU the kernels are not run (the
bookkeeping is the same). The records go to an endpoint nobody listens on (they are dropped).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import torch  # noqa: E402

import overhead as B  # noqa: E402
from client_hooks import engine, stats  # noqa: E402

MiB = float(1 << 20)


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _mib(ts) -> float:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor) and t.is_cuda) / MiB


def held_now(v: dict, base) -> str:
    """What the allocated memory holds between steps, by owner: the variant's model (its
    parameters and gradients), the optimizer's state, the capture's flat buffer and weight
    snapshot, the base model the variants are copied from, and the rest (batches, caches)."""
    model, opt, tap = v["model"], v["opt"], v["tap"]
    parts = {"parameters": _mib(model.parameters()),
             "gradients": _mib([p.grad for p in model.parameters()]),
             "optimizer state": _mib([t for st in opt.state.values() for t in st.values()]),
             "base model": _mib(base.parameters())}
    if tap is not None and getattr(tap, "_engine", None) is not None:
        e = tap._engine
        parts["flat buffer"] = _mib([e._flat.buf] if e._flat else [])
        parts["weight snapshot"] = _mib(e._snap)
    total = torch.cuda.memory_allocated() / MiB
    parts["the rest"] = total - sum(parts.values())
    return f"{total:.0f} MiB allocated: " + ", ".join(f"{k} {x:.0f}" for k, x in parts.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--modes", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    a = ap.parse_args()
    if stats.fused_module(torch.ones(1, device=a.device)) is None:
        sys.exit("capture_memory: no fused kernels here (a CUDA GPU with Triton, or "
                 "TRITON_INTERPRET=1 TENSORTAP_FUSED_ON_CPU=1 with Triton installed)")
    os.environ.update(TENSORTAP_BENCH_ON="1", TENSORTAP_ENDPOINT="tcp://127.0.0.1:9", TENSORTAP_RUN="capture-memory")
    cuda = a.device == "cuda"
    if not cuda:  # Triton's interpreter would take minutes; the held bytes do not depend on the kernels
        from client_hooks import fused

        def no_kernel(fn, grid, args, num_warps):
            if fn is fused._merge:
                args[3].fill_(1.0)  # the rows read as finite values
        fused._launch = no_kernel
    held: list = []  # the deferred tensors' storages at each launch point of a step
    launch = engine.Engine.launch_deferred

    def watching(self, *args, **kw):
        held.append([_storage(t) for _, t, *_ in self._deferred])
        return launch(self, *args, **kw)
    engine.Engine.launch_deferred = watching
    torch.manual_seed(0)
    base = B.build_fno(a.width, a.modes)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(a.batch, 1, a.size, a.size, generator=g).to(a.device),
                torch.randn(a.batch, 2, a.size, a.size, generator=g).to(a.device)) for _ in range(a.steps)]
    saved: dict = {}  # storages autograd saved during a step

    def pack(t):
        ptr, n = _storage(t)
        saved[ptr] = n
        return t

    print(f"demo FNO width {a.width}, modes {a.modes}, batch {a.batch}, {a.size}x{a.size} on {a.device}")
    for label, name in (("every_step", "every_step"), ("none", "none"), ("every_step, no grouping", "every_step")):
        if label != "every_step" and not cuda:
            break  # (on CPU only the bookkeeping means anything)
        v = tap = None
        gc.collect()  # the last variant's model, optimizer and capture, freed before this one's
        v = B.make_variant(name, base, a.device, 1e-4)
        tap = v["tap"]
        if label == "every_step, no grouping":
            tap._engine.group_values = False  # each value launched in its hook: nothing held
        peaks, starts = [], []
        for i in range(len(batches)):
            held.clear()
            saved.clear()
            if cuda:
                torch.cuda.synchronize()
                start = torch.cuda.memory_allocated()
                starts.append(start / MiB)
                torch.cuda.reset_peak_memory_stats()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                B.run_step(v, batches, i, a.device)
            if cuda:
                peaks.append((torch.cuda.max_memory_allocated() - start) / MiB)
            if label == "every_step":
                group = dict(held[0]) if held else {}  # the first launch point: the end of the forward
                extra = sum(n for ptr, n in group.items() if ptr not in saved)
                e = tap._engine
                snap = sum(b.numel() * b.element_size() for b in e._snap)
                flat = e._flat.buf if e._flat else None  # gradients and weights (client_hooks.flat)
                flat = 0 if flat is None else flat.numel() * flat.element_size()
                print(f"capture {i}: {len(group)} tensors deferred at the end of the forward, "
                      f"{sum(group.values()) / MiB:.0f} MiB; not saved by autograd (held only by the "
                      f"capture) {extra / MiB:.0f} MiB; autograd saved {sum(saved.values()) / MiB:.0f} MiB; "
                      f"kept between captures: weight snapshot {snap / MiB:.0f} MiB, flat buffer of the "
                      f"watched gradients and weights {flat / MiB:.0f} MiB")
        if cuda:
            print(f"{label:22s} peak of a step over its start: {statistics.median(peaks[1:] or peaks):8.0f} MiB "
                  f"(steps: {', '.join(f'{p:.0f}' for p in peaks)}); allocated at its start: "
                  f"{statistics.median(starts[1:] or starts):.0f} MiB")
            print(f"{'':22s} at the end: {held_now(v, base)}")
        if tap is not None:
            tap.close(0.2)


if __name__ == "__main__":
    main()
