"""Non-blocking calls on pools that include rank 0 leave their outputs where they were made:
chained futures go producer -> consumer (rank 0 being one of them), colocated roles of one
layout move no row at all, and rank 0 receives only statuses and small blocking results.

One spawn per world size runs every check; each check compares the chained values with the same
calls fed `future.result()`, and reads the transport counters of every rank."""
import torch

import hfrl
from hfrl.controller import (DP_COMPUTE, DP_COMPUTE_BALANCED, ONE_TO_ALL, Batch, ParallelDims,
                             RemoteError, ResourcePool, Worker, WorkerGroup, get_runtime,
                             register)
from tests.multiproc import run_ranks


class Stage(Worker):
    """The steps of an RL iteration in miniature; every output says which rank made it."""

    @register(protocol=DP_COMPUTE)
    def generate(self, batch, k=1):
        # k samples per prompt, interleaved; 1 KiB of "logits" per row, so moved rows show.
        ids = batch["id"].repeat_interleave(k)
        return Batch({"id": ids, "attention_mask": batch["attention_mask"].repeat_interleave(k, 0),
                      "big": ids[:, None].float().expand(len(ids), 256).clone(),
                      "rank": torch.full((len(ids),), self.ctx.rank)},
                     meta={"producer_rank": self.ctx.rank, "gen_tokens": 12.5})

    @register(protocol=DP_COMPUTE)
    def score(self, batch):
        return Batch({"id": batch["id"], "score": batch["big"].sum(-1),
                      "rank": torch.full((len(batch),), self.ctx.rank),
                      "meta_rank": torch.full((len(batch),), batch.meta["producer_rank"])},
                     meta={"reward_mean": float(batch["big"].sum(-1).mean())})

    @register(protocol=DP_COMPUTE)
    def advantages(self, gen, rew):
        assert torch.equal(gen["id"], rew["id"]), (gen["id"], rew["id"])
        return Batch({"id": gen["id"], "adv": rew["score"] - gen["big"].mean(-1),
                      "rank": torch.full((len(gen),), self.ctx.rank)})

    @register(protocol=DP_COMPUTE)
    def update(self, batch):
        # Small: one float per row. The blocking call at the end of a step.
        return Batch({"loss": batch["adv"].float() * 0.5})

    @register(protocol=DP_COMPUTE_BALANCED)
    def take_balanced(self, batch):
        return Batch({"id": batch["id"], "rank": torch.full((len(batch),), self.ctx.rank)})

    @register(protocol=DP_COMPUTE)
    def fail_on(self, batch, rank):
        if self.ctx.rank == rank:
            raise ValueError(f"no rows for rank {rank}")
        return batch

    @register(protocol=ONE_TO_ALL)
    def stats(self):
        return self.ctx.runtime.transport.stats.snapshot()

    @register(protocol=ONE_TO_ALL)
    def stored(self):
        return sorted(self.ctx.runtime.store)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (n,), generator=g)
    return Batch({"id": torch.arange(n),
                  "attention_mask": (torch.arange(8)[None] < lengths[:, None]).long()})


def as_lists(batch):
    return {k: v.tolist() for k, v in batch.tensors.items()}


def counter(snapshot, kind, channel):
    return snapshot[kind].get(channel, 0)


def step(actor, reward, batch, k, chained):
    """generate -> score -> advantages, chaining futures or passing their values; then the
    blocking update (issued by the caller, so it can read the counters in between)."""
    value = (lambda f: f) if chained else (lambda f: f.result())
    gen = actor.generate(batch, k=k, blocking=False)
    rew = reward.score(value(gen), blocking=False)
    adv = actor.advantages(value(gen), value(rew), blocking=False)
    return gen, rew, adv, lambda: actor.update(value(adv))


