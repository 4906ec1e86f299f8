"""The 3D-HybridEngine on real processes (gloo): for every valid layout on 4 and 8 ranks and every mode,
each rank's generation weights are the slices of the full model its generation coordinates own, the
bytes moved and held are Table 2's, nothing is stored twice, and generation after resharding (and
after a training step) equals the full model's."""
import itertools
from fractions import Fraction

import pytest
import torch

from hfrl.distributed.parallel_dims import GroupCache, ParallelDims, build_groups
from hfrl.engine.train_engine import EngineConfig, TrainEngine
from hfrl.hybrid_engine import plan
from hfrl.hybrid_engine.accounting import predict
from hfrl.hybrid_engine.engine import HybridEngine
from hfrl.models import weights
from hfrl.models.config import ModelConfig
from tests.multiproc import run_ranks

MODES_BY_GROUPING = {"hybridflow": ("hybridflow", "ds_chat"), "vanilla": ("hybridflow_v",)}


def layouts(world_size):
    """Every (pp, tp, pg, tg) whose pp * tp divides the world (dp the rest), model limits aside."""
    for pp, tp in itertools.product([1, 2, 4, 8], repeat=2):
        if world_size % (pp * tp) == 0:
            for pg, tg in itertools.product([d for d in range(1, pp + 1) if pp % d == 0],
                                            [d for d in range(1, tp + 1) if tp % d == 0]):
                yield pp, tp, pg, tg


def _full_state(path):
    config = ModelConfig.from_pretrained(path)
    return config, weights.hf_to_hfrl(weights.load_hf_state_dict(path), config)


def _expected(spec, full, hybrid):
    """What this rank's generation tensors of ``spec`` must be."""
    dims, coord = hybrid.dims, hybrid.coord
    if spec.shard == "replicated":
        return [full]
    if hybrid.mode == "hybridflow":
        st = dims.tp // dims.tg
        return [weights.shard_tensor(spec, full, coord.gen_tp * st + u, dims.tp, replicate_kv_heads=True)
                for u in range(st)]
    return [weights.shard_tensor(spec, full, coord.gen_tp, dims.tg, replicate_kv_heads=True)]


def _check(hybrid, full_sd, pieces_bytes):
    """Compare one transition with the full model and Table 2; returns a short record."""
    dims, config, es = hybrid.dims, hybrid.config, hybrid.element_size
    got = hybrid.generation_weights()
    for gs in hybrid.specs:
        want = _expected(gs.spec, full_sd[gs.spec.name], hybrid)
        assert len(got[gs.spec.name]) == len(want), gs.spec.name
        for g, w in zip(got[gs.spec.name], want):
            assert torch.equal(g, w), (gs.spec.name, hybrid.mode, dims.describe())
    t = hybrid.last
    all_specs = plan.generation_specs(config, ParallelDims(pp=dims.pp, tp=dims.tp, dp=dims.dp), 0)
    m_sharded, m_replicated = plan.model_bytes_of(all_specs, dims.tp, es)
    # Table 2 assumes stages of equal size: one stage, or two with untied embeddings (embedding and head alike)
    balanced = dims.pp == 1 or (dims.pp == 2 and not config.tie_word_embeddings)
    if hybrid.mode == "hybridflow":
        # replicated tensors come over once from the first TP rank of their stage when pipeline stages
        # are gathered (all-gather: the stage's other ranks get them too)
        st, sp = dims.tp // dims.tg, dims.pp // dims.pg
        other = sum(plan.numel(gs.spec.shape) * es for gs in hybrid.specs if not gs.sharded and sp > 1
                    and (gs.stage != hybrid.coord.pp or hybrid.coord.tp % st != 0))
        gen_replicated = sum(plan.numel(gs.spec.shape) * es for gs in hybrid.specs if not gs.sharded)
        # received: every piece of the generation shard but this rank's own
        own = sum(pieces_bytes[gs.spec.name] for gs in hybrid.specs if gs.sharded and gs.stage == hybrid.coord.pp)
        want = sum(pieces_bytes[gs.spec.name] * st for gs in hybrid.specs if gs.sharded) - own + other
        assert t.received == want, (dims.describe(), hybrid.coord, t, want, own, other)
        if balanced:  # Table 2 exactly, M = the sharded bytes of one training replica
            cost = predict(dims, "hybridflow")
            assert t.received == cost.received * m_sharded + other
            # held: M / (tg pg), the replicated tensors, the padding received, and the copies of this
            # stage's replicated tensors that the all-gather brings along (sp > 1, not the stage's first TP rank)
            same_stage = sum(plan.numel(gs.spec.shape) * es for gs in hybrid.specs if not gs.sharded and sp > 1
                             and gs.stage == hybrid.coord.pp and hybrid.coord.tp % st != 0)
            assert hybrid.resident_gen == cost.resident * m_sharded + gen_replicated + same_stage
        assert t.wire == t.received  # no padding: unequal contributions are broadcast at their own sizes
        # zero redundancy: every training parameter is a generation tensor (same storage), but the
        # tied head's training copy (pp > 1) when the generation stage has the embedding it is tied to
        gen_storage = {x.untyped_storage().data_ptr() for x in hybrid.generation_tensors()}
        used = {id(hybrid._train[gs.spec.name]) for gs in hybrid.specs if gs.spec.name in hybrid._train}
        idle = {name for name, p in hybrid._train.items() if id(p) not in used}
        assert idle <= {"lm_head.weight"}, idle
        for name, p in hybrid._train.items():
            assert (p.untyped_storage().data_ptr() in gen_storage) == (name not in idle), name
        assert hybrid.redundant_gen == sum(hybrid._train[name].nbytes for name in idle)
    else:
        n = dims.tp * dims.pp * (dims.dp if hybrid.mode == "ds_chat" else 1)
        replica = sum(sum(plan.numel(plan.shard_shape(gs.spec, 0, dims.tp)) for gs in
                          plan.training_specs(config, dims, s)) for s in range(dims.pp)) * dims.tp * es
        assert t.wire >= t.received
        if dims.pp == 1:  # one stage: no padding between members, Table 2 exactly (M: one replica's shards)
            assert t.received == Fraction(n - 1, n) * replica
        # the whole model passes through this rank, and its training shard stays beside the generation one
        train_bytes = sum(p.nbytes for p in {id(p): p for p in hybrid._train.values()}.values())
        assert hybrid.redundant_gen == train_bytes
        assert t.peak >= replica + train_bytes
    return dict(received=t.received, resident=hybrid.resident_gen)


