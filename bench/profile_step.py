"""Where the every-step capture's host time goes (CUDA): step times of a few ablations, then
a cProfile of the training thread. Not a benchmark of record (bench/overhead.py is).

    python bench/profile_step.py [--steps 50] [--rounds 4] [--device cuda] [--width 64] [--modes 16] [--batch 64]

Ablations (each against `none`, epochs alternated): every_step as in overhead.py;
`nosend` (records handed to the sender only after the epoch's timing: no sender-thread work
while the steps run); `eager` (every forward tensor launched in its hook, no grouped launch);
`nopair` (x_combined recorded as a real tensor, no complex statistics); `noact` (gradients
only); `nograd` (activations only).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402

import overhead as B  # noqa: E402
from client_hooks import Tap  # noqa: E402


def variant(name: str, base, device: str):
    if name in ("none", "every_step"):
        return B.make_variant(name, base, device, 1e-4)
    v = B.make_variant("none", base, device, 1e-4)
    kw = dict(gate="TENSORTAP_BENCH_ON", every_n_steps=1, all_leaves=True, gradients="all",
              pairs={"x_combined": "real_imag"})
    if name == "nopair":
        kw["pairs"] = {}
    if name == "noact":
        kw.update(all_leaves=False, activations=[])
    if name == "nograd":
        kw.update(gradients=[])
    tap = Tap(**kw)
    tap.watch(v["model"], optimizer=v["opt"])
    if name == "nosend":
        tap._engine.sender = _Later(tap._engine.sender)
    if name == "eager":
        tap._engine.group_values = False
    v["tap"] = tap
    return v


class _Later:
    """A sender that keeps a capture's records until `release()` (after the epoch's timing),
    so the sender thread has nothing to do while the steps run."""

    def __init__(self, sender):
        self._sender, self._held = sender, []

    def send_many(self, items, step=None, epoch=None):
        self._held.append((items, step, epoch))
        return len(items)

    def __getattr__(self, name):
        return getattr(self._sender, name)

    def release(self):
        held, self._held = self._held, []
        for items, step, epoch in held:
            self._sender.send_many(items, step, epoch)


OUTERMOST = "(all of the above, outermost calls only)"


def install_timers() -> dict:
    """Wrap tensortap's entry points (and a few inner calls) with wall-clock accumulators:
    {name: [calls, seconds]}, inclusive (end_step holds flush, grads_ready holds the grouped
    launch). Installed on the classes, so only Taps made afterwards go through them.
    OUTERMOST: the outermost calls only, so each microsecond once: tensortap's own host time
    (less noisy than a step's wall time, which holds the model's)."""
    import time

    from client_hooks import capture, engine, fused, hooks

    acc: dict = {}
    top = acc.setdefault(OUTERMOST, [0, 0.0])
    depth = [0]

    def timed(owner, attr, label):
        fn = getattr(owner, attr)
        cell = acc.setdefault(label, [0, 0.0])

        def wrapper(*a, **kw):
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                depth[0] -= 1
                cell[0] += 1
                cell[1] += dt
                if not depth[0]:
                    top[0] += 1
                    top[1] += dt
        setattr(owner, attr, wrapper)

    E = engine.Engine
    for attr in ("begin_step", "on_output", "record", "log_batch", "launch_deferred", "grads_ready",
                 "end_step", "metrics", "event", "add_tensor"):
        timed(E, attr, f"Engine.{attr}")
    timed(hooks.Hooks, "_grad", "Hooks._grad (per parameter)")
    timed(hooks.Hooks, "attach", "Hooks.attach")
    timed(capture.Capture, "flush", "Capture.flush")
    timed(fused.Batch, "add", "fused.Batch.add")
    timed(fused.Batch, "add_group", "fused.Batch.add_group")
    timed(fused.Batch, "finish", "fused.Batch.finish")
    # a method since the seventh session; a module function before (trees compared by --tree)
    timed(*((E, "_fused_complex") if hasattr(E, "_fused_complex") else (engine, "_fused_complex")),
          "_fused_complex")
    for attr in ("_fused_grads", "_add_gradients"):
        timed(E, attr, f"Engine.{attr}")
    return acc


def print_timers(acc: dict, steps: int) -> None:
    """`install_timers`' accumulators as host time a step, largest first."""
    for name, (n, sec) in sorted(acc.items(), key=lambda kv: -kv[1][1]):
        if n:
            print(f"  {sec / steps * 1e6:8.0f} us  {n / steps:6.1f} calls  {name}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--modes", type=int, default=16)
    ap.add_argument("--timers", action="store_true",
                    help="after the ablations: host time per step of each tensortap entry point")
    ap.add_argument("--no-cprofile", action="store_true")
    ap.add_argument("--diff", action="store_true",
                    help="instead: cProfile of none's and every_step's epochs, the functions whose own "
                    "time a step differs most; and (CUDA) each one's GPU busy time a step")
    a = ap.parse_args()
    if a.diff:
        return diff(a)
    from client_hooks import capture

    capture._ring._slots = 256  # `nosend` holds two pinned buffers a step until its epoch ends
    names = ("none", "every_step", "nosend", "eager", "nopair", "noact", "nograd")
    with tempfile.TemporaryDirectory() as tmp:
        proc, base, batches = _start(a, tmp)
        vs = {n: variant(n, base, a.device) for n in names}
        times: dict = {n: [] for n in names}
        for r in range(a.rounds + 1):
            for n in names[r % len(names):] + names[:r % len(names)]:
                t = B.run_epoch(vs[n], batches, a.device)
                if n == "nosend":
                    vs[n]["tap"]._engine.sender.release()  # outside the timing
                if r:
                    times[n].append(t)
        base_t = statistics.median(times["none"])
        for n in names:
            m = statistics.median(times[n])
            print(f"{n:10s} {m * 1e3:7.2f} ms/step  {m / base_t:.3f}x")
        print(f"sender: {vs['every_step']['tap'].sender.stats()}")
        B.print_counters()
        if a.timers:
            acc = install_timers()
            vt = variant("every_step", base, a.device)  # made after: its hooks call the wrappers
            B.run_epoch(vt, batches, a.device)  # warm-up
            for cell in acc.values():
                cell[:] = [0, 0.0]
            t = B.run_epoch(vt, batches, a.device)
            print(f"\ntimers, one every_step epoch ({t * 1e3:.2f} ms/step with the timers; none "
                  f"{base_t * 1e3:.2f}); host time a step, inclusive:")
            print_timers(acc, a.steps)
            vt["tap"].close()
        if not a.no_cprofile:
            prof = cProfile.Profile()
            if a.device == "cuda":
                torch.cuda.synchronize()
            prof.enable()
            B.run_epoch(vs["every_step"], batches, a.device)
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(28)
            print("\n".join(s.getvalue().splitlines()[:45]))
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats("client_hooks", 25)
            print("\n".join(s.getvalue().splitlines()[:40]))
        for v in vs.values():
            if v["tap"] is not None:
                v["tap"].close()
        if proc is not None:
            proc.terminate()
            proc.wait(10)


