"""The checks every rank runs before a training run starts (pure: no process group)."""
from __future__ import annotations

import json

import pytest

from hfrl.config import Config, from_dict
from hfrl.trainers.job import check_job, default_config


def _config(tmp_path, **sections):
    data = {"data": {"task": "max_digit", "max_prompt_length": 32},
            "roles": {"reward": {"enabled": False}}, "trainer": {"run_dir": str(tmp_path)}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return from_dict(Config, data)


def test_default_job_is_valid_for_two_ranks():
    config = default_config()
    check_job(config, world_size=2)
    assert config.algorithm.name == "ppo" and config.data.task == "max_digit"
    assert not config.roles.reward.enabled and config.roles.critic.enabled


def test_a_critic_in_grpo_is_refused(tmp_path):
    config = _config(tmp_path, algorithm={"name": "grpo", "mini_batch_size": 16}, rollout={"n": 4})
    with pytest.raises(ValueError, match=r"algorithm.name='grpo' trains without a critic: set roles.critic.enabled=false"):
        check_job(config, world_size=2)


def test_prompt_and_response_longer_than_the_context(tmp_path):
    config = _config(tmp_path, data={"max_prompt_length": 60}, rollout={"max_new_tokens": 8},
                     algorithm={"mini_batch_size": 16})
    with pytest.raises(ValueError, match=r"max_prompt_length=60 \+ rollout.max_new_tokens=8 = 68 tokens exceed "
                                         r"the context of 64"):
        check_job(config, world_size=2)


def test_a_row_without_a_prompt_is_named(tmp_path):
    rows = tmp_path / "train.jsonl"
    rows.write_text(json.dumps({"prompt": "1+1=", "ground_truth": "2"}) + "\n"
                    + json.dumps({"question": "2+2=", "ground_truth": "4"}) + "\n")
    config = _config(tmp_path, data={"task": None, "train_files": [str(rows)], "reward_fn": "a.b:c"},
                     engine={"model_path": ""}, algorithm={"mini_batch_size": 16})
    config.data.task = None
    with pytest.raises(ValueError, match=r"train.jsonl row 1 has no usable 'prompt' .*keys: \['ground_truth', "
                                         r"'question'\]"):
        from hfrl.trainers.job import _check_prompt_files

        _check_prompt_files(config.data)


def test_rows_must_divide_over_data_parallel_ranks_and_mini_batches(tmp_path):
    config = _config(tmp_path, data={"train_batch_size": 6}, algorithm={"mini_batch_size": 3})
    with pytest.raises(ValueError, match=r"6 responses per step cannot be cut into 2 mini-batches .* "
                                         r"dp=2 ranks: make 6 a multiple of 4"):
        check_job(config, world_size=2)


def test_group_algorithms_need_whole_groups_per_rank(tmp_path):
    config = _config(tmp_path, data={"train_batch_size": 3}, algorithm={"name": "grpo", "mini_batch_size": 3},
                     rollout={"n": 4}, roles={"critic": {"enabled": False}})
    with pytest.raises(ValueError, match=r"train_batch_size=3 must be a multiple of the actor's dp=2"):
        check_job(config, world_size=2)


def test_reward_model_and_rule_reward_together_are_refused(tmp_path):
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text("{}")
    config = _config(tmp_path, data={"reward_fn": "m:f"},
                     roles={"reward": {"enabled": True, "engine": {"model_path": str(tmp_path / "rm")}}})
    with pytest.raises(ValueError, match="give one source of rewards"):
        config.validate(training=True)


@pytest.mark.parametrize("name", ["grpo_rule_reward.yaml", "safe_rlhf.yaml"])
def test_example_configs_load(name):
    """Every key of the example configs exists and every value is valid (the model folders are
    checked when they run: tests/trainers/test_trainers.py runs the same roles on the same assets)."""
    from pathlib import Path

    from hfrl.config import load_config

    config = load_config(Path(__file__).resolve().parents[2] / "examples" / name)
    assert config.algorithm.name == name.split("_rule")[0].replace(".yaml", "")


def test_an_unknown_task_is_refused_with_the_known_ones(tmp_path):
    config = _config(tmp_path, data={"task": "countdown"}, algorithm={"mini_batch_size": 16})
    with pytest.raises(ValueError, match=r"countdown.*max_digit"):
        check_job(config, world_size=2)


def test_interrupted_saves_are_settled(tmp_path):
    """What a killed save or prune leaves is settled: an unfinished .step_N.tmp is deleted, a whole
    one (its state file written last) renamed into place, replacing a step_N the kill left half
    deleted, and a step_N without its state file (pruning deletes that first) deleted. Complete
    checkpoints, and folders hfrl did not name so, are left alone."""
    from hfrl.trainers.base import STATE_FILE, complete_checkpoints, remove_incomplete_checkpoints

    root = tmp_path / "checkpoints"
    names = ("step_00000002", "step_00000004", ".step_00000004.tmp", ".step_00000006.tmp",
             ".step_00000008.tmp", ".step_00000010.tmp", "step_00000003", "notes")
    for name in names:
        (root / name / "actor").mkdir(parents=True)
        (root / name / "actor" / "weights.bin").write_bytes(name.encode())
    (root / "step_00000002" / STATE_FILE).write_text("{}")
    (root / ".step_00000004.tmp" / STATE_FILE).write_text('{"step": 4}')   # whole; step_00000004 half deleted
    (root / ".step_00000006.tmp" / STATE_FILE).write_text('{"step": 6}')   # whole, never renamed
    (root / ".step_00000010.tmp" / STATE_FILE).write_text('{"step": ')   # killed while writing it
    lines = remove_incomplete_checkpoints(tmp_path)
    assert [line.split()[0] for line in lines] == ["recovered", "recovered", "deleted", "deleted", "deleted"]
    assert lines[-1].split()[1].endswith("step_00000003:")
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step_00000002", "step_00000004", "step_00000006"]
    assert (root / "step_00000004" / "actor" / "weights.bin").read_bytes() == b".step_00000004.tmp"
    assert (root / "step_00000006" / "actor" / "weights.bin").read_bytes() == b".step_00000006.tmp"
    assert (root / "step_00000002" / "actor" / "weights.bin").read_bytes() == b"step_00000002"
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000004", "step_00000006"]
    assert remove_incomplete_checkpoints(tmp_path) == []   # settled
    assert remove_incomplete_checkpoints(tmp_path / "nothing_here") == []


@pytest.mark.parametrize("older", [True, False])
def test_a_damaged_newest_checkpoint_is_never_deleted(tmp_path, older):
    """A step_N without its state file that is newer than every complete checkpoint is no pruning
    leftover (pruning keeps the newest): resuming stops with an error naming it, and nothing is
    deleted; starting over (keep_damaged) leaves it for the move aside."""
    from hfrl.trainers.base import STATE_FILE, remove_incomplete_checkpoints

    root = tmp_path / "checkpoints"
    for name in ("step_00000002", "step_00000004") if older else ("step_00000004",):
        (root / name / "actor").mkdir(parents=True)
        (root / name / "actor" / "weights.bin").write_bytes(b"w")
    if older:
        (root / "step_00000002" / STATE_FILE).write_text("{}")
    with pytest.raises(ValueError, match="step_00000004 has no trainer_state.json") as err:
        remove_incomplete_checkpoints(tmp_path)
    assert ("resume from step_00000002" if older else "start over") in str(err.value)
    assert (root / "step_00000004" / "actor" / "weights.bin").read_bytes() == b"w"
    assert remove_incomplete_checkpoints(tmp_path, keep_damaged=True) == []
    assert (root / "step_00000004" / "actor" / "weights.bin").read_bytes() == b"w"


def test_a_run_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(ValueError, match=r"trainer.run_dir='.*run' is a file, not a folder"):
        check_job(_config(tmp_path, trainer={"run_dir": str(tmp_path / "run")}), world_size=2)
    with pytest.raises(ValueError, match=r"run/sub' cannot be created: '.*run' is a file"):
        check_job(_config(tmp_path, trainer={"run_dir": str(tmp_path / "run" / "sub")}), world_size=2)
    check_job(_config(tmp_path, trainer={"run_dir": str(tmp_path / "new" / "deeper")}, rollout={"max_new_tokens": 8},
                      algorithm={"mini_batch_size": 16}), world_size=2)


def test_fewer_training_rows_than_a_batch_are_refused_before_launch(tmp_path):
    rows = tmp_path / "few.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+1=", "ground_truth": str(i + 1)}) + "\n" for i in range(5)))
    config = _config(tmp_path, data={"task": None, "train_files": [str(rows)], "train_batch_size": 8},
                     algorithm={"mini_batch_size": 4})
    with pytest.raises(ValueError, match=r"few.jsonl'\] hold 5 prompt rows, fewer than one batch "
                                         r"\(data.train_batch_size=8\)"):
        from hfrl.trainers.job import _check_prompt_files

        _check_prompt_files(config.data)


