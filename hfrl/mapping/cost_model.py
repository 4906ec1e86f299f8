"""Analytic latency and memory of one role's stages under a parallel layout (HybridFlow §7).

The paper's auto-mapper scores each candidate placement with a simulator of training, inference and
generation built on two facts, which this module turns into formulas (seconds, bytes):

- training and inference passes are compute-bound: FLOPs / (devices * peak * efficiency), plus
  tensor-parallel all-reduces, the pipeline bubble, and (training) the data-parallel gradient sync;
- generation is memory-bound: each decode step streams the weights and the KV cache of the batch,
  and the KV cache left after weights (and the actor's resident training state) caps the batch.

Shared assumptions (stated once, used everywhere):

- no overlap of communication with compute (a conservative upper bound on time);
- ring collectives: an all-reduce moves 2(n-1)/n of the message per rank, an all-gather (n-1)/n of
  its output, each plus one `collective_latency_s`; a group whose ranks lie in one node uses
  `intra_node_bandwidth`, otherwise the slower `inter_node_bandwidth`;
- ranks in hfrl's order (tp fastest, then dp, then pp: see hfrl/distributed/parallel_dims.py), pools
  aligned to node boundaries, so a group spanning positions [0, span) is intra-node iff span <= devices
  per node;
- bf16 weights, gradients and activations (dtype_bytes=2); Adam with fp32 master weights and two
  fp32 moments (12 bytes/parameter); no sequence parallelism; flash attention (no s^2 activations);
- every response runs to `response_len` tokens (no early EOS), so the KV cache of a sequence is
  reserved for prompt_len + response_len tokens;
- fixed costs (the profile's `*_overhead_s`: framework dispatch, kernel launches) are paid per event
  (micro-batch pass, decoder layer, decode step, optimizer step) and add to the FLOP and byte terms;
  they are 0 in the datasheet profiles and most of the time of a calibrated CPU's small models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from hfrl.mapping.devices import GIB, DeviceProfile
from hfrl.mapping.models import ModelSpec

MODES = ("hybridflow", "hybridflow_v", "ds_chat")
ADAM_BYTES_PER_PARAM = 12        # fp32 master weight + two fp32 moments
OPTIMIZER_TRAFFIC_PER_PARAM = 28  # Adam step reads grad 2 + master/m/v 12, writes master/m/v 12 + param 2
GEN_WORKSPACE_FRACTION = 0.1     # memory kept free while generating (vLLM's gpu_memory_utilization=0.9)


@dataclass(frozen=True)
class TrainLayout:
    """Training layout of one role: pipeline, tensor and data parallel degrees."""

    pp: int
    tp: int
    dp: int

    def __post_init__(self) -> None:
        _check_degrees(self, ("pp", "tp", "dp"))

    @property
    def num_devices(self) -> int:
        return self.pp * self.tp * self.dp


@dataclass(frozen=True)
class GenLayout:
    """Generation layout on the same devices: each generation replica has pg x tg devices and each
    training replica holds dg = pp*tp / (pg*tg) of them (tg must divide tp, pg divide pp)."""

    pg: int
    tg: int

    def __post_init__(self) -> None:
        _check_degrees(self, ("pg", "tg"))

    @property
    def per_replica_devices(self) -> int:
        return self.pg * self.tg

    def dg(self, train: TrainLayout) -> int:
        """Generation replicas per training replica (the micro-DP group size); checks divisibility."""
        if train.tp % self.tg or train.pp % self.pg:
            raise ValueError(f"generation layout (pg={self.pg}, tg={self.tg}) does not fit training "
                             f"layout (pp={train.pp}, tp={train.tp}): tg must divide tp and pg divide pp")
        return (train.pp * train.tp) // (self.pg * self.tg)


def _check_degrees(obj, names) -> None:
    for name, value in ((n, getattr(obj, n)) for n in names):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(obj).__name__}: {name}={value!r} must be a positive integer")


# ---- communication primitives ---------------------------------------------------------------
def _link(device: DeviceProfile, span: int) -> float:
    """Bytes/s per device for a group covering `span` consecutive rank positions."""
    return device.intra_node_bandwidth if span <= device.devices_per_node else device.inter_node_bandwidth


def _all_reduce(device: DeviceProfile, nbytes: float, n: int, span: int) -> float:
    """Seconds of one ring all-reduce of `nbytes` over `n` ranks (0 for a group of one)."""
    if n <= 1:
        return 0.0
    return device.collective_latency_s + 2 * (n - 1) / n * nbytes / _link(device, span)


def _p2p(device: DeviceProfile, nbytes: float, span: int) -> float:
    """Seconds of one point-to-point send of `nbytes` between ranks `span - 1` positions apart."""
    return device.collective_latency_s + nbytes / _link(device, span)


# ---- training and inference passes ----------------------------------------------------------
def _pipeline_pass(model, layout, device, num_seqs, seq_len, num_micro_batches, *, flops_mult,
                   allreduces_per_layer, p2p_per_mb, dtype_bytes, fixed_s=0.0) -> float:
    """Seconds for one replica to run `flops_mult` forward-equivalents over its share of the batch.

    Per micro-batch and stage: compute + `allreduces_per_layer` TP all-reduces per layer of the
    stage's activations (tokens x hidden) + `p2p_per_mb` activation sends to the next stage +
    `fixed_s` (the device's per-pass overheads for one stage). 1F1B takes (m + pp - 1) stage slots
    for m micro-batches: the bubble is (pp - 1)/m of the ideal time.
    """
    if num_seqs < 1 or seq_len < 1:
        raise ValueError(f"num_seqs={num_seqs} and seq_len={seq_len} must be >= 1")
    pp, tp, dp = layout.pp, layout.tp, layout.dp
    seqs = math.ceil(num_seqs / dp)  # the busiest replica
    m = num_micro_batches if num_micro_batches is not None else min(max(4 * pp, 1), seqs)
    if not 1 <= m <= seqs:
        raise ValueError(f"num_micro_batches={m}: expected 1..{seqs} (sequences per replica)")
    tokens_mb = seqs * seq_len / m
    act_bytes = tokens_mb * model.hidden_size * dtype_bytes
    compute = flops_mult * model.flops_per_token(seq_len) * tokens_mb / (
        pp * tp * device.peak_flops * device.matmul_efficiency)
    tp_comm = allreduces_per_layer * model.num_layers / pp * _all_reduce(device, act_bytes, tp, tp)
    p2p = p2p_per_mb * _p2p(device, act_bytes, tp * dp + 1) if pp > 1 else 0.0
    return (m + pp - 1) * (compute + tp_comm + p2p + fixed_s)


def train_time(model: ModelSpec, layout: TrainLayout, device: DeviceProfile, *, num_seqs: int,
               seq_len: int, num_micro_batches: int | None = None, zero_stage: int = 0,
               activation_checkpointing: bool = False, dtype_bytes: int = 2, optimizer_steps: int = 1) -> float:
    """Seconds for forward + backward + optimizer step over `num_seqs` sequences of `seq_len` tokens
    (the whole batch, split over dp replicas), in `optimizer_steps` mini-batches of
    num_seqs / optimizer_steps sequences, each its own pass, gradient sync and optimizer step
    (num_micro_batches then counts a mini-batch's micro-batches per replica).

    compute: 3 * flops_per_token(seq_len) per token (backward = 2x forward; + 1 forward when
        `activation_checkpointing` recomputes), over pp*tp devices at peak * matmul_efficiency;
    TP: 4 all-reduces per layer per micro-batch (2 forward, 2 backward) of tokens_mb x hidden;
    PP: 1F1B with (pp-1)/m bubble, one activation send forward and one gradient send back per
        micro-batch; m defaults to min(4*pp, sequences per replica);
    DP: one all-reduce of the replica's bf16 gradient shard (param_bytes / (tp*pp)); ZeRO-1/2's
        reduce-scatter + all-gather move the same volume;
    optimizer: Adam is memory-bound, 28 bytes of traffic per parameter of the shard (/dp under ZeRO);
    fixed costs (the device's overheads): per micro-batch and stage, train_pass + layers of the stage
        x train_layer; per optimizer step, optimizer_step + layers of the stage x optimizer_layer, + dp_sync
        when dp > 1.
    """
    if not isinstance(optimizer_steps, int) or not 1 <= optimizer_steps <= num_seqs:
        raise ValueError(f"optimizer_steps={optimizer_steps!r}: expected 1..{num_seqs} (one per mini-batch)")
    mult = 4 if activation_checkpointing else 3
    layers = math.ceil(model.num_layers / layout.pp)
    t = _pipeline_pass(model, layout, device, math.ceil(num_seqs / optimizer_steps), seq_len, num_micro_batches,
                       flops_mult=mult, allreduces_per_layer=4, p2p_per_mb=2, dtype_bytes=dtype_bytes,
                       fixed_s=device.train_pass_overhead_s + layers * device.train_layer_overhead_s)
    shard_params = model.num_params / (layout.tp * layout.pp)
    t += _all_reduce(device, shard_params * dtype_bytes, layout.dp, (layout.dp - 1) * layout.tp + 1)
    owned = shard_params / (layout.dp if zero_stage >= 1 else 1)
    t += owned * OPTIMIZER_TRAFFIC_PER_PARAM / (device.mem_bandwidth * device.bandwidth_efficiency)
    t += device.optimizer_step_overhead_s + layers * device.optimizer_layer_overhead_s
    t += device.dp_sync_overhead_s if layout.dp > 1 else 0.0
    return optimizer_steps * t


def forward_time(model: ModelSpec, layout: TrainLayout, device: DeviceProfile, *, num_seqs: int,
                 seq_len: int, num_micro_batches: int | None = None, dtype_bytes: int = 2) -> float:
    """Seconds for an inference-only pass (old/ref log-probs, values, rewards) over `num_seqs`
    sequences: 1 forward of compute, 2 TP all-reduces per layer, 1 send per stage boundary, the
    same pipeline bubble as training, no gradient sync; per micro-batch and stage the device's
    pass_overhead + layers of the stage x layer_overhead."""
    layers = math.ceil(model.num_layers / layout.pp)
    return _pipeline_pass(model, layout, device, num_seqs, seq_len, num_micro_batches, flops_mult=1,
                          allreduces_per_layer=2, p2p_per_mb=1, dtype_bytes=dtype_bytes,
                          fixed_s=device.pass_overhead_s + layers * device.layer_overhead_s)


# ---- generation -----------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationCost:
    """Breakdown of one generation stage for the busiest replica (seconds unless named otherwise)."""

    total_s: float
    prefill_s: float
    decode_s: float            # sum over steps of max(memory, compute) + comm
    decode_memory_s: float     # sum over steps of the weight + KV streaming time alone
    decode_compute_s: float    # sum over steps of the compute time alone
    decode_comm_s: float       # sum over steps of TP all-reduces and PP sends
    decode_overhead_s: float   # sum over steps of the device's fixed per-step and per-layer costs
    seqs_per_replica: int
    max_concurrent: int        # sequences one replica holds in its KV cache at once
    num_waves: int


def _gen_spans(train: TrainLayout, gen: GenLayout, mode: str) -> tuple[int, int]:
    """(span of a generation TP group, span between adjacent generation PP stages)."""
    st, sp = train.tp // gen.tg, train.pp // gen.pg
    tp_span = (gen.tg - 1) * st + 1 if mode == "hybridflow" else gen.tg
    return tp_span, sp * train.tp * train.dp + 1


def _decode_terms(model, train, gen, device, batch, mode, dtype_bytes):
    """One global decode step (every sequence of the batch advances one token) as
    (mem_a, mem_b, comp_a, comp_b, comm, fixed): memory time mem_a + mem_b*ctx, compute time
    comp_a + comp_b*ctx (ctx = positions attended), comm and fixed constant;
    step = max(mem, comp) + comm + fixed. fixed = the device's decode_step overhead + every layer's
    decode_layer overhead (the pg stage passes of a step cover all layers once).

    The batch is split into m = min(pg, batch) micro-batches so every stage can be busy; a step is
    then pg stage passes on the critical path. Each pass streams the stage's weights once, so PP
    adds KV capacity but not decode speed: weights cost W/tg per step, KV and compute /(pg*tg).
    """
    pg, tg = gen.pg, gen.tg
    rows = batch / min(pg, batch)
    eff_bw = device.mem_bandwidth * device.bandwidth_efficiency
    eff_flops = device.peak_flops * device.matmul_efficiency
    kv_dev = model.kv_bytes_per_token(dtype_bytes) / (pg * min(tg, model.num_kv_heads))
    attn = 4 * model.num_layers * model.num_heads * model.head_dim
    mem_a = model.param_bytes(dtype_bytes) / tg / eff_bw
    mem_b = pg * rows * kv_dev / eff_bw
    comp_a = rows * 2 * model.matmul_params / tg / eff_flops
    comp_b = rows * attn / tg / eff_flops
    tp_span, pp_span = _gen_spans(train, gen, mode)
    act = rows * model.hidden_size * dtype_bytes
    comm = 2 * model.num_layers * _all_reduce(device, act, tg, tp_span)
    if pg > 1:
        comm += pg * _p2p(device, act, pp_span)
    fixed = device.decode_step_overhead_s + model.num_layers * device.decode_layer_overhead_s
    return mem_a, mem_b, comp_a, comp_b, comm, fixed


def decode_step_time(model: ModelSpec, gen_layout: GenLayout, device: DeviceProfile, *,
                     batch_size: int, context_len: int, train_layout: TrainLayout | None = None,
                     dtype_bytes: int = 2) -> float:
    """Seconds for one decode step of `batch_size` sequences attending to `context_len` positions:
    max(memory time, compute time) + TP/PP communication (see `_decode_terms`)."""
    train = train_layout or TrainLayout(gen_layout.pg, gen_layout.tg, 1)
    mem_a, mem_b, comp_a, comp_b, comm, fixed = _decode_terms(model, train, gen_layout, device, batch_size,
                                                              "hybridflow", dtype_bytes)
    return max(mem_a + mem_b * context_len, comp_a + comp_b * context_len) + comm + fixed


def _resident_train_bytes(model, train, mode, zero_stage, dtype_bytes) -> float:
    """Per-device bytes of the actor's training state kept on device while generating: gradients and
    Adam state of the training shard (HybridFlow does not offload them), plus the training weight
    shard when `mode` stores it a second time (Table 2's redundancy column; 0 for hybridflow, whose
    generation shard already contains the training shard)."""
    shard = model.num_params / (train.tp * train.pp)
    grads = shard * dtype_bytes / (train.dp if zero_stage >= 2 else 1)
    optim = shard * ADAM_BYTES_PER_PARAM / (train.dp if zero_stage >= 1 else 1)
    return grads + optim + float(_redundant_fraction(train, mode) * model.param_bytes(dtype_bytes))


def max_concurrent_seqs(model: ModelSpec, train_layout: TrainLayout, gen_layout: GenLayout,
                        device: DeviceProfile, *, seq_len: int, dtype_bytes: int = 2,
                        mode: str = "hybridflow", zero_stage: int = 0, train_state_resident: bool = True,
                        reserved_bytes: int = 0) -> int:
    """Sequences of `seq_len` tokens one generation replica can hold in its KV cache at once.

    Free bytes per device = memory * (1 - GEN_WORKSPACE_FRACTION) - weights/(pg*tg) - resident
    training state (if `train_state_resident`) - `reserved_bytes` (e.g. colocated models' weights);
    each sequence needs seq_len * kv_bytes_per_token / (pg * min(tg, kv_heads)) of it per device.
    Raises ValueError when not even one sequence fits.
    """
    g = gen_layout.per_replica_devices
    weights = model.param_bytes(dtype_bytes) / g
    state = _resident_train_bytes(model, train_layout, mode, zero_stage, dtype_bytes) \
        if train_state_resident else 0.0
    free = device.memory_bytes * (1 - GEN_WORKSPACE_FRACTION) - weights - state - reserved_bytes
    per_seq = seq_len * model.kv_bytes_per_token(dtype_bytes) / (
        gen_layout.pg * min(gen_layout.tg, model.num_kv_heads))
    count = int(free // per_seq) if free > 0 else 0
    if count < 1:
        raise ValueError(
            f"model {model.name!r} cannot generate under train layout {train_layout} / generation "
            f"layout {gen_layout} on {device.name}: per device {device.memory_bytes / GIB:.1f} GiB "
            f"holds weights {weights / GIB:.1f} GiB + training state {state / GIB:.1f} GiB + reserved "
            f"{reserved_bytes / GIB:.1f} GiB, leaving {max(free, 0) / GIB:.2f} GiB for a KV cache that "
            f"needs {per_seq / GIB:.2f} GiB per {seq_len}-token sequence; use more devices or larger tg/pg")
    return count


def _sum_max_linear(a1: float, b1: float, a2: float, b2: float, n: int) -> float:
    """sum_{i=0}^{n-1} max(a1 + b1*i, a2 + b2*i), in closed form (one crossing at most)."""
    def seg(a, b, lo, hi):  # sum of a + b*i for i in [lo, hi)
        return (hi - lo) * a + b * (hi - lo) * (lo + hi - 1) / 2

    if b1 == b2:
        return seg(max(a1, a2), b1, 0, n)
    k = min(max(math.ceil((a2 - a1) / (b1 - b2)), 0), n)
    total = 0.0
    for lo, hi in ((0, k), (k, n)):
        if hi > lo:
            mid = (lo + hi - 1) / 2
            first = a1 + b1 * mid >= a2 + b2 * mid
            total += seg(a1, b1, lo, hi) if first else seg(a2, b2, lo, hi)
    return total


def _wave(model, train, gen, device, batch, prompt_len, response_len, mode, dtype_bytes):
    """(prefill, decode, decode_memory, decode_compute, decode_comm, decode_overhead) seconds of one
    wave of `batch`; the prefill is one pass over the wave's prompts (its fixed costs once)."""
    g = gen.per_replica_devices
    tokens = batch * prompt_len
    compute = model.flops_per_token(prompt_len) * tokens / (g * device.peak_flops * device.matmul_efficiency)
    stream = model.param_bytes(dtype_bytes) / g / (device.mem_bandwidth * device.bandwidth_efficiency)
    tp_span, pp_span = _gen_spans(train, gen, mode)
    act = tokens * model.hidden_size * dtype_bytes
    prefill = max(compute, stream) * (1 + (gen.pg - 1) / batch)
    prefill += device.pass_overhead_s + model.num_layers * device.layer_overhead_s
    prefill += 2 * model.num_layers * _all_reduce(device, act, gen.tg, tp_span)
    if gen.pg > 1:
        prefill += (gen.pg - 1) * _p2p(device, act / batch, pp_span)
    mem_a, mem_b, comp_a, comp_b, comm, fixed = _decode_terms(model, train, gen, device, batch, mode, dtype_bytes)
    # step i (0-based) attends to prompt_len + i positions
    mem_a, comp_a = mem_a + mem_b * prompt_len, comp_a + comp_b * prompt_len
    decode = _sum_max_linear(mem_a, mem_b, comp_a, comp_b, response_len) + (comm + fixed) * response_len
    mem = _sum_max_linear(mem_a, mem_b, mem_a, mem_b, response_len)
    comp = _sum_max_linear(comp_a, comp_b, comp_a, comp_b, response_len)
    return prefill, decode, mem, comp, comm * response_len, fixed * response_len


def generation_cost(model: ModelSpec, train_layout: TrainLayout, gen_layout: GenLayout,
                    device: DeviceProfile, *, num_seqs: int, prompt_len: int, response_len: int,
                    dtype_bytes: int = 2, mode: str = "hybridflow", zero_stage: int = 0,
                    train_state_resident: bool = True, reserved_bytes: int = 0) -> GenerationCost:
    """Generation of `num_seqs` sequences (prompts x samples) over the dp * dg generation replicas.

    Per replica: its sequences run in waves of at most `max_concurrent_seqs` (balanced sizes); a
    wave is a compute-bound prefill of its prompts, then `response_len` decode steps, step i
    attending to prompt_len + i positions (see `_decode_terms`). Replicas run in parallel, so the
    busiest one (ceil(num_seqs / replicas) sequences) sets the time.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if min(num_seqs, prompt_len, response_len) < 1:
        raise ValueError(f"num_seqs={num_seqs}, prompt_len={prompt_len}, response_len={response_len} "
                         f"must all be >= 1")
    replicas = train_layout.dp * gen_layout.dg(train_layout)
    seqs = math.ceil(num_seqs / replicas)
    cap = max_concurrent_seqs(model, train_layout, gen_layout, device, seq_len=prompt_len + response_len,
                              dtype_bytes=dtype_bytes, mode=mode, zero_stage=zero_stage,
                              train_state_resident=train_state_resident, reserved_bytes=reserved_bytes)
    waves = math.ceil(seqs / cap)
    q, r = divmod(seqs, waves)
    parts = [0.0] * 6
    for size, count in ((q + 1, r), (q, waves - r)):
        if count and size:
            for j, v in enumerate(_wave(model, train_layout, gen_layout, device, size, prompt_len,
                                        response_len, mode, dtype_bytes)):
                parts[j] += count * v
    prefill, decode, mem, comp, comm, fixed = parts
    return GenerationCost(prefill + decode, prefill, decode, mem, comp, comm, fixed, seqs, cap, waves)


def generation_time(model: ModelSpec, train_layout: TrainLayout, gen_layout: GenLayout,
                    device: DeviceProfile, *, num_seqs: int, prompt_len: int, response_len: int,
                    dtype_bytes: int = 2, **kwargs) -> float:
    """Seconds of the generation stage: `generation_cost(...).total_s` (same keyword options)."""
    return generation_cost(model, train_layout, gen_layout, device, num_seqs=num_seqs,
                           prompt_len=prompt_len, response_len=response_len, dtype_bytes=dtype_bytes,
                           **kwargs).total_s


# ---- 3D-HybridEngine transition (Table 2) ---------------------------------------------------
def _redundant_fraction(train: TrainLayout, mode: str) -> Fraction:
    """Table 2's redundancy: fraction of M stored twice per rank during generation."""
    n = {"hybridflow": 0, "hybridflow_v": train.tp * train.pp, "ds_chat": train.num_devices}[mode]
    return Fraction(1, n) if n else Fraction(0)


def transition_bytes(model: ModelSpec, train_layout: TrainLayout, gen_layout: GenLayout,
                     mode: str = "hybridflow", dtype_bytes: int = 2) -> int:
    """All-gather bytes one rank receives switching from training to generation (Table 2, floored):

        hybridflow    (t*p - tg*pg) / (tg*pg*t*p) * M   (inside each micro-DP group of dg ranks)
        hybridflow_v  (t*p - 1) / (t*p) * M             (over the training model-parallel group)
        ds_chat       (t*p*d - 1) / (t*p*d) * M         (over every rank of the role)

    M = model.param_bytes(dtype_bytes); t, p, d = tp, pp, dp. Same numbers as
    hfrl.hybrid_engine.accounting.predict.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    t, p, d = train_layout.tp, train_layout.pp, train_layout.dp
    g = gen_layout.per_replica_devices
    gen_layout.dg(train_layout)  # validates tg | tp and pg | pp
    frac = {"hybridflow": Fraction(t * p - g, g * t * p), "hybridflow_v": Fraction(t * p - 1, t * p),
            "ds_chat": Fraction(t * p * d - 1, t * p * d)}[mode]
    return int(frac * model.param_bytes(dtype_bytes))


def transition_time(model: ModelSpec, train_layout: TrainLayout, gen_layout: GenLayout,
                    device: DeviceProfile, mode: str = "hybridflow", dtype_bytes: int = 2) -> float:
    """Seconds of the train -> generate switch: `transition_bytes` over the all-gather group's link
    (ring all-gather: received bytes / bandwidth) + one collective latency per decoder layer (the
    engine gathers layer by layer). The way back frees the gathered part: 0 s. Zero bytes: 0 s.
    """
    nbytes = transition_bytes(model, train_layout, gen_layout, mode, dtype_bytes)
    if nbytes == 0:
        return 0.0
    t, p, d = train_layout.tp, train_layout.pp, train_layout.dp
    st, sp = t // gen_layout.tg, p // gen_layout.pg
    span = {"hybridflow": (sp - 1) * t * d + st,  # micro-DP group: st consecutive x sp stages
            "hybridflow_v": (p - 1) * t * d + t,  # one training replica (pp x tp)
            "ds_chat": t * p * d}[mode]
    return nbytes / _link(device, span) + model.num_layers * device.collective_latency_s


# ---- memory ---------------------------------------------------------------------------------
def _layer_activation_bytes(model: ModelSpec, tokens: int, tp: int, dtype_bytes: int) -> float:
    """Activations of one layer's forward kept for its backward: tokens * h * (10 + 24/t) bytes
    in 16-bit (Korthikanti et al. 2022, "Reducing Activation Recomputation", Eq. 2 with tensor
    parallelism, without sequence parallelism; flash attention removes the 5as/h score term)."""
    return tokens * model.hidden_size * (10 + 24 / tp) * dtype_bytes / 2


def _logit_bytes(model: ModelSpec, tokens: int, tp: int) -> float:
    """fp32 logits of `tokens` (vocab-parallel over tp), or one value each for a value head."""
    return tokens * (1 if model.value_head else model.vocab_size / tp) * 4


def train_memory(model: ModelSpec, layout: TrainLayout, *, dtype_bytes: int = 2, zero_stage: int = 0,
                 num_seqs_per_micro_batch: int = 1, seq_len: int = 2048,
                 activation_checkpointing: bool = True) -> int:
    """Peak bytes per device while training (the busiest pipeline stage, conservatively):

    states: params (dtype) + grads (dtype) + Adam 12 B/param, all / (tp*pp); ZeRO-1 divides the Adam
        state by dp, ZeRO-2 the gradients too;
    activations: 1F1B keeps pp micro-batches in flight on stage 0; with checkpointing each keeps its
        layer inputs (tokens * h * dtype per layer of the stage), plus one layer's full activations
        while recomputing; without, every layer's full activations (`_layer_activation_bytes`);
    logits: fp32 logits and their gradient of one micro-batch (last stage).
    """
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage={zero_stage}: expected 0, 1 or 2")
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    shard = model.num_params / (tp * pp)
    states = (shard * dtype_bytes  # params
              + shard * dtype_bytes / (dp if zero_stage >= 2 else 1)
              + shard * ADAM_BYTES_PER_PARAM / (dp if zero_stage >= 1 else 1))
    tokens = num_seqs_per_micro_batch * seq_len
    layers = math.ceil(model.num_layers / pp)
    full = _layer_activation_bytes(model, tokens, tp, dtype_bytes)
    if activation_checkpointing:
        acts = tokens * model.hidden_size * dtype_bytes * layers * pp + full
    else:
        acts = full * layers * pp
    return int(states + acts + 2 * _logit_bytes(model, tokens, tp))


def inference_memory(model: ModelSpec, layout: TrainLayout, *, dtype_bytes: int = 2,
                     num_seqs_per_micro_batch: int = 1, seq_len: int = 2048) -> int:
    """Peak bytes per device for a forward-only pass: params / (tp*pp) + a working set of one
    layer's activations (`_layer_activation_bytes`: only the running layer is alive) + the fp32
    logits of one micro-batch (log-probs need them in full precision)."""
    tokens = num_seqs_per_micro_batch * seq_len
    return int(model.param_bytes(dtype_bytes) / (layout.tp * layout.pp)
               + _layer_activation_bytes(model, tokens, layout.tp, dtype_bytes)
               + _logit_bytes(model, tokens, layout.tp))


# ---- layouts and minimal allocations ------------------------------------------------------
def _tp_ok(model: ModelSpec, t: int) -> bool:
    """t splits the attention heads, and the KV heads split over t or are replicated."""
    return model.num_heads % t == 0 and (model.num_kv_heads % t == 0 or t % model.num_kv_heads == 0)


def train_layouts(model: ModelSpec, num_devices: int, device: DeviceProfile,
                  max_tp: int | None = None) -> list[TrainLayout]:
    """Every (pp, tp, dp) on `num_devices` with tp a power of two up to devices per node (and
    `max_tp`) splitting the heads, and pp dividing the rest with at most one layer per stage
    (the paper's Algorithm 2 space). Ordered by tp, then pp."""
    limit = min(device.devices_per_node, max_tp or device.devices_per_node)
    out = []
    t = 1
    while t <= limit and num_devices % t == 0:
        if _tp_ok(model, t):
            rest = num_devices // t
            out += [TrainLayout(p, t, rest // p) for p in range(1, min(rest, model.num_layers) + 1)
                    if rest % p == 0]
        t *= 2
    return out


def gen_layouts(model: ModelSpec, train_layout: TrainLayout) -> list[GenLayout]:
    """Every (pg, tg) the 3D-HybridEngine can switch to from `train_layout`: tg | tp, pg | pp."""
    return [GenLayout(pg, tg) for pg in _divisors(train_layout.pp) for tg in _divisors(train_layout.tp)
            if _tp_ok(model, tg)]


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def min_devices(model: ModelSpec, device: DeviceProfile, *, trainable: bool, seq_len: int,
                max_tp: int | None = None, zero_stage: int = 0, num_seqs_per_micro_batch: int = 1,
                dtype_bytes: int = 2) -> int:
    """Smallest device count n (powers of two below devices per node, then multiples of it) with a
    layout from `train_layouts` whose `train_memory` (trainable) or `inference_memory` fits in
    `device.memory_bytes`. Raises ValueError when not even tp = devices per node and one layer per
    stage fits."""
    dpn = device.devices_per_node
    candidates = [1 << k for k in range(dpn.bit_length()) if 1 << k < dpn]
    candidates += [dpn * k for k in range(1, model.num_layers + 1)]
    for n in candidates:
        for layout in train_layouts(model, n, device, max_tp):
            if trainable:
                need = train_memory(model, layout, dtype_bytes=dtype_bytes, zero_stage=zero_stage,
                                    num_seqs_per_micro_batch=num_seqs_per_micro_batch, seq_len=seq_len)
            else:
                need = inference_memory(model, layout, dtype_bytes=dtype_bytes,
                                        num_seqs_per_micro_batch=num_seqs_per_micro_batch, seq_len=seq_len)
            if need <= device.memory_bytes:
                return n
    raise ValueError(f"model {model.name!r} ({'training' if trainable else 'inference'}, seq_len="
                     f"{seq_len}) does not fit {device.name} ({device.memory_bytes / GIB:.1f} GiB per "
                     f"device) with up to {candidates[-1]} devices")
