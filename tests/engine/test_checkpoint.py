"""Checkpoints of the TrainEngine on real gloo processes: HF export and resumable training state.

One 4-process run (its processes shared with other modules: see test_train_engine.shared_4rank_run):
a (pp=2, tp=2) engine exports a merged HF checkpoint for transformers; a (tp=2, dp=2) ZeRO-1 engine
takes a step, saves its training state, and takes a second step (the uninterrupted run); fresh engines then resume from the checkpoint under the same layout and under
(pp=2, tp=1, dp=2) with plain DP, and take the same second step. The LR warms up over 2 steps,
so a resumed step is right only if the schedule's position was restored too. The parent checks
the HF export against the original transformers model, loads the training state into a single
process (a third layout) and checks the refusal of incomplete folders.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from hfrl.distributed.parallel_dims import GroupCache, ParallelDims, build_groups
from hfrl.engine.checkpoint import load_checkpoint, save_checkpoint, save_hf
from hfrl.engine.train_engine import TrainEngine
from tests.engine.test_train_engine import (VOCAB, dp_share, engine_config, global_batch, policy_loss,
                                            shared_4rank_run)

TOL = 1e-5
WARMUP = dict(warmup_steps=2)  # step 1 at lr/2, step 2 at lr


def _max_diff(state: dict, ref: dict) -> float:
    return max((state[n] - ref[n]).abs().max().item() for n in state)


def checkpoint_body(rank, world_size, path, out):
    cache = GroupCache()
    batches = [global_batch(3), global_batch(4)]

    def build(layout, zero_stage):
        groups = build_groups("actor", ParallelDims.create(world_size, **layout), tuple(range(world_size)), rank, cache)
        return TrainEngine(engine_config(path, False, zero_stage, optim=WARMUP, num_micro_batches=2), groups)

    def step(engine, i):
        return engine.train_step(dp_share(batches[i], engine.dims.dp, engine.dp_rank), policy_loss(engine))

    results = {}
    exporter = build(dict(pp=2, tp=2), 0)
    save_hf(exporter, os.path.join(out, "hf"))
    if rank == 0:  # a tokenizer saved beside the weights, and a stale shard of an older export
        for name in ("tokenizer.json", "model-00009-of-00009.safetensors"):
            with open(os.path.join(out, "hf", name), "w") as f:
                f.write("{}")
    save_hf(exporter, os.path.join(out, "hf"))  # replaces the weights, keeps the tokenizer

    original = build(dict(tp=2), 1)
    step(original, 0)
    w1 = {n: t.clone() for n, t in original.stage_state_dict().items()}  # replicated entries are live views
    save_checkpoint(original, os.path.join(out, "state"))
    rand_after_save = torch.rand(3)
    m2 = step(original, 1)
    w2 = {n: t.clone() for n, t in original.stage_state_dict().items()}
    if rank == 0:
        results.update(w1=w1, w2=w2)

    same = build(dict(tp=2), 1)
    meta = load_checkpoint(same, os.path.join(out, "state"))
    results["same"] = {"w1": _max_diff(same.stage_state_dict(), w1), "rng": torch.equal(torch.rand(3), rand_after_save),
                       "step": same.step, "meta": meta}
    results["same"].update(metrics=step(same, 1), m2=m2, w2=_max_diff(same.stage_state_dict(), w2))

    other = build(dict(pp=2, tp=1), 0)  # w1, w2 hold the full model (pp=1 above): they cover any stage
    load_checkpoint(other, os.path.join(out, "state"))
    results["other"] = {"w1": _max_diff(other.stage_state_dict(), w1)}
    results["other"].update(metrics=step(other, 1), w2=_max_diff(other.stage_state_dict(), w2))
    save_checkpoint(other, os.path.join(out, "state_pp2"))  # written by two stages
    return results


def rank_job(tmp_path_factory):
    """This module's part of the shared 4-rank run (see tests.engine.test_train_engine.shared_4rank_run)."""
    # Imported here, not at the top: the spawned ranks import this module, and need no transformers models.
    from tests.models._hf import build_hf

    path = tmp_path_factory.mktemp("policy")
    hf_model = build_hf("llama_gqa_tied", vocab_size=VOCAB, num_hidden_layers=4)
    hf_model.save_pretrained(path)
    out = tmp_path_factory.mktemp("out")
    return checkpoint_body, (str(path), str(out)), (hf_model, str(path), out)


@pytest.fixture(scope="module")
def run(request, tmp_path_factory):
    (hf_model, path, out), results = shared_4rank_run(request, tmp_path_factory, __name__)
    return results, hf_model, path, out


