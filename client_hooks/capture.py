"""One capture = the statistics vectors of one step, read back with one device-to-host copy.

Training thread: `Capture.add` keeps each entry's small device vector; `Capture.flush`
concatenates them (one `torch.cat` per device), starts one non-blocking copy into a reused
pinned host buffer, records a CUDA event, and hands the sender one packed record for the
entries that carry a spec (collector.packed: tensor and gradient statistics, decoded by the
collector) and one callable per other record. Which values go where follows from the
entries' signature alone (keys, spans, pieces' sizes); the engine keeps the last capture
step's layout (FlushMemo), and a step like it reuses that layout.
Sender thread: the first read waits on the event and takes the whole buffer's bytes; the
packed record carries the bytes its entries use, a callable decodes its own slice.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional, Union

import numpy as np
import torch

from client_hooks import stats
from collector.packed import PACKED_KIND

Decode = Callable[[list], dict]
# a record's decoding: a callable run on the sender thread, or a collector.packed spec (a
# list) decoded by the collector
Decoding = Union[Decode, list]
PACK_MAX_ENTRIES = 256  # entries of one packed record (a bigger capture sends several)


class _HostRing:
    """Reused pinned buffers (CUDA) so a capture allocates no page-locked memory, each with
    its own event (made once: creating one costs more than recording it). A slot is busy
    from the copy until the sender thread has read it; the slots cover the captures that can
    wait for the sender's next round (sender.IDLE_WAIT_S), a capture a step."""

    def __init__(self, slots: int = 16):
        self._bufs: list[torch.Tensor] = []
        self._views: dict = {}  # (slot, n) -> the slot's first n values (`_view`)
        self._events: list = []  # each slot's event, recorded on its device only
        self._devs: list = []
        self._busy: list[bool] = []
        self._slots = slots
        self.one_off = 0  # buffers taken outside the ring (benchmarks report it)
        self._lock = threading.Lock()  # taken by the training and the sender thread

    def take(self, n: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, Optional[int], object]:
        """(buffer of n, its slot or None, its event: None for a one-off buffer)."""
        with self._lock:
            for i, buf in enumerate(self._bufs):
                if not self._busy[i] and buf.numel() >= n and buf.dtype == dtype and self._devs[i] == device:
                    self._busy[i] = True
                    return self._view(i, n), i, self._events[i]
            if len(self._bufs) < self._slots:
                buf = torch.empty(max(n, 4096), dtype=dtype, pin_memory=True)
                self._bufs.append(buf)
                self._events.append(_event())
                self._devs.append(device)
                self._busy.append(True)
                return buf[:n], len(self._bufs) - 1, self._events[-1]
        # every slot in use (a slow sender): a one-off buffer from torch's caching host allocator
        self.one_off += 1
        return torch.empty(n, dtype=dtype, pin_memory=True), None, None

    def _view(self, i: int, n: int) -> torch.Tensor:
        """Slot i's first n values: a view made once per size (a slice is a torch operation,
        and the sizes repeat: a capture's, a loss's)."""
        v = self._views.get((i, n))
        if v is None:
            if len(self._views) >= 64:
                self._views.clear()
            v = self._views[(i, n)] = self._bufs[i][:n]
        return v

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
        self._raw: Optional[bytes] = None

    def __del__(self):
        """Dropped unread (its record dropped: a full queue, a closed sender): its ring slot
        is free again once its copy is done. One still in flight keeps its slot (the next
        captures take another). No lock: one list item set, which take() reads under its
        lock; a __del__ may run inside take() itself."""
        try:
            if self._host is not None and self._slot is not None and (
                    self._event is None or self._event.query()):
                _ring._busy[self._slot] = False
        except Exception:  # interpreter shutdown, a CUDA error: the slot stays taken
            pass

    def _take_host(self) -> torch.Tensor:
        # sender thread: waits for this capture's copy only. query() first: synchronize()
        # lets go of the GIL even when the copy is done, and taking it back costs the
        # training thread a hand-over (usually the copy is done by then)
        if self._event is not None and not self._event.query():
            self._event.synchronize()
        host, self._host = self._host, None
        return host

    def values(self) -> list:
        if self._vals is None:
            if self._raw is not None:
                self._vals = np.frombuffer(self._raw, dtype="<f8").tolist()  # sender thread: host bytes
            else:
                self._vals = self._take_host().tolist()  # sender thread: the one host conversion
                _ring.give(self._slot)
        return self._vals

    def raw(self) -> bytes:
        """The values as little-endian float64 bytes (what a packed record carries)."""
        if self._raw is None:
            if self._vals is not None:
                self._raw = np.asarray(self._vals, dtype="<f8").tobytes()
            else:
                # sender thread, after the copy's event: the one host conversion
                self._raw = self._take_host().detach().numpy().astype("<f8", copy=False).tobytes()
                _ring.give(self._slot)
        return self._raw


