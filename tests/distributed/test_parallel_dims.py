"""Layouts: validation, the paper's groupings, and the zero-redundancy property."""
import itertools

import pytest

from hfrl.distributed.parallel_dims import AXES, ParallelDims


def test_paper_figure8_hybridflow_grouping():
    # HybridFlow §5.3: training TP [G1..G4] with tg=2 -> generation TP at stride 2, micro-DP
    # groups of consecutive ranks.
    dims = ParallelDims.create(4, tp=4, tg=2)
    assert dims.dg == 2
    assert dims.groups("gen_tp") == [[0, 2], [1, 3]]
    assert dims.groups("micro_dp") == [[0, 1], [2, 3]]


def test_paper_figure8_vanilla_grouping():
    dims = ParallelDims.create(4, tp=4, tg=2, grouping="vanilla")
    assert dims.groups("gen_tp") == [[0, 1], [2, 3]]
    assert dims.groups("micro_dp") == [[0, 2], [1, 3]]


def test_megatron_rank_order():
    dims = ParallelDims.create(8, pp=2, tp=2)   # dp inferred = 2
    assert dims.dp == 2
    assert dims.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.groups("mp") == [[0, 1, 4, 5], [2, 3, 6, 7]]


LAYOUTS = [(pp, tp, dp, pg, tg)
           for pp, tp, dp in itertools.product((1, 2, 4), (1, 2, 4, 8), (1, 2, 3))
           for pg in (1, 2, 4) for tg in (1, 2, 4, 8) if pp % pg == 0 and tp % tg == 0]


@pytest.mark.parametrize("grouping", ["hybridflow", "vanilla"])
def test_every_axis_partitions_the_pool(grouping):
    for pp, tp, dp, pg, tg in LAYOUTS:
        dims = ParallelDims(pp=pp, tp=tp, dp=dp, pg=pg, tg=tg, grouping=grouping)
        sizes = {"tp": tp, "pp": pp, "dp": dp, "mp": pp * tp, "gen_tp": tg, "gen_pp": pg,
                 "micro_dp": dims.dg, "gen_mp": pg * tg, "role": pp * tp * dp}
        for axis in AXES:
            groups = dims.groups(axis)
            flat = sorted(r for g in groups for r in g)
            assert flat == list(range(dims.world_size)), (dims, axis)
            assert {len(g) for g in groups} == {sizes[axis]}, (dims, axis)


def _training_shard(dims, index):
    c = dims.coord(index)
    return (c.pp, c.tp)   # which (stage, TP shard) of the weights this rank trains


def _generation_shard(dims, index):
    # The weights a generation rank needs: layers of its generation stage, its generation TP
    # slice, expressed as the set of training (stage, shard) blocks they consist of.
    c = dims.coord(index)
    sp, st = dims.pp // dims.pg, dims.tp // dims.tg
    return {(p, t) for p in range(c.gen_pp * sp, (c.gen_pp + 1) * sp)
            for t in range(c.gen_tp * st, (c.gen_tp + 1) * st)}


def test_hybridflow_grouping_has_zero_redundancy():
    for pp, tp, dp, pg, tg in LAYOUTS:
        dims = ParallelDims(pp=pp, tp=tp, dp=dp, pg=pg, tg=tg)
        for group in dims.groups("micro_dp"):
            # The micro-DP group's training shards are exactly one generation shard, and every
            # member's own training shard lies inside it: the all-gather needs no extra copy.
            held = {_training_shard(dims, i) for i in group}
            for i in group:
                assert _generation_shard(dims, i) == held, (dims, group)
                assert _training_shard(dims, i) in _generation_shard(dims, i)


def _redundant_blocks(dims, index):
    """Training blocks rank ``index`` holds while generating beyond its generation shard.

    A rank keeps its own training shard through generation (it resumes training with it); the
    shard costs extra memory exactly when it is not part of the generation shard it gathers.
    """
    return {_training_shard(dims, index)} - _generation_shard(dims, index)


