"""Step-time overhead of tensortap's client hooks on a 4-layer FNO, variants side by side.

    python bench/overhead.py --device cpu --steps 400
    python bench/overhead.py --device cuda --steps 2000 --width 64 --modes 16 --batch 64

Variants, side by side in one process; each round is one "epoch" of --epoch-steps steps
per variant. --interleave step (the CPU default) alternates the variants step by step (the
order rotated every step), so load drift on a shared machine hits each variant alike;
--interleave epoch (the CUDA default) runs whole epochs in turn, the order rotated every
round, with one device sync around each epoch's timing so the GPU pipeline stays full:
  none         no tensortap at all
  gate_off     every Tap call made, gate variable unset (must cost nothing)
  default      gate on, default cadence: first batch of each epoch + loss every step
  every_step   gate on, every step: every leaf module's output and every layer's gradients
  naive_item   reference: the same statistics read with one .item() per statistic, every step
--diagnose adds two every_step variants that split its slow rounds on a host-bound GPU
(every_step's rounds spread by up to 20% where `none`'s do not, eleventh session):
  every_step_nogc     Python's garbage collector disabled during its epochs' timing
  every_step_nosend   its records handed to the sender only after each epoch's timing
and prints, per variant, the collector's runs by generation and their time during its
epochs, and (CUDA) the caching allocator's device allocations and frees.
Prints a markdown table and the device: median step (or epoch-mean) time; ratio to `none` of
the medians and of the means (the mean carries a once-an-epoch capture; the median does not);
median and middle half of the paired ratios (same step or round, adjacent in time); with
--interleave epoch also every round's time and the ratio of the fastest quarters of rounds.
The collector is a real `python -m collector collect` subprocess (an in-process ZeroMQ PULL
drain if it cannot start).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from client_hooks import Tap  # noqa: E402

VARIANTS = ("none", "gate_off", "default", "every_step", "naive_item")
DIAGNOSE = ("every_step_nogc", "every_step_nosend")


def build_fno(width: int, modes: int) -> nn.Module:
    from examples.grid_lines.models import FNOGenerator  # the demo's model

    return FNOGenerator(channels=1, width=width, modes=modes, depth=4)


def start_collector(tmp: str) -> tuple[str, object]:
    """Real collector subprocess; falls back to a PULL socket drained by a thread."""
    ready = os.path.join(tmp, "ready.json")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "collector", "collect", "--zmq", "tcp://127.0.0.1:0",
                                 "--http", "off", "--out", os.path.join(tmp, "runs"), "--ready-file", ready,
                                 "--quiet"], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.path.exists(ready) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if os.path.exists(ready):
            time.sleep(0.05)
            with open(ready) as f:
                return json.load(f)["zmq"], proc
        proc.kill()
    except OSError:
        pass
    import zmq

    sock = zmq.Context.instance().socket(zmq.PULL)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    threading.Thread(target=lambda: [sock.recv() for _ in iter(int, 1)], daemon=True).start()
    return f"tcp://127.0.0.1:{port}", None


class NaiveItem:
    """The reference: hooks on every leaf and parameter, one .item() per statistic."""

    def __init__(self, model: nn.Module):
        self.sink: list = []
        for m in model.modules():
            if not any(True for _ in m.children()):
                m.register_forward_hook(lambda mod, a, out: self._stats(out))
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: self._stats(p.grad, grad=True))

    def _stats(self, t: torch.Tensor, grad: bool = False) -> None:
        t = t.detach().float()
        d = {"min": t.min().item(), "max": t.max().item(), "mean": t.mean().item(),
             "std": t.std().item(), "nan": torch.isnan(t).sum().item(), "inf": torch.isinf(t).sum().item()}
        if grad:
            d["norm"] = t.norm().item()
        self.sink.append(d)
        del self.sink[:-100]


def make_variant(name: str, base: nn.Module, device: str, lr: float):
    model = copy.deepcopy(base).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    tap = None
    if name == "gate_off":
        os.environ.pop("TENSORTAP_BENCH_OFF", None)
        tap = Tap(gate="TENSORTAP_BENCH_OFF")
    elif name == "default":
        tap = Tap(gate="TENSORTAP_BENCH_ON", pairs={"x_combined": "real_imag"})
    elif name.startswith("every_step"):
        tap = Tap(gate="TENSORTAP_BENCH_ON", every_n_steps=1, all_leaves=True, gradients="all",
                  pairs={"x_combined": "real_imag"})
    elif name == "naive_item":
        NaiveItem(model)
    if tap is not None:
        tap.watch(model, optimizer=opt)
        if name == "every_step_nosend":
            from profile_step import _Later

            tap._engine.sender = _Later(tap._engine.sender)
    return {"model": model, "opt": opt, "tap": tap, "step": 0, "epoch": 0, "times": [], "name": name,
            "gc": {}, "allocs": [0, 0]}


_in_epoch: list = [None]  # the variant whose epoch is being timed (gc callbacks count for it)
_gc_start = [0.0]


def _gc_watch(phase: str, info: dict) -> None:
    """gc.callbacks: each collection's generation and time, charged to the variant timed."""
    v = _in_epoch[0]
    if v is None:
        return
    if phase == "start":
        _gc_start[0] = time.perf_counter()
        return
    cell = v["gc"].setdefault(info["generation"], [0, 0.0])
    cell[0] += 1
    cell[1] += time.perf_counter() - _gc_start[0]