class _Packed:
    """The payload of a packed record (collector.packed): its entries' values, cut out of the
    capture's bytes on the sender thread. `records`: how many records it stands for (the
    sender's sequence numbers and counts go by records)."""
    __slots__ = ("_rb", "_pieces", "_entries", "records")

    def __init__(self, rb: _Readback, pieces: list, entries: list, records: int):
        self._rb, self._pieces, self._entries, self.records = rb, pieces, entries, records

    def __call__(self) -> dict:
        raw = self._rb.raw()
        return {"values": b"".join([raw[8 * lo:8 * hi] for lo, hi in self._pieces]), "entries": self._entries}


def _event():
    """`blocking`: the sender thread that waits on it sleeps. A default event's wait may spin
    (CUDA's automatic scheduling spins when the cores outnumber the contexts), and in a
    GPU-bound run the sender waits most of the time: on an H100 (sixth session) the sender
    thread used 12 s of CPU in a 70 s benchmark."""
    return torch.cuda.Event(blocking=True)


def _after_copy(event=None):
    """`event` (a ring slot's, else a new one) recorded on the current stream, after the copy
    just queued."""
    event = event or _event()
    event.record()
    return event


def _to_ring(flat: torch.Tensor, dtype: torch.dtype) -> _Readback:
    """CUDA `flat` into a pinned ring slot of `dtype` (the cast in the copy): one
    non-blocking copy, then the slot's event."""
    host, slot, event = _ring.take(flat.numel(), dtype, flat.device)
    host.copy_(flat, non_blocking=True)
    return _Readback(host, _after_copy(event), slot)


def to_host(flat: torch.Tensor) -> _Readback:
    """Start the copy of `flat` to the host (training thread; non-blocking on CUDA)."""
    if flat.device.type == "cpu":
        return _Readback(flat, None, None)  # already on the host; fresh tensor, nobody mutates it
    if flat.device.type == "cuda":
        return _to_ring(flat, flat.dtype)
    return _Readback(flat.to("cpu", non_blocking=True), None, None)  # other devices: best effort


def scalar_to_host(v: torch.Tensor) -> _Readback:
    """One scalar (a loss) to the host without a capture step's bookkeeping, as float64: on
    CUDA, the cast and the copy into a pinned slot in one non-blocking `copy_`, then one
    event; elsewhere a copy (the caller's tensor may change in place later)."""
    flat = v.detach() if v.dim() < 2 else v.detach().reshape(1)  # (a 0-d one copies into (1,) as it is)
    if flat.device.type == "cuda":
        return _to_ring(flat, torch.float64)
    return to_host(flat.reshape(1).to(torch.float64, copy=True))


class Span:
    """Values [lo, hi) of a device vector that several entries share (one piece of the flat
    copy however many entries point into it). `src` is a 1-D tensor, or a device: the rows of
    that device's fused batch, known only once the batch is merged at flush. lo < 0: a row not
    given yet (a deferred launch); still so at flush, the value could not be read."""
    __slots__ = ("src", "lo", "hi")

    def __init__(self, src, lo: int, hi: int):
        self.src, self.lo, self.hi = src, lo, hi


