"""The auto-mapper's analytic cost model: model shapes, device profiles, stage times, memory."""
import dataclasses
import json
import math
import os
from fractions import Fraction

import pytest

from hfrl.distributed.parallel_dims import ParallelDims
from hfrl.hybrid_engine.accounting import predict
from hfrl.mapping.cost_model import (GIB, MODES, GenLayout, TrainLayout, _sum_max_linear, decode_step_time,
                                     forward_time, gen_layouts, generation_cost, generation_time,
                                     inference_memory, min_devices, train_layouts, train_memory, train_time,
                                     transition_bytes, transition_time)
from hfrl.mapping.devices import PROFILES, DeviceProfile, get_profile, load_profile, save_profile
from hfrl.mapping.models import MODEL_SIZES, ModelSpec

A100 = PROFILES["a100-80gb"]
M7 = ModelSpec.from_name("7b")


# ---- models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name, published, exact", [
    ("7b", 6.74e9, 6_738_415_616), ("13b", 13.0e9, 13_015_864_320), ("70b", 69.0e9, 68_976_648_192)])
def test_llama2_parameter_counts(name, published, exact):
    model = ModelSpec.from_name(name.upper())
    assert abs(model.num_params - published) / published < 0.01
    assert model.num_params == exact  # the HF checkpoints' counts
    assert model.param_bytes() == 2 * exact and model.param_bytes(4) == 4 * exact


def test_value_head_and_flops():
    critic = M7.as_value_model()
    assert critic.value_head and critic.as_value_model() is critic
    assert M7.num_params - critic.num_params == 32000 * 4096 - 4096
    matmul = M7.num_params - 32000 * 4096 - (2 * 32 + 1) * 4096  # no embedding lookup, no norms
    assert M7.flops_per_token() == 2 * matmul
    assert M7.flops_per_token(1000) - M7.flops_per_token() == 4 * 32 * 4096 * 1000


def test_kv_bytes_per_token():
    assert M7.kv_bytes_per_token() == 2 * 32 * 32 * 128 * 2 == 512 * 1024
    assert MODEL_SIZES["70b"].kv_bytes_per_token() == 2 * 80 * 8 * 128 * 2  # GQA: 8 KV heads
    assert MODEL_SIZES["34b"].kv_bytes_per_token(4) == 2 * 48 * 8 * 128 * 4


def test_from_name_errors():
    with pytest.raises(ValueError, match=r"'1.3b', '13b', '34b', '70b', '7b'"):
        ModelSpec.from_name("8b")


