"""Fused tensor statistics on CUDA (Triton): one launch per tensor, one merge per capture.

Imported lazily by `stats._fused_module`, and only for a CUDA tensor: CPU-only installs (and
CI) never import Triton. Every result is, for a real tensor of float16, bfloat16, float32 or
float64, the float64 vector

    [nan, inf, nfinite, min, max, mean, std, nzero, norm, max_abs]

with min/max/mean/std (population), norm (L2) and max_abs over the finite elements only
(min = +inf, max = -inf, the rest 0 when none is finite). Arithmetic: float32 in registers
(float64 for float64 input); the merge is float64.

Kernels:
- `_partials_one`: one program per BLOCK elements of one tensor; loads its block once into
  registers (without a mask, so as vectors, when the block is full) and computes the counts,
  finite min/max, the block's finite mean and (second pass over the same registers)
  M2 = sum (x - mean_b)^2, scaled by the block's largest deviation so that no square
  underflows or overflows: 8 partials per block, written field-major into a workspace
  (`p[k * cap + block]`). A full block whose sum is finite holds only finite elements and
  takes a short way (`_finite`: no masks; 5 reductions, not 9; about a third of the
  instructions, bench/kernel_sass.py); a tensor's last block, and one with a NaN, an
  infinity or an overflowing float32 sum, the general way (`_general`).
- `_partials_group`: the same for many tensors in one launch (a layer's or a whole model's
  gradients, a forward's activations): the tensors' offsets from the first one come from a
  table (in 16-byte units when all are aligned, which keeps the loads vectorised), each
  program finds its tensor and block from two small index tables that depend only on the
  sizes (cached).
- `_merge`: one program per result row; merges the row's consecutive blocks with Chan's
  formula, M2 = sum M2_b + sum n_b (mean_b - mean)^2.

`Batch` collects the rows of one capture step: `add(x)` launches the partials of one tensor at
once (so a later in-place change of x cannot alter its statistics), `add_group(layers)`
launches the partials of many, `finish()` launches one merge for every row and returns the
(rows, 10) matrix. Host cost per tensor: one Triton launch; the readback stays with the
capture's one device-to-host copy.
"""
from __future__ import annotations

import inspect
import os
from itertools import accumulate, chain
from typing import Optional

import torch
import triton
import triton.language as tl

from client_hooks import stats

BLOCK = 4096  # elements per program of the partials kernels
# warps of a partials program: 4 read 1.87-1.88 TB/s on two H100s where 8 read 1.72-1.74
# (bench/fused_check.py, grouped launch over the demo FNO's forward)
WARPS = 4
RB = 1024  # partials per iteration of the merge
NF = 8  # partial fields per block
FIRST_CAP = 16384  # blocks in a capture's first workspace (1 MiB of partials, 67M elements)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# TRITON_INTERPRET=1 runs the kernels on CPU tensors (tests of the kernels on a machine
# without a GPU); otherwise only CUDA tensors are accepted
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _store8(p_ptr, g, cap, c_nan, c_inf, c_fin, c_zero, mn, mx, mean, m2):
    tl.store(p_ptr + g, c_nan.to(tl.float64))
    tl.store(p_ptr + cap + g, c_inf.to(tl.float64))
    tl.store(p_ptr + 2 * cap + g, c_fin.to(tl.float64))
    tl.store(p_ptr + 3 * cap + g, c_zero.to(tl.float64))
    tl.store(p_ptr + 4 * cap + g, mn.to(tl.float64))
    tl.store(p_ptr + 5 * cap + g, mx.to(tl.float64))
    tl.store(p_ptr + 6 * cap + g, mean.to(tl.float64))
    tl.store(p_ptr + 7 * cap + g, m2)


@triton.jit
def _m2(d, s):
    # M2 = s^2 * sum((d / s)^2), s the largest |deviation| (at least 1e-30): the squares of
    # deviations below ~1e-19 (float32) would vanish, those above ~1e19 overflow; scaled,
    # neither happens. One division a block; a multiply an element.
    s = tl.maximum(s, 1e-30)
    e = d * (1.0 / s)
    s64 = s.to(tl.float64)
    return s64 * s64 * tl.sum(e * e, axis=0).to(tl.float64)


