"""Host time a step of the CUDA capture path, measured without a GPU: the demo FNO (tiny:
width 8, modes 4, batch 1, 16x16, one torch thread) on CPU tensors that take the fused path
(Triton's interpreter flags set, every Triton launch replaced by a no-op). What is left is
tensortap's Python and torch work on the training thread, the part of a GPU step's overhead
that shows when the step is bound by its host (bench/overhead.py on a GPU measures the
whole). Not the CUDA launch cost itself (~20-70 us a launch on the H100 hosts seen).

    python bench/host_cost.py [--rounds 15] [--tree PATH] [--timers] [--ablations] [--pieces] [--calls]
    python bench/host_cost.py --instructions [--epochs 3] [--tree PATH]    # needs valgrind

--tree: import client_hooks from another checkout (e.g. a `git archive` of an earlier commit)
to compare trees; the same model and harness either way. Prints the median step time of
`none` and of each Tap variant (rounds of --steps steps, alternated), the difference in us a
step: wall time, the training thread's CPU time, and the sender thread's CPU time (its work
on the epoch's records is waited for after each epoch: on a host-bound GPU step the two
threads contend for the GIL, so both count); with --timers, the inclusive host time of each
entry point over every_step's rounds, first the outermost calls' sum (tensortap's own host
time on the training thread, steadier than the wall time); with --ablations, three more
variants that split the every-step cost (ABLATIONS); --pieces: the gradient path's pieces
timed alone (how much of it is torch's CPU arithmetic); --calls: the Python and the C
function calls a step makes on the training thread, over none's, and the functions of
client_hooks that execute the most bytecodes in an every_step step (counted, not timed:
the same from run to run on any machine, so two trees compare without this VM's noise),
then stop; --instructions: the machine instructions a step of `none` and of `every_step`
executes on the training thread (callgrind counts only the thread inside the toggled call;
the sender's are not counted), over --epochs epochs after two uncounted ones (~5 minutes;
every_step over none read within ~1% from run to run here), with the share of each library
(the Python interpreter, torch, libc...), then stop. The records go to a drain process.
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
ap.add_argument("--rounds", type=int, default=15)
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--tree", default=os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
ap.add_argument("--timers", action="store_true")
ap.add_argument("--pieces", action="store_true", help="time the gradient path's pieces alone, then stop")
ap.add_argument("--calls", action="store_true", help="count each variant's calls a step, then stop")
ap.add_argument("--instructions", action="store_true",
                help="count the instructions of a step of none and of every_step under valgrind, then stop")
ap.add_argument("--epochs", type=int, default=3, help="--instructions: epochs counted")
ap.add_argument("--child", help=argparse.SUPPRESS)  # --instructions: the variant run under valgrind
ap.add_argument("--ablations", action="store_true", help="also: " + "; ".join(
    ["nosend", "grads_only", "hooks_only"]) + " (see ABLATIONS)")
ap.add_argument("--width", type=int, default=8)
ap.add_argument("--modes", type=int, default=4)
ap.add_argument("--size", type=int, default=16)
a = ap.parse_args()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [a.tree, HERE]
# a drain in its own process: the records are really sent (a sender whose peer is away
# retries one frame and decodes nothing more), and the receiving takes no GIL of this one
_DRAIN = ("import sys, zmq; s = zmq.Context().socket(zmq.PULL); "
          "print(s.bind_to_random_port('tcp://127.0.0.1'), flush=True)\n"
          "while True: s.recv()")
drain = subprocess.Popen([sys.executable, "-c", _DRAIN], stdout=subprocess.PIPE, text=True)
atexit.register(drain.kill)
os.environ.update(TRITON_INTERPRET="1", TENSORTAP_FUSED_ON_CPU="1", TENSORTAP_BENCH_ON="1",
                  TENSORTAP_ENDPOINT=f"tcp://127.0.0.1:{int(drain.stdout.readline())}",
                  TENSORTAP_RUN="host-cost")

import torch  # noqa: E402

torch.set_num_threads(1)
from client_hooks import fused, hooks  # noqa: E402  (first: from --tree, before overhead adds this checkout)
import overhead as B  # noqa: E402

if os.path.dirname(os.path.abspath(fused.__file__)) != os.path.join(os.path.abspath(a.tree), "client_hooks"):
    sys.exit(f"host_cost: client_hooks came from {fused.__file__}, not from --tree {a.tree}")


def _no_kernel(fn, grid, args, num_warps):
    """No kernel runs, only the host's work is left; the merge's rows read as ones (finite
    values, so that the sender decodes every record as it would a real one)."""
    if fn is fused._merge:
        args[3].fill_(1.0)


fused._launch = _no_kernel
timers = None
if a.timers:
    import profile_step

    timers = profile_step.install_timers()


ABLATIONS = {
    "nosend": "every_step, its records handed to the sender only after the epoch's timing",
    "grads_only": "every_step with its hooks registered, forward values, record() and log_batch() ignored",
    "hooks_only": "no Tap: a no-op forward hook on every leaf and the model, a no-op hook on every parameter",
}


def _variant(name: str, base) -> dict:
    """overhead.py's variant, or an ablation of every_step (ABLATIONS)."""
    if name not in ABLATIONS:
        return B.make_variant(name, base, "cpu", 1e-4)
    if name == "hooks_only":
        v = B.make_variant("none", base, "cpu", 1e-4)
        m = v["model"]
        for mod in [mod for _, mod in hooks.leaf_modules(m)] + [m]:
            mod.register_forward_hook(lambda *args: None)
        for p in m.parameters():
            p.register_post_accumulate_grad_hook(lambda p: None)
        return v
    if name == "nosend":  # overhead.py's run_epoch hands its records over after the timing
        return B.make_variant("every_step_nosend", base, "cpu", 1e-4)
    v = B.make_variant("every_step", base, "cpu", 1e-4)
    e = v["tap"]._engine
    e._hooks._on_output = lambda name, out: None  # the hooks run, and return at once
    e.record = e.log_batch = lambda *args, **kw: None
    return v


