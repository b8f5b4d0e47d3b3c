"""The packed capture record (collector/packed.py): a capture's records in one, expanded by the
collector's frame decoding into exactly the records it stands for; anything malformed is
rejected whole, with a one-line reason; the sender counts it as the records it holds."""
from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
import zmq

from client_hooks.sender import Sender
from collector.packed import grad_stats_dict, tensor_stats_dict
from collector.wire import Record, WireError, decode, encode
from tests.procs import CollectorProc, manifest, read_jsonl, wait_for

REAL = [1.0, 2.0, 9.0, -1.5, 4.25, 0.5, 1.75]  # nan, inf, nfinite, min, max, mean, std
EMPTY_FIN = [0.0, 3.0, 0.0, math.inf, -math.inf, 0.0, 0.0]  # nothing finite: min +inf, max -inf
CPLX = [0.0, 1.0, 4.0] + [float(i) for i in range(16)]
# two layers' rows (nan, inf, nfinite, min, max, mean, std, nzero, norm, max_abs), then the
# weight norms of their 3 parameters (layer 0 has [0, 2), layer 1 [2, 3)), then update norms
ROWS = [0.0, 0.0, 6.0, -2.0, 3.0, 0.1, 1.2, 1.0, 3.0, 3.0,
        0.0, 0.0, 4.0, -1.0, 1.0, 0.0, 0.5, 0.0, 2.0, 1.0]
WN, DN = [3.0, 4.0, 2.0], [0.03, 0.04, 0.0]


def packed_data(entries=None, values=None) -> dict:
    vals = REAL + EMPTY_FIN + CPLX + ROWS + WN + DN + [7.5]
    n1, n2, n3, n4 = len(REAL), len(EMPTY_FIN), len(CPLX), len(ROWS) + 6
    a, b, c, d = 0, n1, n1 + n2, n1 + n2 + n3
    if entries is None:
        entries = [
            ["activations", ["lin:output"], [[a, b]], ["tensor", [3, 3], "float32", False, None]],
            ["loader_stats", ["images"], [[b, c]], ["tensor", [3], "float16", False, {"split": "train", "batch": 0}]],
            ["activations", ["x_combined"], [[c, c + 5], [c + 5, d]], ["tensor", [2, 2], "complex64", True, None]],
            ["gradients", ["0", "2", "_total"], [[d, d + n4]], ["grads", [8, 3], [[0, 2], [2, 3]], 3, True]],
            ["gradients", ["_other"], [[d + n4, d + n4 + 1]], ["norm"]],
            ["metrics", ["loss"], [[d + n4, d + n4 + 1]], ["value"]],
        ]
    return {"values": np.asarray(vals if values is None else values, dtype="<f8").tobytes(), "entries": entries}


def frame(data: dict, seq: int = 5) -> bytes:
    return encode(Record(v=1, run="pk", rank=1, world=2, seq=seq, t=12.5, kind="packed", name="capture",
                         step=7, epoch=2, data=data))


def test_a_packed_record_expands_into_the_records_it_stands_for_with_consecutive_seqs():
    recs, raw = decode(frame(packed_data()))
    assert raw is None  # the collector encodes the expanded records itself
    assert [(r.kind, r.name, r.seq) for r in recs] == [
        ("activations", "lin:output", 5), ("loader_stats", "images", 6), ("activations", "x_combined", 7),
        ("gradients", "0", 8), ("gradients", "2", 9), ("gradients", "_total", 10), ("gradients", "_other", 11),
        ("metrics", "loss", 12)]
    assert all((r.run, r.rank, r.world, r.t, r.step, r.epoch) == ("pk", 1, 2, 12.5, 7, 2) for r in recs)
    d = {r.name: r.data for r in recs}
    assert d["lin:output"] == tensor_stats_dict(REAL, [3, 3], "float32", False)
    assert d["lin:output"]["min"] == -1.5 and d["lin:output"]["count"] == 9
    assert d["images"] == {**tensor_stats_dict(EMPTY_FIN, [3], "float16", False), "split": "train", "batch": 0}
    assert d["images"]["inf"] == 3 and d["images"]["min"] is None  # +inf travelled exactly; nothing finite
    assert d["x_combined"] == tensor_stats_dict(CPLX, [2, 2], "complex64", True)  # two spans, concatenated
    assert d["x_combined"]["angle"] == {"min": 12.0, "max": 13.0, "mean": 14.0, "std": 15.0}
    # a layer: its row, weight norm sqrt(sum of its parameters' squares), update ratio likewise
    assert d["0"] == grad_stats_dict(ROWS[:10] + [5.0], 8, pytest.approx(0.05 / 5.0))
    assert d["2"]["weight_norm"] == 2.0 and d["2"]["update_ratio"] == 0.0 and d["2"]["zero_frac"] == 0.0
    assert d["_total"] == {"norm": pytest.approx(math.sqrt(3.0 ** 2 + 2.0 ** 2))}
    assert d["_other"] == {"norm": 7.5}
    assert d["loss"] == {"value": 7.5}