@triton.jit
def _general(x, valid, p_ptr, g, cap, ACC: tl.constexpr):
    """Any block: masked (a tensor's last), or holding a NaN or an infinity."""
    ax = tl.abs(x)
    isnan = valid & (x != x)
    isinf = valid & (ax == float("inf"))
    fin = valid & (ax < float("inf"))  # False for NaN
    c_nan = tl.sum(isnan.to(tl.int32), axis=0)
    c_inf = tl.sum(isinf.to(tl.int32), axis=0)
    c_fin = tl.sum(fin.to(tl.int32), axis=0)
    c_zero = tl.sum((valid & (x == 0.0)).to(tl.int32), axis=0)
    xf = tl.where(fin, x, 0.0)
    tot = tl.sum(xf, axis=0)
    cnt = tl.maximum(c_fin, 1).to(ACC)
    if tl.abs(tot) < float("inf"):
        mean = tot / cnt
    else:  # finite elements whose sum overflows (a float32 mean above ~8e34): summed scaled
        mean = tl.sum(xf * (1.0 / cnt), axis=0)
    d = tl.where(fin, x - mean, 0.0)
    m2 = _m2(d, tl.max(tl.abs(d), axis=0))
    mn = tl.min(tl.where(fin, x, float("inf")), axis=0)
    mx = tl.max(tl.where(fin, x, float("-inf")), axis=0)
    _store8(p_ptr, g, cap, c_nan, c_inf, c_fin, c_zero, mn, mx, mean, m2)


@triton.jit
def _finite(x, sx, p_ptr, g, cap, BLOCK: tl.constexpr):
    """A full block of finite elements, sx their sum: nothing needs masking, and the largest
    |deviation| comes from min and max (x - mean is monotone in x, rounded too)."""
    mean = sx / BLOCK
    mn = tl.min(x, axis=0)
    mx = tl.max(x, axis=0)
    c_zero = tl.sum((x == 0.0).to(tl.int32), axis=0)
    m2 = _m2(x - mean, tl.maximum(mx - mean, mean - mn))
    none = c_zero * 0
    _store8(p_ptr, g, cap, none, none, none + BLOCK, c_zero, mn, mx, mean, m2)


@triton.jit
def _block(x_ptr, offs, n, full, p_ptr, g, cap, BLOCK: tl.constexpr, ACC: tl.constexpr):
    if full:  # no mask: the load can be vectorised (a mask against an unknown n cannot)
        x = tl.load(x_ptr + offs).to(ACC)
        sx = tl.sum(x, axis=0)
        # a finite sum means every element is finite (a NaN or an infinity makes the sum one):
        # 5 reductions a block, not 9. A sum that overflows from finite elements, and a block
        # with a NaN or an infinity, take the general way.
        if tl.abs(sx) < float("inf"):
            _finite(x, sx, p_ptr, g, cap, BLOCK)
        else:
            _general(x, offs < n, p_ptr, g, cap, ACC)
    else:
        _general(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(ACC), offs < n, p_ptr, g, cap, ACC)


