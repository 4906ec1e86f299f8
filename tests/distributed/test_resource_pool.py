"""Placement plans: each mode's pools, and every bad placement's message."""
import pytest

from hfrl.config import load_config
from hfrl.distributed.resource_pool import build_plan


def plan(world, *overrides):
    cfg = load_config(None, list(overrides))
    return build_plan(cfg.placement, cfg.roles, world)


def test_colocate_puts_every_role_on_every_rank():
    p = plan(4, "roles.actor.tp=2")
    assert [r.role for r in p.roles] == ["actor", "critic", "ref", "reward"]
    assert {r.pool.ranks for r in p.roles} == {(0, 1, 2, 3)}
    assert p.role("actor").dims.dp == 2 and p.role("critic").dims.dp == 4


def test_split_and_standalone():
    p = plan(8, "placement.mode=split", "placement.pools={actor: 6, critic: 2}",
             "roles.actor.tp=2")
    assert p.role("actor").pool.ranks == (0, 1, 2, 3, 4, 5)
    assert p.role("ref").pool is p.role("actor").pool
    assert p.role("reward").pool.ranks == (6, 7)
    assert p.role("actor").dims.dp == 3
    s = plan(8, "placement.mode=standalone")
    assert [r.pool.ranks for r in s.roles] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert plan(4, "placement.mode=standalone", "roles.critic.enabled=false",
                "roles.reward.enabled=false").roles_on(3) == ["ref"]


def test_custom_pools_with_rank_lists():
    p = plan(4, "placement.mode=custom", "placement.pools={gen: [0, 2], score: [1, 3]}",
             "roles.actor.pool=gen", "roles.ref.pool=gen", "roles.critic.pool=score",
             "roles.reward.pool=score", "roles.actor.tp=2")
    assert p.role("actor").pool.ranks == (0, 2)
    assert p.to_dict()["roles"]["actor"]["groups"]["tp"] == [[0, 2]]
    assert p.roles_on(1) == ["critic", "reward"]


@pytest.mark.parametrize("overrides,world,match", [
    (["placement.mode=custom", "placement.pools={a: [0, 1, 2], b: [2, 3]}",
      "roles.actor.pool=a", "roles.critic.pool=b", "roles.ref.pool=a", "roles.reward.pool=b"],
     4, r"pools 'a' and 'b' overlap at rank 2"),
    (["placement.mode=custom", "placement.pools={a: [0, 1], b: [3, 2]}",
      "roles.actor.pool=a", "roles.critic.pool=b", "roles.ref.pool=a", "roles.reward.pool=b"],
     4, r"placement.pools.b=\[3, 2\]: list the ranks in ascending order \(\[2, 3\]\)"),
    (["placement.mode=split", "placement.pools={actor: 2, critic: 1}"], 4,
     r"cover 3 of 4 ranks; ranks \[3\] would sit idle"),
    (["placement.mode=split", "placement.pools={actor: 4, critic: 2}"], 4,
     r"rank 4, outside the world of 4"),
    (["placement.mode=standalone"], 6, r"6 ranks cannot be split evenly over pools"),
    (["placement.mode=colocate", "placement.pools={all: 4}"], 4, r"only for split"),
    (["placement.mode=ring"], 4, r"placement.mode='ring'"),
    (["placement.mode=custom", "placement.pools={a: 4}", "roles.actor.pool=a"], 4,
     r"roles.critic.pool is not set"),
    (["placement.mode=custom", "placement.pools={a: 4}", "roles.actor.pool=b"], 4,
     r"roles.actor.pool='b' is not a pool"),
    (["roles.actor.pool=a"], 4, r"only used with placement.mode=custom"),
    (["roles.actor.enabled=false"], 4, r"every algorithm needs an actor"),
    (["roles.critic.tp=3"], 4, r"roles.critic on pool 'all': pp=1 x tp=3 = 3 does not divide"),
    (["placement.mode=split", "placement.pools={actor: 2, judge: 2}"], 4,
     r"uses pools \['actor', 'critic'\], but placement.pools names \['actor', 'judge'\]"),
])
def test_bad_placements(overrides, world, match):
    with pytest.raises(ValueError, match=match):
        plan(world, *overrides)


def test_plan_is_plain_data_and_deterministic():
    a = plan(8, "roles.actor.tp=4", "roles.actor.tg=2").to_dict()
    b = plan(8, "roles.actor.tp=4", "roles.actor.tg=2").to_dict()
    assert a == b
    assert a["roles"]["actor"]["groups"]["micro_dp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert a["roles"]["actor"]["layout"] == {"pp": 1, "tp": 4, "dp": 2, "pg": 1, "tg": 2,
                                             "dg": 2, "grouping": "hybridflow"}


def test_pool_membership_is_indexed_and_pickles_small():
    import pickle

    from hfrl.distributed.resource_pool import ResourcePool

    pool = ResourcePool("all", tuple(range(0, 200000, 2)))
    size = len(pickle.dumps(pool))
    assert 199998 in pool and 3 not in pool and pool.positions[10] == 5
    copy = pickle.loads(pickle.dumps(pool))
    assert len(pickle.dumps(pool)) == size and copy == pool and 10 in copy   # no cached index sent
