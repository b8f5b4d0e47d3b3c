"""Fuzzed frames: the collector never crashes, never writes outside the run folder, and every
frame ends up either written or in rejected.jsonl."""
from __future__ import annotations

import json
import time
import urllib.request

import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.index import Index
from collector.ingest import Ingest
from collector.wire import Record, encode
from tests.procs import CollectorProc, read_jsonl, wait_for

VALID = json.loads(encode(Record(v=1, run="fz", rank=0, world=1, seq=0, t=1.0, kind="metrics",
                                 name="loss", step=1, data={"value": 0.5, "abs": {"min": 0.0}})))

PACKED = json.loads(encode(Record(v=1, run="fz", rank=0, world=1, seq=0, t=1.0, kind="packed", name="capture",
                                  data={"values": b"\0" * 8 * 12, "entries": [
                                      ["activations", ["a"], [[0, 7]], ["tensor", [7], "float32", False, None]],
                                      ["gradients", ["l", "_total"], [[0, 12]], ["grads", [4], [[0, 1]], 1, True]]]})))

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
json_value = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), c, max_size=4)),
                          max_leaves=20)


@st.composite
def wrong_types(draw):
    d = dict(VALID)
    for key in draw(st.lists(st.sampled_from(sorted(d)), min_size=1, max_size=3, unique=True)):
        d[key] = draw(json_value)
    return json.dumps(d, allow_nan=True).encode()


@st.composite
def mutated(draw):
    b = bytearray(json.dumps(VALID).encode())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        i = draw(st.integers(0, max(0, len(b) - 1)))
        if op == "flip" and b:
            b[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del b[i:]
        else:
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(b)


@st.composite
def huge_or_deep(draw):
    kind = draw(st.sampled_from(["name", "data", "array", "object", "run", "batch"]))
    n = draw(st.integers(1, 200_000))
    if kind == "name":
        return json.dumps({**VALID, "name": "x" * n}).encode()
    if kind == "data":
        return json.dumps({**VALID, "data": {"s": "y" * n}}).encode()
    if kind == "array":
        return b"[" * n + b"]" * draw(st.integers(0, n))
    if kind == "object":
        return b'{"a":' * n + b"1" + b"}" * n
    if kind == "run":
        return json.dumps({**VALID, "run": draw(st.sampled_from(["..", "../x", "a/b", "/abs", ".hidden", "a\\b", "é"])) + "z" * (n % 50)}).encode()
    return json.dumps([{**VALID, "seq": i} for i in range(n % 5000 + 4097)]).encode()  # over MAX_BATCH


@st.composite
def packed(draw):
    """A packed record (collector/packed.py) with parts of its data replaced, or its bytes mutated."""
    data = json.loads(json.dumps(PACKED["data"]))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["values", "entries", "entry", "spec", "span"]))
        ents = data.get("entries")
        whole = isinstance(ents, list) and len(ents) == 2 and all(isinstance(x, list) and len(x) == 4 for x in ents)
        e = ents[draw(st.integers(0, 1))] if whole else None
        if where in ("values", "entries") or e is None:
            data[where if where in ("values", "entries") else "entries"] = draw(json_value)
        elif where == "entry":
            e[draw(st.integers(0, 3))] = draw(json_value)
        elif where == "spec" and isinstance(e[3], list) and e[3]:
            e[3][draw(st.integers(0, len(e[3]) - 1))] = draw(json_value)
        elif where == "span":
            e[2] = [[draw(st.integers(-3, 20)), draw(st.integers(-3, 20))]]
    b = json.dumps({**PACKED, "data": data}, allow_nan=True).encode()
    if draw(st.booleans()):
        i = draw(st.integers(0, len(b) - 1))
        b = b[:i] + draw(st.binary(max_size=4)) + b[i + 1:]
    return b


frames = st.one_of(st.binary(max_size=300), wrong_types(), mutated(), huge_or_deep(), packed(),
                   json_value.map(lambda v: json.dumps(v, allow_nan=True).encode()))


