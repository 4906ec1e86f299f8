"""Messages: Batches and tensors in one payload, the rest pickled; exact byte counters."""
import numpy as np
import torch

from hfrl.controller.batch import Batch, batches_equal
from hfrl.controller.transport import CMD, REPLY, Transport, decode, encode
from tests.multiproc import run_ranks


def sample_message():
    batch = Batch({"ids": torch.arange(6).reshape(3, 2), "mask": torch.ones(3, 2, dtype=torch.bool)},
                  {"text": np.array(["a", "bb", "ccc"], dtype=object)}, {"step": 4})
    return {"op": "call", "args": (batch, 7), "extra": torch.tensor([1.5, -2.0]),
            "scalar": torch.tensor(3), "nested": [{"x": torch.zeros(0, 3)}]}


def test_encode_decode_round_trip():
    msg = sample_message()
    header, payload = encode(msg)
    assert payload.dtype == torch.uint8 and payload.dim() == 1 and payload.is_contiguous()
    out = decode(header, payload)
    assert batches_equal(out["args"][0], msg["args"][0]) and out["args"][1] == 7
    assert torch.equal(out["extra"], msg["extra"]) and out["scalar"].item() == 3
    assert out["nested"][0]["x"].shape == (0, 3)
    assert encode({"op": "shutdown"})[1] is None          # no tensors: no payload at all


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
