"""`tensortap replay RUN_DIR --to ENDPOINT [--speed X | --max] [--run ID]`.

Re-sends a stored run into a live collector, one Sender per original rank, with the
original pacing (scaled by `speed`, or none with `--max`) and the original wall times `t`,
steps, epochs and payloads. The copy gets a new run id unless one is given. The original
lifecycle events (hello, bye, drops) are not re-sent: each Sender makes its own, and its
hello names the source run (`replay_of`). Sequence numbers are the new senders' own.

Unlike training, replay may wait: when a sender's queue is nearly full it pauses instead of
dropping, so the copy holds every record. It first checks that a collector answers at the
endpoint (CONNECT_S; with the CURVE keys of TENSORTAP_CURVE_SERVER_KEY and
TENSORTAP_CURVE_CLIENT_KEY, as a training process does), and stops waiting for the last
records when the collector takes none for STALL_S.
"""
from __future__ import annotations

import os
import secrets
import sys
import time
from typing import Optional

from collector.load import LoadStats, run_records
from collector.text import plural
from collector.wire import valid_run_id

LIFECYCLE = frozenset({"hello", "bye", "drops"})  # events a Sender sends by itself
QUEUE_BYTES = 32 << 20
_NBYTES = 256  # per-record queue charge (an estimate; the bound only needs to be consistent)
CONNECT_S = 3.0  # a collector answers (ZeroMQ handshake done) within this, or replay says so
STALL_S = 10.0  # the collector took no record for this long: stop waiting for the rest


class ReplayError(ValueError):
    """Bad input for replay; the message is one line saying what is expected."""


def _lifecycle(rec) -> bool:
    return rec.kind == "events" and rec.name in LIFECYCLE


def _wait_for_room(sender) -> None:
    # replay is not training: wait for the sender thread rather than drop
    while sender.stats()["queued_bytes"] + _NBYTES + 160 > QUEUE_BYTES * 0.9:
        time.sleep(0.001)


def _curve_options() -> dict:
    """The Sender's CURVE keys from the environment, read the way a training process reads
    them (client_hooks.session.curve_options)."""
    from client_hooks.session import curve_options

    try:
        return curve_options()
    except (OSError, ValueError) as e:
        raise ReplayError("cannot read the CURVE keys (TENSORTAP_CURVE_SERVER_KEY, "
                          f"TENSORTAP_CURVE_CLIENT_KEY): {e}") from None