class Capture:
    """Entries (kind, name, vector, decode) collected during one step; `flush` sends them."""

    def __init__(self, step: Optional[int] = None, epoch: Optional[int] = None):
        self.step, self.epoch = step, epoch
        self._entries: dict[tuple[str, str], tuple] = {}  # (kind, name) -> entry; last wins
        self._batches: dict = {}  # device -> client_hooks.fused.Batch (CUDA statistics)

    def add(self, kind: str, name: str, vec, decode: Decoding, nbytes: int = 400) -> None:
        """vec: a 1-D device tensor, a `Span` of one, a tuple of those (their values
        concatenated), a list of Python floats (values already on the host: nothing to
        copy), or None for a payload that needs no device value. decode: a callable of the
        values, or a collector.packed spec."""
        self._entries[(kind, name)] = (vec, decode, nbytes)

    def has(self, kind: str, name: str) -> bool:
        return (kind, name) in self._entries

    def add_many(self, kind: str, names: tuple, vec, spec: list, nbytes: int = 400) -> None:
        """Records of several names from one vector (a layer per name), by one packed spec
        that makes them all (collector.packed "grads")."""
        self._entries[(kind, tuple(names))] = (vec, spec, nbytes)

    def __len__(self) -> int:
        return len(self._entries)

    def batch(self, device, fused_mod):
        """This capture's fused batch on `device` (made on first use)."""
        b = self._batches.get(device)
        if b is None:
            b = self._batches[device] = fused_mod.Batch(device)
        return b

    def _merged(self, device) -> Optional[torch.Tensor]:
        """The rows of the fused batch on `device`, flat (one merge launch), or None."""
        try:
            return self._batches[device].finish(flat=True)
        except Exception as e:  # a Triton failure: the torch path from now on; warned once
            stats.fused_failed(e)
            return None

    def flush(self, sender, memo: Optional["FlushMemo"] = None) -> int:
        """Copy every vector to the host in one go per device; enqueue the records (those
        with a spec packed into one, see `_layout`). A vector is a tensor, a Span, or a
        tuple of those (values concatenated). Each piece (a tensor, or a device's merged
        rows) is copied once however many entries share it; an entry's values are (lo, hi)
        spans of the flat copy of its first piece's device.

        Two passes: the entries' signature (`_signature`: each one's key, spans and pieces,
        with the pieces' sizes), then the layout that follows from it alone (`_layout`). A
        capture step like the last one (memo: the engine's) has the same signature, and its
        layout is reused: what is left is the signature, the merge, one copy a device and
        the records themselves."""
        entries, self._entries = self._entries, {}
        merged: dict = {}  # device -> its fused batch's rows, flat (None: the merge failed)
        try:
            sig, decs, tens, host = self._signature(entries, merged)
        finally:
            self._batches = {}
        if memo is not None and memo.sig == sig:
            layout = memo.layout
        else:
            layout = _layout(sig)
            if memo is not None:
                memo.sig, memo.layout = sig, layout
        nones, host_recs, groups = layout
        out = []  # (kind, name, payload, nbytes), sent together at the end
        if nones:
            rb = _Readback(None, None, None, [])
            for i, kind, names, nb, unread in nones:
                dec = _unread if unread else decs[i]
                out.extend((kind, n, _payload(rb, [(0, 0)], dec), nb) for n in names)
        if host_recs is not None:
            _emit(out, _Readback(None, None, None, host), host_recs, decs)
        for refs, recs in groups:
            pieces = [merged[r] if type(r) is torch.device else tens[r] for r in refs]
            _emit(out, to_host(torch.cat(pieces) if len(pieces) > 1 else pieces[0]), recs, decs)
        return sender.send_many(out, self.step, self.epoch) if out else 0

    def _signature(self, entries: dict, merged: dict) -> tuple:
        """(sig, decodings, tensors, host values) of `entries`, in their order. sig: per entry
        (0, key, nbytes) for a payload without values; (1, key, nbytes, count, is_call) for
        host floats (their values appended to `host values`); (2, key, nbytes, parts,
        is_call) for device values, each part (piece, lo, hi) up to the first one that cannot
        be read (UNREAD, LOST). is_call: decoded by a callable, not a packed spec. A piece is
        a device (its fused batch's rows, merged into `merged` here) or the index of a tensor
        in `tensors`. Last, the pieces' sizes: ((device, size) per tensor, (device, size) of
        each device's merged rows)."""
        sig, decs, tens, host = [], [], [], []
        seen: dict = {}  # id(tensor) -> its index in tens
        device = torch.device
        for key, (vec, dec, nb) in entries.items():
            decs.append(dec)
            tv = type(vec)
            if tv is Span:  # most entries: one value's rows, read
                src, lo = vec.src, vec.lo
                if type(src) is device and lo >= 0:
                    m = merged.get(src, _NOT_YET)
                    if m is _NOT_YET:
                        m = merged[src] = self._merged(src)
                    if m is not None:
                        sig.append((2, key, nb, ((src, lo, vec.hi),), type(dec) is not list))
                        continue
            elif vec is None:
                sig.append((0, key, nb))
                continue
            elif tv is list:
                sig.append((1, key, nb, len(vec), type(dec) is not list))
                host += vec
                continue
            parts = []
            for part in (vec if tv is tuple else (vec,)):
                if type(part) is Span:
                    src, lo, hi = part.src, part.lo, part.hi
                    if lo < 0:  # not read before this flush: the sender counts it as dropped
                        parts.append(UNREAD)
                        break
                    if type(src) is device:  # its fused batch's rows
                        m = merged.get(src, _NOT_YET)
                        if m is _NOT_YET:
                            m = merged[src] = self._merged(src)
                        if m is None:  # already reported: this record is not produced
                            parts.append(LOST)
                            break
                        parts.append((src, lo, hi))
                        continue
                else:
                    src, lo, hi = part, 0, part.numel()
                k = seen.get(id(src))
                if k is None:
                    k = seen[id(src)] = len(tens)
                    tens.append(src)
                parts.append((k, lo, hi))
            sig.append((2, key, nb, tuple(parts), type(dec) is not list))
        sig.append((tuple([(t.device, t.numel()) for t in tens]),
                    tuple([(d, m.numel()) for d, m in merged.items() if m is not None])))
        return sig, decs, tens, host