def _device_allocs() -> tuple[int, int]:
    """The CUDA caching allocator's cudaMalloc and cudaFree calls so far (0, 0 without)."""
    if not torch.cuda.is_available():
        return 0, 0
    st = torch.cuda.memory_stats()
    return st.get("num_device_alloc", 0), st.get("num_device_free", 0)


def run_step(v: dict, batches: list, i: int, device: str) -> float:
    """One training step of variant `v` (epoch_start before the first, epoch_end after the
    last batch of an epoch, both inside the timing); returns its seconds."""
    model, opt, tap = v["model"], v["opt"], v["tap"]
    x, y = batches[i]
    if device == "cuda":
        torch.cuda.synchronize()  # timing only, outside any hook
    t0 = time.perf_counter()
    if tap is not None and i == 0:
        tap.epoch_start(v["epoch"])
    if tap is not None:
        tap.log_batch({"images": x, "target": y}, epoch=v["epoch"], batch_idx=i)
        tap.record("model_input", x)
    out = model(x)
    if tap is not None:
        tap.record("x_combined", out)
    loss = (out - y).abs().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if tap is not None:
        tap.log_loss(loss)
        if i == len(batches) - 1:
            tap.epoch_end(v["epoch"])
    if device == "cuda":
        torch.cuda.synchronize()  # timing only
    v["step"] += 1
    if i == len(batches) - 1:
        v["epoch"] += 1
    return time.perf_counter() - t0