@pytest.mark.parametrize("source,error", [
    ("def f(prompt, response:\n    return 1.0\n", r"loading .*bad.py' raised SyntaxError"),
    ("import not_a_module_anywhere\ndef f(p, r, g):\n    return 1.0\n", r"imports 'not_a_module_anywhere', which is not installed"),
    ("def f(prompt, response):\n    return 1.0\n", r"bad.py.f\(prompt, response\) cannot be called as fn\(prompt, response, ground_truth\)"),
])
def test_a_reward_fn_that_cannot_be_used_fails_before_launch(tmp_path, source, error):
    (tmp_path / "bad.py").write_text(source)
    config = _config(tmp_path, data={"reward_fn": f"{tmp_path / 'bad.py'}:f"})
    with pytest.raises((ValueError, TypeError), match=error):
        check_job(config, world_size=2)


def test_a_reward_fn_over_rows_without_ground_truth_is_noticed(tmp_path):
    """Rows whose answer column is named otherwise reach the reward function as None: said once."""
    from types import SimpleNamespace

    from hfrl.trainers.base import missing_ground_truth_notice

    data = SimpleNamespace(reward_fn="rewards.py:exact")
    notice = missing_ground_truth_notice(data, SimpleNamespace(ground_truths=[None, None]))
    assert "no row of data.train_files has a 'ground_truth' field" in notice and "rewards.py:exact" in notice
    assert missing_ground_truth_notice(data, SimpleNamespace(ground_truths=[None, "7"])) is None
    assert missing_ground_truth_notice(SimpleNamespace(reward_fn=None), SimpleNamespace(ground_truths=[None])) is None