def test_save_hf_loads_in_transformers_with_identical_logits(run):
    from transformers import AutoModelForCausalLM

    _, hf_model, _, out = run
    reloaded = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    assert sorted(os.listdir(out / "hf")) == ["config.json", "model-00001-of-00002.safetensors",
                                              "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                              "tokenizer.json"]
    ref_sd, got_sd = hf_model.state_dict(), reloaded.state_dict()
    assert sorted(ref_sd) == sorted(got_sd) and all(torch.equal(ref_sd[n], got_sd[n]) for n in ref_sd)
    batch = global_batch()
    with torch.no_grad():
        expected = hf_model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = reloaded(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(got, expected)
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no temp folder left behind


def test_resume_under_the_same_layout_equals_an_uninterrupted_run(run):
    results = run[0]
    for rank, r in enumerate(results):
        same = r["same"]
        assert same["w1"] == 0.0 and same["rng"] and same["step"] == 1, (rank, same)
        assert same["meta"]["layout"] == {"pp": 1, "tp": 2, "dp": 2, "zero_stage": 1, "dtype": "float32"}
        assert same["w2"] < 1e-6, (rank, same["w2"])
        assert abs(same["metrics"]["loss"] - same["m2"]["loss"]) < 1e-6
        assert same["metrics"]["lr"] == same["m2"]["lr"] == 1e-2  # warmup position restored


def test_state_saved_under_one_layout_resumes_under_another(run):
    results = run[0]
    m2 = results[0]["same"]["m2"]
    for rank, r in enumerate(results):
        other = r["other"]
        assert other["w1"] == 0.0, (rank, other)  # (tp=2, dp=2) weights in a (pp=2, tp=1, dp=2) engine
        assert other["w2"] < TOL, (rank, other["w2"])  # ZeRO-1 moments resumed by plain DP
        assert abs(other["metrics"]["loss"] - m2["loss"]) < TOL and other["metrics"]["lr"] == m2["lr"]


def test_single_process_loads_both_checkpoints(run):
    results, _, path, out = run
    w1, w2 = results[0]["w1"], results[0]["w2"]
    engine = TrainEngine(engine_config(path, False, optim=WARMUP, max_tokens_per_micro_batch=20))
    load_checkpoint(engine, out / "state")
    assert _max_diff(engine.stage_state_dict(), w1) == 0.0
    engine.train_step(global_batch(4), policy_loss(engine))
    assert _max_diff(engine.stage_state_dict(), w2) < TOL
    load_checkpoint(engine, out / "state_pp2")  # saved after step 2 by two pipeline stages
    assert _max_diff(engine.stage_state_dict(), w2) < TOL and engine.step == 2


def test_incomplete_checkpoints_are_refused(run, tmp_path):
    _, _, path, out = run
    engine = TrainEngine(engine_config(path, False))
    no_meta = tmp_path / "no_meta"
    shutil.copytree(out / "state", no_meta)
    os.remove(no_meta / "meta.json")
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        load_checkpoint(engine, no_meta)
    missing = tmp_path / "missing"
    shutil.copytree(out / "state", missing)
    os.remove(missing / "optim" / "stage-00000.safetensors")
    with pytest.raises(FileNotFoundError, match=r"optim/stage-00000\.safetensors"):
        load_checkpoint(engine, missing)
    with pytest.raises(ValueError, match="value_head=True"):
        load_checkpoint(TrainEngine(engine_config(path, True, init_missing_value_head=True)), out / "state")


# ---- a save killed between the two renames of a replacement (single process) -------------------------

KILL_SCRIPT = """
import os, sys
from hfrl.engine import checkpoint
from hfrl.engine.train_engine import TrainEngine
from tests.engine.test_train_engine import engine_config, global_batch, policy_loss

model_path, ckpt = sys.argv[1:3]
engine = TrainEngine(engine_config(model_path, False))
checkpoint.save_checkpoint(engine, ckpt)  # step 0
engine.train_step(global_batch(), policy_loss(engine))
real_replace = os.replace

def replace_then_die(src, dst):
    real_replace(src, dst)
    if os.path.abspath(src) == os.path.abspath(ckpt):  # the published checkpoint was just moved away
        os._exit(17)  # a kill: no finally, no clean-up

checkpoint.os.replace = replace_then_die
checkpoint.save_checkpoint(engine, ckpt)  # step 1, killed mid-swap
os._exit(0)
"""


@pytest.fixture(scope="module")
def killed_swap(tmp_path_factory):
    """A step-0 checkpoint replaced by a step-1 one, the process killed between the two renames."""
    from tests.models._hf import build_hf

    model_path = tmp_path_factory.mktemp("kill_policy")
    build_hf("llama_gqa_tied", vocab_size=VOCAB, num_hidden_layers=2).save_pretrained(model_path)
    out = tmp_path_factory.mktemp("kill")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(model_path), str(out / "ckpt")], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-3000:]
    return str(model_path), out


def _copy_state(out, tmp_path):
    """The killed save's folders, copied so that each test can change them."""
    shutil.copytree(out, tmp_path / "copy")
    return tmp_path / "copy"


def test_kill_between_renames_leaves_the_new_checkpoint_loadable(killed_swap, tmp_path):
    model_path, out = killed_swap
    folder = _copy_state(out, tmp_path)
    assert sorted(os.listdir(folder)) == [".ckpt.old", ".ckpt.tmp"]  # what the kill left: no ckpt at all
    engine = TrainEngine(engine_config(model_path, False))
    meta = load_checkpoint(engine, folder / "ckpt")
    assert meta["step"] == 1 and engine.step == 1  # the newest complete one, not the older .old
    # the next save at the same path finishes the job and leaves no temp folder behind
    save_checkpoint(engine, folder / "ckpt")
    assert sorted(os.listdir(folder)) == ["ckpt"]
    assert load_checkpoint(TrainEngine(engine_config(model_path, False)), folder / "ckpt")["step"] == 1


@pytest.mark.parametrize("damage", ["no_meta", "truncated_meta", "missing_file"])
def test_half_written_tmp_is_never_taken_as_complete(killed_swap, tmp_path, damage):
    model_path, out = killed_swap
    folder = _copy_state(out, tmp_path)
    tmp = folder / ".ckpt.tmp"
    if damage == "no_meta":
        os.remove(tmp / "meta.json")
    elif damage == "truncated_meta":
        text = (tmp / "meta.json").read_text()
        (tmp / "meta.json").write_text(text[:len(text) // 2])
    else:
        os.remove(tmp / "optim" / "stage-00000.safetensors")
    engine = TrainEngine(engine_config(model_path, False))
    assert load_checkpoint(engine, folder / "ckpt")["step"] == 0  # the older complete one
    shutil.rmtree(folder / ".ckpt.old")
    with pytest.raises(FileNotFoundError, match="ckpt"):
        load_checkpoint(engine, folder / "ckpt")
