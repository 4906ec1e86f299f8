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

import collections
import io
import pickle
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from hfrl.controller.batch import Batch, buffer_nbytes, header_from_bytes, header_to_bytes

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
    def __init__(self, file, items: list):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.items = items

    def persistent_id(self, obj):
        if isinstance(obj, (Batch, torch.Tensor)):
            self.items.append(obj)
            return len(self.items) - 1
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, items: list):
        super().__init__(file)
        self.items = items

    def persistent_load(self, pid):
        return self.items[pid]


def encode(obj: Any, keep_device: bool = False) -> tuple[bytes, torch.Tensor | None]:
    """(header bytes, payload uint8 tensor or None). The payload is on the CPU unless
    `keep_device` and every tensor of the message is on the same CUDA device."""
    items: list = []
    stream = io.BytesIO()
    _Pickler(stream, items).dump(obj)
    if not items:
        return pickle.dumps((stream.getvalue(), [])), None
    devices = {buf_device(item) for item in items}
    on_device = keep_device and len(devices) == 1 and next(iter(devices)).type == "cuda"
    descs, buffers, offset = [], [], 0
    for item in items:
        batch = item if isinstance(item, Batch) else Batch({"t": item.reshape(1, *item.shape)})
        buf, header = batch.to_buffer(alignment=_ALIGN)
        buf = buf if on_device else buf.cpu()
        descs.append(("batch" if isinstance(item, Batch) else "tensor", header_to_bytes(header),
                      offset, buf.numel()))
        buffers.append(buf)
        offset += buf.numel()
    payload = torch.cat(buffers) if len(buffers) > 1 else buffers[0]
    return pickle.dumps((stream.getvalue(), descs)), payload


def buf_device(item: Batch | torch.Tensor) -> torch.device:
    if isinstance(item, torch.Tensor):
        return item.device
    devices = {t.device for t in item.tensors.values()}
    return devices.pop() if len(devices) == 1 else torch.device("cpu")


def decode(header: bytes, payload: torch.Tensor | None) -> Any:
    body, descs = pickle.loads(header)
    if payload is None:   # Batches without tensor columns have a 0-byte payload
        payload = torch.empty(0, dtype=torch.uint8)
    items = []
    for kind, item_header, offset, nbytes in descs:
        meta = header_from_bytes(item_header)
        assert buffer_nbytes(meta) == nbytes, "payload size disagrees with its header"
        batch = Batch.from_buffer(payload[offset:offset + nbytes], meta)
        items.append(batch if kind == "batch" else batch["t"][0])
    return _Unpickler(io.BytesIO(body), items).load()


# ---------------------------------------------------------------------------------------------