def chain_check(actor, reward, batch, k, everyone):
    """The chained step against the same step fed results, with every rank's counters (read
    by `everyone`, a group on all ranks) around the chained one."""
    rank0 = get_runtime().transport.stats
    before_all, before = everyone.stats(), rank0.snapshot()
    gen, rew, adv, update = step(actor, reward, batch, k, chained=True)
    nonblocking = rank0.snapshot()
    loss = update()
    after_all = everyone.stats()
    gen_r, rew_r, adv_r, update_r = step(actor, reward, batch, k, chained=False)
    loss_r = update_r()
    return {
        "equal": [as_lists(f.result()) == as_lists(r.result())
                  for f, r in ((gen, gen_r), (rew, rew_r), (adv, adv_r))]
                 + [as_lists(loss) == as_lists(loss_r)],
        "meta_rank": rew.result()["meta_rank"].tolist(),
        # Rank 0, from the first call until the blocking update: statuses only.
        "reply_payload_nonblocking": (counter(nonblocking, "payload_recv", "reply")
                                      - counter(before, "payload_recv", "reply")),
        "data_sent": [counter(a, "payload_sent", "data") - counter(b, "payload_sent", "data")
                      for a, b in zip(after_all, before_all)],
        "rank0_reply_payload": (counter(after_all[0], "payload_recv", "reply")
                                - counter(before_all[0], "payload_recv", "reply")),
    }


def meta_check(actor, batch):
    """Future.meta reads the joined output's meta from the statuses: no fetch, no payload."""
    rank0 = get_runtime().transport.stats
    gen = actor.generate(batch, blocking=False)
    gen.wait()
    before = rank0.snapshot()
    meta = gen.meta
    after = rank0.snapshot()
    moved = (counter(after, "messages_sent", "cmd") - counter(before, "messages_sent", "cmd"),
             counter(after, "payload_recv", "reply") - counter(before, "payload_recv", "reply"))
    return meta, gen.result().meta, moved, actor.generate(batch).meta


def error_check(actor, reward, batch):
    """A producer failing on rank 1: raised at the consumer call and at the wait, never a hang,
    and the next chain finds every channel clean."""
    caught = []
    bad = actor.fail_on(batch, rank=1, blocking=False)
    for attempt in (lambda: reward.score(bad), bad.wait, bad.result, lambda: bad.meta):
        try:
            attempt()
            caught.append(None)
        except RemoteError as err:
            caught.append((err.rank, err.method, err.remote_message))
    loss = step(actor, reward, batch, 1, chained=True)[3]()
    loss_r = step(actor, reward, batch, 1, chained=False)[3]()
    return caught, as_lists(loss) == as_lists(loss_r)


def dropped_check(actor, batch):
    """A dropped Future frees the stored output on every rank, rank 0 included (the others
    are told with their next command); a resolved one stays chainable until dropped."""
    store = get_runtime().store
    gen = actor.generate(batch, blocking=False)
    cid = gen.call_id
    held = (cid in store, [cid in s for s in actor.stored()])
    gen.result()
    resolved = (cid in store, as_lists(actor.score(gen)) == as_lists(actor.score(gen.result())))
    del gen
    return held, resolved, (cid in store, [cid in s for s in actor.stored()])


def balanced_check(actor, consumer, batch, k):
    """A balanced consumer of a rank-0 producer regroups by the token counts the producers
    reported (rank 0's own included), exactly as it would regroup the joined Batch."""
    gen = actor.generate(batch, k=k, blocking=False)
    return as_lists(consumer.take_balanced(gen)), as_lists(consumer.take_balanced(gen.result()))


def main4():
    everyone = ResourcePool("all", (0, 1, 2, 3))
    actor = WorkerGroup(Stage, everyone, ParallelDims(dp=4), name="actor")
    reward = WorkerGroup(Stage, everyone, ParallelDims(dp=4), name="reward")
    wide = WorkerGroup(Stage, everyone, ParallelDims(tp=2, dp=2), name="wide")   # dp=2
    pair = WorkerGroup(Stage, ResourcePool("pair", (0, 1)), ParallelDims(dp=2), name="pair")
    right = WorkerGroup(Stage, ResourcePool("right", (2, 3)), ParallelDims(dp=2), name="right")
    out = {"same": chain_check(actor, reward, prompts(8), 1, actor),
           "dp2_to_dp4": chain_check(wide, actor, prompts(7, 1), 3, actor),
           "dp4_to_dp2": chain_check(actor, wide, prompts(6, 2), 2, actor),
           "pair_to_all": chain_check(pair, actor, prompts(5, 3), 2, actor),
           "right_to_all": chain_check(right, actor, prompts(6, 4), 1, actor),
           "meta": meta_check(actor, prompts(8)),
           "error": error_check(actor, reward, prompts(8)),
           "dropped": dropped_check(actor, prompts(8)),
           "balanced": [balanced_check(p, c, prompts(n, n), k)
                        for p, c, n, k in ((actor, wide, 9, 2), (pair, actor, 11, 1),
                                           (wide, reward, 6, 3))]}
    return out


