"""Liveness: no rank outlives a lost peer or a failed rank 0 by more than a few seconds.

The main thread of a rank can be blocked anywhere: in a collective inside a worker method, in a
receive from a busy peer. A collective waits for the job's timeout (600 s by default) before it
fails, and a process killed under srun or mpirun (no torchrun agent) is noticed by nobody else.
So every rank runs two small threads over a gloo group of their own:

    ring:  rank r waits on a receive from rank (r + 1) % world. A peer that exits cleanly sends
           BYE first; any other end of that connection (SIGKILL, OOM kill, a crash) fails the
           receive at once: rank r reports "rank r+1 is lost" to rank 0 (NOTE channel).
    ctl:   every rank but 0 waits on a receive from rank 0: ABORT (rank 0 failed: exit now),
           INTERRUPT (rank 0's own share of call c failed: a rank that has not started call c
           skips it; one still inside it after the grace period may be waiting for rank 0 in
           a collective, and exits: rank 0's failure inside its own share is fatal unless the
           other ranks of that call finish it within the grace period), or BYE. A
           failed receive means rank 0 is gone.
    note:  (rank 0) receives LOST reports and, at shutdown, DONE from every rank.

A lost rank ends the job: rank 0 gives its main thread `grace_s` to notice and fail the normal
way (a WorkerLostError with the lost rank named, every rank told to abort); if it has not, rank
0 prints where its threads are, tells every rank to abort, and exits non-zero. Gloo reports a
closed connection within milliseconds, so a killed rank ends the whole job in about `grace_s`.

A hung rank (stopped, swapped out, its interpreter frozen) keeps its connections open, so with
`hang_s` set every rank also beats: a BEAT to its ring predecessor, and rank 0 one to every rank
on the ctl channel, every `hang_s / 4` seconds (at most 30 s apart). A rank that hears nothing
from its ring successor, or from rank 0, for `hang_s` seconds reports it (HUNG on the note
channel); rank 0 then prints where its threads are, tells every rank to abort and exits
non-zero, naming the rank (its main thread may be waiting for that rank for good, so there is
no grace period). A rank that stops hearing rank 0 ends itself. The beats come from a thread of
their own, which a busy main thread does not stop (torch's ops release the GIL); `hfrl.run`
passes the job's collective timeout, `distributed.timeout_s`, no less than `MIN_HANG_S`.
"""
from __future__ import annotations

import datetime
import faulthandler
import logging
import os
import sys
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

RING, CTL, NOTE = 201, 202, 203
BYE, LOST, ABORT, DONE, INTERRUPT, BEAT, HUNG = range(7)

MIN_HANG_S = 10.0
"""The shortest silence taken for a hung rank: beats from a starved thread on a busy host can be
late by seconds."""

ROOT_FIRST_S = 1.0
"""How long a rank whose serve loop ended because rank 0 failed waits before it exits (hfrl.cli), so
that rank 0, which holds the error, exits first: launchers such as torchrun report the first rank
to exit as the failure's root cause, and stop the others then. (The watchdog's own exits do not
wait: rank 0 may be waiting for those ranks' replies within its grace period.)"""


