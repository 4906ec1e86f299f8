"""Point-to-point messages between ranks, with byte counters.

A message is any picklable Python object. `Batch` objects and tensors inside it travel as one
contiguous payload buffer; the rest is a small pickled header. On the wire a message is two
sends on one (peer, channel) pair, which gloo delivers in order:

    int64[3] = (header bytes, payload bytes, alignment)   then   uint8[header + payload]

Sends are asynchronous (`isend`), so a worker that has sent its result moves on to its next
command, and rank 0 can queue commands for busy workers without blocking; pending sends are kept
alive until complete. Receives are blocking and name their source, so each (peer, channel) pair
is a FIFO. Channels are gloo tags: commands from rank 0, replies to rank 0, and data between
workers never match each other's receives.

Pickle is used only between ranks of one job (the same program on every rank); nothing here
reads a file. Counters split control (header) bytes from tensor payload bytes: the hybrid engine
and the benchmarks read the latter, and tests use them to prove data did not pass through rank 0.
"""
from __future__ import annotations

import io
import pickle
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from hfrl.controller.protocol import Batch, buffer_nbytes, header_from_bytes, header_to_bytes

CMD, REPLY, DATA = 101, 102, 103
CHANNELS = {CMD: "cmd", REPLY: "reply", DATA: "data"}
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


def encode(obj: Any) -> tuple[bytes, torch.Tensor | None]:
    """(header bytes, payload uint8 tensor or None)."""
    items: list = []
    stream = io.BytesIO()
    _Pickler(stream, items).dump(obj)
    if not items:
        return pickle.dumps((stream.getvalue(), [])), None
    descs, buffers, offset = [], [], 0
    for item in items:
        batch = item if isinstance(item, Batch) else Batch({"t": item.reshape(1, *item.shape)})
        buf, header = batch.to_buffer(alignment=_ALIGN)
        buf = buf.cpu()
        descs.append(("batch" if isinstance(item, Batch) else "tensor", header_to_bytes(header),
                      offset, buf.numel()))
        buffers.append(buf)
        offset += buf.numel()
    payload = torch.cat(buffers) if len(buffers) > 1 else buffers[0]
    return pickle.dumps((stream.getvalue(), descs)), payload


def decode(header: bytes, payload: torch.Tensor | None) -> Any:
    body, descs = pickle.loads(header)
    items = []
    for kind, item_header, offset, nbytes in descs:
        meta = header_from_bytes(item_header)
        assert buffer_nbytes(meta) == nbytes, "payload size disagrees with its header"
        batch = Batch.from_buffer(payload[offset:offset + nbytes], meta)
        items.append(batch if kind == "batch" else batch["t"][0])
    return _Unpickler(io.BytesIO(body), items).load()


# ---------------------------------------------------------------------------------------------


class Transport:
    """This rank's endpoint: async sends, blocking receives, counters. Main thread only."""

    def __init__(self, group=None):
        self.group = group
        self.stats = TransportStats()
        self._pending: list[tuple[Any, tuple]] = []

    def send(self, obj: Any, dst: int, channel: int) -> None:
        header, payload = encode(obj)
        nbytes_payload = 0 if payload is None else payload.numel()
        body = torch.empty(len(header) + nbytes_payload, dtype=torch.uint8)
        body[:len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
        if payload is not None:
            body[len(header):] = payload
        sizes = torch.tensor([len(header), nbytes_payload, _ALIGN], dtype=torch.int64)
        self._isend(sizes, dst, channel)
        self._isend(body, dst, channel)
        name = CHANNELS[channel]
        self.stats.header_sent[name] += len(header) + sizes.numel() * 8
        self.stats.payload_sent[name] += nbytes_payload
        self.stats.messages_sent[name] += 1

    def _isend(self, tensor: torch.Tensor, dst: int, channel: int) -> None:
        work = dist.isend(tensor, dst=dst, group=self.group, tag=channel)
        self._pending.append((work, tensor))
        if len(self._pending) > 64:
            self.poll()

    def recv(self, src: int, channel: int) -> Any:
        sizes = torch.empty(3, dtype=torch.int64)
        dist.recv(sizes, src=src, group=self.group, tag=channel)
        n_header, n_payload, _ = (int(v) for v in sizes)
        body = torch.empty(n_header + n_payload, dtype=torch.uint8)
        dist.recv(body, src=src, group=self.group, tag=channel)
        name = CHANNELS[channel]
        self.stats.header_recv[name] += n_header + sizes.numel() * 8
        self.stats.payload_recv[name] += n_payload
        self.stats.messages_recv[name] += 1
        header = body[:n_header].numpy().tobytes()
        return decode(header, body[n_header:] if n_payload else None)

    def poll(self) -> None:
        """Forget sends that completed (their buffers may be freed)."""
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]

    def flush(self) -> None:
        """Wait until every pending send is delivered."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