def pieces() -> None:
    """The gradient path's pieces alone (--pieces): the engine's grads_ready, then with
    _add_gradients and the flush, against the torch ops inside them, on one backward's
    gradients of the same FNO (best of 5 x 2000 calls)."""
    import timeit

    from client_hooks.capture import Capture
    from client_hooks.engine import Engine, Options

    class _NoSender:
        def send_many(self, items, step=None, epoch=None):
            return len(items)

    torch.manual_seed(0)
    m = B.build_fno(a.width, a.modes)
    e = Engine(_NoSender(), Options(every_n_steps=1, all_leaves=True, gradients="all"))
    e.watch(m, param_hooks=False)
    m(torch.randn(1, 1, a.size, a.size)).abs().mean().backward()

    def grads_ready():
        e.capturing, e.capture = True, Capture(0, 0)
        e._reset_grads()
        e.grads_ready()

    def whole():
        grads_ready()
        e._add_gradients()
        e.capture.flush(_NoSender())

    ws = e._wparams
    snap = [w.detach().clone() for w in ws]
    norms = list(torch._foreach_norm(ws)) * 2
    for name, fn in (("grads_ready", grads_ready), ("grads_ready + _add_gradients + flush", whole),
                     (f"torch._foreach_norm of the {len(ws)} parameters", lambda: torch._foreach_norm(ws)),
                     ("torch._foreach_copy_ of them (the snapshot)", lambda: torch._foreach_copy_(snap, ws)),
                     (f"torch.stack of {len(norms)} norms", lambda: torch.stack(norms))):
        fn()
        us = min(timeit.repeat(fn, number=2000, repeat=5)) / 2000 * 1e6
        print(f"  {us:7.1f} us  {name}")