class FlushMemo:
    """The last layout of a capture's flush (`Capture.flush`), kept by the engine across its
    capture steps: one that matches the next signature is used as it is."""
    __slots__ = ("sig", "layout")

    def __init__(self):
        self.sig, self.layout = None, None


UNREAD, LOST = ("unread",), ("lost",)  # parts of a signature that end an entry's parts
_NOT_YET = object()


def _names(name) -> list[str]:
    """The record names of an entry (`add_many`: a tuple of them)."""
    return list(name) if type(name) is tuple else [name]


def _layout(sig: list) -> tuple:
    """What a signature (`Capture._signature`) makes: (nones, host records, groups).
    nones: (entry, kind, names, nbytes, unread) of the records without values; host
    records: those of the host floats (see `_records`), or None; groups: per device (that of
    an entry's first piece), (its pieces in the order of its flat copy, its records)."""
    *entries, (tensors, rows) = sig
    dev_of, size_of = {}, {}  # piece -> its device, its size (values)
    for i, (dev, n) in enumerate(tensors):
        dev_of[i], size_of[i] = dev, n
    for dev, n in rows:
        dev_of[dev], size_of[dev] = dev, n
    nones, host_items, at = [], [], 0
    groups: dict = {}  # device -> [pieces, their total size, items]
    where: dict = {}  # piece -> (its group, its offset in the group's flat copy)
    for i, e in enumerate(entries):
        tag, (kind, name), nb = e[0], e[1], e[2]
        if tag == 0:
            nones.append((i, kind, _names(name), nb, False))
            continue
        if tag == 1:
            host_items.append((i, (kind, name), [(at, at + e[3])], e[4], nb))
            at += e[3]
            continue
        spans, grp = [], None
        for part in e[3]:
            if part is UNREAD:
                nones.append((i, kind, _names(name), nb, True))
                break
            if part is LOST:
                break
            ref, lo, hi = part
            w = where.get(ref)
            if w is None:  # a new piece: into the group of the entry's first piece
                if grp is None:
                    grp = groups.get(dev_of[ref])
                    if grp is None:
                        grp = groups[dev_of[ref]] = [[], 0, []]
                w = where[ref] = (grp, grp[1])
                grp[0].append(ref)
                grp[1] += size_of[ref]
            elif grp is None:
                grp = w[0]
            spans.append((w[1] + lo, w[1] + hi))
        else:
            if grp is not None:
                grp[2].append((i, (kind, name), spans, e[4], nb))
    return (nones, _records(host_items) if host_items else None,
            [(refs, _records(items)) for refs, _, items in groups.values() if items])


def _records(items: list) -> tuple:
    """The records of entries that share one read-back, as (calls, packs): a callable
    decoding for each entry without a spec, (entry, kind, name, spans, nbytes); a packed
    record (collector.packed) for those with one (a few, of at most PACK_MAX_ENTRIES
    entries each), (its spans of the read-back, (entry, kind, names, its values' span) per
    entry, records, nbytes): the values cut down to what the entries use, each entry's
    contiguous."""
    calls, packed, packs = [], [], []
    for i, (kind, name), spans, is_call, nb in items:
        if is_call:
            calls.append((i, kind, name, spans, nb))
        else:
            packed.append((i, kind, name, spans, nb))
    for c in range(0, len(packed), PACK_MAX_ENTRIES):
        pieces, ents, at, nrec, nbytes = [], [], 0, 0, 0
        for i, kind, name, spans, nb in packed[c:c + PACK_MAX_ENTRIES]:
            names = _names(name)
            size = sum([hi - lo for lo, hi in spans])
            pieces += spans
            ents.append((i, kind, names, [[at, at + size]]))
            at += size
            nrec += len(names)
            nbytes += nb * len(names)
        packs.append((pieces, ents, nrec, nbytes + 8 * at))
    return calls, packs


def _emit(out: list, rb: _Readback, recs: tuple, decs: list) -> None:
    """The records (`_records`) of one read-back, with this capture's decodings."""
    calls, packs = recs
    for i, kind, name, spans, nb in calls:
        out.append((kind, name, _payload(rb, spans, decs[i]), nb))
    for pieces, ents, nrec, nbytes in packs:
        entries = [[kind, names, span, decs[i]] for i, kind, names, span in ents]
        out.append((PACKED_KIND, "capture", _Packed(rb, pieces, entries, nrec), nbytes))


def _unread(_v: list) -> dict:
    raise ValueError("its value was not read before the capture was sent (warned when it happened)")


def _payload(rb: _Readback, spans: list, decode: Decode) -> Callable[[], dict]:
    if len(spans) == 1:
        lo, hi = spans[0]
        return lambda: decode(rb.values()[lo:hi])  # runs on the sender thread

    def payload():
        v = rb.values()
        return decode([x for lo, hi in spans for x in v[lo:hi]])
    return payload
