"""The wire format, defined once: both the client (client_hooks) and the collector import it.

Imports neither torch nor the web stack. See docs/PROTOCOL.md for the prose version.

A frame is one ZeroMQ message holding UTF-8 JSON:
- a single record: one JSON object (a `Record`);
- a batch: a JSON array of records (at most `MAX_BATCH` of them).
Frames larger than `MAX_FRAME_BYTES` are rejected by the collector. A record of kind "packed"
stands for a capture's records (collector.packed): `decode` returns those in its place.

JSON (not msgpack) so that the collector can append a valid record's bytes to the JSONL file
as they arrived, with no re-encoding: a single-record frame whole, a batch's records split
out of it (msgspec.Raw).
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

import msgspec

from collector.packed import PACKED_KIND, PackedError, expand

SCHEMA_VERSION = 1
MAX_FRAME_BYTES = 1 << 20  # 1 MiB, the collector's default limit
MAX_BATCH = 4096

# kind -> artifact file name in the run folder (DESIGN.md "Artifacts, per run")
STREAM_FILES = {
    "loader_stats": "loader_stats.jsonl",
    "activations": "activations.jsonl",
    "gradients": "gradients.jsonl",
    "metrics": "metrics.jsonl",
    "events": "events.jsonl",
    "patch_metrics": "patch_metrics.json",  # latest record wins, one JSON document
}
Kind = Literal["loader_stats", "activations", "gradients", "metrics", "events", "patch_metrics"]
# also "packed": a capture's records in one (collector.packed), expanded by `decode` (never
# stored). A frame that holds one fails the plain decoders on `kind`, and only then is decoded
# again with this wider type: the frames of every other record pay nothing for it
PackedOrKind = Literal["loader_stats", "activations", "gradients", "metrics", "events", "patch_metrics", "packed"]

# A run id names a folder: it cannot start with a dot and holds no separator, so no record
# can write outside its run folder ("../../etc" is rejected, not rewritten). The pattern is
# checked once per distinct run id (a regex per record would double the decode cost).
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
RUN_ID = re.compile(RUN_ID_PATTERN)
RunId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Rank = Annotated[int, msgspec.Meta(ge=0, le=65535)]
World = Annotated[int, msgspec.Meta(ge=1, le=65536)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**62)]


class Record(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=False, gc=False):
    """One telemetry record (the envelope plus its payload).

    v      schema version (SCHEMA_VERSION)
    run    run id (folder name, see RUN_ID_PATTERN)
    rank   global rank of the sending process; world: world size
    seq    per-sender sequence number, 0, 1, 2, ... (assigned when the frame is sent)
    t      sender wall time, seconds since the epoch
    kind   stream (see STREAM_FILES)
    name   what was measured: a field, layer, metric or event name
    step   global training step (or None); epoch: epoch (or None)
    data   the payload: statistics, a scalar ("value"), or event details
    """

    v: Literal[1]
    run: RunId
    rank: Rank
    world: World
    seq: Seq
    t: float
    kind: Kind
    name: Name
    step: Optional[int] = None
    epoch: Optional[int] = None
    data: dict[str, Any] = {}


class _AnyRecord(Record, forbid_unknown_fields=True, omit_defaults=False, gc=False):
    """A Record whose kind may be "packed" (see PackedOrKind)."""
    kind: PackedOrKind


class WireError(ValueError):
    """A frame that is not valid tensortap wire data; the message says why (one line)."""


_encoder = msgspec.json.Encoder()
_decode_one = msgspec.json.Decoder(Record).decode
_decode_batch = msgspec.json.Decoder(list[Record]).decode
_decode_raws = msgspec.json.Decoder(list[msgspec.Raw]).decode  # a valid batch's records, as sent
_decode_one_any = msgspec.json.Decoder(_AnyRecord).decode
_decode_batch_any = msgspec.json.Decoder(list[_AnyRecord]).decode
_good_runs: set[str] = set()  # run ids that passed the pattern (bounded below)


def encode(record: Union[Record, list[Record]]) -> bytes:
    """Encode one record (a single-record frame) or a list of them (a batched frame)."""
    return _encoder.encode(record)


def encode_lines(records: list[Record]) -> bytes:
    """Records as JSONL (each line ends in a newline), in one call."""
    return _encoder.encode_lines(records)


def encode_many(records: list[Record], max_bytes: int = MAX_FRAME_BYTES) -> list[tuple[bytes, int]]:
    """Encode records into as few batched frames as fit under max_bytes each.

    Returns (frame, number of records in it) pairs, in order."""
    frames, parts, size = [], [], 2
    for rec in records:
        b = _encoder.encode(rec)
        if parts and (size + len(b) + 1 > max_bytes or len(parts) >= MAX_BATCH):
            frames.append((b"[" + b",".join(parts) + b"]", len(parts)))
            parts, size = [], 2
        parts.append(b)
        size += len(b) + 1
    if parts:
        frames.append((b"[" + b",".join(parts) + b"]", len(parts)))
    return frames


def eval_split(data: dict) -> Optional[str]:
    """The evaluation a record's values were taken in: its data's "split" when that is not
    "train" (record(always=True) in an evaluation loop says {"split": "val"}), else None (a
    training value). The collector's index and its diagnosis read a split alike by this."""
    split = data.get("split")
    return None if split is None or split == "train" else str(split)


