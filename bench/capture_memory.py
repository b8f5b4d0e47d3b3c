"""Memory a capture step holds beyond training's own, on the demo FNO (bench/overhead.py's
`every_step` step). On CUDA the deferred values (client_hooks.engine) are held from their
hook to the grouped launch at the end of the model's forward. Those that autograd saves for
backward cost nothing more; the others (an output that feeds only an addition) live longer
than training alone would keep them.

    TRITON_INTERPRET=1 TENSORTAP_FUSED_ON_CPU=1 python bench/capture_memory.py
    python bench/capture_memory.py --device cuda --width 64 --modes 16 --batch 64 --size 64

Prints, for each step of an every-step capture: the bytes deferred at the end of the forward,
the part of them that autograd does not save (what the capture adds to the forward's peak),
what autograd saves (training's own activations), and the weight snapshot (for the update
ratios) that captures every few steps keep between them. On CUDA also the peak allocated memory
of a step over the memory at its start (torch.cuda.max_memory_allocated), and that start, for `none`,
`every_step` and `every_step` with each value launched in its hook (no grouping: nothing
held). On CPU the kernels are not run (the bookkeeping is the same). The records go to an
endpoint nobody listens on (they are dropped).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402

from client_hooks import Tap, engine, stats  # noqa: E402

MiB = float(1 << 20)


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


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
    from examples.grid_lines.models import FNOGenerator

    os.environ.update(TENSORTAP_MEMORY="1", TENSORTAP_ENDPOINT="tcp://127.0.0.1:9", TENSORTAP_RUN="capture-memory")
    cuda = a.device == "cuda"
    if not cuda:  # Triton's interpreter would take minutes; the held bytes do not depend on the kernels
        from client_hooks import fused

        def no_kernel(fn, grid, args, num_warps):
            if fn is fused._merge:
                args[3].fill_(1.0)  # the rows read as finite values
        fused._launch = no_kernel
    held: list = []  # the deferred tensors' storages at each launch point of the step
    launch = engine.Engine.launch_deferred

    def watching(self, *args, **kw):
        held.append([_storage(t) for _, t, *_ in self._deferred])
        return launch(self, *args, **kw)
    engine.Engine.launch_deferred = watching

    def run(variant: str, tap) -> None:
        torch.manual_seed(0)
        model = FNOGenerator(channels=1, width=a.width, modes=a.modes, depth=4).to(a.device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        if tap is not None:
            tap.watch(model, optimizer=opt)
        peaks, starts = [], []
        for step in range(a.steps):  # the step of bench/overhead.py's run_step
            x = torch.randn(a.batch, 1, a.size, a.size, device=a.device)
            y = torch.randn(a.batch, 2, a.size, a.size, device=a.device)
            saved: dict = {}

            def pack(t):
                ptr, n = _storage(t)
                saved[ptr] = n
                return t
            if cuda:
                torch.cuda.synchronize()
                start = torch.cuda.memory_allocated()
                starts.append(start / MiB)
                torch.cuda.reset_peak_memory_stats()
            held.clear()
            if tap is not None:
                tap.log_batch({"images": x, "target": y}, epoch=0)
                tap.record("model_input", x)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(x)
                forward_end = list(held)  # the launch point at the end of the forward
                if tap is not None:
                    tap.record("x_combined", out)
                loss = (out - y).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if tap is not None:
                tap.log_loss(loss)
                tap.step_end()
            if cuda:
                torch.cuda.synchronize()
                peaks.append((torch.cuda.max_memory_allocated() - start) / MiB)
            if variant == "every_step":
                group = {ptr: n for ptr, n in (forward_end[-1] if forward_end else [])}
                extra = sum(n for ptr, n in group.items() if ptr not in saved)
                snap = sum(b.numel() * b.element_size() for b in tap._engine._snap)
                print(f"capture {step}: {len(group)} tensors deferred at the end of the forward, "
                      f"{sum(group.values()) / MiB:.0f} MiB; not saved by autograd (held only by the "
                      f"capture) {extra / MiB:.0f} MiB; autograd saved {sum(saved.values()) / MiB:.0f} MiB; "
                      f"weight snapshot kept between captures {snap / MiB:.0f} MiB")
        if cuda:
            print(f"{variant:22s} peak of a step over its start: {statistics.median(peaks[1:] or peaks):8.0f} MiB "
                  f"(steps: {', '.join(f'{p:.0f}' for p in peaks)}); allocated at its start: "
                  f"{statistics.median(starts[1:] or starts):.0f} MiB")
        if tap is not None:
            tap.close(0.2)

    print(f"demo FNO width {a.width}, modes {a.modes}, batch {a.batch}, {a.size}x{a.size} on {a.device}")
    run("every_step", Tap(gate="TENSORTAP_MEMORY", every_n_steps=1, all_leaves=True, gradients="all",
                          pairs={"x_combined": "real_imag"}))
    if cuda:
        run("none", None)
        tap = Tap(gate="TENSORTAP_MEMORY", every_n_steps=1, all_leaves=True, gradients="all",
                  pairs={"x_combined": "real_imag"})
        tap._engine.group_values = False
        run("every_step, no grouping", tap)


if __name__ == "__main__":
    main()
