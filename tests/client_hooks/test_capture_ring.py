"""The pinned ring's slots come back when a capture's read-back is dropped unread (its record
dropped by a full or closed sender). The ring's buffers are pinned CUDA host memory; without
a GPU a plain tensor stands in for the buffer (the slot bookkeeping is the same)."""
from __future__ import annotations

import torch

from client_hooks import capture


class _Event:
    def __init__(self, done: bool):
        self.done = done

    def query(self) -> bool:
        return self.done


def _fill_ring(monkeypatch, n: int) -> capture._HostRing:
    ring = capture._HostRing(slots=n)
    for _ in range(n):
        ring._bufs.append(torch.zeros(8, dtype=torch.float64))
        ring._events.append(None)
        ring._devs.append(torch.device("cpu"))
        ring._busy.append(True)
    monkeypatch.setattr(capture, "_ring", ring)
    return ring


def test_a_read_back_dropped_unread_gives_its_slot_back_once_its_copy_is_done(monkeypatch):
    ring = _fill_ring(monkeypatch, 3)
    done = capture._Readback(ring._bufs[0][:4], _Event(True), 0)
    in_flight = capture._Readback(ring._bufs[1][:4], _Event(False), 1)
    read = capture._Readback(ring._bufs[2][:4], _Event(True), 2)
    assert read.values() == [0.0] * 4 and ring._busy == [True, True, False]  # read: given back
    ring._busy[2] = True  # taken again by a later capture
    del done, in_flight, read
    assert ring._busy == [False, True, True]  # the copy in flight keeps its slot; the read one is not given twice
    buf, slot, _ = ring.take(4, torch.float64, torch.device("cpu"))
    assert slot == 0 and buf.numel() == 4
