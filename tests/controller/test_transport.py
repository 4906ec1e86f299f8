"""Messages: Batches and tensors in one payload, the rest pickled; exact byte counters."""
import numpy as np
import pytest
import torch

from hfrl.controller.batch import Batch, batches_equal
from hfrl.controller.transport import CMD, REPLY, Transport, decode_message
from tests.multiproc import run_ranks


def sample_message():
    batch = Batch({"ids": torch.arange(6).reshape(3, 2), "mask": torch.ones(3, 2, dtype=torch.bool)},
                  {"text": np.array(["a", "bb", "ccc"], dtype=object)}, {"step": 4})
    return {"op": "call", "args": (batch, 7), "extra": torch.tensor([1.5, -2.0]),
            "scalar": torch.tensor(3), "nested": [{"x": torch.zeros(0, 3)}]}


def test_encode_decode_round_trip():
    msg = sample_message()
    encoded = Transport().encode_message(msg)
    assert encoded.body is None and encoded.payload is None   # all of it in the first message
    out = decode_message(encoded)
    assert batches_equal(out["args"][0], msg["args"][0]) and out["args"][1] == 7
    assert torch.equal(out["extra"], msg["extra"]) and out["scalar"].item() == 3
    assert out["nested"][0]["x"].shape == (0, 3)
    assert Transport().encode_message({"op": "shutdown"}).payload_bytes == 0


def exchange(rank, world):
    t = Transport()
    if rank == 0:
        t.send(sample_message(), 1, CMD)
        t.send({"op": "noop"}, 1, CMD)
        reply = t.recv(1, REPLY)
        t.flush()
        return t.stats.snapshot(), reply
    first = t.recv(0, CMD)
    second = t.recv(0, CMD)
    t.send({"got": [first["op"], second["op"]], "rows": len(first["args"][0])}, 0, REPLY)
    t.flush()
    return t.stats.snapshot(), None


def test_counters_on_two_ranks():
    (stats0, reply), (stats1, _) = run_ranks(2, exchange, init=True)
    assert reply == {"got": ["call", "noop"], "rows": 3}
    # Payload: ids 48 B, mask 6 B -> 16-aligned 48 + 16 = 64; extra 8 B -> 16; scalar 8 B -> 16.
    # The zero-size tensor takes no bytes.
    assert stats0["payload_sent"] == {"cmd": 64 + 16 + 16}
    assert stats1["payload_recv"] == {"cmd": 64 + 16 + 16}
    assert stats0["messages_sent"] == {"cmd": 2} and stats0["messages_recv"] == {"reply": 1}
    assert stats0["header_sent"]["cmd"] == stats1["header_recv"]["cmd"]
    assert stats0["payload_recv"] == {} or stats0["payload_recv"] == {"reply": 0}


def large_and_empty(rank, world):
    t = Transport()
    if rank == 0:
        t.send({"big": torch.arange(50_000, dtype=torch.float32),      # 200 kB: its own message
                "rows": Batch(non_tensors={"r": np.arange(3)})}, 1, CMD)   # no tensor columns
        t.flush()
        return t.stats.snapshot()
    msg = t.recv(0, CMD)
    assert torch.equal(msg["big"], torch.arange(50_000, dtype=torch.float32))
    assert len(msg["rows"]) == 3 and msg["rows"]["r"].tolist() == [0, 1, 2]
    return t.stats.snapshot()


def test_large_payloads_and_batches_without_tensors():
    sent, received = run_ranks(2, large_and_empty, init=True)
    assert sent["payload_sent"] == received["payload_recv"] == {"cmd": 200_000}


def all_dtypes_batch(num_rows: int) -> Batch:
    """One column of each kind a message may hold, a non-contiguous one among them."""
    wide = torch.arange(num_rows * 6, dtype=torch.float64).reshape(num_rows, 6)
    return Batch({"f32": torch.randn(num_rows, 3), "bf16": torch.randn(num_rows, 5).bfloat16(),
                  "i64": torch.arange(num_rows, dtype=torch.int64),
                  "mask": torch.rand(num_rows, 7) > 0.5,
                  "strided": wide[:, ::2],                      # (N, 3) with stride 2
                  "transposed": torch.randn(3, num_rows).t(),   # (N, 3), not contiguous
                  "c64": torch.randn(num_rows, 2, dtype=torch.complex64)},
                 {"text": [f"row {i}" for i in range(num_rows)]},
                 {"step": 3, "name": "rollout", "temperature": 0.7})