class _Reaper:
    """Keeps sent tensors alive until their send completed, and then lets them go.

    gloo's send Work only reports completion once waited on, so a background thread waits on the
    oldest pending send (outside the lock; wait releases the GIL) and drops it. CUDA sends
    (NCCL) are polled instead: their wait() only orders streams, it does not say the buffer is
    free. A send that failed (dead peer) is dropped too: the receive side reports the failure.
    """

    def __init__(self):
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._flushing = 0    # threads in wait_all
        self._thread = threading.Thread(target=self._loop, name="hfrl-send-reaper", daemon=True)
        self._thread.start()

    def add(self, work, tensor: torch.Tensor) -> None:
        # Wake the thread only when it sleeps on an empty queue: while it waits on an older
        # send, it finds this one when that returns (a futex wake-up per message was the
        # largest system-call cost of a no-op call).
        with self._cond:
            self._queue.append((work, tensor))
            if len(self._queue) == 1:
                self._cond.notify()

    def __len__(self) -> int:
        return len(self._queue)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                work, tensor = self._queue[0]
            try:
                if tensor.is_cuda:
                    while not work.is_completed():
                        time.sleep(0.0005)
                else:
                    work.wait()
            except Exception:  # noqa: BLE001 - reported by whoever receives from that peer
                pass
            with self._cond:
                self._queue.popleft()
                if self._flushing and not self._queue:
                    self._cond.notify_all()

    def wait_all(self, timeout: float | None = None) -> bool:
        with self._cond:
            self._flushing += 1
            try:
                return self._cond.wait_for(lambda: not self._queue, timeout=timeout)
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

    def encode_message(self, obj: Any) -> Message:
        """Encode once; raises (TypeError/ValueError/pickle errors) before anything is sent."""
        header, payload = encode(obj, keep_device=self.data_groups is not None)
        nbytes = 0 if payload is None else payload.numel()
        where = _placement(payload, self.INLINE_MAX)
        start = _aligned(len(header))
        body_len = start + (nbytes if where == _INLINE else 0)
        # The first message has a fixed size, so the receiver can post it blind: the four sizes,
        # then the body itself when it fits (one operation for a typical command or reply).
        first = torch.empty(_FIRST, dtype=torch.uint8)
        first[:_PREFIX].view(torch.int64).copy_(
            torch.tensor([len(header), nbytes, where, body_len], dtype=torch.int64))
        fits = _PREFIX + body_len <= _FIRST
        body = first[_PREFIX:_PREFIX + body_len] if fits else torch.empty(body_len, dtype=torch.uint8)
        body[:len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
        if where == _INLINE and nbytes:
            body[start:] = payload
        return Message(first, None if fits else body, None if where == _INLINE else payload,
                       where, len(header), nbytes)

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
        self._reaper.add(dist.isend(tensor, dst=dst, group=group, tag=channel), tensor)

    def recv(self, src: int, channel: int, raw: bool = False) -> Any:
        """The next message from `src` on `channel`; with `raw`, (object, Message to forward)."""
        first = torch.empty(_FIRST, dtype=torch.uint8)
        dist.recv(first, src=src, group=self.group, tag=channel)
        n_header, nbytes, where, body_len = first[:_PREFIX].view(torch.int64).tolist()
        body = None
        if _PREFIX + body_len <= _FIRST:
            header_and_inline = first[_PREFIX:_PREFIX + body_len]
        else:
            body = header_and_inline = torch.empty(body_len, dtype=torch.uint8)
            dist.recv(body, src=src, group=self.group, tag=channel)
        payload = None
        if where == _INLINE:
            inline = header_and_inline[_aligned(n_header):]
        elif where == _SEPARATE:
            payload = inline = torch.empty(nbytes, dtype=torch.uint8)
            dist.recv(payload, src=src, group=self.group, tag=channel)
        else:
            payload = inline = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            dist.recv(payload, src=src, group=self._data_group(src, self._rank), tag=channel)
        name = CHANNELS[channel]
        self.stats.header_recv[name] += _PREFIX + n_header
        self.stats.payload_recv[name] += nbytes
        self.stats.messages_recv[name] += 1
        if raw:
            # The buffers are forwarded as they are while the caller uses the object: decode
            # from a copy, so a worker changing its tensors in place cannot change what its
            # relay children receive.
            obj = decode(header_and_inline[:n_header].numpy().tobytes(), inline.clone())
            return obj, Message(first, body, payload, where, n_header, nbytes)
        return decode(header_and_inline[:n_header].numpy().tobytes(), inline)

    @property
    def num_pending_sends(self) -> int:
        return len(self._reaper)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every send so far was delivered (False if `timeout` passed first)."""
        return self._reaper.wait_all(timeout)


_INLINE, _SEPARATE, _DEVICE = 0, 1, 2
_PREFIX = 32          # int64 (header bytes, payload bytes, where, body bytes)
_FIRST = 4096         # the fixed-size first message: prefix + the body when it fits


def _placement(payload: torch.Tensor | None, inline_max: int) -> int:
    if payload is None or (not payload.is_cuda and payload.numel() <= inline_max):
        return _INLINE
    return _DEVICE if payload.is_cuda else _SEPARATE


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
