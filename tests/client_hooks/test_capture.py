"""Capture.flush: each record gets its own values, whether the layout is made for the
capture or reused from the last capture step (FlushMemo)."""
from __future__ import annotations

import torch

from client_hooks.capture import Capture, FlushMemo, Span
from collector.packed import PACKED_KIND, expand, grads_payloads, tensor_stats_dict

CPU = torch.device("cpu")
SPEC = ["tensor", [4], "float32", False, None]


class Rows:
    """A device's fused batch, already merged: the (rows, 10) matrix it would give (its
    kernels are tested in test_fused.py)."""

    def __init__(self, m: torch.Tensor):
        self.m = m

    def finish(self, flat: bool = False) -> torch.Tensor:
        return self.m.reshape(-1) if flat else self.m


class Kept:
    """A sender that keeps what it is given."""

    def __init__(self):
        self.items = []

    def send_many(self, items, step=None, epoch=None):
        self.items += items
        return len(items)


def records(items: list) -> list:
    """(kind, name, payload) of every record, as the collector would store them."""
    out = []
    for kind, name, payload, _ in items:
        try:
            data = payload() if callable(payload) else payload
        except ValueError as e:
            out.append((kind, name, f"not read: {e}"))
            continue
        out.extend(expand(data) if kind == PACKED_KIND else [(kind, name, data)])
    return out


def capture(seed: int, late: bool = False, shift: int = 0, extra: bool = False) -> tuple[Capture, list]:
    """A capture step's entries of every sort the engine makes, from values drawn with
    `seed`, and the records they must give (from the values, without a flush). late: a
    value whose launch never came; shift: its rows elsewhere in the batch; extra: one more
    entry."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(6, 10, generator=g, dtype=torch.float64) + 1
    pn = torch.rand(4, generator=g, dtype=torch.float64) + 1  # 2 weight norms, 2 update norms
    loss = torch.rand(1, generator=g, dtype=torch.float64)
    host = [float(seed), 2.5]
    cap = Capture(step=seed, epoch=0)
    cap._batches[CPU] = Rows(rows)
    a, b = shift, 1 + shift
    cap.add("activations", "a", Span(CPU, 10 * a, 10 * a + 7), SPEC)
    cap.add("loader_stats", "b", Span(CPU, 10 * b, 10 * b + 7), SPEC[:4] + [{"batch": seed}])
    grads = ["grads", [12], [[0, 2]], 2, False]
    cap.add_many("gradients", ("layer",), (Span(CPU, 40, 50), Span(pn, 0, 2), Span(pn, 2, 4)), grads)
    cap.add("metrics", "loss", loss, ["value"])
    cap.add("metrics", "host", host, lambda v: {"sum": v[0] + v[1]})
    cap.add("events", "note", None, lambda v: {"values": len(v)})
    if extra:
        cap.add("activations", "c", Span(CPU, 50, 57), SPEC)
    if late:
        cap.add("activations", "late", Span(CPU, -1, -1), SPEC)
    r = rows.tolist()
    want = [("events", "note", {"values": 0})]
    if late:
        want.append(("activations", "late",
                     "not read: its value was not read before the capture was sent (warned when it happened)"))
    want += [("metrics", "host", {"sum": seed + 2.5}),
             ("activations", "a", tensor_stats_dict(r[a][:7], [4], "float32", False)),
             ("loader_stats", "b", {**tensor_stats_dict(r[b][:7], [4], "float32", False), "batch": seed}),
             ("gradients", "layer", grads_payloads(r[4] + pn.tolist(), [12], [[0, 2]], 2, False)[0]),
             ("metrics", "loss", {"value": loss.item()})]
    if extra:
        want.append(("activations", "c", tensor_stats_dict(r[5][:7], [4], "float32", False)))
    return cap, want


def test_each_record_gets_its_own_values_with_the_layout_made_or_reused():
    """One memo across captures whose layout stays, changes and comes back: each flush's
    records equal those made from its own values, and those of a flush without a memo."""
    memo = FlushMemo()
    kinds = [{}, {}, {"shift": 1}, {"shift": 1}, {"late": True}, {}, {"extra": True}, {"extra": True}, {}]
    layouts = []
    for seed, kw in enumerate(kinds):
        cap, want = capture(seed, **kw)
        kept = Kept()
        cap.flush(kept, memo)
        got = records(kept.items)
        assert got == want, (seed, kw)
        layouts.append(memo.layout)
        fresh, _ = capture(seed, **kw)
        kept = Kept()
        fresh.flush(kept)
        assert records(kept.items) == want
    # reused where the capture was like the last one; made again where it was not
    reused = [layouts[i] is layouts[i - 1] for i in range(1, len(kinds))]
    assert reused == [True, False, True, False, False, False, True, False]


def test_a_reused_layout_takes_this_steps_tensors_not_the_last_ones():
    """The layout is reused, the values are not: a capture whose tensors were changed after
    the last flush gives the new values."""
    memo = FlushMemo()
    first, _ = capture(1)
    first.flush(Kept(), memo)
    layout = memo.layout
    cap, want = capture(2)
    kept = Kept()
    cap.flush(kept, memo)
    assert memo.layout is layout
    assert records(kept.items) == want
    assert records(kept.items) != capture(1)[1]