def test_scaled_gradient_rows_are_divided_by_their_loss_scale():
    """AMP: the rows carry the loss scale (last value); everything that scales with the
    gradients is divided by it, counts and weights are not, and each record says the scale."""
    n = len(ROWS) + 6
    entries = [["gradients", ["0", "2", "_total"], [[0, n + 1]], ["grads", [8, 3], [[0, 2], [2, 3]], 3, True, True]],
               ["gradients", ["_all"], [[0, 20], [n, n + 1]], ["total", True]]]
    recs, _ = decode(frame(packed_data(entries, ROWS + WN + DN + [4.0])))
    d = {r.name: r.data for r in recs}
    row = ROWS[:10]
    for i in (3, 4, 5, 6, 8, 9):  # min, max, mean, std, norm, max_abs
        row[i] /= 4.0
    assert d["0"] == {**grad_stats_dict(row + [5.0], 8, pytest.approx(0.05 / 5.0)), "loss_scale": 4.0}
    assert d["0"]["norm"] == 0.75 and d["0"]["zero_frac"] == 1 / 8
    assert d["_total"] == d["_all"] == {"norm": pytest.approx(math.sqrt(0.75 ** 2 + 0.5 ** 2)), "loss_scale": 4.0}
    with pytest.raises(WireError):  # scaled, but no value for the scale
        decode(frame(packed_data(entries[:1], ROWS + WN + DN)))


def _row(n: float, nan: float = 0.0, inf: float = 0.0) -> list:
    """A row whose norm is n (nan, inf: its counts of those)."""
    return [nan, inf, 4.0, -1.0, 1.0, 0.0, 0.5, 0.0, n, 1.0]


def test_gradient_rows_with_weight_and_update_rows_give_the_records_of_the_grads_spec():
    """"grad_rows" (the client's flat buffer): each layer's weight and update norm are rows'
    norms, not sums of per-parameter norms; they give the same records as "grads" does."""
    rows = ROWS + _row(5.0) + _row(2.0) + _row(0.05) + _row(0.0)
    entries = [["gradients", ["0", "2", "_total"], [[0, 60]], ["grad_rows", [8, 3], True, True]]]
    d = {r.name: r.data for r in decode(frame(packed_data(entries, rows)))[0]}
    expect = {r.name: r.data for r in decode(frame(packed_data(
        [["gradients", ["0", "2", "_total"], [[0, 26]], ["grads", [8, 3], [[0, 2], [2, 3]], 3, True]]],
        ROWS + WN + DN)))[0]}
    assert d["0"] == {**expect["0"], "update_ratio": pytest.approx(0.01)}
    assert d["2"] == expect["2"] and d["2"]["update_ratio"] == 0.0 and d["_total"] == expect["_total"]
    # no optimizer step: no update rows, no ratio; a weight row that counts a NaN: a NaN norm
    entries = [["gradients", ["0", "2"], [[0, 41]], ["grad_rows", [8, 3], False, False, True]]]
    d = {r.name: r.data for r in decode(frame(packed_data(entries, ROWS + _row(5.0, nan=1.0) + _row(2.0, inf=2.0)
                                                             + [2.0])))[0]}
    assert d["0"]["update_ratio"] is None and math.isnan(d["0"]["weight_norm"]) and d["0"]["loss_scale"] == 2.0
    assert d["2"]["weight_norm"] == math.inf and d["2"]["norm"] == 1.0  # 2.0 / the loss scale
    with pytest.raises(WireError):  # updated, but no update rows
        decode(frame(packed_data([["gradients", ["0", "2"], [[0, 40]], ["grad_rows", [8, 3], False, True]]],
                                 ROWS + _row(5.0) + _row(2.0))))


def test_a_packed_kind_written_with_json_escapes_is_expanded_too():
    f = frame(packed_data()).replace(b'"kind":"packed"', b'"kind":"p\\u0061cked"')
    assert b'"packed"' not in f
    recs, raw = decode(f)
    assert raw is None and len(recs) == 8 and "packed" not in {r.kind for r in recs}


def test_packed_and_plain_records_mix_in_one_batch():
    plain = Record(v=1, run="pk", rank=1, world=2, seq=4, t=1.0, kind="metrics", name="loss", data={"value": 1.0})
    packed = msgspec.json.decode(frame(packed_data(), seq=5))
    recs, raw = decode(msgspec.json.encode([plain, packed]))
    assert raw is None and [r.seq for r in recs] == list(range(4, 13)) and recs[0].name == "loss"