def run_epoch(v: dict, batches: list, device: str) -> float:
    """Mean step time of one epoch of variant `v` (CUDA: one sync around the whole epoch, so
    the device pipeline stays full as in real training)."""
    if device == "cuda":
        torch.cuda.synchronize()
    nogc = v["name"] == "every_step_nogc" and gc.isenabled()
    if nogc:
        gc.disable()
    a0, f0 = _device_allocs()
    _in_epoch[0] = v
    t0 = time.perf_counter()
    try:
        for i in range(len(batches)):
            run_step(v, batches, i, "cpu")  # "cpu": no per-step sync inside the epoch's timing
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / len(batches)
    finally:
        _in_epoch[0] = None
        a1, f1 = _device_allocs()
        v["allocs"][0] += a1 - a0
        v["allocs"][1] += f1 - f0
        if nogc:
            gc.enable()
        sender = getattr(getattr(v.get("tap"), "_engine", None), "sender", None)
        release = getattr(sender, "release", None)
        if release is not None:  # every_step_nosend: its records go now, outside the timing
            release()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=400, help="timed steps per variant")
    ap.add_argument("--epoch-steps", type=int, default=50, help="steps per epoch (= per round)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--modes", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--interleave", choices=["step", "epoch"], default=None,
                    help="alternate variants step by step (default on CPU: the VM's load drifts "
                    "faster than an epoch) or epoch by epoch (default on CUDA: no sync per step)")
    ap.add_argument("--ring-slots", type=int, default=None,
                    help="pinned host buffers of the capture's read-back ring (default: the library's)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated subset of the variants (`none` is always run)")
    ap.add_argument("--diagnose", action="store_true",
                    help="also every_step_nogc and every_step_nosend, and per variant the garbage "
                    "collector's runs and the CUDA allocator's device calls (see the docstring)")
    a = ap.parse_args()
    a.variants = {"none", *a.variants.split(",")} | (set(DIAGNOSE) if a.diagnose else set())
    unknown = a.variants - set(VARIANTS + DIAGNOSE)
    if unknown:
        ap.error(f"unknown variants: {', '.join(sorted(unknown))} (choose from {', '.join(VARIANTS)})")
    a.interleave = a.interleave or ("epoch" if a.device == "cuda" or a.diagnose else "step")
    if a.diagnose and a.interleave != "epoch":
        ap.error("--diagnose times whole epochs: use it with --interleave epoch")
    if a.ring_slots is not None:
        from client_hooks import capture

        capture._ring._slots = a.ring_slots
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        endpoint, proc = start_collector(tmp)
        os.environ.update(TENSORTAP_BENCH_ON="1", TENSORTAP_ENDPOINT=endpoint, TENSORTAP_RUN="bench-overhead")
        base = build_fno(a.width, a.modes)
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(a.batch, 1, a.size, a.size, generator=g).to(a.device),
                    torch.randn(a.batch, 2, a.size, a.size, generator=g).to(a.device))
                   for _ in range(a.epoch_steps)]
        names = tuple(n for n in VARIANTS + DIAGNOSE if n in a.variants)
        variants = {n: make_variant(n, base, a.device, 1e-4) for n in names}
        gc.callbacks.append(_gc_watch)
        rounds = max(1, a.steps // a.epoch_steps)
        for r in range(a.warmup + rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            if a.interleave == "epoch":
                for n in order:
                    t = run_epoch(variants[n], batches, a.device)
                    if r >= a.warmup:
                        variants[n]["times"].append(t)
                continue
            for i in range(len(batches)):  # step by step: drift hits every variant alike
                k = i % len(order)
                for n in order[k:] + order[:k]:
                    t = run_step(variants[n], batches, i, a.device)
                    if r >= a.warmup:
                        variants[n]["times"].append(t)
        for v in variants.values():
            if v["tap"] is not None:
                v["tap"].close()
        sender = getattr(variants.get("every_step", {}).get("tap"), "sender", None)
        print_table(a, variants, rounds, sender)
        from client_hooks import session

        for s in list(session._senders.values()):
            s.close()
        if proc is not None:
            proc.terminate()
            proc.wait(10)


def print_table(a, variants: dict, rounds: int, sender) -> None:
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    print(f"device: {dev}; torch {torch.__version__}")
    unit = "step" if a.interleave == "step" else "round"
    print(f"FNO width {a.width}, modes {a.modes}, depth 4, batch {a.batch}, {a.size}x{a.size}; "
          f"{rounds} rounds x {a.epoch_steps} steps per variant (1 epoch = {a.epoch_steps} steps), "
          f"variants alternated {unit} by {unit}\n")
    base = statistics.median(variants["none"]["times"])
    mean0 = statistics.fmean(variants["none"]["times"])
    print(f"| variant | median {'step' if unit == 'step' else 'round'} (ms) | ratio of medians | ratio of means | "
          f"median of per-{unit} ratios | middle half of per-{unit} ratios |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in variants:
        ts = variants[n]["times"]
        paired = sorted(t / b for t, b in zip(ts, variants["none"]["times"]))  # same step/round
        q1, q3 = paired[len(paired) // 4], paired[(3 * len(paired)) // 4]
        print(f"| {n} | {statistics.median(ts) * 1e3:.2f} | {statistics.median(ts) / base:.3f}x | "
              f"{statistics.fmean(ts) / mean0:.3f}x | {statistics.median(paired):.3f}x | {q1:.3f}-{q3:.3f}x |")
    if unit == "round":  # each round's time, in the order run: drift and outliers show
        print("\nper round (ms, round 1 first):")
        for n in variants:
            print(f"  {n:<17} " + " ".join(f"{t * 1e3:.2f}" for t in variants[n]["times"]))
        # a device host's noise comes as slow rounds over a steady floor (eleventh session):
        # the mean of each variant's fastest quarter of rounds, over `none`'s, is that floor's ratio
        floor = {n: statistics.fmean(sorted(v["times"])[:max(1, len(v["times"]) // 4)]) for n, v in variants.items()}
        print("fastest quarter of rounds, over none's: " + ", ".join(
            f"{n} {floor[n] / floor['none']:.3f}x" for n in variants if n != "none"))
    if a.diagnose:
        print("\nduring each variant's timed epochs, per 1000 steps: garbage collections by generation "
              "(count, ms); CUDA allocator device allocations / frees")
        for n, v in variants.items():
            steps = max(1, len(v["times"]) * (a.epoch_steps if unit == "round" else 1)) / 1000
            g = ", ".join(f"gen{k} {c / steps:.1f} ({ms * 1e3 / steps:.1f} ms)"
                          for k, (c, ms) in sorted(v["gc"].items()))
            print(f"  {n:<17} {g or 'none'}; allocator {v['allocs'][0] / steps:.1f} / {v['allocs'][1] / steps:.1f}")
    if sender is not None:
        st = sender.stats()
        print(f"\nsender (every_step + default share one): {st}")
        if st.get("cpu_s") is not None and st["sent"]:
            print(f"sender thread CPU: {st['cpu_s'] * 1e6 / st['sent']:.1f} us a record sent")
    print_counters()


def print_counters() -> None:
    """The capture path's counters: pinned buffers taken outside the read-back ring, fused
    tables uploaded (steady capture steps take and upload none)."""
    from client_hooks import capture

    print(f"pinned buffers taken outside the ring: {capture._ring.one_off}")
    if "client_hooks.fused" in sys.modules:
        print(f"fused tables uploaded: {sys.modules['client_hooks.fused'].uploads[0]} "
              f"(steady capture steps upload none)")


if __name__ == "__main__":
    main()