def test_a_checkpoint_that_no_longer_fits_the_model_says_resume(tmp_path):
    """Loading a checkpoint into a changed model fails naming the checkpoint and --no-resume, not
    only the tensor shapes."""
    from types import SimpleNamespace

    from hfrl.trainers.base import STATE_FILE, RLTrainer

    step = tmp_path / "checkpoints" / "step_00000002"
    (step / "actor").mkdir(parents=True)
    (step / STATE_FILE).write_text(json.dumps({"step": 2, "algorithm": "ppo", "roles": ["actor"], "kl_ctrl": {}}))

    class Group:
        def load(self, path):
            raise ValueError("checkpoint tensor 'layers.0.attn.qkv_proj.weight' is (96, 32) but the config "
                             "expects (96, 64); does config.json belong to these weights?")

    trainer = SimpleNamespace(run_dir=tmp_path, cfg=SimpleNamespace(trainer=SimpleNamespace(resume=True)),
                              notices=[], algorithm="ppo", trainable=lambda: {"actor": Group()})
    with pytest.raises(ValueError, match=r"resuming from the checkpoint .*step_00000002/actor failed: checkpoint "
                                         r"tensor .*expects \(96, 64\).*start over with --no-resume"):
        RLTrainer.resume(trainer)


def test_a_kv_budget_too_small_for_one_sequence_fails_before_launch(tmp_path):
    """rollout.kv_cache_bytes is checked as RolloutEngine checks it at its first generate, to the byte:
    the init model (2 layers, 2 kv heads of 16 dims, fp32) takes 8192 bytes per 16-token block, and a
    32-token prompt + 8 new tokens caches 39 tokens (3 blocks)."""
    import torch

    from hfrl.models.config import ModelConfig
    from hfrl.models.llama import CausalLM
    from hfrl.rollout import RolloutEngine, SamplingParams

    def config(budget):
        return _config(tmp_path, rollout={"max_new_tokens": 8, "kv_cache_bytes": budget}, algorithm={"mini_batch_size": 16})

    with pytest.raises(ValueError, match=r"rollout.kv_cache_bytes=24575 holds 2 KV blocks of 8192 bytes \(16 tokens, "
                                         r"2 layers, 2 kv heads per rank, float32\), but one sequence of .* = 40 tokens "
                                         r"needs 3 \(24576 bytes\)"):
        check_job(config(24575), world_size=2)
    check_job(config(24576), world_size=2)
    shape = config(0).init_model
    model = CausalLM(ModelConfig(vocab_size=50, hidden_size=shape.hidden_size, intermediate_size=32,
                                 num_layers=shape.num_layers, num_heads=shape.num_heads,
                                 num_kv_heads=shape.num_kv_heads, max_position_embeddings=64)).eval()
    params = SamplingParams(temperature=0, max_new_tokens=8)
    with pytest.raises(ValueError, match="needs 3 KV blocks"):
        RolloutEngine(model, kv_cache_bytes=24575).generate([list(range(32))], params)
    assert len(RolloutEngine(model, kv_cache_bytes=24576).generate([list(range(32))], params).samples[0].token_ids) == 8


