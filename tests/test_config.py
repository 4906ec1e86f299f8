"""Config schema: YAML, overrides, typed errors with did-you-mean, documented fields."""
import dataclasses
import re

import pytest

from hfrl.config import Config, describe, dump_yaml, field_docs, load_config, parse_override


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("placement:\n  mode: split\nroles:\n  actor: {tp: 2, tg: 1}\n"
                    "distributed: {timeout_s: 30}\n")
    cfg = load_config(path, ["roles.actor.tp=4", "placement.pools={actor: 4, critic: [4, 5]}"])
    assert cfg.placement.mode == "split"
    assert cfg.roles.actor.tp == 4 and cfg.roles.actor.tg == 1   # file value kept, tp overridden
    assert cfg.distributed.timeout_s == 30.0 and isinstance(cfg.distributed.timeout_s, float)
    assert cfg.placement.pools == {"actor": 4, "critic": [4, 5]}
    assert cfg.roles.cost.enabled is False          # partial sections keep their own defaults
    assert load_config(None, ["roles.cost.tp=2"]).roles.cost.enabled is False


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["roles.actor.tp=2", "placement.mode=standalone"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("override,error,match", [
    ("roles.actor.tpp=2", ValueError,
     r"unknown config key 'roles.actor.tpp'; did you mean 'roles.actor.tp'\?"),
    ("rolse.actor.tp=2", ValueError, r"unknown config key 'rolse'; did you mean 'roles'\?"),
    ("roles.actor.tp=two", TypeError, r"roles.actor.tp: expected int, got str 'two'"),
    ("roles.actor.tp=true", TypeError, r"roles.actor.tp: expected int, got bool True"),
    ("distributed.timeout_s=[1]", TypeError, r"distributed.timeout_s: expected float"),
    ("roles.actor=3", TypeError, r"roles.actor: expected a mapping"),
    ("placement.pools={a: x}", TypeError, r"placement.pools.a: expected int \| list\[int\]"),
    ("roles.actor.tp", ValueError, r"not of the form section.key=value"),
])
def test_bad_overrides(override, error, match):
    with pytest.raises(error, match=match):
        load_config(None, [override])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(TypeError, match="expected a mapping at the top level"):
        load_config(bad)


def test_override_values_are_yaml():
    assert parse_override("a.b=null") == (["a", "b"], None)
    # YAML 1.1 reads 1e-3 as a string; float fields accept it, in files and overrides alike.
    assert load_config(None, ["distributed.timeout_s=1e3"]).distributed.timeout_s == 1e3
    assert load_config(None, ["engine.optim.lr=1e-3"]).engine.optim.lr == 1e-3
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


def _sections(cls):
    yield cls
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            yield from _sections(type(default))


def test_every_field_is_documented():
    for cls in _sections(Config):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    lines = describe()
    assert any(line.strip().startswith("roles.actor.tg (int | None, default None)")
               for line in lines)


# ---- item 10: malformed files and values give one line naming the file, key or value ---------

def _one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("text,match", [
    ("roles:\n  actor: {tp: 2\n", r"job\.yaml:3:1: invalid YAML: .* on line 2"),     # syntax error
    ("roles:\n\tactor: {tp: 2}\n", r"job\.yaml:2:1: .*tab"),                       # tab indent
    ("x: !!python/object:os.system {}\n", r"job\.yaml:1:4: .*python/object"),      # unsafe tag
    ("roles: {}\nx: \"a\x01\"\n", r"job\.yaml:2:6: invalid YAML: character '\\x01'"),  # control
    ("a: 1\n---\nb: 2\n", r"job\.yaml:2:1: invalid YAML: .*single document"),          # two docs
])
def test_malformed_yaml_names_file_line_and_column(tmp_path, text, match):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert re.search(match, _one_line_error(err)), str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("text,key,line", [
    ("roles:\n  actor: {tp: 2}\nplacement: {mode: split}\nroles:\n  critic: {tp: 2}\n",
     "roles", 4),
    ("roles:\n  actor:\n    tp: 2\n    pp: 2\n    tp: 4\n", "roles.actor.tp", 5),
    ("distributed: {timeout_s: 5, timeout_s: 6}\n", "distributed.timeout_s", 1),
])
def test_duplicate_yaml_keys_are_errors(tmp_path, text, key, line):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_config(path)
    message = _one_line_error(err)
    assert f"{path}:{line}:" in message and f"duplicate key '{key}'" in message, message


def test_duplicate_keys_in_an_override_value():
    with pytest.raises(ValueError, match=r"duplicate key 'actor'"):
        load_config(None, ["placement.pools={actor: 2, actor: 3}"])


@pytest.mark.parametrize("value,shown", [
    ("-1", "-1.0"), ("0", "0.0"), ("1e400", "inf"), ("nan", "nan"), (".inf", "inf"),
    ("-.inf", "-inf"), ("1e30", "1e+30"), ("1e-7", "1e-07"), ("0.5", "0.5"),
])
def test_bad_timeouts_name_key_and_value(value, shown):
    with pytest.raises(ValueError) as err:
        load_config(None, [f"distributed.timeout_s={value}"])
    message = _one_line_error(err)
    assert message.startswith(f"distributed.timeout_s={shown} ") and "seconds" in message, message


def test_bad_timeout_in_a_file_too(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("distributed:\n  timeout_s: .nan\n")
    with pytest.raises(ValueError, match=r"^distributed.timeout_s=nan "):
        load_config(path)


@pytest.mark.parametrize("backend", [pytest.param("mpi", id="backend-mpi"), "NCCL", "", "ucc"])
def test_backend_must_be_one_the_launched_run_accepts(backend):
    with pytest.raises(ValueError, match=rf"distributed.backend={backend!r}: expected one of"):
        load_config(None, [f"distributed.backend={backend}" if backend else
                           "distributed.backend=''"])


def test_backends_mirror_pick_backend():
    from hfrl.config import BACKENDS
    from hfrl.distributed.env import pick_backend

    for backend in BACKENDS:   # accepted by name ('nccl' may still need CUDA)
        try:
            pick_backend(backend)
        except ValueError as err:
            assert "needs CUDA" in str(err), err
    with pytest.raises(ValueError) as err:
        pick_backend("mpi")
    assert set(re.findall(r"'(\w+)'", str(err.value).split("expected")[1])) == set(BACKENDS)


@pytest.mark.parametrize("value", ["0", "-3", "2000000000"])
def test_world_size_bounds(value):
    with pytest.raises(ValueError, match=rf"distributed.world_size={value} "):
        load_config(None, [f"distributed.world_size={value}"])


def test_empty_path_directory_and_non_utf8_name_the_input(tmp_path):
    with pytest.raises(ValueError) as err:
        load_config("")
    assert "config file path is empty" in _one_line_error(err)
    with pytest.raises(ValueError) as err:
        load_config(tmp_path)
    assert f"config file '{tmp_path}' is a directory" in _one_line_error(err)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("roles: {actor: {pool: caf\xe9}}\n".encode("latin-1"))
    with pytest.raises(ValueError) as err:
        load_config(latin)
    message = _one_line_error(err)
    assert message.startswith(f"{latin}:1:26: not UTF-8") and "0xe9" in message, message


def test_multi_line_yaml_error_in_override_is_one_line():
    with pytest.raises(ValueError) as err:
        load_config(None, ["roles.actor={tp: [1"])
    assert "override 'roles.actor={tp: [1'" in _one_line_error(err)


# ---- item 15: every trainer setting in the one schema -----------------------------------------

def test_schema_reuses_the_engine_and_optimizer_dataclasses():
    from hfrl.engine.optim import OptimConfig
    from hfrl.engine.train_engine import EngineConfig

    cfg = Config()
    assert type(cfg.engine) is EngineConfig and type(cfg.engine.optim) is OptimConfig
    keys = {line.split(" (")[0].strip() for line in describe() if " (" in line}
    for key in ("engine.model_path", "engine.dtype", "engine.activation_checkpointing",
                "engine.optim.lr", "engine.optim.betas", "engine.optim.zero_stage",
                "engine.max_tokens_per_micro_batch", "engine.pp_schedule", "data.train_files",
                "data.tokenizer_path", "data.trust_remote_code", "rollout.max_new_tokens",
                "rollout.temperature", "rollout.top_p", "rollout.top_k", "rollout.n",
                "algorithm.name", "algorithm.kl_coef", "algorithm.clip_ratio_low",
                "algorithm.gamma", "algorithm.lam", "trainer.total_steps", "trainer.save_every",
                "trainer.eval_every", "trainer.run_dir", "trainer.seed", "roles.critic.engine"):
        assert key in keys, key


def test_per_role_engine_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("engine:\n  model_path: /ckpt/policy\n  optim: {lr: 1.0e-6, warmup_steps: 3}\n"
                    "roles:\n  critic:\n    engine: {model_path: /ckpt/critic, optim: {lr: 5e-6}}\n")
    cfg = load_config(path, ["roles.critic.engine.optim.weight_decay=0.0",
                             "engine.num_micro_batches=4"])
    actor, critic, ref = (cfg.engine_for(r) for r in ("actor", "critic", "ref"))
    assert (actor.model_path, actor.value_head, actor.optim.lr) == ("/ckpt/policy", False, 1e-6)
    assert ref.model_path == "/ckpt/policy"
    assert (critic.model_path, critic.value_head, critic.optim.lr) == ("/ckpt/critic", True, 5e-6)
    assert critic.optim.warmup_steps == 3 and critic.optim.weight_decay == 0.0   # root kept
    assert critic.num_micro_batches == 4 and actor.optim.weight_decay == 0.01
    assert cfg.engine_for("reward").value_head is True
    assert cfg.engine.optim.lr == 1e-6 and cfg.roles.critic.engine["optim"]["lr"] == 5e-6  # as given
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(dump_yaml(cfg))
    assert load_config(resolved) == cfg


@pytest.mark.parametrize("override,match", [
    ("engine.optim.lr=0", r"^engine.optim.lr=0.0 must be"),
    ("engine.optim.lr=nan", r"^engine.optim.lr=nan must be"),
    ("engine.optim.lr=.inf", r"^engine.optim.lr=inf must be"),
    ("engine.optim.weight_decay=nan", r"engine.optim.weight_decay=nan"),
    ("engine.optim.grad_clip=nan", r"^engine.optim.grad_clip=nan"),
    ("engine.dtype=float16", r"^engine.dtype='float16': expected one of"),
    ("engine.pp_schedule=zb", r"^engine.pp_schedule='zb'"),
    ("roles.critic.engine.optim.lr=-1", r"^roles.critic.engine.optim.lr=-1.0 must be"),
    ("roles.critic.engine.optimm.lr=1", r"unknown config key 'roles.critic.engine.optimm'; "
                                        r"did you mean 'roles.critic.engine.optim'\?"),
    ("roles.critic.engine.dtype=3", r"roles.critic.engine.dtype: expected str, got int 3"),
    ("rollout.top_p=0", r"^rollout.top_p=0.0 must be in \(0, 1\]"),
    ("rollout.top_p=1.5", r"^rollout.top_p=1.5 must be in \(0, 1\]"),
    ("rollout.temperature=-1", r"^rollout.temperature=-1.0 must be"),
    ("rollout.top_k=0", r"^rollout.top_k=0 must be -1"),
    ("rollout.n=0", r"^rollout.n=0 must be"),
    ("rollout.max_new_tokens=0", r"^rollout.max_new_tokens=0 must be"),
    ("rollout.block_size=0", r"^rollout.block_size=0 must be a positive"),
    ("rollout.kv_cache_bytes=0", r"^rollout.kv_cache_bytes=0 must be null or"),
    ("rollout.kv_cache_fraction=1.5", r"^rollout.kv_cache_fraction=1.5 must be in \(0, 1\]"),
    ("rollout.max_model_len=1", r"^rollout.max_model_len=1 must be null or"),
    ("algorithm.name=dpo", r"^algorithm.name='dpo': expected one of"),
    ("algorithm.gamma=1.5", r"^algorithm.gamma=1.5 must be in \[0, 1\]"),
    ("algorithm.lam=nan", r"^algorithm.lam=nan must be in \[0, 1\]"),
    ("algorithm.kl_coef=-0.1", r"^algorithm.kl_coef=-0.1 must be"),
    ("algorithm.clip_ratio_low=1", r"^algorithm.clip_ratio_low=1.0 must be in \(0, 1\)"),
    ("algorithm.kl_estimator=k4", r"^algorithm.kl_estimator='k4'"),
    ("trainer.total_steps=0", r"^trainer.total_steps=0 must be"),
    ("trainer.save_every=-1", r"^trainer.save_every=-1 must be"),
    ("data.max_prompt_length=0", r"^data.max_prompt_length=0 must be"),
    ("data.truncation=middle", r"^data.truncation='middle'"),
    ("roles.actor.tp=0", r"^roles.actor.tp=0 must be"),
    ("roles.actor.dp=0", r"^roles.actor.dp=0 must be -1"),
])
def test_semantic_validation_names_key_and_value(override, match):
    with pytest.raises((ValueError, TypeError)) as err:
        load_config(None, [override])
    assert re.search(match, _one_line_error(err)), str(err.value)


def test_batch_sizes_must_divide():
    with pytest.raises(ValueError, match=r"algorithm.mini_batch_size=48 must divide "
                                         r"data.train_batch_size=64"):
        load_config(None, ["algorithm.mini_batch_size=48", "data.train_batch_size=64"])


def test_resolve_for_run(tmp_path):
    from hfrl.config import DistributedConfig, resolve_for_run

    path = tmp_path / "job.yaml"
    path.write_text("distributed: {backend: gloo, timeout_s: 30}\nroles: {actor: {tp: 2}}\n")
    cfg = resolve_for_run(path, ["distributed.timeout_s=45"], world_size=4)
    assert (cfg.distributed.backend, cfg.distributed.timeout_s) == ("gloo", 45.0)
    assert resolve_for_run(None, world_size=1) == Config()
    base = Config(distributed=DistributedConfig(timeout_s=5.0))
    again = resolve_for_run(base, ["roles.actor.tp=2"], world_size=2)
    assert again.distributed.timeout_s == 5.0 and again.roles.actor.tp == 2
    assert base.roles.actor.tp == 1                                  # the argument is not changed
    critic = load_config(None, ["roles.critic.engine={model_path: /c, optim: {lr: 2e-6}}"])
    merged = resolve_for_run(critic, ["roles.critic.engine.optim.eps=1e-6"], world_size=1)
    assert merged.roles.critic.engine == {"model_path": "/c", "optim": {"lr": 2e-6, "eps": 1e-6}}
    with pytest.raises(ValueError, match=r"^distributed.timeout_s=-1.0 "):
        resolve_for_run(Config(distributed=DistributedConfig(timeout_s=-1.0)), world_size=1)
    with pytest.raises(ValueError, match=r"pp=1 x tp=2 = 2 does not divide the pool of 3 ranks"):
        resolve_for_run(path, world_size=3)                         # the plan, before any collective
    with pytest.raises(ValueError, match=r"distributed.world_size=8 but 4 ranks were launched"):
        resolve_for_run(path, ["distributed.world_size=8"], world_size=4)
    with pytest.raises(TypeError, match=r"expected a Config, a YAML path or None"):
        resolve_for_run(42)


def test_training_needs_models_and_data(tmp_path):
    from hfrl.config import resolve_for_run

    with pytest.raises(ValueError, match=r"engine.model_path is empty.*roles actor, critic, ref, "
                                         r"reward"):
        resolve_for_run(None, ["data.train_files=[prompts.jsonl]"], world_size=1, training=True)
    # a built-in task trains a fresh model, but a fresh reward model would score nothing
    with pytest.raises(ValueError, match=r"roles.reward is enabled but has no model"):
        resolve_for_run(None, ["data.task=max_digit"], world_size=1, training=True)
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    overrides = [f"engine.model_path={folder}", "data.task=countdown",
                 "roles.reward.enabled=false", "roles.critic.engine.model_path=/nope"]
    with pytest.raises(ValueError, match=r"^roles.critic.engine.model_path='/nope' is not a model "
                                         r"folder \(no config.json\)"):
        resolve_for_run(None, overrides, world_size=1, training=True)
    with pytest.raises(ValueError, match=r"algorithm.name='ppo' needs a critic"):
        resolve_for_run(None, overrides[:3] + ["roles.critic.enabled=false"], world_size=1,
                        training=True)
    with pytest.raises(ValueError, match=r"data.train_files and data.task are both empty"):
        resolve_for_run(None, [f"engine.model_path={folder}", "roles.reward.enabled=false"],
                        world_size=1, training=True)
    cfg = resolve_for_run(None, overrides[:3], world_size=1, training=True)
    assert cfg.engine_for("critic").model_path == str(folder)
    resolve_for_run(None, overrides, world_size=1)       # not training: models are not needed


@pytest.mark.parametrize("overrides,match", [
    (["hybrid.mode=zero3"], r"hybrid.mode.*'zero3'"),
    (["hybrid.bucket_mb=0"], r"hybrid.bucket_mb"),
    (["hybrid.mode=hybridflow_v"], r"hybrid.mode='hybridflow_v'.*roles.actor.grouping=vanilla"),
    (["roles.actor.grouping=vanilla", "hybrid.mode=hybridflow"], r"hybrid.mode='hybridflow'.*'hybridflow' grouping"),
])
def test_hybrid_section_is_checked_against_the_actor_grouping(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides).validate()
    cfg = load_config(None, ["hybrid.mode=hybridflow_v", "roles.actor.grouping=vanilla"])
    cfg.validate()
    assert load_config(None, ["hybrid.mode=ds_chat", "roles.actor.grouping=vanilla"]).validate() is None
    assert load_config(None, ["roles.actor.grouping=vanilla"]).validate() is None  # mode null follows the grouping