def rank_key(key) -> Optional[int]:
    """A manifest's rank key ("0", "1"...) as its int; None for anything else (a key that
    str.isdigit takes and int() does not, "²", included: a hand-edited manifest)."""
    return int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else None


def valid_run_id(run: str) -> bool:
    if run in _good_runs:
        return True
    if not RUN_ID.fullmatch(run):  # (a trailing newline passes "$" of a match, not a fullmatch)
        return False
    if len(_good_runs) > 100_000:
        _good_runs.clear()
    _good_runs.add(run)
    return True


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> tuple[list[Record], Union[bytes, list, None]]:
    """Validate a frame: (records, raw). raw is what can be written to JSONL as it arrived,
    when the frame holds no newline: the frame itself for a single record, the records' own
    bytes (a list of msgspec.Raw) for a batch. None when the frame holds a newline, or a
    packed record (expanded here into the records it stands for): the caller encodes the
    records (`encode_lines`).

    Raises WireError with a short reason. A batch is all-or-nothing: one bad record rejects
    the frame, so a frame is always either fully written or fully quarantined.
    """
    if len(frame) > max_bytes:
        raise WireError(f"frame of {len(frame)} bytes exceeds the {max_bytes}-byte limit")
    packed = False
    try:
        head = frame[:1]
        batch = head == b"[" or (head != b"{" and frame.lstrip().startswith(b"["))
        try:
            recs = _decode_batch(frame) if batch else [_decode_one(frame)]
        except msgspec.ValidationError as e:
            if "kind" not in str(e):
                raise
            recs = _decode_batch_any(frame) if batch else [_decode_one_any(frame)]  # packed, or invalid
            packed = True
        if batch:
            if not recs:
                raise WireError("empty batch")
            if len(recs) > MAX_BATCH:
                raise WireError(f"batch of {len(recs)} records exceeds {MAX_BATCH}")
    except msgspec.ValidationError as e:
        raise WireError(f"invalid record: {e}") from None
    except msgspec.DecodeError as e:
        raise WireError(f"malformed JSON: {e}") from None
    except RecursionError:
        raise WireError("nesting too deep") from None
    except UnicodeDecodeError as e:  # msgspec raises it for invalid UTF-8 in object keys
        raise WireError(f"malformed JSON: invalid UTF-8 at byte {e.start}") from None
    for r in recs:
        if r.run not in _good_runs and not valid_run_id(r.run):
            raise WireError(f"invalid record: run id {r.run[:64]!r} does not match {RUN_ID_PATTERN} - at `$.run`")
    if packed:
        return _expand(recs), None
    if b"\n" in frame or b"\r" in frame:
        return recs, None
    return recs, (_decode_raws(frame) if batch else frame)


def _expand(recs: list[Record]) -> list[Record]:
    """Each packed record replaced by the records it stands for (collector.packed): seq,
    seq + 1, ... with its envelope. All or nothing, like a batch."""
    out = []
    for r in recs:
        if r.kind != PACKED_KIND:
            out.append(r)  # an _AnyRecord: a Record in all but the type of `kind`
            continue
        try:
            items = expand(r.data)
        except PackedError as e:
            raise WireError(f"invalid record: {e}") from None
        if not items:
            raise WireError("invalid record: a packed record with no entries")
        if r.seq + len(items) > 2**62:
            raise WireError("invalid record: packed seq range out of bounds")
        out.extend(Record(v=1, run=r.run, rank=r.rank, world=r.world, seq=r.seq + i, t=r.t, kind=kind,
                          name=name, step=r.step, epoch=r.epoch, data=data)
                   for i, (kind, name, data) in enumerate(items))
    return out