def test_vanilla_grouping_is_redundant_when_resharding():
    # Figure 8, HybridFlow-V: rank 1 trains shard 1 but generates with {2, 3}, rank 2 trains 2 and
    # generates with {0, 1}: each stores one training shard twice; ranks 0 and 3 need no copy.
    dims = ParallelDims(tp=4, tg=2, grouping="vanilla")
    assert [_redundant_blocks(dims, i) for i in range(4)] == [set(), {(0, 1)}, {(0, 2)}, set()]
    assert _generation_shard(dims, 1) == {(0, 2), (0, 3)} and _generation_shard(dims, 2) == {(0, 0), (0, 1)}
    for pp, tp, dp, pg, tg in LAYOUTS:
        vanilla = ParallelDims(pp=pp, tp=tp, dp=dp, pg=pg, tg=tg, grouping="vanilla")
        hybrid = ParallelDims(pp=pp, tp=tp, dp=dp, pg=pg, tg=tg)
        st, sp = tp // tg, pp // pg
        redundant = [i for i in range(vanilla.world_size) if _redundant_blocks(vanilla, i)]
        # Vanilla gives training TP rank t the generation TP rank t % tg, whose blocks are
        # [t % tg * st, (t % tg + 1) * st); likewise stage p generates with stages of p % pg.
        expected = [i for i in range(vanilla.world_size)
                    if vanilla.coord(i).tp // st != vanilla.coord(i).tp % tg
                    or vanilla.coord(i).pp // sp != vanilla.coord(i).pp % pg]
        assert redundant == expected, (vanilla, redundant)
        # Redundancy exactly when some axis reshards to a degree other than 1 (all in one shard)
        # or the training degree (nothing moves); each such rank holds 1/(pp*tp) of M extra.
        assert bool(redundant) == (1 < tg < tp or 1 < pg < pp), vanilla
        assert all(len(_redundant_blocks(vanilla, i)) == 1 for i in redundant)
        assert not any(_redundant_blocks(hybrid, i) for i in range(hybrid.world_size)), hybrid


def test_coordinates_and_generation_replicas():
    dims = ParallelDims(pp=2, tp=4, dp=2, pg=1, tg=2)
    assert dims.dg == 4 and dims.num_gen_replicas == 8
    replicas = sorted({dims.coord(i).gen_replica(dims.dg) for i in range(dims.world_size)})
    assert replicas == list(range(8))
    c = dims.coord(13)   # pp=1, dp=1, tp=1
    assert (c.pp, c.dp, c.tp) == (1, 1, 1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_ranks=6, tp=4), r"pp=1 x tp=4 = 4 does not divide the pool of 6"),
    (dict(num_ranks=8, tp=2, pp=2, dp=3), r"pp=2 x tp=2 x dp=3 = 12 but the pool has 8"),
    (dict(num_ranks=4, tp=4, tg=3), r"tg=3 must divide training tp=4.*\[1, 2, 4\].*valid generation layouts are "
                                    r"\(pg=1, tg=1\), \(pg=1, tg=2\), \(pg=1, tg=4\)$"),
    (dict(num_ranks=4, pp=4, pg=3), r"pg=3 must divide training pp=4.*\(pg=2, tg=1\), \(pg=4, tg=1\)$"),
    (dict(num_ranks=4, tp=0), r"tp=0 must be a positive integer"),
    (dict(num_ranks=4, tp=2, grouping="dschat"), r"grouping='dschat'"),
])
def test_bad_degrees(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelDims.create(**kwargs)


def test_heads_must_split_over_tp_and_tg():
    ParallelDims.create(8, tp=8, tg=4).check_model(num_heads=32, num_kv_heads=8)
    ParallelDims.create(8, tp=8).check_model(num_heads=32, num_kv_heads=2)   # kv replicated
    with pytest.raises(ValueError, match=r"tp=8 does not divide the model's 12 attention heads"):
        ParallelDims.create(8, tp=8).check_model(num_heads=12, num_kv_heads=12)
    with pytest.raises(ValueError, match=r"tg=4 and the model's 6 key/value heads"):
        ParallelDims.create(12, tp=12, tg=4).check_model(num_heads=12, num_kv_heads=6)


def _reference_groups(dims, axis):
    # The definition, by brute force over coordinates: a group shares every other coordinate;
    # members are ordered by their coordinate along the axis.
    key = {"tp": ("pp", "dp"), "pp": ("dp", "tp"), "dp": ("pp", "tp"), "mp": ("dp",),
           "gen_tp": ("dp", "micro", "gen_pp"), "gen_pp": ("dp", "micro", "gen_tp"),
           "micro_dp": ("dp", "gen_pp", "gen_tp"), "gen_mp": ("dp", "micro"), "role": ()}[axis]
    order = {"tp": ("tp",), "pp": ("pp",), "dp": ("dp",), "mp": ("pp", "tp"),
             "gen_tp": ("gen_tp",), "gen_pp": ("gen_pp",), "micro_dp": ("micro",),
             "gen_mp": ("gen_pp", "gen_tp"), "role": ("pp", "dp", "tp")}[axis]
    buckets = {}
    for i in range(dims.world_size):
        c = dims.coord(i)
        buckets.setdefault(tuple(getattr(c, k) for k in key), []).append(
            (tuple(getattr(c, k) for k in order), i))
    return sorted(([i for _, i in sorted(m)] for m in buckets.values()), key=lambda g: g[0])


@pytest.mark.parametrize("grouping", ["hybridflow", "vanilla"])
def test_arithmetic_groups_match_the_coordinate_definition(grouping):
    for pp, tp, dp, pg, tg in LAYOUTS + [(6, 12, 5, 3, 4), (4, 6, 1, 2, 3)]:
        dims = ParallelDims(pp=pp, tp=tp, dp=dp, pg=pg, tg=tg, grouping=grouping)
        for axis in AXES:
            assert dims.groups(axis) == _reference_groups(dims, axis), (dims, axis)


def test_groups_of_a_100000_rank_pool_are_fast():
    import time

    dims = ParallelDims.create(100000, pp=5, tp=8, tg=2)
    start = time.perf_counter()
    groups = {axis: dims.groups(axis) for axis in AXES}
    elapsed = time.perf_counter() - start
    assert groups["gen_tp"][:3] == [[0, 4], [1, 5], [2, 6]] and len(groups["gen_tp"]) == 50000
    assert groups["pp"][0] == [0, 20000, 40000, 60000, 80000]
    assert elapsed < 5, elapsed    # generous for a loaded 2-core machine: 0.4 s here, 7 s before


def test_group_of_is_the_group_holding_the_position():
    for pp, tp, dp, pg, tg in LAYOUTS[::3]:
        for grouping in ("hybridflow", "vanilla"):
            dims = ParallelDims(pp=pp, tp=tp, dp=dp, pg=pg, tg=tg, grouping=grouping)
            for axis in AXES:
                for group in dims.groups(axis):
                    for i in group:
                        assert dims.group_of(axis, i) == group, (dims, axis, i)
