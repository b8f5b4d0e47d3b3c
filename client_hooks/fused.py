"""Fused tensor statistics on CUDA (Triton): two kernel launches per tensor instead of ~25.

Imported lazily by `stats._fused`, and only for a CUDA tensor: CPU-only installs (and CI)
never import Triton. `stats10(x)` returns, for a real 1-D CUDA tensor of float16, bfloat16,
float32 or float64, a float64 CUDA vector

    [nan, inf, nfinite, min, max, mean, std, nzero, norm, max_abs]

with min/max/mean/std (population), norm (L2) and max_abs over the finite elements only
(min = +inf, max = -inf, the rest 0 when none is finite). Arithmetic: float32 in registers
(float64 for float64 input); the merge is float64.

Kernel 1 (`_partials`): one program per BLOCK elements; loads its block once into registers
and computes the counts, finite min/max, the block's finite mean and then (second pass over
the same registers) its M2 = sum (x - mean_b)^2; writes 8 partials per block.
Kernel 2 (`_merge`): one program; reads the partials RB blocks at a time and merges them
with Chan's formula, M2 = sum M2_b + sum n_b (mean_b - mean)^2, into the output vector.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements per program of the first kernel
RB = 1024  # partials per iteration of the merge


@triton.jit
def _partials(x_ptr, p_ptr, n, nb, BLOCK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(ACC)
    ax = tl.abs(x)
    isnan = valid & (x != x)
    isinf = valid & (ax == float("inf"))
    fin = valid & (ax < float("inf"))  # False for NaN
    c_nan = tl.sum(isnan.to(tl.int32), axis=0)
    c_inf = tl.sum(isinf.to(tl.int32), axis=0)
    c_fin = tl.sum(fin.to(tl.int32), axis=0)
    c_zero = tl.sum((valid & (x == 0.0)).to(tl.int32), axis=0)
    mean = tl.sum(tl.where(fin, x, 0.0), axis=0) / tl.maximum(c_fin, 1).to(ACC)
    d = tl.where(fin, x - mean, 0.0)
    m2 = tl.sum(d * d, axis=0)
    mn = tl.min(tl.where(fin, x, float("inf")), axis=0)
    mx = tl.max(tl.where(fin, x, float("-inf")), axis=0)
    tl.store(p_ptr + pid, c_nan.to(tl.float64))
    tl.store(p_ptr + nb + pid, c_inf.to(tl.float64))
    tl.store(p_ptr + 2 * nb + pid, c_fin.to(tl.float64))
    tl.store(p_ptr + 3 * nb + pid, c_zero.to(tl.float64))
    tl.store(p_ptr + 4 * nb + pid, mn.to(tl.float64))
    tl.store(p_ptr + 5 * nb + pid, mx.to(tl.float64))
    tl.store(p_ptr + 6 * nb + pid, mean.to(tl.float64))
    tl.store(p_ptr + 7 * nb + pid, m2.to(tl.float64))


@triton.jit
def _merge(p_ptr, o_ptr, nb, RB: tl.constexpr):
    r = tl.arange(0, RB)
    zero = tl.sum(tl.zeros([RB], dtype=tl.float64), axis=0)
    c_nan = zero
    c_inf = zero
    c_zero = zero
    n_a = zero
    mean_a = zero
    m2_a = zero
    mn = zero + float("inf")
    mx = zero - float("inf")
    for start in range(0, nb, RB):
        idx = start + r
        m = idx < nb
        c_nan += tl.sum(tl.load(p_ptr + idx, mask=m, other=0.0), axis=0)
        c_inf += tl.sum(tl.load(p_ptr + nb + idx, mask=m, other=0.0), axis=0)
        b_n = tl.load(p_ptr + 2 * nb + idx, mask=m, other=0.0)
        c_zero += tl.sum(tl.load(p_ptr + 3 * nb + idx, mask=m, other=0.0), axis=0)
        mn = tl.minimum(mn, tl.min(tl.load(p_ptr + 4 * nb + idx, mask=m, other=float("inf")), axis=0))
        mx = tl.maximum(mx, tl.max(tl.load(p_ptr + 5 * nb + idx, mask=m, other=float("-inf")), axis=0))
        b_mean = tl.load(p_ptr + 6 * nb + idx, mask=m, other=0.0)
        b_m2 = tl.load(p_ptr + 7 * nb + idx, mask=m, other=0.0)
        # this chunk's blocks merged at once, then Chan's pairwise update with the running total
        n_c = tl.sum(b_n, axis=0)
        mean_c = tl.sum(b_n * b_mean, axis=0) / tl.maximum(n_c, 1.0)
        dev = b_mean - mean_c
        m2_c = tl.sum(b_m2 + b_n * dev * dev, axis=0)
        n = n_a + n_c
        delta = mean_c - mean_a
        w = n_c / tl.maximum(n, 1.0)
        mean_a = mean_a + delta * w
        m2_a = m2_a + m2_c + delta * delta * n_a * w
        n_a = n
    tl.store(o_ptr + 0, c_nan)
    tl.store(o_ptr + 1, c_inf)
    tl.store(o_ptr + 2, n_a)
    tl.store(o_ptr + 3, mn)
    tl.store(o_ptr + 4, mx)
    tl.store(o_ptr + 5, mean_a)
    tl.store(o_ptr + 6, tl.sqrt(m2_a / tl.maximum(n_a, 1.0)))
    tl.store(o_ptr + 7, c_zero)
    tl.store(o_ptr + 8, tl.sqrt(m2_a + n_a * mean_a * mean_a))
    tl.store(o_ptr + 9, tl.maximum(tl.abs(mn), tl.abs(mx)))


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def stats10(x: torch.Tensor) -> torch.Tensor:
    """The 10-vector above for a real, non-empty CUDA tensor (any shape; made contiguous)."""
    if x.device.type != "cuda" or x.dtype not in _DTYPES:
        raise TypeError(f"tensortap: fused stats need a real float CUDA tensor, got {x.dtype} on {x.device}")
    x = x.detach().reshape(-1)
    if x.numel() == 0:
        raise ValueError("tensortap: fused stats of an empty tensor")
    if not x.is_contiguous():
        x = x.contiguous()
    n = x.numel()
    nb = triton.cdiv(n, BLOCK)
    buf = torch.empty(10 + 8 * nb, dtype=torch.float64, device=x.device)  # one allocation
    out, part = buf[:10], buf[10:]
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    if x.device.index != torch.cuda.current_device():  # Triton launches on the current device
        with torch.cuda.device(x.device):
            _launch(x, part, out, n, nb, acc)
    else:
        _launch(x, part, out, n, nb, acc)
    return out


def _launch(x, part, out, n, nb, acc) -> None:
    _partials[(nb,)](x, part, n, nb, BLOCK=BLOCK, ACC=acc, num_warps=8)
    _merge[(1,)](part, out, nb, RB=RB, num_warps=4)