def sweep_body(rank, world_size, path):
    torch.manual_seed(0)
    config, full_sd = _full_state(path)
    cache, records, engines = GroupCache(), {}, {}
    pieces_bytes = {}
    for pp, tp, pg, tg in layouts(world_size):
        if tp > config.num_heads or pp > config.num_layers:
            continue
        if (pp, tp) not in engines:  # one engine per training layout; each generation layout reuses it
            dims = ParallelDims.create(world_size, pp=pp, tp=tp)
            engines = {(pp, tp): TrainEngine(EngineConfig(model_path=str(path)),
                                             build_groups("actor", dims, tuple(range(world_size)), rank, cache))}
            pieces_bytes = {spec.name: plan.numel(plan.shard_shape(spec, 0, tp)) * 4
                            for spec in weights.param_plan(config)}
        engine = engines[(pp, tp)]
        for grouping, modes in MODES_BY_GROUPING.items():
            if grouping == "vanilla" and (pg, tg) == (pp, tp):
                continue  # the same groups as hybridflow: nothing new
            dims = ParallelDims.create(world_size, pp=pp, tp=tp, pg=pg, tg=tg, grouping=grouping)
            groups = build_groups("actor", dims, tuple(range(world_size)), rank, cache)
            for mode in modes:
                hybrid = HybridEngine(engine, mode=mode, bucket_mb=0.01, groups=groups)
                before = hybrid.resident_bytes()
                with hybrid.generation():
                    records[(pp, tp, pg, tg, mode)] = _check(hybrid, full_sd, pieces_bytes)
                assert hybrid.resident_bytes() == before == hybrid.resident_train
    return records


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out = {}
    # 8 heads, 2 kv heads (replicated over tp 4 and 8), 8 layers (pp 8), an odd vocabulary (padding)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=8,
                                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=False))
    out["llama"] = tmp_path_factory.mktemp("llama")
    llama.save_pretrained(out["llama"])
    # biases on q/k/v, tied embeddings
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=67, hidden_size=32, intermediate_size=32, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                        tie_word_embeddings=True))
    with torch.no_grad():
        for name, p in qwen.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    out["qwen"] = tmp_path_factory.mktemp("qwen")
    qwen.save_pretrained(out["qwen"])
    return out


def _cases(world_size, config):
    count = 0
    for pp, tp, pg, tg in layouts(world_size):
        if tp <= config["num_attention_heads"] and pp <= config["num_hidden_layers"]:
            count += 2 + ((pg, tg) != (pp, tp))
    return count


def test_every_layout_on_4_ranks(checkpoints):
    """Qwen2: q/k/v biases, tied embeddings, an odd vocabulary (padding)."""
    records = run_ranks(4, sweep_body, checkpoints["qwen"], init=True, timeout=300)
    assert len(records[0]) == _cases(4, dict(num_attention_heads=4, num_hidden_layers=4)) == 39


def test_every_layout_on_8_ranks(checkpoints):
    """Llama: GQA with kv heads replicated over tp 4 and 8, untied embeddings (so Table 2 holds exactly
    for pp <= 2, whose stages are then equal), pp up to 8."""
    records = run_ranks(8, sweep_body, checkpoints["llama"], init=True, timeout=600)
    assert len(records[0]) == _cases(8, dict(num_attention_heads=8, num_hidden_layers=8)) == 35 * 2 + 25