def main2():
    pool = ResourcePool("both", (0, 1))
    actor = WorkerGroup(Stage, pool, ParallelDims(dp=2), name="actor")
    reward = WorkerGroup(Stage, pool, ParallelDims(dp=2), name="reward")
    far = WorkerGroup(Stage, ResourcePool("far", (1,)), name="far")     # rank 0 only produces
    near = WorkerGroup(Stage, ResourcePool("near", (0,)), name="near")  # rank 0 alone consumes
    out = {"same": chain_check(actor, reward, prompts(6), 2, actor),
           "to_far": chain_check(actor, far, prompts(5), 1, actor),
           "to_near": chain_check(actor, near, prompts(5), 2, actor)}
    not_batches = actor.stored(blocking=False)     # a list per rank: nothing to split or read
    out["not_batches"] = []
    for attempt in (lambda: reward.score(not_batches), lambda: not_batches.meta):
        try:
            attempt()
            out["not_batches"].append(None)
        except TypeError as err:
            out["not_batches"].append(str(err))
    return out


def run_main(rank, world, main):
    return hfrl.run(main)


def loss_bytes(rows_per_rank, remote_ranks):
    """Payload of the update's result from the other output ranks: one float32 column, each
    aligned to 16 bytes."""
    return remote_ranks * (-(-rows_per_rank * 4 // 16) * 16)


def test_chains_on_pools_with_rank_0_on_4_ranks():
    out = run_ranks(4, run_main, main4)[0]
    chains = ("same", "dp2_to_dp4", "dp4_to_dp2", "pair_to_all", "right_to_all")
    for name, check in out.items():
        if name in chains:
            assert all(check["equal"]), (name, check["equal"])
            # Rank 0 got statuses only while the step's non-blocking calls ran ...
            assert check["reply_payload_nonblocking"] == 0, (name, check)
    # ... then only the update's small result: dp=4, 8 rows (k=1) -> 2 floats per other rank.
    assert out["same"]["rank0_reply_payload"] == loss_bytes(2, 3)
    # Colocated roles of one layout: every row stayed where it was made.
    assert out["same"]["data_sent"] == [0, 0, 0, 0]
    # Across layouts rows moved between the workers, rank 0 one of them.
    for name in chains[1:]:
        assert out[name]["data_sent"][0] > 0, name
    # The consumer's Batch carries the meta of the producer's first output (rank 0's).
    assert set(out["pair_to_all"]["meta_rank"]) == {0}

    meta, result_meta, moved, blocking_meta = out["meta"]
    assert meta == result_meta == blocking_meta == {"producer_rank": 0, "gen_tokens": 12.5}
    assert moved == (0, 0)

    caught, then_equal = out["error"]
    assert caught == [(1, "fail_on", "no rows for rank 1")] * 4
    assert then_equal

    held, resolved, dropped = out["dropped"]
    assert held == (True, [True] * 4)
    assert resolved == (True, True)
    assert dropped == (False, [False] * 4)

    for chained, direct in out["balanced"]:
        assert chained == direct       # the same rows on the same ranks, in input order


def test_chains_on_pools_with_rank_0_on_2_ranks():
    out = run_ranks(2, run_main, main2)[0]
    split, meta = out.pop("not_batches")
    assert "pass future.result() instead" in split
    assert "did not return a Batch on rank 0" in meta
    for name, check in out.items():
        assert all(check["equal"]), (name, check["equal"])
        assert check["reply_payload_nonblocking"] == 0, (name, check)
    assert out["same"]["data_sent"] == [0, 0]
    assert out["same"]["rank0_reply_payload"] == loss_bytes(6, 1)
    assert out["to_far"]["data_sent"][0] > 0      # rank 0's rows went straight to rank 1
    assert out["to_near"]["data_sent"][1] > 0     # and rank 1's to rank 0
