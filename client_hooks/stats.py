"""Tensor statistics computed on the tensor's device, packed into one small vector per tensor.

Each `*_vector` function runs on the training thread and returns a 1-D float64 tensor on the
input's device (no host read of a device value); the matching `*_dict` function (those of
tensors and gradients live in collector.packed, where the collector expands a capture's packed
record) turns the vector's values into the payload dict.

Real tensor payload (`tensor_stats_dict`):
    {"count", "nan", "inf", "min", "max", "mean", "std", "shape": [...], "dtype": "float32"}
min/max/mean/std are over the finite elements only (NaN/Inf are counted in nan/inf); std is the
population std (ddof=0); all four are None when no element is finite (an empty tensor too).
Arithmetic is float32 (float64 for float64/int64/int32 inputs), so float16/bfloat16 are fine.

Complex tensor (or a declared two-channel pair, see `as_complex`):
    {"count", "nan", "inf", "shape", "dtype", "real": {min,max,mean,std}, "imag": {...},
     "abs": {...}, "angle": {...}}
An element is finite when both its parts are; nan counts elements with a NaN part, inf those
with an infinite part (NumPy's isnan/isinf on complex).

Cost: on CPU, aminmax first; when every element is finite, a sum and a sum of squared
deviations (no var_mean: its CPU Welford kernel is ~15x slower than two cascade sums); a
masked pass only when an element is not finite (CPU ops are synchronous, so looking at the
result costs no device wait). On CUDA with Triton, `tensor_stats_vector` of a real tensor
costs two kernel launches (client_hooks.fused: per-block partials, then a Chan merge); the
capture engine batches further (one launch per tensor, one merge per capture; see
client_hooks.engine). Otherwise (complex here, integer, no Triton, other accelerators) the
masked torch path runs (no host read is allowed there).
"""
from __future__ import annotations

import math
import os
import struct
import warnings
from typing import Optional

import torch

from collector.packed import grad_stats_dict, tensor_stats_dict  # noqa: F401  (the payloads, shared)

