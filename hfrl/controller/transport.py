"""Point-to-point messages between ranks, with byte counters.

A message is any picklable Python object. `Batch` objects and tensors inside it travel as one
contiguous payload buffer; the rest is a small pickled header. On the wire a message is two
sends on one (peer, channel) pair, which gloo delivers in order:

    uint8[4096] = int64[4] (header bytes, payload bytes, where, body bytes) + the body if it fits
    [then uint8[body] = header, pad, small payload, when it does not fit]
    [then uint8[large payload], over gloo or NCCL]

so a typical command or reply is a single gloo operation. A message is encoded once
(`encode_message`) and may then be posted to several ranks, or forwarded as received
(`recv(..., raw=True)` then `post`), without being encoded again.

Sends are asynchronous (`isend`), so a worker that has sent its result moves on to its next
command, and rank 0 can queue commands for busy workers without blocking; a reaper thread keeps
each sent buffer alive until its send completed. Receives are blocking and name their source, so each (peer, channel) pair
is a FIFO. Channels are gloo tags: commands from rank 0, replies to rank 0, and data between
workers never match each other's receives.

Pickle is used only between ranks of one job (the same program on every rank); nothing here
reads a file. Counters split control (header) bytes from tensor payload bytes: the hybrid engine
and the benchmarks read the latter, and tests use them to prove data did not pass through rank 0.
"""
from __future__ import annotations

import io
import pickle
import queue
import struct
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from hfrl.controller.batch import Batch
from hfrl.controller.errors import WorkerLostError

CMD, REPLY, DATA, RELAY = 101, 102, 103, 104
CHANNELS = {CMD: "cmd", REPLY: "reply", DATA: "data", RELAY: "relay"}
_ALIGN = 16


@dataclass
class TransportStats:
    """Bytes and messages per channel; `payload_*` counts tensor bytes only."""

    payload_sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    payload_recv: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    header_sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    header_recv: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    messages_sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    messages_recv: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {name: dict(getattr(self, name)) for name in
                ("payload_sent", "payload_recv", "header_sent", "header_recv",
                 "messages_sent", "messages_recv")}

    def total_payload(self) -> tuple[int, int]:
        return sum(self.payload_sent.values()), sum(self.payload_recv.values())


# ---------------------------------------------------------------------------------------------
# Encoding: Batches and tensors go to the payload, everything else is pickled.


class _Pickler(pickle.Pickler):
    """Pickles the message with each Batch and tensor replaced by `_item(index)`.

    reducer_override, unlike persistent_id, is not called for ints, strs, dicts, lists and
    tuples, which make up most of a command: it halves the pickling time of a small one."""

    def __init__(self, file, items: list):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.items = items

    def reducer_override(self, obj):
        if isinstance(obj, (Batch, torch.Tensor)):
            self.items.append(obj)
            return _item, (len(self.items) - 1,)
        return NotImplemented


def _item(index: int):
    raise AssertionError("only _Unpickler loads message items")


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, items: list):
        super().__init__(file)
        self.items = items

    def find_class(self, module, name):
        if module == __name__ and name == "_item":
            return self.items.__getitem__
        return super().find_class(module, name)


def _pickle(obj: Any) -> tuple[bytes, list]:
    """(the message pickled without its Batches and tensors, those items in order)."""
    items: list = []
    stream = io.BytesIO()
    _Pickler(stream, items).dump(obj)
    return stream.getvalue(), items


def _layout(items: list) -> tuple[list[Batch], list[tuple], int, set[torch.device]]:
    """Each item as a Batch (a tensor is a 1-row Batch), its descriptor (kind, Batch header,
    offset in the payload), the payload's size (the items back to back, aligned), and the
    items' devices. A Batch whose tensors are on several devices cannot be sent."""
    batches, descs, offset, devices = [], [], 0, set()
    for item in items:
        batch = item if isinstance(item, Batch) else Batch({"t": item.reshape(1, *item.shape)})
        header = batch.buffer_header(alignment=_ALIGN)
        if batch.tensors:
            devices.add(batch.device)
        batches.append(batch)
        descs.append(("batch" if isinstance(item, Batch) else "tensor", header, offset))
        offset += header["nbytes"]
    return batches, descs, offset, devices


def _write_payload(batches: list[Batch], descs: list[tuple], payload: torch.Tensor) -> None:
    for batch, (_, header, offset) in zip(batches, descs):
        batch.write_buffer(payload[offset:offset + header["nbytes"]], header)


def decode_message(msg: Message, copy: bool = False) -> Any:
    """The object a message holds (as received, or as encoded). Its tensors are views of the
    message's buffers, or with `copy` of a copy of them."""
    container, start = (msg.first, _PREFIX) if msg.body is None else (msg.body, 0)
    body, descs = pickle.loads(container.numpy()[start:start + msg.header_bytes])
    items = []
    if descs:
        if msg.where == _INLINE:
            start += _aligned(msg.header_bytes)
            payload = container[start:start + msg.payload_bytes]
        else:
            payload = msg.payload
        items = _items(descs, payload.clone() if copy else payload)
    return _Unpickler(io.BytesIO(body), items).load()