def _exit_now(code: int, message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


class Watchdog:
    """This rank's liveness threads (see the module docstring). Create on every rank, in the
    same order (the group is collective), then `start()`; `close()` on a clean shutdown."""

    def __init__(self, rank: int, world_size: int, grace_s: float = 3.0, hang_s: float | None = None):
        self.rank, self.world_size, self.grace_s, self.hang_s = rank, world_size, grace_s, hang_s
        # A receive here waits for the whole job: any error on it means the peer is gone, so
        # it must never time out (gloo's timeout would also close the connection).
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365 * 100))
        self.ending = threading.Event()
        """Set by the main thread once it handles a failure itself (or shuts down cleanly)."""
        self.current_call: tuple[int, str] | None = None
        """(call id, 'role.method') the main thread is executing (workers)."""
        self.interrupted: set[int] = set()
        """Calls whose rank-0 share failed: a worker that has not started one yet skips it."""
        self._threads: dict[str, threading.Thread] = {}
        self._lost: set[int] = set()
        self._lock = threading.Lock()
        self._heard: dict[int, float] = {}
        """Watched peer (the ring successor; rank 0 on the others) -> when it was last heard from."""
        self._stop_beats = threading.Event()

    # ---- starting and stopping ------------------------------------------------------------
    def start(self) -> None:
        if self.world_size < 2:
            return
        now = time.monotonic()
        self._heard = {(self.rank + 1) % self.world_size: now, **({0: now} if self.rank != 0 else {})}
        self._spawn("ring", self._ring_loop)
        self._spawn("note" if self.rank == 0 else "ctl",
                    self._note_loop if self.rank == 0 else self._ctl_loop)
        if self.hang_s is not None:
            self._spawn("beat", self._beat_loop)

    def _spawn(self, name: str, target: Callable) -> None:
        thread = threading.Thread(target=target, name=f"hfrl-watch-{name}", daemon=True)
        self._threads[name] = thread
        thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Clean shutdown handshake: every watched connection is told BYE before it closes."""
        if self.world_size < 2:
            return
        self.ending.set()
        self._stop_beats.set()
        if "beat" in self._threads:   # before the BYEs: the receivers of its beats still listen
            self._threads["beat"].join(timeout)
        pred = (self.rank - 1) % self.world_size
        self._send(BYE, 0, pred, RING)
        if self.rank == 0:
            self._threads["note"].join(timeout)          # DONE from every rank
            for rank in range(1, self.world_size):
                self._send(BYE, 0, rank, CTL)
        else:
            self._send(DONE, self.rank, 0, NOTE)
            self._threads["ctl"].join(timeout)
        self._threads["ring"].join(timeout)

    # ---- rank 0's main thread ------------------------------------------------------------
    def abort_all(self) -> None:
        """Tell every rank to exit now (they may be blocked in a collective)."""
        self.ending.set()
        for rank in range(1, self.world_size):
            if rank not in self._lost:
                self._send(ABORT, 0, rank, CTL)

    def interrupt(self, cid: int, ranks) -> None:
        """Rank 0's own share of call `cid` failed: ranks still inside it after the grace period
        are waiting for rank 0 and end themselves."""
        for rank in ranks:
            if rank != 0 and rank not in self._lost:
                self._send(INTERRUPT, cid, rank, CTL)

    # ---- threads -----------------------------------------------------------------------------
    def _send(self, kind: int, value: int, dst: int, tag: int) -> None:
        try:
            dist.send(torch.tensor([kind, value], dtype=torch.int64), dst=dst, group=self.group,
                      tag=tag)
        except Exception:  # noqa: BLE001 - a dead peer cannot be told; the others still are
            pass

    def _recv(self, src: int | None, tag: int) -> tuple[int, int]:
        buf = torch.empty(2, dtype=torch.int64)
        dist.recv(buf, src=src, group=self.group, tag=tag)
        kind, value = buf.tolist()
        return kind, value

    def _ring_loop(self) -> None:
        succ = (self.rank + 1) % self.world_size
        while True:
            try:
                kind, _ = self._recv(succ, RING)
            except Exception:  # noqa: BLE001 - the connection to succ broke: succ is gone
                self._peer_lost(succ)
                return
            if kind == BEAT:
                self._heard[succ] = time.monotonic()
                continue
            assert kind == BYE, kind
            self._heard.pop(succ, None)
            return

    def _beat_loop(self) -> None:
        """Beat to the ring predecessor (and, on rank 0, to every rank), and check the watched
        peers' beats, every hang_s / 4 seconds."""
        interval = min(self.hang_s / 4, 30.0)
        pred = (self.rank - 1) % self.world_size
        while not self._stop_beats.wait(interval):
            self._send(BEAT, 0, pred, RING)
            if self.rank == 0:
                for rank in range(1, self.world_size):
                    if rank not in self._lost:
                        self._send(BEAT, 0, rank, CTL)
            now = time.monotonic()
            for peer, last in list(self._heard.items()):
                if now - last > self.hang_s and peer in self._heard:
                    self._peer_hung(peer)

    def _ctl_loop(self) -> None:
        while True:
            try:
                kind, value = self._recv(0, CTL)
            except Exception:  # noqa: BLE001 - rank 0 is gone
                self._peer_lost(0)
                return
            self._heard[0] = time.monotonic()
            if kind == BEAT:
                continue
            if kind == BYE:
                self._heard.pop(0, None)
                return
            if kind == ABORT:
                if self.current_call is not None:    # maybe in a collective: it cannot listen
                    _exit_now(1, f"rank {self.rank}: aborting because rank 0 failed")
                # Idle: the abort command follows on the command channel and the main thread
                # ends the ordinary way; if it has not after the grace period, end it here.
                self._later(self._abort_if_alive)
            if kind == INTERRUPT:
                self.interrupted.add(value)
                self._later(self._still_inside, value)

    def _note_loop(self) -> None:
        done = set()
        while len(done) < self.world_size - 1:
            try:
                kind, value = self._recv(None, NOTE)
            except Exception:  # noqa: BLE001 - the group itself broke: nothing left to watch
                return
            if kind == DONE:
                done.add(value)
            elif kind == LOST:
                self._peer_lost(value)
            elif kind == HUNG:
                self._peer_hung(value)

    # ---- decisions ---------------------------------------------------------------------------
    def _later(self, fn: Callable, *args) -> None:
        timer = threading.Timer(self.grace_s, fn, args)
        timer.daemon = True
        timer.start()

    def _first_news_of(self, peer: int) -> bool:
        """Record `peer` as gone; False if it already was, or if the main thread is ending anyway."""
        with self._lock:
            if peer in self._lost:
                return False
            self._lost.add(peer)
        return not self.ending.is_set()

    def _peer_lost(self, peer: int) -> None:
        if not self._first_news_of(peer):
            return
        if self.rank != 0 and peer != 0:
            self._send(LOST, peer, 0, NOTE)
            return
        self._later(self._end_job, peer)

    def _peer_hung(self, peer: int) -> None:
        """`peer` sent nothing for hang_s seconds. Rank 0 ends the job now (its main thread may wait
        for that rank for good); another rank reports it to rank 0, or ends itself if it is rank 0."""
        if not self._first_news_of(peer):
            return
        what = (f"rank {peer} has sent nothing for over {self.hang_s:g} s (distributed.timeout_s): it is "
                "hung (stopped, swapped out, or its interpreter frozen)")
        if self.rank != 0:
            if peer == 0:
                _exit_now(1, f"rank {self.rank}: {what}; rank 0 is the controller: ending this rank")
            self._send(HUNG, peer, 0, NOTE)
            return
        self._abort_job(what, f"rank {peer} hung")

    def _abort_job(self, why: str, short: str) -> None:
        """Rank 0 ends the job from a watchdog thread: where its threads are, then every rank aborted."""
        print(f"hfrl: {why}; ending the job. Rank 0's threads were at:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        self.abort_all()
        _exit_now(1, f"hfrl: aborted: {short}")

    def _end_job(self, peer: int) -> None:
        """The grace period after losing `peer` is over and the main thread has not ended."""
        if self.ending.is_set():
            return
        if self.rank != 0:
            _exit_now(1, f"rank {self.rank}: lost contact with rank 0 (the controller) while "
                         "busy; ending this rank")
        self._abort_job(f"rank {peer} was lost (its process died or its connection broke) while rank 0 "
                        "was busy", f"rank {peer} was lost")

    def _abort_if_alive(self) -> None:
        _exit_now(1, f"rank {self.rank}: aborting because rank 0 failed")

    def _still_inside(self, cid: int) -> None:
        current = self.current_call
        if current is not None and current[0] == cid and not self.ending.is_set():
            _exit_now(1, f"rank {self.rank}: rank 0 failed inside {current[1]} (call {cid}) and "
                         f"this rank was still inside it {self.grace_s:g} s later, probably "
                         "waiting for rank 0 in a collective; ending this rank")