def _one(kind="activations", names=("x",), spans=((0, 7),), spec=("tensor", [1], "float32", False, None)):
    return lambda d: {**d, "entries": [[kind, list(names), [list(s) for s in spans], list(spec)]]}


BAD = {
    "base64": lambda d: {**d, "values": "not base64!"},
    "partial float": lambda d: {**d, "values": d["values"][:-3]},
    "span outside": _one(spans=((0, 10_000),)),
    "unknown spec": _one(spec=("histogram",)),
    "value spec count": _one(kind="metrics", names=("loss",), spans=((0, 2),), spec=("value",)),
    "value count": _one(spans=((0, 6),)),
    "events kind": _one(kind="events"),
    "stream kind": _one(kind="nope"),
    "long name": _one(names=("x" * 300,)),
    "names count": _one(names=("x", "y")),
    "bad shape": _one(spec=("tensor", [-1], "float32", False, None)),
    "grads range": _one(kind="gradients", spans=((0, 12),), spec=("grads", [3], [[0, 5]], 1, False)),
    "grad_rows count": _one(kind="gradients", spans=((0, 25),), spec=("grad_rows", [3], False, True)),
    "no entries": lambda d: {**d, "entries": []},
    "unknown field": lambda d: {**d, "extra": 1},
    "entry shape": lambda d: {**d, "entries": [["activations", "x", [[0, 7]]]]},
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_malformed_packed_record_is_rejected_whole_with_a_one_line_reason(case):
    data = packed_data()
    data = {**data, "values": msgspec.json.decode(msgspec.json.encode(data["values"]))}  # as base64 text
    with pytest.raises(WireError) as e:
        decode(msgspec.json.encode({**msgspec.json.decode(frame(packed_data())), "data": BAD[case](data)}))
    assert "\n" not in str(e.value) and str(e.value).startswith("invalid record")


class _Payload:
    """A packed payload as the capture makes one: it stands for `records` records."""

    def __init__(self, records: int):
        self.records = records

    def __call__(self) -> dict:
        return packed_data()


def test_the_sender_counts_a_packed_record_as_the_records_it_holds(tmp_path):
    """Through a real collector: seqs, sent, dropped and the manifest all go by records."""
    col = CollectorProc(str(tmp_path / "out"))
    try:
        s = Sender(col.endpoint, "pk", rank=0, world=1)
        s.send("metrics", "loss", {"value": 1.0}, step=0)
        s.send_many([("packed", "capture", _Payload(8), 500), ("metrics", "loss", {"value": 2.0}, 64)], step=1)
        assert s.flush(5.0)
        assert wait_for(lambda: s.sent == 1 + 1 + 8 + 1, 5)  # hello, loss, the 8 packed ones, loss
        s.close()
        assert s.dropped == 0
        closed = Sender(col.endpoint, "pk2")
        closed.close()
        assert closed.send_many([("packed", "capture", _Payload(8), 500)]) == 0 and closed.dropped == 8
        run = tmp_path / "out" / "pk"
        assert wait_for(lambda: [r["name"] for r in read_jsonl(run / "events.jsonl")] == ["hello", "bye"], 10)
    finally:
        assert col.stop() == 0
    m = manifest(run)["ranks"]["0"]
    assert m["received"] == m["written"] == m["sent_by_sender"] + 1 == 12 and m["gaps"] == 0
    grads = read_jsonl(run / "gradients.jsonl")
    assert [r["name"] for r in grads] == ["0", "2", "_total", "_other"] and {r["step"] for r in grads} == {1}
    assert [r["seq"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 9, 10]
    assert len(read_jsonl(run / "activations.jsonl")) == 2 and len(read_jsonl(run / "loader_stats.jsonl")) == 1


def test_a_malformed_packed_frame_is_quarantined_and_the_collector_goes_on(tmp_path):
    col = CollectorProc(str(tmp_path / "out"))
    try:
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(col.endpoint)
        sock.send(frame(BAD["span outside"](packed_data()), seq=0))
        sock.send(frame(packed_data(), seq=1))
        sock.close()
        assert wait_for(lambda: len(read_jsonl(tmp_path / "out" / "pk" / "gradients.jsonl")) == 4, 10)
    finally:
        assert col.stop() == 0
    rejected = read_jsonl(tmp_path / "out" / "pk" / "rejected.jsonl")
    assert len(rejected) == 1 and "packed entry 0: a span lies outside the values" in rejected[0]["reason"]
    assert manifest(tmp_path / "out" / "pk")["ranks"]["1"]["gaps"] == 1  # seq 0 never written
