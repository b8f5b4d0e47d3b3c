"""Host time of one Triton launch of the fused partials kernel: through `JITFunction.run` (what
client_hooks.fused does) against the compiled kernel's own launcher (what a direct launch
would cost), to size what skipping Triton's Python launch path could save.

    python bench/launch_cost.py [--launches 2000]

On CUDA: real launches of `_partials_one` over 17 blocks (host time per launch; the device
is synchronised after each batch of launches, outside the timing). Without a GPU: Triton's
launch path up to the launcher, with a stand-in driver and a stand-in compiled kernel
(Triton 3.6's internals, as on the device machines; other versions may not run it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402


def per_launch(fn, n: int, sync) -> float:
    """Best of 5: host seconds per call of fn, n calls a round."""
    best = float("inf")
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    sync()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", type=int, default=2000)
    a = ap.parse_args()
    import triton

    cuda = torch.cuda.is_available()
    if not cuda:
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver

        class _Driver:  # the calls JITFunction.run makes before the launcher
            def get_current_device(self):
                return 0

            def get_current_stream(self, device):
                return 0

            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)

            def get_active_torch_device(self):
                return torch.device("cpu")

        driver.set_active(_Driver())
    from client_hooks import fused

    dev = "cuda" if cuda else "cpu"
    n = fused.BLOCK * 17
    x = torch.randn(n, device=dev)
    p = torch.empty(fused.NF * 64, dtype=torch.float64, device=dev)
    args = (x, p, n, 0, 64, fused.BLOCK, fused._acc(x.dtype))
    fn = fused._partials_one
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        kernel = fn[(17,)](*args, num_warps=8)
    else:  # a compiled kernel stand-in under the key JITFunction.run computes for these args
        from triton.runtime import jit

        class _Kernel:
            function, packed_metadata = 1, (8, 1, 0)

            def launch_metadata(self, grid, stream, *args):
                return None

            def run(self, *args):
                return None

        kernel_cache, key_cache, _, _, binder = fn.device_caches[0]
        _, spec, opts = binder(*args, num_warps=8, debug=False, instrumentation_mode="")
        kernel = kernel_cache[jit.compute_cache_key(key_cache, spec, opts)] = _Kernel()
    stream = torch.cuda.current_stream().cuda_stream if cuda else 0

    def direct():
        kernel.run(17, 1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None, *args)

    try:
        fn[(17,)](*args, num_warps=8)
    except Exception as e:
        sys.exit(f"launch_cost: Triton {triton.__version__}'s launch path differs from the one this "
                 f"stand-in follows (3.6): {type(e).__name__}; run it on a GPU, or with Triton 3.6")
    jit_s = per_launch(lambda: fn[(17,)](*args, num_warps=8), a.launches, sync)
    direct_s = per_launch(direct, a.launches, sync)
    where = torch.cuda.get_device_name() if cuda else "no GPU: stand-in driver and kernel"
    print(f"Triton {triton.__version__}, {where}")
    print(f"JITFunction.run: {jit_s * 1e6:.2f} us a launch; the compiled kernel's launcher: "
          f"{direct_s * 1e6:.2f} us; difference {(jit_s - direct_s) * 1e6:.2f} us")


if __name__ == "__main__":
    main()
