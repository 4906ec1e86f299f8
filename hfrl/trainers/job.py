"""The job around a trainer: the built-in default job, and the checks every rank runs before
`hfrl.run` (a bad job fails on every rank the same way, before the first collective)."""
from __future__ import annotations

import math
import os
from pathlib import Path

DEFAULT_JOB = """\
# hfrl train with no config: PPO on the built-in max_digit task ("max(3,7,2,5)=" -> "7"), a fresh
# 2-layer Llama with the task's own tokenizer, every role colocated on 2 local ranks.
data:
  task: max_digit
  train_batch_size: 64
  max_prompt_length: 32
  val_size: 128
rollout:
  max_new_tokens: 4
  temperature: 1.0
  n: 1
  kv_cache_bytes: 16777216
engine:
  optim: {lr: 2.0e-3, weight_decay: 0.0, grad_clip: 1.0}
roles:
  reward: {enabled: false}
  critic: {engine: {optim: {lr: 2.0e-3, weight_decay: 0.0}}}
algorithm:
  name: ppo
  kl_coef: 0.05
  entropy_coef: 0.02
  mini_batch_size: 32
  ppo_epochs: 1
trainer:
  total_steps: 200
  eval_every: 20
  save_every: 50
  run_dir: runs/default
"""


def default_config(overrides=()):
    """The built-in job's Config, with `section.key=value` overrides applied."""
    import yaml

    from hfrl.config import Config, _set_path, from_dict, parse_override

    data = yaml.safe_load(DEFAULT_JOB)
    for text in overrides:
        keys, value = parse_override(text)
        _set_path(data, keys, value)
    config = from_dict(Config, data)
    config.validate(training=True)
    return config


def check_job(config, world_size: int | None = None, *, handed_models=()) -> None:
    """What a training run needs beyond the config's own checks: rows that divide evenly over each
    trainable role's data-parallel ranks and mini-batches, whole prompt groups per rank for group
    estimators, model folders that hold a config and safetensors weights, prompts + responses that
    fit the model's context, and a fixed KV cache budget that holds one whole sequence. Pure;
    ValueError otherwise. ``handed_models``: model folders whose weights the caller hands to the run
    in-process (the Megatron embedding's config-only folder), not read from disk."""
    from hfrl.config import GROUP_ALGORITHMS
    from hfrl.distributed.resource_pool import plan_for_config

    config.validate(training=True)
    if config.data.task is not None:
        from hfrl.data import get_task

        get_task(config.data.task)   # ValueError listing the built-in tasks
    if world_size is None:
        from hfrl.distributed.env import detect_env

        world_size = detect_env().world_size
    plan = plan_for_config(config, world_size)
    data, algo, rollout = config.data, config.algorithm, config.rollout
    rows = data.train_batch_size * rollout.n
    num_mini = data.train_batch_size // algo.mini_batch_size
    for placement in plan.roles:
        if placement.role not in ("actor", "critic"):
            continue
        dp = placement.dims.dp
        if rows % (dp * num_mini):
            raise ValueError(
                f"data.train_batch_size={data.train_batch_size} x rollout.n={rollout.n} = {rows} responses "
                f"per step cannot be cut into {num_mini} mini-batches (train_batch_size / "
                f"algorithm.mini_batch_size) on each of roles.{placement.role}'s dp={dp} ranks: make "
                f"{rows} a multiple of {dp * num_mini}")
        if placement.role == "actor" and algo.name in GROUP_ALGORITHMS and data.train_batch_size % dp:
            raise ValueError(f"algorithm.name={algo.name!r} compares the responses of a prompt on one rank: "
                             f"data.train_batch_size={data.train_batch_size} must be a multiple of the "
                             f"actor's dp={dp}")
    _check_model_folders(config, plan, {os.path.abspath(p) for p in handed_models})
    actor = _actor_model(config)
    if any(p.role == "rollout" for p in plan.roles):
        _check_rollout_model(actor, plan.role("rollout").dims.tp)
    chat = _check_prompt_files(config.data)
    if chat is not None:
        _check_chat_template(config, chat)
    if config.data.reward_fn:
        from hfrl.data.rewards import load_reward_fn

        load_reward_fn(config.data.reward_fn)   # imports it: a missing file or a bad signature fails here
    _check_run_dir(config.trainer.run_dir)
    context = actor.max_position_embeddings or math.inf
    need = data.max_prompt_length + rollout.max_new_tokens
    limit = min(context, rollout.max_model_len or context)
    if need > limit:
        raise ValueError(f"data.max_prompt_length={data.max_prompt_length} + rollout.max_new_tokens="
                         f"{rollout.max_new_tokens} = {need} tokens exceed the context of {limit} tokens "
                         "(the model's max_position_embeddings or rollout.max_model_len): lower one of them")
    _check_kv_budget(config, actor, plan, need)


def _actor_model(config):
    """The actor's ModelConfig: its folder's config.json, or the shape of the fresh init_model."""
    from hfrl.models.config import ModelConfig

    path = config.engine_for("actor").model_path
    if path:
        return ModelConfig.from_pretrained(path)
    shape = config.init_model
    return ModelConfig(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                       num_layers=shape.num_layers, num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
                       max_position_embeddings=shape.max_position_embeddings)


