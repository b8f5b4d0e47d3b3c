"""What a GPU runs for one block of the partials kernels, counted without a GPU.

    python bench/kernel_sass.py [--tree PATH] [--arch 90] [--dtype float32]

Compiles client_hooks.fused's partials kernels with Triton for an NVIDIA architecture (sm_90,
the H100, by default; Triton's bundled ptxas and nvdisasm, no GPU needed) and prints:
- the SASS instructions one program executes for a full block of 4096 finite elements (the
  case of nearly every block of a training's activations and gradients), by instruction kind:
  the block's way compiled alone as a kernel (`full` a constant), for a tree whose `_block`
  has a separate all-finite way (`_finite`);
- the whole of `_block` for a full block: every way it has, one taken (for a tree with
  `_finite`, the finite way and the general way that a block with a NaN or an infinity takes);
- the production kernels' registers a thread (occupancy) and spills.
--tree: import client_hooks from another checkout (e.g. a `git archive` of an earlier commit).
The partials kernel is bound by its arithmetic, not its loads, on an H100 (docs/BENCHMARKS.md,
sixth session), so its instructions a block are what its GPU time follows; a count is not a
time: the device run (`partials_bandwidth.py`) measures the bandwidth.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--tree", default=os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100)")
ap.add_argument("--dtype", default="float32", choices=("float16", "bfloat16", "float32", "float64"))
a = ap.parse_args()
sys.path.insert(0, a.tree)

try:
    import triton  # noqa: E402
    import triton.language as tl  # noqa: E402
    from triton.backends.compiler import GPUTarget  # noqa: E402
    from triton.compiler import ASTSource  # noqa: E402
except ImportError as e:
    sys.exit(f"kernel_sass: needs Triton with its NVIDIA backend ({e})")

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
from client_hooks import fused  # noqa: E402

if os.path.dirname(os.path.abspath(fused.__file__)) != os.path.join(os.path.abspath(a.tree), "client_hooks"):
    sys.exit(f"kernel_sass: client_hooks came from {fused.__file__}, not from --tree {a.tree}")

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64"}[a.dtype]
ACC = tl.float64 if a.dtype == "float64" else tl.float32
BLOCK = fused.BLOCK
KINDS = (("load", r"^LDG"), ("store", r"^STG"), ("shuffle", r"^SHFL"), ("barrier", r"^BAR"),
         ("shared", r"^(LDS|STS)"), ("branch", r"^(BRA|EXIT|RET|CALL|BSSY|BSYNC|WARPSYNC)"))


def _has(name: str) -> bool:
    return hasattr(fused, name)


# one full block, as `_block` runs it with `full` true; the two ways of a tree with `_finite`
@triton.jit
def full_block(x_ptr, p_ptr, n, cap, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    fused._block(x_ptr, offs, n, True, p_ptr, 0, cap, ACC)


@triton.jit
def full_block_b(x_ptr, p_ptr, n, cap, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    fused._block(x_ptr, offs, n, True, p_ptr, 0, cap, BLOCK, ACC)


@triton.jit
def finite_way(x_ptr, p_ptr, n, cap, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs).to(ACC)
    fused._finite(x, tl.sum(x, axis=0), p_ptr, 0, cap, BLOCK)


def compile_(fn, sig: dict, consts: dict):
    """fn compiled as a launch would: each pointer argument 16-byte aligned (torch's tensors
    are), which lets the full blocks load as vectors."""
    names = list(fn.arg_names)
    aligned = {(names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items() if v.startswith("*")}
    src = ASTSource(fn, {**sig, **{k: "constexpr" for k in consts}}, constexprs=consts, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", a.arch, 32), options={"num_warps": fused.WARPS})


def _tool(kernel, *argv: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "k.cubin")
        with open(f, "wb") as fh:
            fh.write(kernel.asm["cubin"])
        return subprocess.run([os.path.join(BIN, argv[0]), *argv[1:], f], capture_output=True, text=True,
                              check=True).stdout


def resources(kernel) -> str:
    """Registers a thread and spill bytes, from cuobjdump's resource usage."""
    out = _tool(kernel, "cuobjdump", "--dump-resource-usage")
    reg = re.search(r"REG:(\d+)", out)
    spill = re.search(r"STACK:(\d+)", out)
    return f"{reg.group(1) if reg else '?'} registers a thread, stack {spill.group(1) if spill else '?'} bytes"


def sass(kernel) -> list[str]:
    out = _tool(kernel, "nvdisasm", "-c")
    ops = []
    for line in out.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and not m.group(1).startswith("NOP"):
            ops.append(m.group(1))
    return ops


def kinds(ops: list[str]) -> str:
    c = collections.Counter()
    for op in ops:
        c[next((k for k, rx in KINDS if re.match(rx, op)), "arithmetic")] += 1
    return ", ".join(f"{k} {c[k]}" for k, _ in KINDS + (("arithmetic", ""),) if c[k])


def main() -> None:
    one = {"x_ptr": PTR, "p_ptr": "*fp64", "n": "i64", "cap": "i64"}
    consts = {"BLOCK": BLOCK, "ACC": ACC}
    print(f"client_hooks from {a.tree}; sm_{a.arch}, {fused.WARPS} warps, {BLOCK}-element blocks of {a.dtype} "
          f"(Triton {triton.__version__})")
    print("SASS instructions a program executes for one full block (no branch taken but the reductions'):")
    ways = [("any full block (`_block`, every way it has)",
             full_block_b if "BLOCK" in getattr(fused._block, "arg_names", ()) else full_block)]
    if _has("_finite"):
        ways.insert(0, ("finite elements (the load, the sum and `_finite`)", finite_way))
    for what, fn in ways:
        ops = sass(compile_(fn, one, consts))
        branches = [op for op in ops if op.startswith("BRA")]
        print(f"  {what}: {len(ops)} ({kinds(ops)})" + (f"; {len(branches)} branch(es) left in" if branches else ""))
    print("production kernels (all their ways):")
    prod = [("_partials_one", fused._partials_one, {"x_ptr": PTR, "p_ptr": "*fp64", "n": "i64", "g0": "i64",
                                                    "cap": "i64"}, consts),
            ("_partials_group", fused._partials_group, {"x0": PTR, "rel": "*i64", "seg_n": "*i64", "seg_b0": "*i64",
                                                        "blk_seg": "*i32", "p_ptr": "*fp64", "g0": "i64",
                                                        "cap": "i64"},
             {**consts, "UNIT": 16 // {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[a.dtype]})]
    for name, fn, sig, cs in prod:
        k = compile_(fn, sig, cs)
        print(f"  {name}: {len(sass(k))} instructions in all; {resources(k)}")


if __name__ == "__main__":
    main()