def _items(descs: list[tuple], payload: torch.Tensor) -> list:
    """The Batches and tensors `_layout` described, as views of `payload`."""
    items = []
    for kind, header, offset in descs:   # from_buffer validates the header
        batch = Batch.from_buffer(payload[offset:offset + header["nbytes"]], header)
        items.append(batch if kind == "batch" else batch["t"][0])
    return items


# ---------------------------------------------------------------------------------------------


class _Reaper:
    """Keeps sent tensors alive until their send completed, and then lets them go.

    gloo's send Work only reports completion once waited on, so a background thread waits on the
    oldest pending send (wait releases the GIL) and drops it. CUDA sends (NCCL) are polled
    instead: their wait() only orders streams, it does not say the buffer is free. A send that
    failed (dead peer) is dropped too: the receive side reports the failure.

    The queue is a SimpleQueue: adding to it wakes the thread only when it sleeps on an empty
    queue (a futex wake-up per message was the largest system-call cost of a no-op call), and
    takes no Python-level lock. Each counter is written by one thread only.
    """

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._added = 0       # written by the sending thread
        self._reaped = 0      # written by the reaper thread
        self._cond = threading.Condition()
        self._flushing = 0    # threads in wait_all
        self._thread = threading.Thread(target=self._loop, name="hfrl-send-reaper", daemon=True)
        self._thread.start()

    def add(self, work, tensor: torch.Tensor) -> None:
        self._added += 1
        self._queue.put((work, tensor))

    def __len__(self) -> int:
        return self._added - self._reaped

    def _loop(self) -> None:
        while True:
            work, tensor = self._queue.get()
            try:
                if tensor.is_cuda:
                    while not work.is_completed():
                        time.sleep(0.0005)
                else:
                    work.wait()
            except Exception:  # noqa: BLE001 - reported by whoever receives from that peer
                pass
            del work, tensor
            self._reaped += 1
            if self._flushing:   # read after the count changed: a waiter sees one or the other
                with self._cond:
                    self._cond.notify_all()

    def wait_all(self, timeout: float | None = None) -> bool:
        with self._cond:
            self._flushing += 1
            try:
                return self._cond.wait_for(lambda: self._reaped == self._added, timeout=timeout)
            finally:
                self._flushing -= 1


@dataclass
class Message:
    """An encoded message, ready to post to any number of ranks (or received, to forward)."""

    first: torch.Tensor
    """uint8[_FIRST]: the four sizes, then the body when it fits."""
    body: torch.Tensor | None
    """uint8[body bytes] when the body does not fit in `first`."""
    payload: torch.Tensor | None
    """uint8[payload bytes] sent as a message of its own (gloo, or NCCL for GPU tensors)."""
    where: int
    header_bytes: int
    payload_bytes: int