PAIR_KINDS = ("real_imag", "amp_phase")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype: float64 for 64-bit and int32 inputs, float32 otherwise."""
    wide = (torch.float64, torch.int64, torch.int32, torch.complex128)
    return torch.float64 if dtype in wide else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _out_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # mps has no float64


def _std(x: torch.Tensor, mean: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    """Population std of 1-D `x` around its known `mean`, min `mn` and max `mx` (0-d tensors).

    CPU: the sum of squared deviations (`_deviations_m2`: torch's CPU sum is a cascade sum,
    so this is as accurate as var_mean and ~15x faster than its Welford kernel; float64
    where float32 squares would underflow or overflow); elsewhere `_std_scaled`."""
    if x.device.type == "cpu":
        if x.numel() == 0:
            return torch.tensor(math.nan, dtype=x.dtype)
        m2 = _deviations_m2(x, float(mean), float(mn), float(mx))  # CPU, training thread: no device wait
        return torch.tensor(math.sqrt(m2 / x.numel()), dtype=x.dtype)
    return _std_scaled(x, mn, mx)


def _std_scaled(x: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    """Population std of 1-D `x` by one var_mean, without reading anything back (the
    accelerator way where Triton is missing). x is first divided by s, the power of two at
    or below its largest magnitude (exact, bar underflow far below the spread): float32
    squares of deviations above ~1.8e19 would overflow and those below ~1e-19 underflow."""
    a = torch.maximum(mn.abs(), mx.abs())
    s = torch.exp2(torch.floor(torch.log2(a)))
    s = torch.where((a > 0) & torch.isfinite(a), s, torch.ones_like(s))
    return torch.var_mean(x / s, correction=0)[0].sqrt() * s


def _masked_moments(parts: list[torch.Tensor], fin: torch.Tensor, nfin: torch.Tensor) -> list[torch.Tensor]:
    """(min, max, mean, std) of each 1-D tensor in `parts` over the elements where `fin`.

    Non-finite elements are replaced by the finite mean: that leaves min, max and every
    deviation from the mean unchanged, so one aminmax and one std do the rest (few
    kernels: on an accelerator their launch cost is what a capture costs)."""
    cnt64 = nfin.clamp(min=1)
    cnt = cnt64.to(parts[0].dtype)
    scale = fin.numel() / cnt
    out = []
    for x in parts:
        # summed in float64: a float32 sum of large finite values can overflow
        mean = (torch.where(fin, x, 0).sum(dtype=torch.float64) / cnt64).to(x.dtype)
        xr = torch.where(fin, x, mean)
        mn, mx = torch.aminmax(xr)
        out += [mn, mx, mean, _std(xr, mean, mn, mx) * scale.sqrt()]
    return out


def _m2_float64(x: torch.Tensor, mean: float) -> float:
    """sum((x - mean)^2) in float64 (rare: deviations beyond float32's safe squaring range)."""
    d = x.double() - mean
    return float(d.mul_(d).sum())  # CPU, training thread: no device wait


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


_DOT_CHUNK = 1 << 19     # elements per chunk of `_chunk_reads` (2 MiB of float32)
_SQ_SAFE = (1e-15, 1e14)  # |x| range where float32 squares neither lose digits nor overflow
_SQ_SAFE64 = (1e-140, 1e140)  # the same for float64


def _chunk_reads(x: torch.Tensor, zeros: bool = False) -> tuple[float, float, float, float, Optional[int]]:
    """(min, max, sum, sum of squares) of a CPU 1-D tensor. Chunk by chunk, aminmax, sum and
    dot run back to back, so a chunk comes from memory once and is re-read from cache. The
    chunk is 2^19 elements: on the 2-core VM, 14 freshly written 524k-element activations
    took 1.41 ms this way against 1.95 ms with 2^18 (each op's thread start-up counts) and
    1.42 ms with 2^20. BLAS dot accumulates in the input dtype; a 2^19 chunk keeps its
    relative error ~1e-6, and the partial sums are added in Python float64. No temporaries;
    CPU reads need no device wait.
    zeros: also the number of +-0 elements (|sign(y)| summed per chunk, while it is cached:
    sign(-0.0) is -0.0; a float32 sum of 0/1 values is exact up to 2^24 > a chunk)."""
    vals, k = [], 5 if zeros else 4
    for i in range(0, x.numel(), _DOT_CHUNK):
        y = x[i:i + _DOT_CHUNK]
        mn, mx = torch.aminmax(y)
        vals += [mn, mx, y.sum(), torch.dot(y, y)]
        if zeros:
            vals.append(y.sign().abs_().sum())
    if not vals:  # empty: not finite, so the caller takes the general path
        return math.nan, math.nan, 0.0, 0.0, None
    v = torch.stack(vals).tolist()  # CPU, training thread: no device wait
    ext = v[0::k] + v[1::k]
    if not all(math.isfinite(e) for e in ext):  # Python's min/max would skip a NaN chunk
        return math.nan, math.nan, 0.0, 0.0, None
    nzero = x.numel() - int(sum(v[4::k])) if zeros else None
    return min(v[0::k]), max(v[1::k]), sum(v[2::k]), sum(v[3::k]), nzero


def _fast_moments(parts: list[torch.Tensor], zeros: Optional[list] = None) -> Optional[list[float]]:
    """Unmasked (min, max, mean, std) per part as Python floats, or None when an element is
    not finite.

    CPU only: finite min and max of every part imply every element is finite (NaN propagates
    through aminmax, +-Inf becomes the max/min). Host reads of CPU scalars cost no device wait
    (CPU kernels have already run), so the scalar arithmetic is done in Python float64 rather
    than as a dozen tiny tensor ops. Per part, one read from memory and no temporary
    (`_chunk_reads`: aminmax, a cascade sum and a dot per cache-sized chunk); the sum of
    squared deviations is sum(x^2) - n mean^2. Where that subtraction would cancel (|mean|
    not small against the spread) or the squares leave float32's safe range, the deviations
    are summed instead (x - mean, in float64 for extreme ranges): var_mean's accuracy at a
    fraction of its Welford kernel's time."""
    reads = [_chunk_reads(x, zeros is not None) for x in parts]
    if not all(math.isfinite(r[0]) and math.isfinite(r[1]) for r in reads):
        return None
    if zeros is not None:  # the zero count of each part, for the caller
        zeros.extend(r[4] for r in reads)
    out = []
    for x, (mn, mx, total, sq, _) in zip(parts, reads):
        n = x.numel()
        if not math.isfinite(total):  # finite elements whose float32 sum overflows (a mean above ~6e32)
            total = float(x.sum(dtype=torch.float64))  # CPU, training thread: no device wait
        mean = total / n
        amax = max(abs(mn), abs(mx))
        lo, hi = _SQ_SAFE64 if x.dtype == torch.float64 else _SQ_SAFE
        safe = lo <= amax <= hi or amax == 0.0
        m2 = None
        if safe:
            if n * mean * mean <= 0.5 * sq:  # cancellation costs at most one bit
                m2 = max(0.0, sq - n * mean * mean)
        if m2 is None:
            m2 = _deviations_m2(x, mean, mn, mx)
        out += [mn, mx, mean, math.sqrt(m2 / n)]
    return out


def _deviations_m2(x: torch.Tensor, mean: float, mn: float, mx: float) -> float:
    """sum((x - mean)^2) on CPU: in x's dtype, corrected for the mean's rounding to it, or in
    float64 when float32 squares would underflow or overflow (largest deviation outside
    _SQ_SAFE: inside it, n squares can neither all vanish nor overflow)."""
    dmax = max(mx - mean, mean - mn)  # the largest |deviation|
    if x.dtype == torch.float32 and dmax > 0 and not _SQ_SAFE[0] <= dmax <= _SQ_SAFE[1]:
        return _m2_float64(x, mean)
    d = x - mean  # the kernel subtracts the mean rounded to x's dtype: corrected below
    m2 = d.mul_(d).sum().item()  # CPU, training thread: no device wait
    if x.dtype == torch.float32:
        return max(0.0, m2 - x.numel() * (_f32(mean) - mean) ** 2)
    return m2


def _moments(parts: list[torch.Tensor], x: torch.Tensor,
             zeros: Optional[list] = None) -> tuple[list, list, Optional[torch.Tensor]]:
    """(moments, [nnan, ninf, nfinite], finite mask or None when all finite) for parts of x.

    Complex: an element can be both NaN and Inf (nan+infj), so the counts are separate.
    All finite (CPU fast path): the counts are plain Python numbers."""
    if x.device.type == "cpu":
        fast = _fast_moments(parts, zeros)
        if fast is not None:
            return fast, [0, 0, x.numel()], None
    fin = torch.isfinite(x)
    nfin = fin.sum(dtype=torch.float64)
    nnan = torch.isnan(x).sum(dtype=torch.float64)
    # real: an element is NaN, Inf or finite, so Inf = n - NaN - finite (one kernel less)
    ninf = torch.isinf(x).sum(dtype=torch.float64) if x.is_complex() else x.numel() - nnan - nfin
    counts = [nnan, ninf, nfin]
    return _masked_moments(parts, fin, nfin), counts, fin


def _vec(vals: list, out_dt: torch.dtype, device: torch.device, host_ok: bool = False):
    """One 1-D tensor of scalar tensors and Python numbers (the numbers need no kernel).
    host_ok: when every value is already a Python number (the CPU fast path), return them as
    a list of floats: no tensor to build now and none to read back later."""
    if all(isinstance(v, torch.Tensor) for v in vals):
        return torch.stack(vals).to(out_dt)
    if not any(isinstance(v, torch.Tensor) for v in vals):
        floats = [float(v) for v in vals]
        return floats if host_ok else torch.tensor(floats, dtype=out_dt, device=device)
    pieces, run = [], []
    for v in vals:
        if isinstance(v, torch.Tensor):
            run.append(v)
            continue
        if run:
            pieces.append(torch.stack(run).to(out_dt))
            run = []
        pieces.append(torch.tensor([float(v)], dtype=out_dt, device=device))
    if run:
        pieces.append(torch.stack(run).to(out_dt))
    return torch.cat(pieces)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FUSED_DTYPES = _FLOATS
_REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of view_as_real for a complex dtype; a real dtype itself."""
    return _REAL_OF.get(dtype, dtype)


_fused_state: dict = {}  # "mod": the Triton module, or "off": why it is not used
# Tests only: with TRITON_INTERPRET=1 and TENSORTAP_FUSED_ON_CPU=1 the fused kernels run on CPU
# tensors in Triton's interpreter (slow), so the CUDA code path can be checked without a GPU.
_FUSED_CPU = os.environ.get("TENSORTAP_FUSED_ON_CPU") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def read_now(device: torch.device) -> bool:
    """Whether a value on `device` is read on the training thread at once: CPU (no device to
    wait for), except in the fused-kernel test mode, which takes the CUDA way."""
    return device.type == "cpu" and not _FUSED_CPU


def fused_module(x: torch.Tensor):
    """client_hooks.fused when real `x` can use it (CUDA, float dtype, not empty), else None.
    Triton is imported here, lazily, on the first CUDA tensor only (never on CPU)."""
    if x.dtype not in _FLOATS or x.numel() == 0:
        return None
    return fused_for(x.device)


def fused_for(device: torch.device):
    """client_hooks.fused for tensors on `device` (CUDA), or None (CPU, no Triton, failed)."""
    if (device.type != "cuda" and not _FUSED_CPU) or "off" in _fused_state:
        return None
    mod = _fused_state.get("mod")
    if mod is None:
        try:
            from client_hooks import fused as mod
        except Exception as e:  # no Triton: the torch path
            _fused_state["off"] = repr(e)
            return None
        _fused_state["mod"] = mod
    return mod


def current_stream(device: torch.device) -> int:
    """The current CUDA stream of `device` as a number (0 elsewhere). `torch.device("cuda")`
    names no index: the current device's."""
    if device.type != "cuda":
        return 0
    index = device.index
    return raw_stream(torch.cuda.current_device() if index is None else index)


def raw_stream(index: int) -> int:
    """The current CUDA stream of device `index` as a number; 0 for an index below 0 (a
    tensor's get_device() off CUDA)."""
    return torch._C._cuda_getCurrentRawStream(index) if index >= 0 else 0


def fused_failed(err: BaseException) -> None:
    """A Triton failure must not cost the statistics: the torch path for good (said once)."""
    if "off" not in _fused_state:
        _fused_state["off"] = repr(err)
        try:
            warnings.warn(f"tensortap: fused CUDA statistics failed ({err!r}); using the slower "
                          f"torch path from now on", RuntimeWarning, stacklevel=2)
        except Exception:  # a warnings filter set to "error" must not reach training either
            pass


def _fused(x: torch.Tensor) -> Optional[torch.Tensor]:
    """CUDA + Triton: [nan, inf, nfinite, min, max, mean, std, nzero, norm, max_abs] of real
    1-D `x` (client_hooks.fused: two launches); None where it does not apply."""
    mod = fused_module(x)
    if mod is None:
        return None
    try:
        return mod.stats10(x)
    except Exception as e:
        fused_failed(e)
        return None


def _real10(x: torch.Tensor, extra: bool, host_ok: bool = False):
    """Real 1-D x (any dtype): [nan, inf, nfinite, min, max, mean, std] and, with `extra`,
    + [nzero, norm, max_abs]; norm and max_abs are over the finite elements. host_ok: see
    `_vec`."""
    f = _fused(x)
    if f is not None:
        return f if extra else f[:7]
    out_dt = _out_dtype(x.device)
    x = x.to(acc_dtype(x.dtype))
    zeros: list = []  # filled by the CPU fast path only
    (mn, mx, mean, std), (nnan, ninf, nfin), _ = _moments([x], x, zeros if extra else None)
    vals = [nnan, ninf, nfin, mn, mx, mean, std]
    if extra and not isinstance(std, torch.Tensor):  # CPU, all finite: Python floats
        vals += [zeros[0], math.sqrt(nfin * (std * std + mean * mean)), max(abs(mn), abs(mx))]
    elif extra:
        nzero = x.numel() - torch.count_nonzero(x)  # NaN counts as non-zero, as it should
        nf = nfin if isinstance(nfin, torch.Tensor) else torch.tensor(float(nfin), dtype=torch.float64)
        norm = (nf * (std.double() ** 2 + mean.double() ** 2)).sqrt()  # of the finite elements
        vals += [nzero, norm, torch.maximum(mn.abs(), mx.abs())]
    return _vec(vals, out_dt, x.device, host_ok)


def tensor_stats_vector(t: torch.Tensor, host_ok: bool = False):
    """Real: [nan, inf, nfinite, min, max, mean, std]; complex: [nan, inf, nfinite] + 4 x
    (min, max, mean, std) for real, imag, abs, angle. Empty input: an empty vector.
    host_ok: a list of floats instead where the values are already on the host (`_vec`)."""
    x = t.detach().reshape(-1)
    out_dt = _out_dtype(x.device)
    if x.numel() == 0:
        return torch.empty(0, dtype=out_dt, device=x.device)
    if not x.is_complex():
        return _real10(x, extra=False, host_ok=host_ok)
    x = x.to(torch.complex128 if x.dtype == torch.complex128 else torch.complex64)
    ri = torch.view_as_real(x)
    parts = [ri[:, 0], ri[:, 1], x.abs(), x.angle()]
    moments, counts, _ = _moments(parts, x)
    return _vec(counts + moments, out_dt, x.device, host_ok)


def complex_vector(t: torch.Tensor, pair=None, host_ok: bool = False):
    """`tensor_stats_vector` of a complex tensor, or of a declared pair (as `as_complex` would
    make it). CPU, every element finite: the four parts stacked in float64 and reduced
    row-wise, about a dozen ops in all (no complex tensor built for a real/imag pair)."""
    if t.device.type == "cpu" and t.numel():
        fast = _complex_fast_cpu(complex_parts(t, pair))
        if fast is not None:
            return fast if host_ok else torch.tensor(fast, dtype=torch.float64)
    return tensor_stats_vector(t if pair is None else pair_as_complex(t, pair), host_ok)


def _complex_fast_cpu(parts: list[torch.Tensor]) -> Optional[list[float]]:
    """[0, 0, n] + (min, max, mean, std) of each part, or None when an element is not finite
    (then the masked path runs). CPU values: reading them costs no device wait."""
    p = torch.stack([q.reshape(-1) for q in parts]).double()
    # amin + amax: a third of aminmax(dim=1)'s time here
    ext = torch.cat([p.amin(1), p.amax(1)]).tolist()  # CPU, training thread: no device wait
    if not all(math.isfinite(v) for v in ext):
        return None
    n = p.shape[1]
    mean = p.sum(1).div_(n)
    d = p.sub_(mean[:, None])
    means, m2 = torch.stack([mean, d.mul_(d).sum(1)]).tolist()  # CPU, training thread: no device wait
    out = [0.0, 0.0, float(n)]
    for i in range(4):
        out += [ext[i], ext[4 + i], means[i], math.sqrt(m2[i] / n)]
    return out


def _check_pair(t: torch.Tensor, pair: str, dim: int) -> None:
    if pair not in PAIR_KINDS:
        raise ValueError(f"tensortap: pair must be one of {PAIR_KINDS}, got {pair!r}")
    if t.shape[dim] != 2:
        raise ValueError(f"tensortap: a {pair} pair needs size 2 along dim {dim}, got shape {tuple(t.shape)}")


def as_complex(t: torch.Tensor, pair: str, dim: int = 1) -> torch.Tensor:
    """A two-channel real tensor as complex: `pair` "real_imag" (re, im) or "amp_phase"
    (amplitude, phase in radians) along `dim` (size 2)."""
    _check_pair(t, pair, dim)
    a, b = t.detach().to(acc_dtype(t.dtype)).unbind(dim)
    return torch.complex(a, b) if pair == "real_imag" else torch.polar(a, b)


def pair_spec(pair) -> tuple[str, int]:
    """A pairs option, a kind or (kind, dim), as (kind, dim); the default dim is 1."""
    return (pair, 1) if isinstance(pair, str) else tuple(pair)


def pair_as_complex(t: torch.Tensor, pair) -> torch.Tensor:
    """`as_complex` for a pairs option: a kind, or (kind, dim)."""
    return as_complex(t, *pair_spec(pair))


def complex_parts(t: torch.Tensor, pair=None) -> list[torch.Tensor]:
    """[real, imag, abs, angle] of a complex tensor, or of a declared two-channel pair (see
    `as_complex`), as real tensors of the complex shape. A real/imag pair needs no complex
    tensor: its channels are the parts, abs and angle are hypot and atan2."""
    if pair is not None:
        kind, dim = pair_spec(pair)
        if kind == "real_imag":
            _check_pair(t, kind, dim)
            a, b = t.detach().to(acc_dtype(t.dtype)).unbind(dim)
            return [a, b, torch.hypot(a, b), torch.atan2(b, a)]
        t = as_complex(t, kind, dim)
    z = t.detach().to(torch.complex128 if t.dtype == torch.complex128 else torch.complex64)
    ri = torch.view_as_real(z)
    return [ri[..., 0], ri[..., 1], z.abs(), z.angle()]


# -- gradients ------------------------------------------------------------------------------
GRAD_KEYS = ("count", "mean", "std", "norm", "max_abs", "nan", "inf", "zero_frac",
             "weight_norm", "update_ratio")
# a layer's gradient vector: grad_moments_vector's 10 values, then weight_norm (11 in all)
GRAD_VEC = ("nan", "inf", "nfinite", "min", "max", "mean", "std", "nzero", "norm", "max_abs",
            "weight_norm")


def _flat_real(ts: list[torch.Tensor]) -> torch.Tensor:
    flat = [torch.view_as_real(g).reshape(-1) if g.is_complex() else g.reshape(-1) for g in ts]
    return (flat[0] if len(flat) == 1 else torch.cat(flat)).detach()


def grad_moments_vector(grads: list[torch.Tensor], host_ok: bool = False):
    """[nan, inf, nfinite, min, max, mean, std, nzero, norm, max_abs] of a layer's gradients
    (all its parameters' grads as one flat real vector; complex as (re, im) pairs); moments,
    norm and max_abs over the finite elements. host_ok: see `_vec`."""
    return _real10(_flat_real(grads), extra=True, host_ok=host_ok)


def grad_stats_vector(grads: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    """grad_moments_vector + [weight_norm] (the layout GRAD_VEC). The engine computes the
    weight norms of all layers at once instead (one foreach norm)."""
    g = grad_moments_vector(grads)
    wnorm = torch.nn.utils.get_total_norm([w.detach() for w in weights])
    return torch.cat([g, wnorm.reshape(1).to(g.dtype)])


# -- patch metrics --------------------------------------------------------------------------
class PatchShapes(ValueError):
    """pred and target that do not line up element by element."""


def patch_vector(pred: torch.Tensor, target: torch.Tensor, scale) -> torch.Tensor:
    """[mae, mse, optimal_scale, mae_after, mse_after, scale] of amplitude pred vs target.

    `scale` (None, a float or a 0-d tensor) multiplies pred before comparing. The optimal
    scale s = <p, t> / <p, p> minimises ||s p - t|| for the compared p."""
    p = pred.detach().abs() if pred.is_complex() else pred.detach()
    t = target.detach().abs() if target.is_complex() else target.detach()
    dt = torch.float64 if torch.float64 in (p.dtype, t.dtype) else torch.float32
    if [n for n in p.shape if n != 1] != [n for n in t.shape if n != 1]:  # (B, 1, H, W) vs (B, H, W) is fine
        raise PatchShapes(f"patch_metrics needs pred and target of one shape (size-1 dims aside), got "
                          f"{tuple(pred.shape)} and {tuple(target.shape)}")
    p, t = p.to(dt).reshape(-1), t.to(dt).reshape(-1)
    sc = torch.as_tensor(1.0 if scale is None else scale, dtype=dt, device=p.device).reshape(())
    p = p * sc
    diff = p - t
    s = (p * t).sum() / (p * p).sum()
    diff2 = s * p - t
    vals = [diff.abs().mean(), (diff * diff).mean(), s, diff2.abs().mean(), (diff2 * diff2).mean(), sc]
    out_dt = _out_dtype(p.device)
    return torch.stack([v.to(out_dt) for v in vals])


def _finite_or_none(v: float) -> Optional[float]:
    return float(v) if math.isfinite(v) else None


def patch_dict(vals: list[float], count: int, scale_applied: bool, note: Optional[str]) -> dict:
    """The patch_metrics payload (sender thread)."""
    mae, mse, s, mae2, mse2, sc = vals
    if scale_applied:
        sentence = f"prediction multiplied by {sc:.6g} before comparison"
        sentence += f" ({note})" if note else ""
    else:
        sentence = "no scaling applied: raw predicted amplitude compared with target amplitude"
    sentence += f"; least-squares optimal scale of the compared prediction: {s:.6g}"
    return {"mae": _finite_or_none(mae), "mse": _finite_or_none(mse), "count": count,
            "scaling": sentence, "scale_applied": scale_applied,
            "optimal_scale": _finite_or_none(s), "mae_after_optimal_scale": _finite_or_none(mae2),
            "mse_after_optimal_scale": _finite_or_none(mse2)}