def calls() -> None:
    """--calls: each variant's Python function calls and C function calls (torch operators,
    tensor methods, builtins) a step on the training thread, counted by sys.setprofile over
    two epochs after two unprofiled ones; the sender thread's are not counted. Then where
    every_step's bytecodes go (`_opcodes`)."""
    base, batches = _setup()
    names = ("none", "default", "every_step")
    counts = {}
    for n in names:
        v = _variant(n, base)
        for _ in range(2):
            B.run_epoch(v, batches, "cpu")
        seen = {"call": 0, "c_call": 0}

        def count(frame, event, arg):
            if event in seen:
                seen[event] += 1
        sys.setprofile(count)
        for _ in range(2):
            B.run_epoch(v, batches, "cpu")
        sys.setprofile(None)
        counts[n] = (seen["call"] / (2 * a.steps), seen["c_call"] / (2 * a.steps))
        if v["tap"] is not None:
            v["tap"].close()
    print(f"client_hooks from {a.tree}; calls a step on the training thread (two epochs of {a.steps} steps)")
    for n in names:
        py, c = counts[n]
        print(f"{n:11s} Python {py:7.1f} (+{py - counts['none'][0]:6.1f})   C {c:7.1f} (+{c - counts['none'][1]:6.1f})")
    ops = _opcodes(base, batches)
    print(f"every_step: {sum(ops.values()):.0f} bytecodes a step in client_hooks, the most in:")
    for fn, k in sorted(ops.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {k:7.0f}  {fn}")


def _opcodes(base, batches) -> dict:
    """every_step's Python bytecodes a step in each function of client_hooks (sys.settrace
    with opcode events, two epochs after two untraced ones): where its host work lies."""
    v = _variant("every_step", base)
    for _ in range(2):
        B.run_epoch(v, batches, "cpu")
    ours = os.path.join(os.path.abspath(a.tree), "client_hooks") + os.sep
    ops: dict = {}

    def trace(frame, event, arg):
        code = frame.f_code
        if not code.co_filename.startswith(ours):
            return None
        frame.f_trace_opcodes, frame.f_trace_lines = True, False
        key = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno} {code.co_name}"

        def local(frame, event, arg):
            if event == "opcode":
                ops[key] = ops.get(key, 0) + 1
            return local
        return local
    sys.settrace(trace)
    for _ in range(2):
        B.run_epoch(v, batches, "cpu")
    sys.settrace(None)
    v["tap"].close()
    return {k: c / (2 * a.steps) for k, c in ops.items()}


def _setup() -> tuple:
    """The seeded FNO and an epoch of batches (every mode of this script takes the same)."""
    torch.manual_seed(0)
    base = B.build_fno(a.width, a.modes)
    g = torch.Generator().manual_seed(1)
    return base, [(torch.randn(1, 1, a.size, a.size, generator=g), torch.randn(1, 2, a.size, a.size, generator=g))
                  for _ in range(a.steps)]


def child(name: str) -> None:
    """--instructions, under valgrind: variant `name`, two epochs uncounted, then --epochs
    epochs inside functools.reduce, the one call that callgrind counts in (its
    --toggle-collect), on this thread only."""
    import functools

    base, batches = _setup()
    v = _variant(name, base)
    sender = v["tap"]._engine.sender if v["tap"] is not None else None
    for _ in range(2):
        B.run_epoch(v, batches, "cpu")
    if sender is not None:
        sender.flush(5.0)

    functools.reduce(lambda _acc, _i: B.run_epoch(v, batches, "cpu"), range(a.epochs), None)
    if sender is not None:
        sender.flush(5.0)
    drain.kill()  # (it holds the stderr that the parent reads to its end)
    os._exit(0)  # no interpreter shutdown under valgrind (minutes)


def instructions() -> None:
    """--instructions: `child` of none and of every_step under callgrind, side by side."""
    import re
    import shutil
    import tempfile

    if shutil.which("valgrind") is None:
        sys.exit("host_cost: --instructions needs valgrind (apt install valgrind)")
    out = tempfile.mkdtemp(prefix="host-instr-")
    names = ("none", "every_step")
    procs = {n: subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--collect-atstart=no", "--toggle-collect=functools_reduce",
         f"--callgrind-out-file={out}/{n}.out", sys.executable, os.path.abspath(__file__), "--tree", a.tree,
         "--child", n, "--epochs", str(a.epochs), "--steps", str(a.steps), "--width", str(a.width),
         "--modes", str(a.modes), "--size", str(a.size)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for n in names}
    total, by_lib = {}, {}
    for n, p in procs.items():
        err = p.communicate()[1]
        m = re.search(r"Collected : (\d+)", err)
        if p.returncode or m is None:
            sys.exit(f"host_cost: the {n} run under valgrind failed: {err.strip().splitlines()[-1:]}")
        total[n] = int(m.group(1))
        by_lib[n] = _by_library(f"{out}/{n}.out")
    steps = a.epochs * a.steps
    print(f"client_hooks from {a.tree}; instructions a step (callgrind, {a.epochs} epochs of {a.steps} steps)")
    for n in names:
        print(f"{n:11s} {total[n] / steps / 1e3:9.0f} k   over none {(total[n] - total['none']) / steps / 1e3:+8.0f} k")
    libs = sorted(set(by_lib["none"]) | set(by_lib["every_step"]),
                  key=lambda k: by_lib["none"].get(k, 0) - by_lib["every_step"].get(k, 0))
    print("every_step over none, by library (k a step): " + ", ".join(
        f"{k} {(by_lib['every_step'].get(k, 0) - by_lib['none'].get(k, 0)) / steps / 1e3:+.0f}" for k in libs[:6]))
    shutil.rmtree(out, ignore_errors=True)