@pytest.mark.parametrize("num_rows, where", [
    (0, "first"), (1, "first"), (4, "first"),      # fits in the 4 KiB first message
    (60, "body"),                                   # over 4 KiB: header and payload follow it
    (1000, "separate")])                            # over INLINE_MAX: the payload on its own
def test_encoded_message_round_trip_is_exact(num_rows, where):
    batch = all_dtypes_batch(num_rows)
    if num_rows > 1:
        assert not batch["strided"].is_contiguous() and not batch["transposed"].is_contiguous()
    msg = {"op": "call", "args": (batch, batch[:1] if num_rows else batch),
           "kwargs": {"t": torch.arange(10, dtype=torch.int16)[::3], "n": 5}}
    encoded = Transport().encode_message(msg)
    expected_bytes = 0
    for b in (batch, msg["args"][1], Batch({"t": msg["kwargs"]["t"][None]})):
        expected_bytes += sum(-(-t.numel() * t.element_size() // 16) * 16
                              for t in b.tensors.values())
    assert encoded.payload_bytes == expected_bytes
    assert {"first": (encoded.body is None and encoded.payload is None),
            "body": (encoded.body is not None and encoded.payload is None),
            "separate": encoded.payload is not None}[where]
    out = decode_message(encoded)
    for got, sent in zip(out["args"], msg["args"]):
        assert batches_equal(got, sent) and len(got) == len(sent)
        assert all(got[k].dtype == sent[k].dtype and got[k].shape == sent[k].shape
                   for k in sent.tensors)
    assert out["kwargs"]["n"] == 5 and out["kwargs"]["t"].dtype == torch.int16
    assert torch.equal(out["kwargs"]["t"], torch.tensor([0, 3, 6, 9], dtype=torch.int16))
    # A copy decodes to equal values in separate memory (what a relaying rank keeps).
    copied = decode_message(encoded, copy=True)["args"][0]
    assert batches_equal(copied, batch)
    if num_rows:
        assert copied["f32"].data_ptr() != out["args"][0]["f32"].data_ptr()


def test_equal_messages_encode_to_equal_bytes():
    """The alignment padding is zeroed: no stale memory reaches another rank."""
    def wire(msg):
        m = Transport().encode_message(msg)
        return b"".join(t.numpy().tobytes() for t in (m.first, m.body, m.payload)
                        if t is not None)
    for num_rows in (1, 60, 1000):
        batch = Batch({"x": torch.arange(num_rows * 3, dtype=torch.int8).reshape(num_rows, 3)})
        assert wire({"b": batch}) == wire({"b": batch.clone()})


def test_a_batch_on_several_devices_cannot_be_encoded():
    batch = Batch({"cpu": torch.zeros(2), "meta": torch.zeros(2, device="meta")})
    with pytest.raises(ValueError, match="several devices"):
        Transport().encode_message({"args": (batch,)})


def test_a_tensor_that_requires_grad_is_sent_by_value():
    weight = torch.arange(3, dtype=torch.float32).requires_grad_()
    batch = Batch({"w": weight[None].expand(2, 3)})
    out = decode_message(Transport().encode_message({"b": batch, "t": weight}))
    assert not out["t"].requires_grad and torch.equal(out["t"], weight.detach())
    assert not out["b"]["w"].requires_grad and batches_equal(out["b"], batch)
    buf, _ = batch.to_buffer()
    assert not buf.requires_grad and buf.grad_fn is None


def send_to_a_gone_rank(rank, world):
    import time

    import torch.distributed as dist

    from hfrl.controller.errors import WorkerLostError
    from hfrl.controller.transport import CHANNELS

    transport = Transport()
    dist.barrier()
    if rank == 1:
        return "left"   # its process exits: its connections close
    time.sleep(3)
    channel = next(iter(CHANNELS))
    try:
        for _ in range(50):   # the first sends may still reach the socket's buffer
            transport.send({"op": "ping"}, 1, channel)
            time.sleep(0.05)
    except WorkerLostError as err:
        return str(err)
    return "no error"


def test_sending_to_a_rank_whose_process_ended_names_it():
    """A send to a rank whose process is gone (killed during start-up, say) raises WorkerLostError
    naming it, not gloo's bare "Connection closed by peer"."""
    message, _ = run_ranks(2, send_to_a_gone_rank, init=True)
    assert message.startswith("lost contact with rank 1 while sending to it on the "), message
