"""The watched layers' gradients and weights in one flat buffer (CUDA with Triton).

At the end of backward of a capture step the engine copies every watched parameter's gradient
and weight into one buffer of their dtype (one foreach copy: gradients first, then weights,
each parameter from a 16-byte aligned offset), and one grouped launch
(`client_hooks.fused.Batch.add_flat`) gives a row per layer of the gradients and a row per
layer of the weights. After the optimizer step one foreach subtraction leaves the update
(weights before minus after) in the weights' half, and one more launch gives its rows. The
collector takes the weight and update norms from those rows (collector.packed "grad_rows").

Nothing is looked at per parameter in a step: the offsets, sizes and index tables are made
once (`FlatGrads`), and the launch reads only the buffer's address. Against the gradients
read where they lie, this costs a copy of the watched parameters on the GPU (the demo FNO:
2.4M values, ~20 MB read and written, microseconds) and saves on the host, in each capture
step, a look at every gradient (its address, size, layout), two foreach norms and a stack.
Applies when the watched parameters share one device and one real dtype (a complex one as
its real pairs), and the buffer fits under the engine's cap for held tensors.
"""
from __future__ import annotations

from typing import Optional

import torch

from client_hooks import stats


class FlatGrads:
    """Where each watched parameter lies in the flat buffer, and the grouped launch's tables.

    params: the watched parameters, layer by layer; ranges: each layer's [a, b) of them."""

    def __init__(self, params: list, ranges: list, device: torch.device, dtype: torch.dtype, fused_mod):
        self.device, self.dtype, self.mod = device, dtype, fused_mod
        size = torch.empty((), dtype=dtype).element_size()
        self.unit = unit = 16 // size  # elements in 16 bytes: every offset is a multiple
        offs, sizes, at = [], [], 0
        for p in params:
            n = p.numel() * (2 if p.is_complex() else 1)
            offs.append(at)
            sizes.append(n)
            at += -(-n // unit) * unit
        self.half = at  # the weights' offset: the gradients' part, padded
        self.nbytes = 2 * at * size
        self.shapes = [(tuple(p.shape), p.is_complex()) for p in params]
        self.offs, self.sizes = offs, tuple(sizes)
        counts = tuple(b - a for a, b in ranges)
        self.nlayers = len(counts)
        # the layers' element counts, as the records give them
        self.counts = [sum(sizes[a:b]) for a, b in ranges]
        # the launch's tables on the device (uploads, once): the gradients' rows then the
        # weights' rows in one launch; the update's rows in another
        g, w = [o // unit for o in offs], [(at + o) // unit for o in offs]
        up = (lambda v: torch.tensor(v, dtype=torch.int64, device=device))
        self.lay_gw = fused_mod.layout(self.sizes + self.sizes, counts + counts, device)
        self.rel_gw = up(g + w)
        self.lay_w = fused_mod.layout(self.sizes, counts, device)
        self.rel_w = up(w)
        self.buf: Optional[torch.Tensor] = None
        self.views: list = []  # each parameter's gradient view, then each one's weight view
        self.wviews: list = []
        self.specs: dict = {}  # (updated, scaled) -> the packed entries (Engine._add_grad_rows)

    def make(self) -> None:
        """The buffer and each parameter's views into it."""
        buf = torch.zeros(2 * self.half, dtype=self.dtype, device=self.device)
        views = []
        for base in (0, self.half):
            for (shape, cplx), o, n in zip(self.shapes, self.offs, self.sizes):
                v = buf[base + o:base + o + n]
                views.append(torch.view_as_complex(v.view(*shape, 2)) if cplx else v.view(shape))
        self.buf, self.views, self.wviews = buf, views, views[len(self.shapes):]

    def drop(self) -> None:
        self.buf, self.views, self.wviews = None, [], []


def plan(params: list, ranges: list, cap: int) -> Optional[FlatGrads]:
    """A FlatGrads for these parameters, or None where it does not apply (see the module
    docstring): CPU, no Triton, several devices or dtypes, an empty parameter, over `cap`
    bytes."""
    if not params:
        return None
    dev = params[0].device
    mod = stats.fused_for(dev)
    if mod is None:
        return None
    dt = stats.real_dtype(params[0].dtype)
    if dt not in stats.FUSED_DTYPES:
        return None
    for p in params:
        if p.device != dev or stats.real_dtype(p.dtype) is not dt or not p.numel() or p.is_sparse:
            return None
    f = FlatGrads(params, ranges, dev, dt, mod)
    return f if f.nbytes <= cap else None