class Transport:
    """This rank's endpoint: async sends, blocking receives, counters.

    Sends and receives are issued from the main thread only; a reaper thread releases sent
    buffers. `group` (gloo) carries every header and CPU payload: a small payload inline after
    the header (at an aligned offset, so the receiver's tensors are views, not copies), a large
    one as its own message straight from the Batch's buffer. With `data_groups` (two NCCL
    groups, on CUDA), a message whose tensors all sit on one GPU sends its payload GPU to GPU;
    the header still goes first over gloo and says so. NCCL has no tags, and the operations of
    one communicator between a pair of ranks run in order on one stream: if two ranks each sent
    the other a large payload and then received, each send would wait for a receive queued
    behind the other's send (a deadlock). So payloads from a lower to a higher rank use the
    first group and the other direction the second: each direction of a pair is its own stream,
    and payloads in one direction arrive in the order of their headers.
    """

    INLINE_MAX = 64 * 1024

    def __init__(self, group=None, data_groups=None, device: torch.device | None = None):
        self.group = group
        self.data_groups = data_groups
        self.device = device
        self.stats = TransportStats()
        self._reaper = _Reaper()
        self._rank = dist.get_rank() if dist.is_initialized() else 0
        self._peers: dict[tuple[Any, int], tuple[Any, int]] = {}

    def encode_message(self, obj: Any) -> Message:
        """Encode once; raises (TypeError/ValueError/pickle errors) before anything is sent.

        The message is laid out before any byte is written, so each tensor is copied once,
        straight into its place: into the first message itself for a typical command or reply.
        """
        body, items = _pickle(obj)
        batches, descs, nbytes, devices = _layout(items)
        header = pickle.dumps((body, descs), protocol=pickle.HIGHEST_PROTOCOL)
        device = devices.pop() if len(devices) == 1 else torch.device("cpu")
        if self.data_groups is not None and device.type == "cuda":
            where = _DEVICE
        else:
            where = _INLINE if nbytes <= self.INLINE_MAX else _SEPARATE
        start = _aligned(len(header))
        body_len = start + (nbytes if where == _INLINE else 0)
        # The first message has a fixed size, so the receiver can post it blind: the four sizes,
        # then the body itself when it fits (one operation for a typical command or reply).
        # bytearrays start zeroed: no stale memory in the padding reaches another rank.
        first_bytes = bytearray(_FIRST)
        struct.pack_into(_PREFIX_FORMAT, first_bytes, 0, len(header), nbytes, where, body_len)
        first = torch.frombuffer(first_bytes, dtype=torch.uint8)
        if _PREFIX + body_len <= _FIRST:
            first_bytes[_PREFIX:_PREFIX + len(header)] = header
            body, container, start = None, first, _PREFIX + start
        else:
            body_bytes = bytearray(body_len)
            body_bytes[:len(header)] = header
            body = container = torch.frombuffer(body_bytes, dtype=torch.uint8)
        payload = None
        if where != _INLINE:
            payload = torch.empty(nbytes, dtype=torch.uint8,
                                  device=device if where == _DEVICE else "cpu")
            _write_payload(batches, descs, payload)
        elif batches:
            _write_payload(batches, descs, container[start:start + nbytes])
        return Message(first, body, payload, where, len(header), nbytes)

    def send(self, obj: Any, dst: int, channel: int) -> None:
        self.post(self.encode_message(obj), dst, channel)

    def post(self, msg: Message, dst: int, channel: int) -> None:
        """Send an encoded (or received, to forward) message; the buffers are not copied."""
        self._isend(msg.first, dst, channel, self.group)
        if msg.body is not None:
            self._isend(msg.body, dst, channel, self.group)
        if msg.where == _SEPARATE:
            self._isend(msg.payload, dst, channel, self.group)
        elif msg.where == _DEVICE:
            self._isend(msg.payload, dst, channel, self._data_group(self._rank, dst))
        name = CHANNELS[channel]
        self.stats.header_sent[name] += _PREFIX + msg.header_bytes
        self.stats.payload_sent[name] += msg.payload_bytes
        self.stats.messages_sent[name] += 1

    def _data_group(self, src: int, dst: int):
        if self.data_groups is None:
            raise RuntimeError(f"rank {src} sent a GPU payload but this rank has no NCCL data "
                               "group: every rank must use the same backend")
        return self.data_groups[0 if src < dst else 1]

    def _isend(self, tensor: torch.Tensor, dst: int, channel: int, group) -> None:
        group, peer = self._peer(group, dst)
        try:
            work = group.send([tensor], peer, channel)
        except RuntimeError as err:   # gloo: the connection is closed, its process gone
            raise WorkerLostError(f"lost contact with rank {dst} while sending to it on the "
                                  f"{CHANNELS[channel]} channel: {err}") from None
        self._reaper.add(work, tensor)

    def _recv(self, tensor: torch.Tensor, src: int, channel: int, group) -> None:
        group, peer = self._peer(group, src)
        group.recv([tensor], peer, channel).wait()

    def _peer(self, group, rank: int) -> tuple[Any, int]:
        """The process group (None: the default one) and `rank`'s rank in it. Sends and
        receives call the group itself: torch.distributed's isend and recv check their
        arguments and wrap errors for logging on every call, a tenth of rank 0's time in a
        no-op call."""
        key = (group, rank)
        if key not in self._peers:
            process_group = dist.group.WORLD if group is None else group
            self._peers[key] = process_group, dist.get_group_rank(process_group, rank)
        return self._peers[key]

    def recv(self, src: int, channel: int, raw: bool = False) -> Any:
        """The next message from `src` on `channel`; with `raw`, (object, Message to forward)."""
        first_bytes = bytearray(_FIRST)
        first = torch.frombuffer(first_bytes, dtype=torch.uint8)
        self._recv(first, src, channel, self.group)
        n_header, nbytes, where, body_len = struct.unpack_from(_PREFIX_FORMAT, first_bytes)
        body = payload = None
        if _PREFIX + body_len > _FIRST:
            body = torch.empty(body_len, dtype=torch.uint8)
            self._recv(body, src, channel, self.group)
        if where == _SEPARATE:
            payload = torch.empty(nbytes, dtype=torch.uint8)
            self._recv(payload, src, channel, self.group)
        elif where == _DEVICE:
            payload = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._recv(payload, src, channel, self._data_group(src, self._rank))
        name = CHANNELS[channel]
        self.stats.header_recv[name] += _PREFIX + n_header
        self.stats.payload_recv[name] += nbytes
        self.stats.messages_recv[name] += 1
        msg = Message(first, body, payload, where, n_header, nbytes)
        if raw:
            # The buffers are forwarded as they are while the caller uses the object: decode
            # from a copy, so a worker changing its tensors in place cannot change what its
            # relay children receive.
            return decode_message(msg, copy=True), msg
        return decode_message(msg)

    @property
    def num_pending_sends(self) -> int:
        return len(self._reaper)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every send so far was delivered (False if `timeout` passed first)."""
        return self._reaper.wait_all(timeout)


_INLINE, _SEPARATE, _DEVICE = 0, 1, 2
_PREFIX = 32          # int64 (header bytes, payload bytes, where, body bytes)
_PREFIX_FORMAT = "<4q"
_FIRST = 4096         # the fixed-size first message: prefix + the body when it fits


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