def _start(a, tmp: str) -> tuple:
    """A collector receiving in `tmp`, the gate on towards it; the seeded FNO and an epoch of
    batches: (collector process, model, batches)."""
    endpoint, proc = B.start_collector(tmp)
    os.environ.update(TENSORTAP_BENCH_ON="1", TENSORTAP_ENDPOINT=endpoint, TENSORTAP_RUN="profile")
    torch.manual_seed(0)
    base = B.build_fno(a.width, a.modes)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(a.batch, 1, 64, 64, generator=g).to(a.device),
                torch.randn(a.batch, 2, 64, 64, generator=g).to(a.device)) for _ in range(a.steps)]
    return proc, base, batches


def _own_times(v: dict, batches: list, device: str, epochs: int) -> tuple[dict, float]:
    """{function: (own seconds, calls)} over `epochs` epochs of variant v under cProfile, and
    the epochs' wall time a step without it (measured first)."""
    B.run_epoch(v, batches, device)
    wall = statistics.median([B.run_epoch(v, batches, device) for _ in range(epochs)])
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(epochs):
        B.run_epoch(v, batches, device)
    prof.disable()
    st = pstats.Stats(prof).stats  # (file, line, name) -> (prim calls, calls, tottime, cumtime, callers)
    return {k: (v[2], v[1]) for k, v in st.items()}, wall


def _gpu_busy(v: dict, batches: list) -> float:
    """Seconds of kernel time a step (torch.profiler, one epoch; overlapping kernels count twice)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as p:
        B.run_epoch(v, batches, "cuda")
    total = sum(e.self_device_time_total for e in p.key_averages())
    return total * 1e-6 / len(batches)


def diff(a) -> None:
    """--diff: where every_step's extra host time goes, function by function (cProfile's own
    time, which inflates Python calls more than C ones; a guide, not a measure)."""
    epochs = 3
    with tempfile.TemporaryDirectory() as tmp:
        proc, base, batches = _start(a, tmp)
        res, vs = {}, {}
        for n in ("none", "every_step"):
            vs[n] = variant(n, base, a.device)
            res[n] = _own_times(vs[n], batches, a.device, epochs)
        # last: once torch.profiler has traced CUDA, later launches are slower (the first run
        # of this put it between the two variants, and every_step came out at 1.76x)
        for n, v in vs.items():
            if a.device == "cuda":
                print(f"{n}: GPU kernel time {_gpu_busy(v, batches) * 1e3:.2f} ms a step")
            if v["tap"] is not None:
                v["tap"].close()
        steps = epochs * a.steps
        (t0, w0), (t1, w1) = res["none"], res["every_step"]
        print(f"wall a step without the profiler: none {w0 * 1e3:.2f} ms, every_step {w1 * 1e3:.2f} ms")
        tot0, tot1 = sum(x[0] for x in t0.values()), sum(x[0] for x in t1.values())
        print(f"profiled own time a step: none {tot0 / steps * 1e3:.2f} ms, every_step {tot1 / steps * 1e3:.2f} ms")
        rows = []
        for k in set(t0) | set(t1):
            s0, c0 = t0.get(k, (0.0, 0))
            s1, c1 = t1.get(k, (0.0, 0))
            rows.append(((s1 - s0) / steps, (c1 - c0) / steps, k))
        rows.sort(key=lambda r: -abs(r[0]))
        print("  us a step   calls a step  function (every_step - none, own time)")
        for d, c, (f, line, name) in rows[:45]:
            print(f"  {d * 1e6:9.1f}  {c:9.1f}  {os.path.basename(f)}:{line} {name}")
        if proc is not None:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