@triton.jit(do_not_specialize=["n", "g0", "cap"])
def _partials_one(x_ptr, p_ptr, n, g0, cap, BLOCK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    _block(x_ptr, offs, n, start + BLOCK <= n, p_ptr, g0 + pid, cap, BLOCK, ACC)


@triton.jit(do_not_specialize=["g0", "cap"])
def _partials_group(x0, rel, seg_n, seg_b0, blk_seg, p_ptr, g0, cap,
                    BLOCK: tl.constexpr, ACC: tl.constexpr, UNIT: tl.constexpr):
    pid = tl.program_id(0)
    s = tl.load(blk_seg + pid)
    b = pid - tl.load(seg_b0 + s)
    n = tl.load(seg_n + s)
    # tensor s starts rel[s] * UNIT elements from x0 (the group's first tensor). An address
    # read from a table loses its alignment for the compiler; x0's (a pointer argument) and a
    # multiple of UNIT (16 bytes) keep it, so full blocks load as vectors
    x_ptr = x0 + tl.load(rel + s) * UNIT
    start = b.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    _block(x_ptr, offs, n, start + BLOCK <= n, p_ptr, g0 + pid, cap, BLOCK, ACC)


@triton.jit(do_not_specialize=["cap", "r0"])
def _merge(p_ptr, cap, desc, o_ptr, r0, RB: tl.constexpr):
    row = tl.program_id(0)
    start = tl.load(desc + 2 * row)
    nb = tl.load(desc + 2 * row + 1)
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
    for off in range(0, nb, RB):
        m = off + r < nb
        idx = start + off + r
        c_nan += tl.sum(tl.load(p_ptr + idx, mask=m, other=0.0), axis=0)
        c_inf += tl.sum(tl.load(p_ptr + cap + idx, mask=m, other=0.0), axis=0)
        b_n = tl.load(p_ptr + 2 * cap + idx, mask=m, other=0.0)
        c_zero += tl.sum(tl.load(p_ptr + 3 * cap + idx, mask=m, other=0.0), axis=0)
        mn = tl.minimum(mn, tl.min(tl.load(p_ptr + 4 * cap + idx, mask=m, other=float("inf")), axis=0))
        mx = tl.maximum(mx, tl.max(tl.load(p_ptr + 5 * cap + idx, mask=m, other=float("-inf")), axis=0))
        b_mean = tl.load(p_ptr + 6 * cap + idx, mask=m, other=0.0)
        b_m2 = tl.load(p_ptr + 7 * cap + idx, mask=m, other=0.0)
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
    o = o_ptr + (r0 + row) * 10
    tl.store(o + 0, c_nan)
    tl.store(o + 1, c_inf)
    tl.store(o + 2, n_a)
    tl.store(o + 3, mn)
    tl.store(o + 4, mx)
    tl.store(o + 5, mean_a)
    tl.store(o + 6, tl.sqrt(m2_a / tl.maximum(n_a, 1.0)))
    tl.store(o + 7, c_zero)
    tl.store(o + 8, tl.sqrt(m2_a + n_a * mean_a * mean_a))
    tl.store(o + 9, tl.maximum(tl.abs(mn), tl.abs(mx)))


def usable(x: torch.Tensor) -> bool:
    """Whether `x` can go through the fused kernels (a real float, non-empty CUDA tensor)."""
    return ((x.device.type == "cuda" or _INTERPRET) and x.dtype in _DTYPES and x.numel() > 0
            and not x.is_complex())


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


_tables: dict = {}  # (device, stream, values) -> the table on the device (never written again)
uploads = [0]  # tables uploaded so far (cache misses; benchmarks report it)


def _table(vals: tuple, device: torch.device) -> torch.Tensor:
    """A small int64 table on `device`, uploaded once per distinct content: in steady training
    the tensors' addresses and the capture's rows repeat from step to step (the caching
    allocator hands out the same blocks), so later captures upload nothing. Keyed by stream
    too: the upload is asynchronous, ordered only before kernels on its own stream."""
    key = (device, stats.current_stream(device), vals)
    t = _tables.get(key)
    if t is None:
        if len(_tables) >= 256:
            _tables.clear()
        uploads[0] += 1
        t = _tables[key] = _to_device(list(vals), device)
    return t


def _to_device(vals: list[int], device: torch.device) -> torch.Tensor:
    """A small int64 table on `device`: built in pinned memory, copied without a host wait."""
    if device.type != "cuda":
        return torch.tensor(vals, dtype=torch.int64)
    return torch.tensor(vals, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)


# (kernel, warps, device, the arguments' specialisation) -> the compiled kernel: a launch
# alike calls its launcher directly, without Triton's Python launch path (binding, each
# argument's specialisation, the cache key): ~13-22 us a launch on the H100 hosts measured,
# against ~5-7 us for the launcher itself (bench/launch_cost.py). Not in the interpreter.
_direct: dict = {}
_direct_state = {"on": not _INTERPRET}


_constexprs: dict = {}  # kernel -> which of its parameters are constexprs


def _constexpr_mask(fn) -> tuple:
    """Per parameter of the kernel `fn`, whether it is a constexpr (annotated tl.constexpr)."""
    m = _constexprs.get(fn)
    if m is None:
        params = inspect.signature(fn.fn).parameters.values()
        m = _constexprs[fn] = tuple(["constexpr" in str(p.annotation) for p in params])
    return m


def _spec(args: tuple, constexpr: tuple) -> tuple:
    """What Triton's specialisation of these arguments depends on, or finer: a constexpr's
    value; a tensor's dtype and 16-byte alignment; an int's equality to 1, divisibility by 16
    and width (i32, i64, u64); any other argument itself."""
    out = []
    for a, c in zip(args, constexpr):
        t = type(a)
        if c:
            out.append(a)
        elif t is int:
            out.append((a == 1, a % 16 == 0, -0x80000000 <= a <= 0x7FFFFFFF, a > 0x7FFFFFFFFFFFFFFF))
        elif t is torch.Tensor:
            out.append((a.dtype, a.data_ptr() % 16 == 0))
        else:
            out.append(a)
    return tuple(out)


def _no_launch_hooks() -> bool:
    """No launch hook is set in Triton (its hook chains are empty): a direct launch skips
    nothing that Triton would have called."""
    try:
        r = triton.knobs.runtime
        hooks = (r.launch_enter_hook, r.launch_exit_hook)
    except AttributeError:  # a Triton without knobs: its own launch path
        return False
    return all([h is None or getattr(h, "calls", True) == [] for h in hooks])


def _launch(fn, grid: int, args: tuple, num_warps: int) -> None:
    if _direct_state["on"] and _no_launch_hooks():
        dev = torch.cuda.current_device()
        key = (fn, num_warps, dev, _spec(args, _constexpr_mask(fn)))
        k = _direct.get(key)
        if k is not None:
            try:
                k.run(grid, 1, 1, torch._C._cuda_getCurrentRawStream(dev), k.function, k.packed_metadata,
                      None, None, None, *args)
                return
            except Exception:  # a Triton whose launcher takes other arguments: its own path from now on
                _direct_state["on"] = False
                _direct.clear()
        else:
            k = fn[(grid,)](*args, num_warps=num_warps)
            if k is not None and hasattr(k, "packed_metadata"):
                if len(_direct) >= 256:
                    _direct.clear()
                _direct[key] = k
            return
    fn[(grid,)](*args, num_warps=num_warps)


class _Space:
    """One workspace of partials: `cap` blocks x 8 fields, field-major; rows merged at finish."""

    def __init__(self, cap: int, device: torch.device):
        self.buf = torch.empty(NF * cap, dtype=torch.float64, device=device)
        self.cap, self.used = cap, 0
        self.rows: list[int] = []  # first block, blocks: two values per row, rows consecutive
        self.row0 = -1


# device -> blocks the last finished batch used: a capture's first workspace takes that many,
# so a steady capture fills one workspace and is merged in one launch (a capture of the demo
# FNO at batch 64 needed two workspaces, and two merges, from FIRST_CAP)
_size_hint: dict = {}
HINT_MAX = 1 << 19  # blocks (32 MiB of partials, 2G elements): a rare huge capture does not size every later one

_layouts: dict = {}  # (device, dtype, sizes) -> the group kernel's index tables (sizes do not change)


class Batch:
    """The fused rows of one capture step on one device (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.nrows = 0
        self._spaces: list[_Space] = []
        self._keep: list[torch.Tensor] = []  # contiguous copies, alive until the batch is dropped
        self._out: Optional[torch.Tensor] = None

    def _space(self, nb: int) -> _Space:
        if self._spaces and self._spaces[-1].used + nb <= self._spaces[-1].cap:
            return self._spaces[-1]
        if self._spaces:
            cap = max(nb, 2 * self._spaces[-1].cap)
        else:  # as big as the last capture on this device needed: one workspace, one merge
            cap = max(nb, _size_hint.get(self.device, FIRST_CAP))
        sp = _Space(cap, self.device)
        self._spaces.append(sp)
        return sp

    def _rows(self, sp: _Space, blocks: list[int]) -> list[int]:
        if not sp.rows:
            sp.row0 = self.nrows
        first = list(range(self.nrows, self.nrows + len(blocks)))
        starts = list(accumulate(blocks, initial=sp.used))  # each row's first block, then the end
        sp.rows += chain.from_iterable(zip(starts, blocks))  # (first block, blocks) per row
        sp.used = starts[-1]
        self.nrows += len(blocks)
        return first

    def add(self, x: torch.Tensor) -> int:
        """Launch the partials of `x` (real float, non-empty) now; its row index."""
        x = x.detach().reshape(-1)
        if not x.is_contiguous():
            x = x.contiguous()
            self._keep.append(x)
        n = x.numel()
        nb = triton.cdiv(n, BLOCK)
        sp = self._space(nb)
        g0 = sp.used
        (row,) = self._rows(sp, [nb])
        with _on(x.device):
            _launch(_partials_one, nb, (x, sp.buf, n, g0, sp.cap, BLOCK, _acc(x.dtype)), WARPS)
        return row

    def add_group(self, layers: list[list[torch.Tensor]], sizes: Optional[tuple] = None) -> list[int]:
        """One row per layer, over all of that layer's tensors (each as one flat vector): one
        launch for every layer. The tensors must share one float dtype (see `usable`).
        sizes: the tensors' element counts, from a caller that has checked each one
        (contiguous, non-empty, of one float dtype): the launch reads only their addresses."""
        flat = [t for ts in layers for t in ts]
        dtype = flat[0].dtype
        if sizes is None:
            if not all([t.is_contiguous() for t in flat]):
                flat = [t if t.is_contiguous() else t.contiguous() for t in flat]
                self._keep += flat
            sizes = tuple([t.numel() for t in flat])
            if not all(sizes) or any([t.dtype != dtype for t in flat]):
                raise TypeError("tensortap: a fused group needs non-empty tensors of one dtype")
        ptrs = [t.data_ptr() for t in flat]
        counts = tuple(map(len, layers))
        key = (self.device, dtype, sizes, counts)
        lay = _layouts.get(key)
        if lay is None:
            lay = layout(sizes, counts, self.device)
            if len(_layouts) > 64:
                _layouts.clear()
            _layouts[key] = lay
        size = flat[0].element_size()
        # offsets from the first tensor in units of 16 bytes when every address is 16-byte
        # aligned (the caching allocator's blocks are), else in elements
        unit = 1 if any([p % 16 for p in ptrs]) else 16 // size
        base, step = ptrs[0], size * unit
        rel = _table(tuple([(p - base) // step for p in ptrs]), self.device)
        return self._add_at(flat[0], rel, lay, unit)

    def add_flat(self, x0: torch.Tensor, rel: torch.Tensor, lay: tuple, unit: int) -> list[int]:
        """`add_group` for tensors at known places: tensor s starts rel[s] * unit elements
        from x0's first (rel: an int64 table on the device; unit: 1, or 16 bytes in elements
        when every start is 16-byte aligned), its size and its layer in `lay` (`layout`).
        One launch, nothing looked at per tensor: the gradients' flat buffer (Engine)."""
        return self._add_at(x0, rel, lay, unit)

    def _add_at(self, x0: torch.Tensor, rel: torch.Tensor, lay: tuple, unit: int) -> list[int]:
        seg_n, seg_b0, blk_seg, layer_blocks, total = lay
        sp = self._space(total)
        g0 = sp.used
        rows = self._rows(sp, layer_blocks)
        with _on(self.device):
            _launch(_partials_group, total,
                    (x0, rel, seg_n, seg_b0, blk_seg, sp.buf, g0, sp.cap, BLOCK, _acc(x0.dtype), unit), WARPS)
        return rows

    def finish(self, flat: bool = False) -> torch.Tensor:
        """(nrows, 10) float64 matrix on the device (flat: its nrows * 10 values as they lie,
        no view made): one merge launch per workspace (one unless a capture holds more than
        ~200M elements). Idempotent."""
        if self._out is None:
            self._merge()
        return self._out if flat else self._out.view(self.nrows, 10)

    def _merge(self) -> None:
        used = sum(sp.used for sp in self._spaces)
        if used:
            _size_hint[self.device] = min(max(used, FIRST_CAP), HINT_MAX)
        out = torch.empty(max(self.nrows, 1) * 10, dtype=torch.float64, device=self.device)
        for sp in self._spaces:
            if not sp.rows:
                continue
            desc = _table(tuple(sp.rows), self.device)
            with _on(self.device):
                _launch(_merge, len(sp.rows) // 2, (sp.buf, sp.cap, desc, out, sp.row0, RB), 4)
        self._out = out if self.nrows else out[:0]
        self._spaces = []


def layout(sizes: tuple, counts: tuple, device: torch.device):
    """Index tables of a group: per tensor its size and first block, per block its tensor;
    per layer its number of blocks."""
    seg_b0, blk_seg, b = [], [], 0
    for s, n in enumerate(sizes):
        nb = triton.cdiv(n, BLOCK)
        seg_b0.append(b)
        blk_seg.extend([s] * nb)
        b += nb
    layer_blocks, i = [], 0
    for c in counts:
        layer_blocks.append(sum(triton.cdiv(n, BLOCK) for n in sizes[i:i + c]))
        i += c
    # a plain (waiting) upload, not `_to_device`: made once per layout and then used from any
    # stream, so it must be on the device before it is cached
    dev = (lambda v: torch.tensor(v, dtype=torch.int64, device=device))
    return dev(list(sizes)), dev(seg_b0), dev(blk_seg), layer_blocks, b


class _on:
    """Triton launches on the current CUDA device: switch only when `dev` is another one."""

    def __init__(self, dev: torch.device):
        self._ctx = None
        if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
            self._ctx = torch.cuda.device(dev)

    def __enter__(self):
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def stats10(x: torch.Tensor) -> torch.Tensor:
    """The 10-vector above for one real, non-empty tensor (any shape): one partials launch
    and one merge."""
    if not usable(x):
        raise TypeError(f"tensortap: fused stats need a real float CUDA tensor, got {x.dtype} on {x.device}")
    b = Batch(x.device)
    b.add(x)
    return b.finish()[0]