def drain(ing: Ingest) -> None:
    ing.handoff()
    while True:
        item = ing.queue.get(0)
        if item is None:
            break
        ing.write_item(item)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(frames, min_size=1, max_size=6))
def test_every_fuzzed_frame_is_written_or_quarantined_and_nothing_escapes(tmp_path_factory, batch):
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "root"
    ing = Ingest(str(root), Index())
    for f in batch:
        ing.frame(f)
    drain(ing)
    ing.sync()
    # accounting: each frame either decoded (its records counted) or was rejected
    assert ing.frames == len(batch)
    accepted_frames = ing.frames - ing.rejected
    assert ing.written + sum(st.duplicates for rf in ing.runs.values() for st in rf.ranks.values()) \
        == ing.records
    quarantined = read_jsonl(root / "_rejected.jsonl") + [
        r for d in root.iterdir() if d.is_dir() for r in read_jsonl(d / "rejected.jsonl")]
    assert len(quarantined) == ing.rejected
    assert accepted_frames >= 0
    # nothing outside the artifact root, and inside it only run folders and the root log
    assert [p.name for p in base.iterdir()] == ["root"]
    for p in root.iterdir():
        assert p.name == "_rejected.jsonl" or (p.is_dir() and not p.name.startswith("."))
    ing.close_files()


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(sample=st.lists(frames, min_size=100, max_size=150))
def test_a_real_collector_survives_a_burst_of_fuzzed_frames(tmp_path_factory, sample):
    tmp_path = tmp_path_factory.mktemp("fuzzproc")
    col = CollectorProc(str(tmp_path / "out"), http=True)
    good = encode(Record(v=1, run="alive", rank=0, world=1, seq=0, t=time.time(), kind="metrics",
                         name="loss", data={"value": 1.0}))
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(col.endpoint)
    try:
        for f in sample:
            sock.send(f)
        sock.send(good)
        sock.close()
        assert wait_for(lambda: len(read_jsonl(tmp_path / "out" / "alive" / "metrics.jsonl")) == 1, 15)
        with urllib.request.urlopen(col.http + "api/health", timeout=5) as r:
            h = json.load(r)
        assert col.proc.poll() is None
        assert h["frames"] == len(sample) + 1
        assert h["received"] == h["written"] + h["duplicates"]
    finally:
        assert col.stop() == 0
    assert not (tmp_path / "etc").exists()
    for d in (tmp_path / "out").iterdir():
        if d.is_dir():
            for f in d.iterdir():
                if f.suffix == ".jsonl":
                    read_jsonl(f)  # every stored line parses


def test_rejected_files_stop_growing_at_their_cap_but_every_frame_is_counted(tmp_path):
    cap = 4096
    col = CollectorProc(str(tmp_path / "out"), http=True, env={"TENSORTAP_REJECTED_CAP": str(cap)})
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(col.endpoint)
    n = 200
    try:
        for i in range(n):
            sock.send(b"garbage frame %d " % i + b"x" * 300)  # no run id: the root file
            sock.send(b'{"v":1,"run":"capped","rank":"bad","seq":%d}' % i)  # the run's file
        sock.close()

        def counted():
            with urllib.request.urlopen(col.http + "api/health", timeout=5) as r:
                return json.load(r)["rejected"] == 2 * n
        assert wait_for(counted, 15)
    finally:
        assert col.stop() == 0
    root_log = tmp_path / "out" / "_rejected.jsonl"
    run_log = tmp_path / "out" / "capped" / "rejected.jsonl"
    for log in (root_log, run_log):
        assert 0 < log.stat().st_size <= cap
        assert len(read_jsonl(log)) < n  # capped, and what is there parses
    m = json.loads((tmp_path / "out" / "capped" / "manifest.json").read_text())
    assert m["rejected"] == n  # counted even when no longer written