def _by_library(path: str) -> dict:
    """Instructions per shared library of a callgrind profile (callgrind_annotate's lines
    of every function); {} without callgrind_annotate."""
    import re

    try:
        text = subprocess.run(["callgrind_annotate", "--threshold=100", path], capture_output=True,
                              text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    libs: dict = {}
    for line in text.splitlines():
        m = re.match(r"\s*([0-9,]+) \(\s*[0-9.]+%\)\s+(.*)$", line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        lib = re.search(r"\[([^\]]+)\]\s*$", m.group(2))
        key = os.path.basename(lib.group(1)).split(".so")[0] if lib else "?"
        libs[key] = libs.get(key, 0) + int(m.group(1).replace(",", ""))
    return libs


def _cpu(sender) -> float:
    """The sender thread's CPU seconds so far (0 without one)."""
    return (sender.stats()["cpu_s"] or 0.0) if sender is not None else 0.0


def main() -> None:
    base, batches = _setup()
    names = ("none", "default", "every_step") + (tuple(ABLATIONS) if a.ablations else ())
    vs = {n: _variant(n, base) for n in names}
    times: dict = {n: [] for n in names}
    cpu: dict = {n: [] for n in names}  # the training thread's CPU time a step
    scpu: dict = {n: [] for n in names}  # the sender thread's
    tsum: dict = {}  # the timers over every_step's measured epochs (other variants' calls left out)
    for r in range(a.rounds + 1):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            timed = timers is not None and r and n == "every_step"
            if timed:
                before = {key: list(cell) for key, cell in timers.items()}
            sender = vs[n]["tap"]._engine.sender if vs[n]["tap"] is not None else None
            sender = getattr(sender, "_sender", sender)  # nosend's: the one its held records go to
            c0, s0 = time.thread_time(), _cpu(sender)
            t = B.run_epoch(vs[n], batches, "cpu")
            c1 = time.thread_time()
            if timed:
                for key, cell in timers.items():
                    acc = tsum.setdefault(key, [0, 0.0])
                    acc[0] += cell[0] - before[key][0]
                    acc[1] += cell[1] - before[key][1]
            if sender is not None:
                sender.flush(2.0)  # the sender's work on this epoch, done
                time.sleep(0.005)  # and its last frame (taken off the queue before flush saw it empty)
            if r:
                times[n].append(t)
                cpu[n].append((c1 - c0) / a.steps)
                scpu[n].append((_cpu(sender) - s0) / a.steps)
    base_t, base_c = statistics.median(times["none"]), statistics.median(cpu["none"])
    print(f"client_hooks from {a.tree}; {a.rounds} rounds x {a.steps} steps, Triton launches stubbed")
    print("a step (median)  wall, over none       training thread CPU, over none   sender thread CPU")
    for n in names:
        m, c, sc = statistics.median(times[n]), statistics.median(cpu[n]), statistics.median(scpu[n])
        print(f"{n:11s} {m * 1e3:7.3f} ms  +{(m - base_t) * 1e6:6.0f} us   "
              f"{c * 1e3:7.3f} ms  +{(c - base_c) * 1e6:6.0f} us     {sc * 1e6:6.0f} us")
    # the least CPU time of an epoch: what the work itself costs, with the least of the
    # shared machine's interference (caches, frequency) in it
    lo = {n: min(cpu[n]) for n in names}
    print("least training thread CPU of an epoch, over none: " +
          ", ".join(f"{n} +{(lo[n] - lo['none']) * 1e6:.0f} us" for n in names[1:]) +
          "; sender thread: " + ", ".join(f"{n} {min(scpu[n]) * 1e6:.0f} us" for n in names[1:]))
    if timers is not None:
        print(f"every_step, its {a.rounds} rounds, inclusive host time a step:")
        profile_step.print_timers(tsum, a.steps * a.rounds)
    for v in vs.values():
        if v["tap"] is not None:
            v["tap"].close()


if a.child:
    child(a.child)
elif a.instructions:
    instructions()
elif a.pieces:
    pieces()
elif a.calls:
    calls()
else:
    main()
