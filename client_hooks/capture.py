"""One capture = the statistics vectors of one step, read back with one device-to-host copy.

Training thread: `Capture.add` keeps each entry's small device vector; `Capture.flush`
concatenates them (one `torch.cat` per device), starts one non-blocking copy into a reused
pinned host buffer, records a CUDA event, and hands the sender one callable per record.
Sender thread: the first callable waits on the event and converts the whole buffer with one
`.tolist()`; each callable then decodes its own slice into the payload dict.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

import torch

Decode = Callable[[list], dict]


class _HostRing:
    """A few reused pinned buffers (CUDA) so a capture allocates no page-locked memory."""

    def __init__(self, slots: int = 4):
        self._bufs: list[torch.Tensor] = []
        self._busy: list[bool] = []
        self._slots = slots
        self._lock = threading.Lock()  # taken by the training and the sender thread

    def take(self, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, Optional[int]]:
        with self._lock:
            for i, buf in enumerate(self._bufs):
                if not self._busy[i] and buf.numel() >= n and buf.dtype == dtype:
                    self._busy[i] = True
                    return buf[:n], i
            if len(self._bufs) < self._slots:
                buf = torch.empty(max(n, 4096), dtype=dtype, pin_memory=True)
                self._bufs.append(buf)
                self._busy.append(True)
                return buf[:n], len(self._bufs) - 1
        # every slot in use (a slow sender): a one-off buffer from torch's caching host allocator
        return torch.empty(n, dtype=dtype, pin_memory=True), None

    def give(self, i: Optional[int]) -> None:
        if i is not None:
            with self._lock:
                self._busy[i] = False


_ring = _HostRing()


class _Readback:
    """The host side of one copy; read once, on the sender thread."""

    def __init__(self, host: Optional[torch.Tensor], event, slot: Optional[int],
                 vals: Optional[list] = None):
        self._host, self._event, self._slot = host, event, slot
        self._vals: Optional[list] = vals  # given: values that were host floats already

    def values(self) -> list:
        if self._vals is None:
            if self._event is not None:
                self._event.synchronize()  # sender thread: waits for this capture's copy only
            self._vals = self._host.tolist()  # sender thread: the one host conversion
            self._host = None
            _ring.give(self._slot)
        return self._vals


def to_host(flat: torch.Tensor) -> _Readback:
    """Start the copy of `flat` to the host (training thread; non-blocking on CUDA)."""
    if flat.device.type == "cpu":
        return _Readback(flat, None, None)  # already on the host; fresh tensor, nobody mutates it
    if flat.device.type == "cuda":
        host, slot = _ring.take(flat.numel(), flat.dtype)
        host.copy_(flat, non_blocking=True)
        event = torch.cuda.Event()
        event.record()  # on the current stream, after the copy
        return _Readback(host, event, slot)
    return _Readback(flat.to("cpu", non_blocking=True), None, None)  # other devices: best effort


class Capture:
    """Entries (kind, name, vector, decode) collected during one step; `flush` sends them."""

    def __init__(self, step: Optional[int] = None, epoch: Optional[int] = None):
        self.step, self.epoch = step, epoch
        self._entries: dict[tuple[str, str], tuple] = {}  # (kind, name) -> entry; last wins

    def add(self, kind: str, name: str, vec, decode: Decode, nbytes: int = 400) -> None:
        """vec: a 1-D device tensor, a list of Python floats (values already on the host:
        nothing to copy), or None for a payload that needs no device value."""
        self._entries[(kind, name)] = (vec, decode, nbytes)

    def has(self, kind: str, name: str) -> bool:
        return (kind, name) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def flush(self, sender) -> int:
        """Copy every vector to the host in one go per device; enqueue one record per entry."""
        entries, self._entries = self._entries, {}
        by_dev: dict = {}
        for key, (vec, dec, nb) in entries.items():
            dev = vec.device if isinstance(vec, torch.Tensor) else ("host" if vec is not None else None)
            by_dev.setdefault(dev, []).append((key, vec, dec, nb))
        sent = 0
        for dev, items in by_dev.items():
            if dev is None:
                rb = _Readback(None, None, None, [])
                slices = [0] * (len(items) + 1)
            elif dev == "host":
                vals = [x for _, v, _, _ in items for x in v]
                rb = _Readback(None, None, None, vals)
                slices = [0]
                for _, v, _, _ in items:
                    slices.append(slices[-1] + len(v))
            else:
                vecs = [v for _, v, _, _ in items]
                flat = torch.cat(vecs) if len(vecs) > 1 else vecs[0]
                rb = to_host(flat)
                slices = [0]
                for v in vecs:
                    slices.append(slices[-1] + v.numel())
            for i, ((kind, name), _, dec, nb) in enumerate(items):
                payload = _payload(rb, slices[i], slices[i + 1], dec)
                sent += bool(sender.send(kind, name, payload, self.step, self.epoch, nbytes=nb))
        return sent


def _payload(rb: _Readback, lo: int, hi: int, decode: Decode) -> Callable[[], dict]:
    return lambda: decode(rb.values()[lo:hi])  # runs on the sender thread