def _check_kv_budget(config, model, plan, longest: int) -> None:
    """A fixed ``rollout.kv_cache_bytes`` must hold one whole sequence (the longest prompt plus
    max_new_tokens) on each generating rank: RolloutEngine refuses it at its first generate, after
    the ranks started and the models loaded; here it fails before anything starts."""
    from hfrl.engine.train_engine import DTYPES
    from hfrl.rollout.kv_cache import CacheShape

    rollout = config.rollout
    if rollout.kv_cache_bytes is None:
        return  # a fraction of free memory: known only on the ranks
    engine = config.engine_for("actor")
    layers, kv_heads, head_dim = model.num_layers, model.num_kv_heads, model.head_dim
    tg = (plan.role("rollout").dims.tp if any(p.role == "rollout" for p in plan.roles)
          else plan.role("actor").dims.tg)
    block = CacheShape(num_layers=layers, num_kv_heads=max(1, kv_heads // tg), head_dim=head_dim,
                       block_size=rollout.block_size, dtype=DTYPES[engine.dtype]).bytes_per_block
    need = math.ceil((longest - 1) / rollout.block_size)  # the last token is never cached
    if rollout.kv_cache_bytes // block < need:
        raise ValueError(
            f"rollout.kv_cache_bytes={rollout.kv_cache_bytes} holds {rollout.kv_cache_bytes // block} KV blocks of "
            f"{block} bytes ({rollout.block_size} tokens, {layers} layers, {max(1, kv_heads // tg)} kv heads per "
            f"rank, {engine.dtype}), but one sequence of data.max_prompt_length + rollout.max_new_tokens = {longest} "
            f"tokens needs {need} ({need * block} bytes): raise rollout.kv_cache_bytes, or set it to null to take "
            "rollout.kv_cache_fraction of free memory")


def _check_model_folders(config, plan, handed: set[str]) -> None:
    """Every enabled role's model folder holds a config.json and safetensors weights that fit it
    (every shard readable, no tensor the config does not use: ``check_checkpoint``, headers only).
    The ranks read them only after they start."""
    from hfrl.models.config import ModelConfig
    from hfrl.models.weights import check_checkpoint

    seen = set()
    for placement in plan.roles:
        engine = config.engine_for(placement.role)
        path = engine.model_path
        if not path or (path, engine.value_head) in seen or os.path.abspath(path) in handed:
            continue   # empty: the fresh init_model, written by the run itself
        seen.add((path, engine.value_head))
        try:
            check_checkpoint(path, ModelConfig.from_pretrained(path), engine.value_head)
        except (OSError, ValueError) as err:
            raise ValueError(f"the {placement.role} role's model folder (engine.model_path or "
                             f"roles.{placement.role}.engine.model_path) cannot be used: {err}") from None


def _check_rollout_model(model, tg: int) -> None:
    """The rollout role's tensor parallelism must split the actor's model (its heads and MLP)."""
    from hfrl.models.parallelize import check_tp

    try:
        check_tp(model, tg)
    except ValueError as err:
        raise ValueError(f"roles.rollout.tg={tg} cannot split the actor's model ({err}): pick a tg that "
                         "divides its attention heads and MLP width") from None


def _check_run_dir(run_dir) -> None:
    """trainer.run_dir is a folder, or can be made one, that this process can write."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"trainer.run_dir={str(run_dir)!r} is a file, not a folder: name another run folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"trainer.run_dir={str(run_dir)!r} cannot be created: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"trainer.run_dir={str(run_dir)!r}: {str(existing)!r} is not writable by this user; "
                         "name a run folder you can write")


def tokenizer_source(config) -> dict:
    """Where the run's tokenizer comes from (``hfrl.workers.rule_reward.load_tokenizer_for``):
    data.tokenizer_path, else a built-in task's own tokenizer when the run starts from a fresh
    model, else the actor's model folder."""
    data, actor = config.data, config.engine_for("actor")
    if data.tokenizer_path is not None:
        return {"path": data.tokenizer_path, "trust_remote_code": data.trust_remote_code}
    if data.task is not None and not actor.model_path:
        return {"task": data.task}
    return {"path": actor.model_path, "trust_remote_code": data.trust_remote_code}


def _check_chat_template(config, where: str) -> None:
    """Chat-format prompts (lists of messages) need a tokenizer with a chat template."""
    from hfrl.workers.rule_reward import load_tokenizer_for

    source = tokenizer_source(config)
    if not getattr(load_tokenizer_for(source), "chat_template", None):
        raise ValueError(f"{where}: the prompt is a chat message list, but the tokenizer of "
                         f"{source.get('path') or 'data.task=' + repr(source.get('task'))} has no chat template: give "
                         "string prompts, or set data.tokenizer_path to a tokenizer folder whose "
                         "tokenizer_config.json has a chat_template")


def _check_prompt_files(data) -> str | None:
    """Every row of every prompt file has a prompt, and the training files hold at least one batch
    (read on every rank: cheap next to a run, and a bad row then fails every rank alike instead of
    rank 0 alone). Returns where the first chat-format prompt is, if any ("data.<key>: <file> row i")."""
    from hfrl.data import read_rows

    chat = None
    for key in ("train_files", "val_files"):
        count = 0
        for path in getattr(data, key):
            for i, row in enumerate(read_rows(path)):
                count += 1
                prompt = row.get(data.prompt_key)
                if prompt is None or (isinstance(prompt, str) and not prompt.strip()) or \
                        (not isinstance(prompt, (str, list))):
                    raise ValueError(f"data.{key}: {path} row {i} has no usable {data.prompt_key!r} "
                                     f"(got {prompt!r}; the row's keys: {sorted(row)}): give every row a "
                                     f"prompt, or set data.prompt_key to the column that holds it")
                if chat is None and isinstance(prompt, list):
                    chat = f"data.{key}: {path} row {i}"
        if key == "train_files" and data.train_files and count < data.train_batch_size:
            raise ValueError(f"data.train_files {list(map(str, data.train_files))} hold {count} prompt rows, fewer "
                             f"than one batch (data.train_batch_size={data.train_batch_size}): add rows or lower "
                             "data.train_batch_size")
    return chat