def check_collector(endpoint: str, curve: dict, timeout: float = CONNECT_S) -> None:
    """Raise ReplayError unless a collector completes a ZeroMQ handshake at `endpoint` within
    `timeout` s (nothing is sent: a probe frame would be a rejected frame there)."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    failed = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused this client's key",
              zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "does not speak the same security mechanism",
              zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "refused the handshake"}
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    mon = None
    try:
        if "curve_server_key" in curve:
            pub, sec = curve.get("curve_keypair") or zmq.curve_keypair()
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve["curve_server_key"], pub, sec
        mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | sum(failed))
        if "://[" in endpoint:  # an IPv6 address ([::1]): ZeroMQ takes it only with IPV6 on
            sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as e:  # a malformed endpoint
            raise ReplayError(f"cannot connect to {endpoint!r}: {e}") from None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not mon.poll(int(left * 1000) + 1):
                break
            event = recv_monitor_message(mon)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return
            hint = "" if curve else " (a CURVE endpoint? set TENSORTAP_CURVE_SERVER_KEY and TENSORTAP_CURVE_CLIENT_KEY)"
            raise ReplayError(f"the collector at {endpoint} {failed[event]}{hint}")
        raise ReplayError(f"no collector at {endpoint} (none answered within {timeout:g} s): "
                          "start one with `tensortap collect`")
    finally:
        if mon is not None:
            sock.disable_monitor()
            mon.close(0)
        sock.close(0)
        ctx.term()


def _drain(senders: dict, timeout: float, stall_s: float = STALL_S) -> None:
    """Wait until every sender's queue is empty: at most `timeout` s in all, and no longer
    than `stall_s` once the collector takes nothing (gone since the start)."""
    deadline = time.monotonic() + timeout
    for sender in senders.values():
        last, since = None, time.monotonic()
        while not sender.flush(timeout=min(0.5, max(deadline - time.monotonic(), 0))):
            now = time.monotonic()
            queued = sender.stats()["queued"]
            if queued != last:
                last, since = queued, now
            if now >= deadline or now - since >= stall_s:
                return


def replay(run_dir: str, endpoint: str, *, speed: float = 1.0, as_fast_as_possible: bool = False,
           run: Optional[str] = None, drain_timeout: float = 120.0) -> dict:
    """Re-send the run stored in `run_dir` to the collector at `endpoint`.

    Returns {"run", "source", "records", "ranks", "seconds", "sent", "dropped", "skipped_lines"}:
    records is what was re-sent (lifecycle events excluded), sent the senders' counts (hello
    and bye included), dropped how many of `records` never left (at most `records`). Raises
    ReplayError for an empty or unreadable folder, a bad run id or speed, bad CURVE keys, or
    no collector answering at `endpoint`."""
    from client_hooks.sender import Sender  # the ZeroMQ side; kept out of `import collector`

    if not os.path.isdir(run_dir):
        raise ReplayError(f"no such run folder: {run_dir!r}")
    if not as_fast_as_possible and not speed > 0:
        raise ReplayError(f"speed must be > 0, got {speed}")
    stats = LoadStats()
    recs = run_records(run_dir, stats)
    if not recs:
        raise ReplayError(f"no records in {run_dir!r} (expected *.jsonl files written by `tensortap collect`)")
    source = recs[0].run
    run = f"{source[:100]}-replay-{secrets.token_hex(3)}" if run is None else run  # ('' is refused below)
    if not valid_run_id(run):
        raise ReplayError(f"bad run id {run!r}: letters, digits, '_', '.', '-'; up to 128 characters")
    hellos = {r.rank: r.data for r in recs if r.kind == "events" and r.name == "hello"}
    worlds = {r.rank: r.world for r in recs}
    body = [r for r in recs if not _lifecycle(r)]
    curve = _curve_options()
    check_collector(endpoint, curve)
    senders = {}
    try:
        for rank, world in sorted(worlds.items()):
            senders[rank] = Sender(endpoint, run, rank=rank, world=world, max_queue_bytes=QUEUE_BYTES,
                                   hello={**hellos.get(rank, {}), "replay_of": source}, **curve)
    except Exception as e:  # zmq.ZMQError: a malformed endpoint
        for sender in senders.values():
            sender.close(timeout=0.1)
        raise ReplayError(f"cannot connect to {endpoint!r}: {e}") from None
    start = time.monotonic()
    try:
        t0 = body[0].t if body else 0.0
        from tqdm import tqdm  # a progress bar on a terminal only

        for rec in tqdm(body, unit="rec", desc="replay", disable=not sys.stderr.isatty(), leave=False):
            if not as_fast_as_possible:
                ahead = start + (rec.t - t0) / speed - time.monotonic()
                if ahead > 0.001:
                    time.sleep(ahead)
            sender = senders[rec.rank]
            _wait_for_room(sender)
            sender.send(rec.kind, rec.name, rec.data, step=rec.step, epoch=rec.epoch,
                        nbytes=_NBYTES, t=rec.t)
        _drain(senders, drain_timeout)
    finally:
        for sender in senders.values():
            sender.close(timeout=2.0)
    per_rank = {rank: 0 for rank in senders}
    for r in body:
        per_rank[r.rank] += 1
    # a sender's drops include its own hello, reports and bye: count the replayed records only
    dropped = sum(min(s.dropped, per_rank[rank]) for rank, s in senders.items())
    return {"run": run, "source": source, "records": len(body), "ranks": len(senders),
            "seconds": round(time.monotonic() - start, 3),
            "sent": sum(s.sent for s in senders.values()), "dropped": dropped,
            "skipped_lines": stats.torn + stats.bad}


def replay_main(args) -> int:
    """CLI entry: args.run_dir, args.to, args.speed, args.max, args.run. One line out."""
    try:
        res = replay(args.run_dir, args.to, speed=args.speed, as_fast_as_possible=args.max,
                     run=args.run)
    except ReplayError as e:
        print(f"tensortap replay: error: {e}", file=sys.stderr)
        return 2
    pacing = "as fast as possible" if args.max else f"at {args.speed:g}x"
    print(f"tensortap replay: {res['records']} records of {res['source']} -> run {res['run']} at "
          f"{args.to}, {pacing}, {plural(res['ranks'], 'rank')}, {res['seconds']:.2f} s, "
          f"{res['dropped']} dropped, {res['skipped_lines']} unreadable lines skipped")
    return 1 if res["dropped"] else 0