def test_from_hf_config_round_trip(tmp_path):
    spec = MODEL_SIZES["70b"]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "num_hidden_layers": spec.num_layers, "hidden_size": spec.hidden_size,
           "intermediate_size": spec.intermediate_size, "num_attention_heads": spec.num_heads,
           "num_key_value_heads": spec.num_kv_heads, "vocab_size": spec.vocab_size,
           "tie_word_embeddings": False}
    folder = tmp_path / "70b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    for path in (str(folder), str(folder / "config.json")):
        assert ModelSpec.from_hf_config(path) == spec
    cfg.update(architectures=["LlamaForSequenceClassification"], tie_word_embeddings=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    assert ModelSpec.from_hf_config(str(folder)) == dataclasses.replace(
        spec, value_head=True, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="no config.json"):
        ModelSpec.from_hf_config(str(tmp_path / "missing"))


# ---- devices --------------------------------------------------------------------------------
def test_profiles_save_load_and_errors(tmp_path):
    assert get_profile("A100-80GB") is A100 and get_profile("h100-80gb").peak_flops == 989e12
    path = str(tmp_path / "mine.json")
    mine = dataclasses.replace(A100, name="mine", matmul_efficiency=0.4)
    save_profile(mine, path)
    assert load_profile(path) == mine and get_profile(path) == mine
    with pytest.raises(ValueError, match=r"unknown device 'v100'.*'a100-80gb', 'h100-80gb'"):
        get_profile("v100")
    with pytest.raises(ValueError, match="unknown keys"):
        DeviceProfile.from_dict({**A100.to_dict(), "tflops": 1})
    with pytest.raises(ValueError, match="matmul_efficiency"):
        dataclasses.replace(A100, matmul_efficiency=1.5)


# ---- training and inference -----------------------------------------------------------------
def test_train_time_single_device_is_compute_plus_optimizer():
    t = train_time(M7, TrainLayout(1, 1, 1), A100, num_seqs=4, seq_len=512, num_micro_batches=1)
    compute = 3 * M7.flops_per_token(512) * 4 * 512 / (312e12 * 0.5)
    optimizer = M7.num_params * 28 / (2.0e12 * 0.8)
    assert t == pytest.approx(compute + optimizer, rel=1e-12)
    assert forward_time(M7, TrainLayout(1, 1, 1), A100, num_seqs=4, seq_len=512,
                        num_micro_batches=1) == pytest.approx(compute / 3, rel=1e-12)


def test_train_time_scales_with_devices():
    kwargs = dict(num_seqs=256, seq_len=2048)
    t8 = train_time(M7, TrainLayout(1, 8, 1), A100, **kwargs)
    t16 = train_time(M7, TrainLayout(1, 8, 2), A100, **kwargs)
    t32 = train_time(M7, TrainLayout(1, 8, 4), A100, **kwargs)
    assert 1.8 < t8 / t16 < 2.0 and 1.8 < t16 / t32 < 2.0  # < 2: the added gradient all-reduce


def test_train_time_grows_with_tp_communication():
    layout, kwargs = TrainLayout(1, 8, 1), dict(num_seqs=8, seq_len=1024, num_micro_batches=1)
    slow = dataclasses.replace(A100, intra_node_bandwidth=A100.intra_node_bandwidth / 4)
    extra = train_time(M7, layout, slow, **kwargs) - train_time(M7, layout, A100, **kwargs)
    msg = 8 * 1024 * 4096 * 2  # tokens x hidden x bf16
    expected = 4 * 32 * 2 * 7 / 8 * msg * (4 - 1) / A100.intra_node_bandwidth
    assert extra == pytest.approx(expected, rel=1e-9)
    # tp over two nodes (16 > 8 per node) runs its all-reduces on InfiniBand
    assert train_time(M7, TrainLayout(1, 16, 1), A100, **kwargs) > 2 * train_time(M7, layout, A100, **kwargs)


def test_pipeline_bubble():
    kwargs = dict(num_seqs=8, seq_len=1024)
    fast_link = dataclasses.replace(A100, intra_node_bandwidth=1e30, collective_latency_s=0.0)
    base = forward_time(M7, TrainLayout(1, 1, 1), fast_link, **kwargs, num_micro_batches=4)
    piped = forward_time(M7, TrainLayout(2, 1, 1), fast_link, **kwargs, num_micro_batches=4)
    assert piped == pytest.approx(base / 2 * (4 + 1) / 4, rel=1e-9)
    with pytest.raises(ValueError, match="num_micro_batches=9"):
        forward_time(M7, TrainLayout(1, 1, 1), A100, **kwargs, num_micro_batches=9)


# ---- generation -----------------------------------------------------------------------------
def test_sum_max_linear_matches_loop():
    for a1, b1, a2, b2, n in [(5, -1, 0, 1, 10), (0, 1, 5, -1, 10), (1, 2, 1, 2, 7), (0, 1, 3.5, 0, 9),
                              (10, 0, 0, 0.1, 50), (0, 0.5, 100, 0.2, 40)]:
        assert _sum_max_linear(a1, b1, a2, b2, n) == pytest.approx(
            sum(max(a1 + b1 * i, a2 + b2 * i) for i in range(n)))


def test_decode_small_batch_is_memory_bound():
    weights_s = M7.param_bytes() / (2.0e12 * 0.8)
    step = decode_step_time(M7, GenLayout(1, 1), A100, batch_size=1, context_len=512)
    assert step == pytest.approx(weights_s, rel=0.1)
    cost = generation_cost(M7, TrainLayout(1, 8, 1), GenLayout(1, 8), A100, num_seqs=1, prompt_len=128,
                           response_len=256)
    assert cost.decode_s - cost.decode_comm_s == pytest.approx(256 * weights_s / 8, rel=0.1)
    assert cost.decode_memory_s > 10 * cost.decode_compute_s


def test_doubling_tg_halves_decode_memory_time():
    kwargs = dict(num_seqs=64, prompt_len=512, response_len=512)
    # both: 2 generation replicas of 32 sequences, one wave each
    c1 = generation_cost(M7, TrainLayout(1, 2, 1), GenLayout(1, 1), A100, **kwargs, train_state_resident=False)
    c2 = generation_cost(M7, TrainLayout(1, 4, 1), GenLayout(1, 2), A100, **kwargs, train_state_resident=False)
    assert c1.num_waves == c2.num_waves == 1 and c1.seqs_per_replica == c2.seqs_per_replica == 32
    assert c2.decode_memory_s == pytest.approx(c1.decode_memory_s / 2, rel=1e-9)
    assert c2.decode_s < c1.decode_s


def test_generation_waves_when_kv_cache_is_full():
    kwargs = dict(prompt_len=1024, response_len=1024)
    one = generation_cost(M7, TrainLayout(1, 8, 1), GenLayout(1, 8), A100, num_seqs=1, **kwargs)
    cap = one.max_concurrent
    full = generation_cost(M7, TrainLayout(1, 8, 1), GenLayout(1, 8), A100, num_seqs=cap, **kwargs)
    over = generation_cost(M7, TrainLayout(1, 8, 1), GenLayout(1, 8), A100, num_seqs=cap + 1, **kwargs)
    assert (full.num_waves, over.num_waves) == (1, 2)
    free = 80 * GIB * 0.9 - M7.param_bytes() / 8 - M7.num_params * (2 + 12) / 8
    assert cap == int(free // (2048 * M7.kv_bytes_per_token() / 8))
    assert generation_time(M7, TrainLayout(1, 8, 1), GenLayout(1, 8), A100, num_seqs=cap + 1,
                           **kwargs) == over.total_s > full.total_s


def test_generation_that_cannot_fit_names_what():
    with pytest.raises(ValueError, match=r"model '70b'.*TrainLayout\(pp=1, tp=8, dp=1\).*GenLayout"):
        generation_time(MODEL_SIZES["70b"], TrainLayout(1, 8, 1), GenLayout(1, 8), A100, num_seqs=8,
                        prompt_len=1024, response_len=1024)
    with pytest.raises(ValueError, match="tg must divide tp"):
        generation_time(M7, TrainLayout(1, 4, 1), GenLayout(1, 8), A100, num_seqs=1, prompt_len=8,
                        response_len=8)


# ---- 3D-HybridEngine transition -------------------------------------------------------------
@pytest.mark.parametrize("p, t, d, pg, tg", [
    (1, 8, 2, 1, 2), (1, 8, 2, 1, 8), (2, 4, 2, 1, 2), (2, 4, 4, 2, 4), (4, 8, 1, 2, 4), (1, 1, 16, 1, 1)])
def test_transition_volumes_equal_table2(p, t, d, pg, tg):
    train, gen = TrainLayout(p, t, d), GenLayout(pg, tg)
    M = M7.param_bytes()
    table2 = {"hybridflow": Fraction(t * p - tg * pg, tg * pg * t * p),
              "hybridflow_v": Fraction(t * p - 1, t * p), "ds_chat": Fraction(t * p * d - 1, t * p * d)}
    for mode in MODES:
        got = transition_bytes(M7, train, gen, mode)
        assert got == math.floor(table2[mode] * M)
        dims = ParallelDims(pp=p, tp=t, dp=d, pg=pg, tg=tg)
        assert got == predict(dims, mode).in_bytes(M)["received"]  # the engine's own accounting
    if tg * pg == t * p:
        assert transition_bytes(M7, train, gen) == 0 and transition_time(M7, train, gen, A100) == 0.0


def test_transition_time_uses_the_group_link():
    M = M7.param_bytes()
    # 1-8-2 -> tg=2: micro-DP groups of 4 consecutive ranks, inside a node
    t_in = transition_time(M7, TrainLayout(1, 8, 2), GenLayout(1, 2), A100)
    assert t_in == pytest.approx(M * 3 / 8 / 300e9 + 32 * 2e-5, rel=1e-9)
    # ds_chat gathers over all 16 ranks: two nodes, InfiniBand
    t_ds = transition_time(M7, TrainLayout(1, 8, 2), GenLayout(1, 2), A100, mode="ds_chat")
    assert t_ds == pytest.approx(M * 15 / 16 / 25e9 + 32 * 2e-5, rel=1e-6)


# ---- memory and minimal allocations ---------------------------------------------------------
def test_train_memory_7b():
    assert train_memory(M7, TrainLayout(1, 1, 1)) > A100.memory_bytes
    assert train_memory(M7, TrainLayout(1, 8, 1)) < A100.memory_bytes
    states = M7.num_params * 16 / 8
    assert states < train_memory(M7, TrainLayout(1, 8, 1)) < states + 2 * GIB
    zero1 = train_memory(M7, TrainLayout(1, 8, 4), zero_stage=1)
    assert train_memory(M7, TrainLayout(1, 8, 4)) - zero1 == pytest.approx(
        M7.num_params * 12 / 8 * 3 / 4, abs=2)
    assert train_memory(M7, TrainLayout(1, 8, 1), activation_checkpointing=False) > train_memory(
        M7, TrainLayout(1, 8, 1))
    assert inference_memory(M7, TrainLayout(1, 1, 1)) < A100.memory_bytes


def test_min_devices_monotone_in_model_size():
    sizes = ["1.3b", "7b", "13b", "34b", "70b"]
    for trainable in (True, False):
        counts = [min_devices(MODEL_SIZES[s], A100, trainable=trainable, seq_len=2048) for s in sizes]
        assert counts == sorted(counts), counts
    assert min_devices(MODEL_SIZES["70b"], A100, trainable=True, seq_len=2048) == 16
    huge = dataclasses.replace(MODEL_SIZES["70b"], name="huge", num_layers=4, hidden_size=65536,
                               intermediate_size=262144, num_heads=512, num_kv_heads=8)
    with pytest.raises(ValueError, match="'huge'.*does not fit a100-80gb"):
        min_devices(huge, A100, trainable=True, seq_len=2048)


def test_layout_enumeration():
    layouts = train_layouts(M7, 16, A100)
    assert {(l.pp, l.tp, l.dp) for l in layouts} == {
        (p, t, 16 // (p * t)) for t in (1, 2, 4, 8) for p in (1, 2, 4, 8, 16) if p * t <= 16}
    assert all(l.num_devices == 16 for l in layouts)
    assert {(g.pg, g.tg) for g in gen_layouts(M7, TrainLayout(2, 4, 2))} == {
        (pg, tg) for pg in (1, 2) for tg in (1, 2, 4)}


@pytest.mark.slow
def test_calibrate_this_machine(tmp_path):
    from hfrl.mapping.calibration import calibrate

    profile = calibrate(0.3, reps=2)
    assert profile.name == "this-machine" and profile.devices_per_node == (os.cpu_count() or 1)
    assert profile.call_overhead_s > 0 and profile.decode_step_overhead_s + profile.decode_layer_overhead_s > 0
    assert profile.layer_overhead_s + profile.pass_overhead_s > 0
    assert profile.peak_flops > 1e8 and profile.mem_bandwidth > 1e8 and profile.intra_node_bandwidth > 1e6
    save_profile(profile, str(tmp_path / "p.json"))
    assert get_profile(str(tmp_path / "p.json")) == profile


# ---- fixed costs (a calibrated CPU's overheads) ----------------------------------------------
OVERHEADS = dict(call_overhead_s=1e-3, pass_overhead_s=2e-3, layer_overhead_s=3e-4, train_pass_overhead_s=5e-3,
                 train_layer_overhead_s=7e-4, decode_step_overhead_s=1.1e-3, decode_layer_overhead_s=1.3e-4,
                 optimizer_step_overhead_s=1.7e-2, optimizer_layer_overhead_s=1.9e-3, dp_sync_overhead_s=2.3e-3)
SLOW = dataclasses.replace(A100, **OVERHEADS)


def test_fixed_costs_add_per_event():
    """Each overhead is paid once per event it names: micro-batch x stage slot, layer, optimizer step,
    decode step; nothing else moves."""
    layout = TrainLayout(2, 1, 2)          # pp 2: 16 layers per stage, 1F1B slots m + pp - 1
    kw = dict(num_seqs=16, seq_len=256, num_micro_batches=2)
    slots, layers = 2 + 2 - 1, 16
    extra = forward_time(M7, layout, SLOW, **kw) - forward_time(M7, layout, A100, **kw)
    assert extra == pytest.approx(slots * (2e-3 + layers * 3e-4), rel=1e-9)
    extra = train_time(M7, layout, SLOW, **kw, optimizer_steps=2) - train_time(M7, layout, A100, **kw,
                                                                               optimizer_steps=2)
    assert extra == pytest.approx(2 * (slots * (5e-3 + layers * 7e-4) + 1.7e-2 + layers * 1.9e-3 + 2.3e-3), rel=1e-9)
    solo = TrainLayout(2, 2, 1)          # dp 1: no data-parallel sync
    extra = train_time(M7, solo, SLOW, **kw) - train_time(M7, solo, A100, **kw)
    assert extra == pytest.approx(slots * (5e-3 + layers * 7e-4) + 1.7e-2 + layers * 1.9e-3, rel=1e-9)
    gen_kw = dict(num_seqs=4, prompt_len=64, response_len=100)
    fast = generation_cost(M7, TrainLayout(1, 8, 1), GenLayout(1, 8), A100, **gen_kw)
    slow = generation_cost(M7, TrainLayout(1, 8, 1), GenLayout(1, 8), SLOW, **gen_kw)
    assert fast.num_waves == slow.num_waves == 1 and fast.decode_overhead_s == 0
    assert slow.decode_overhead_s == pytest.approx(100 * (1.1e-3 + 32 * 1.3e-4), rel=1e-12)
    assert slow.prefill_s - fast.prefill_s == pytest.approx(2e-3 + 32 * 3e-4, rel=1e-9)  # one pass per wave
    assert slow.total_s - fast.total_s == pytest.approx(slow.decode_overhead_s + 2e-3 + 32 * 3e-4, rel=1e-9)


def test_optimizer_steps_split_the_batch():
    """k optimizer steps over the batch: the same FLOPs, k gradient syncs and k optimizer updates."""
    layout, kw = TrainLayout(1, 1, 4), dict(num_seqs=64, seq_len=512, num_micro_batches=1)
    one, four = train_time(M7, layout, A100, **kw), train_time(M7, layout, A100, **kw, optimizer_steps=4)
    sync_and_update = train_time(M7, layout, A100, num_seqs=4, seq_len=1, num_micro_batches=1) \
        - 3 * M7.flops_per_token(1) * 1 / (312e12 * 0.5)
    assert four - one == pytest.approx(3 * sync_and_update, rel=1e-6)
    for bad in (0, 65, 1.5):
        with pytest.raises(ValueError, match="optimizer_steps"):
            train_time(M7, layout, A100, **kw, optimizer_steps=bad)


def test_oversubscribed_profile_time_shares_the_cores():
    cpu = dataclasses.replace(A100, name="cpu", devices_per_node=2, **OVERHEADS)
    assert cpu.oversubscribed(1) is cpu and cpu.oversubscribed(2) is cpu
    four = cpu.oversubscribed(4)
    assert four.devices_per_node == 4 and four.peak_flops == cpu.peak_flops / 2
    assert four.mem_bandwidth == cpu.mem_bandwidth / 2 and four.intra_node_bandwidth == cpu.intra_node_bandwidth / 2
    assert four.layer_overhead_s == 2 * cpu.layer_overhead_s and four.call_overhead_s == 2e-3
    assert four.collective_latency_s == 2 * cpu.collective_latency_s
    kw = dict(num_seqs=8, seq_len=128, num_micro_batches=1)   # one device each: everything doubles
    assert forward_time(M7, TrainLayout(1, 1, 1), four, **kw) == pytest.approx(
        2 * forward_time(M7, TrainLayout(1, 1, 1), cpu, **kw), rel=1e-12)
    with pytest.raises(ValueError, match="processes"):
        cpu.oversubscribed(0)
    with pytest.raises(ValueError, match="layer_overhead_s"):
        dataclasses.replace(cpu, layer_overhead_s=-1.0)


def test_fit_overheads_recovers_known_costs():
    """Probe times built from known overheads (plus the probes' own compute at the roofs) give those
    overheads back: the calibration's algebra, without timing anything."""
    pytest.importorskip("torch")
    from hfrl.mapping.calibration import DECODE_STEPS, PROBE_BATCH, PROBE_DEPTHS, PROBE_SHAPE, TRAIN_MICRO_BATCHES, \
        fit_overheads

    peak, bandwidth = 5e10, 1e10
    seqs, tokens = PROBE_BATCH
    shape = dict(PROBE_SHAPE)
    specs = {d: ModelSpec(f"probe{d}", d, shape["hidden_size"], shape["intermediate_size"], shape["num_heads"],
                          shape["num_kv_heads"], shape["vocab_size"]) for d in PROBE_DEPTHS}
    o = OVERHEADS
    measured, solo = {}, {}
    for d, spec in specs.items():
        flops = spec.flops_per_token(tokens) * seqs * tokens / peak
        micro = o["train_pass_overhead_s"] + d * o["train_layer_overhead_s"]
        opt = o["optimizer_step_overhead_s"] + d * o["optimizer_layer_overhead_s"]
        roof = max(spec.param_bytes(4) / bandwidth, seqs * 2 * spec.matmul_params / peak)
        step = o["decode_step_overhead_s"] + d * o["decode_layer_overhead_s"] + roof
        measured[d] = {"forward": flops + 2 * (o["pass_overhead_s"] + d * o["layer_overhead_s"]),
                       **{f"train_{k}": 3 * flops + k * micro + opt for k in TRAIN_MICRO_BATCHES},
                       **{f"generate_{k}": 0.05 + k * step for k in DECODE_STEPS}}
        solo[d] = {f"train_{k}": 3 * flops + k * micro + opt for k in TRAIN_MICRO_BATCHES}
        for k in TRAIN_MICRO_BATCHES:   # two data-parallel ranks: each step pays the sync
            measured[d][f"train_{k}"] += o["dp_sync_overhead_s"]
    fitted = fit_overheads(measured, specs, peak, bandwidth, solo=solo)
    assert fitted == pytest.approx({k: v for k, v in o.items() if k != "call_overhead_s"}, rel=1e-9)
    without = fit_overheads(measured, specs, peak, bandwidth)   # no solo times: the sync sits in the optimizer
    assert "dp_sync_overhead_s" not in without
    assert without["optimizer_step_overhead_s"] == pytest.approx(1.7e-2 + 2.3e-3, rel=1e-9)
