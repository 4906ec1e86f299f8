"""Point-to-point messages between ranks, with byte counters.

A message is any picklable Python object. `Batch` objects and tensors inside it travel as one
contiguous payload buffer; the rest is a small pickled header. On the wire a message is two
sends on one (peer, channel) pair, which gloo delivers in order:

    int64[3] = (header bytes, payload bytes, payload on GPU)   then   uint8[header + payload]

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
    items = []
    for kind, item_header, offset, nbytes in descs:
        meta = header_from_bytes(item_header)
        assert buffer_nbytes(meta) == nbytes, "payload size disagrees with its header"
        batch = Batch.from_buffer(payload[offset:offset + nbytes], meta)
        items.append(batch if kind == "batch" else batch["t"][0])
    return _Unpickler(io.BytesIO(body), items).load()


# ---------------------------------------------------------------------------------------------


class Transport:
    """This rank's endpoint: async sends, blocking receives, counters. Main thread only.

    `group` (gloo) carries every header and CPU payload. With a `data_group` (NCCL, on CUDA),
    a message whose tensors all sit on one GPU sends its payload GPU to GPU over it instead; the
    header still goes first over gloo and says so. NCCL has no tags, but each ordered pair of
    ranks uses one channel only (rank 0 -> worker: commands, worker -> rank 0: replies, worker
    -> worker: data), so payloads on a pair arrive in the order of their headers.
    """

    def __init__(self, group=None, data_group=None, device: torch.device | None = None):
        self.group = group
        self.data_group = data_group
        self.device = device
        self.stats = TransportStats()
        self._pending: list[tuple[Any, torch.Tensor]] = []

    def send(self, obj: Any, dst: int, channel: int) -> None:
        header, payload = encode(obj, keep_device=self.data_group is not None)
        nbytes_payload = 0 if payload is None else payload.numel()
        on_device = payload is not None and payload.is_cuda
        inline = 0 if on_device else nbytes_payload
        body = torch.empty(len(header) + inline, dtype=torch.uint8)
        body[:len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
        if inline:
            body[len(header):] = payload
        sizes = torch.tensor([len(header), nbytes_payload, int(on_device)], dtype=torch.int64)
        self._isend(sizes, dst, channel, self.group)
        self._isend(body, dst, channel, self.group)
        if on_device:
            self._isend(payload, dst, channel, self.data_group)
        name = CHANNELS[channel]
        self.stats.header_sent[name] += len(header) + sizes.numel() * 8
        self.stats.payload_sent[name] += nbytes_payload
        self.stats.messages_sent[name] += 1

    def _isend(self, tensor: torch.Tensor, dst: int, channel: int, group) -> None:
        work = dist.isend(tensor, dst=dst, group=group, tag=channel)
        self._pending.append((work, tensor))
        if len(self._pending) > 64:
            self.poll()

    def recv(self, src: int, channel: int) -> Any:
        sizes = torch.empty(3, dtype=torch.int64)
        dist.recv(sizes, src=src, group=self.group, tag=channel)
        n_header, n_payload, on_device = (int(v) for v in sizes)
        inline = 0 if on_device else n_payload
        body = torch.empty(n_header + inline, dtype=torch.uint8)
        dist.recv(body, src=src, group=self.group, tag=channel)
        payload = body[n_header:] if inline else None
        if on_device:
            if self.data_group is None:
                raise RuntimeError(f"rank {src} sent a GPU payload but this rank has no NCCL "
                                   "data group: every rank must use the same backend")
            payload = torch.empty(n_payload, dtype=torch.uint8, device=self.device)
            dist.recv(payload, src=src, group=self.data_group, tag=channel)
        name = CHANNELS[channel]
        self.stats.header_recv[name] += n_header + sizes.numel() * 8
        self.stats.payload_recv[name] += n_payload
        self.stats.messages_recv[name] += 1
        return decode(body[:n_header].numpy().tobytes(), payload)

    def poll(self) -> None:
        """Forget sends that completed (their buffers may be freed)."""
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]

    def flush(self) -> None:
        """Wait until every pending send is delivered."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