def test_a_model_folder_without_usable_weights_fails_before_launch(tmp_path):
    """Weights the ranks would fail to read after starting are named first: no safetensors at all
    (a pytorch_model.bin only), and a shard whose header is cut short."""
    import os

    from hfrl.models.init import write_random_llama

    model = write_random_llama(tmp_path / "policy", vocab_size=300, hidden_size=32, num_layers=1, num_heads=2,
                               num_kv_heads=1, intermediate_size=64, max_position_embeddings=64)

    def config():
        return _config(tmp_path, engine={"model_path": str(model)}, rollout={"max_new_tokens": 8},
                       algorithm={"mini_batch_size": 16})

    weights = model / "model.safetensors"
    check_job(config(), world_size=2)   # the folder as written is fine
    data = weights.read_bytes()
    weights.write_bytes(data[:20])
    with pytest.raises(ValueError, match=r"the actor role's model folder .* cannot be used: .*model.safetensors"):
        check_job(config(), world_size=2)
    os.replace(weights, model / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"cannot be used: .*no model.safetensors or model.safetensors.index.json "
                                         r"\(hfrl reads safetensors checkpoints only\)"):
        check_job(config(), world_size=2)


def test_chat_prompts_without_a_chat_template_fail_before_launch(tmp_path):
    """A prompt file of chat messages with a tokenizer that cannot render them is named before any
    rank starts; string prompts with the same tokenizer pass."""
    from hfrl.data import get_task
    from hfrl.models.init import write_random_llama

    tok = get_task("add").tokenizer()
    assert not getattr(tok, "chat_template", None)
    model = write_random_llama(tmp_path / "policy", vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2,
                               num_kv_heads=1, intermediate_size=64, max_position_embeddings=64)
    tok.save_pretrained(model)
    rows = tmp_path / "train.jsonl"

    def config():
        return _config(tmp_path, data={"task": None, "train_files": [str(rows)], "train_batch_size": 4,
                                       "reward_fn": "examples.reward_fns:exact_answer"},
                       engine={"model_path": str(model)}, rollout={"max_new_tokens": 8},
                       algorithm={"mini_batch_size": 2})

    rows.write_text("".join(json.dumps({"prompt": f"{i}+1=", "ground_truth": str(i + 1)}) + "\n" for i in range(4)))
    check_job(config(), world_size=2)
    with open(rows, "a") as f:
        f.write(json.dumps({"prompt": [{"role": "user", "content": "2+2="}], "ground_truth": "4"}) + "\n")
    with pytest.raises(ValueError, match=r"data.train_files: .*train.jsonl row 4: the prompt is a chat message list, "
                                         r"but the tokenizer of .*policy has no chat template"):
        check_job(config(), world_size=2)
