"""What every RL trainer shares: the job around the step.

A trainer is a single-controller program (rank 0 runs it inside `hfrl.run`); its `step` is the
algorithm and reads as the dataflow (see ppo.py). Everything else lives here, once:

    setup      placement plan -> data (prompt files or a built-in task) and tokenizer -> the fresh
               model of a built-in task (init_model) -> one worker group per enabled role, on its
               pool and layout, plus rule rewards on the actor's ranks

Generation: `self.generator` is the actor (the hybrid engine, on its own ranks) or, with
roles.rollout enabled, the rollout group on its own pool (OpenRLHF's placement). Then a step calls
`sync_rollout()` after the actor's update: the actor's ranks send the new weights straight to the
rollout's (hfrl.workers.rollout); the next step's generate runs after it on the rollout's ranks,
since every rank runs its commands in the order rank 0 issued them.
    fit        [resume] -> per step: prompts of the step (a pure function of seed and step) ->
               step() -> metrics.jsonl + progress bar -> validation every eval_every -> checkpoint
               every save_every -> at the end: checkpoint, merged HF export, PNG curves

Batches move between roles as futures, producer ranks to consumer ranks; rank 0 sends the step's
prompts and receives metrics (Future.meta) and never the rollouts themselves.

Checkpoints: run_dir/checkpoints/step_<k>/ holds each trainable role's engine checkpoint
(hfrl.engine.checkpoint, atomic per role) and trainer_state.json (step, KL controller, Lagrange
multiplier), written last into a hidden temporary folder that is renamed into place: a checkpoint is
complete or absent. Resuming loads the newest complete one and continues at its step; the prompts and
sampling seeds of a step depend only on (trainer.seed, step), so the resumed run repeats the
uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from hfrl.algorithms import build_kl_controller
from hfrl.controller import Batch, Future, WorkerGroup, get_runtime
from hfrl.controller.errors import RemoteError
from hfrl.distributed.parallel_dims import ParallelDims
from hfrl.distributed.resource_pool import plan_for_config
from hfrl.trainers.tracking import MetricsLog, ProgressBar, plot_metrics, set_aside
from hfrl.workers import (ActorWorker, CriticWorker, PolicyWorker, RewardModelWorker, RolloutWorker,
                          RuleRewardWorker)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


class RLTrainer(ABC):
    """Subclasses set `algorithm` and `estimator` and write `step(prompts) -> metrics`."""

    algorithm = ""
    estimator = ""

    def __init__(self, config):
        self.cfg = config
        self.runtime = get_runtime()
        self.plan = plan_for_config(config, self.runtime.world_size)
        self.run_dir = Path(config.trainer.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer, self.tokenizer_source = self._tokenizer()
        self.model_path = self._fresh_model() if _needs_fresh_model(config) else None
        self.train_data, self.val_data = self._datasets()
        from hfrl.data import StepSampler

        self.sampler = StepSampler(len(self.train_data), config.data.train_batch_size, config.trainer.seed,
                                   shuffle=config.data.shuffle)
        self.kl_ctrl = build_kl_controller(config.algorithm.kl_ctrl, config.algorithm.kl_coef,
                                           target_kl=config.algorithm.kl_target, horizon=config.algorithm.kl_horizon)
        self.notices: list[str] = []
        """Things the run tells the user once (printed above the progress bar)."""
        notice = missing_ground_truth_notice(config.data, self.train_data)
        if notice:
            self.notices.append(notice)
        self.build_workers()

    # ---- setup --------------------------------------------------------------------------------
    def _tokenizer(self):
        from hfrl.trainers.job import tokenizer_source
        from hfrl.workers.rule_reward import load_tokenizer_for

        source = tokenizer_source(self.cfg)
        return load_tokenizer_for(source), source

    def _fresh_model(self) -> str:
        """The built-in task's model: a random Llama of init_model's shape over the task tokenizer."""
        from hfrl.models.init import write_random_llama

        shape, tok = self.cfg.init_model, self.tokenizer
        path = self.run_dir / "init_model"
        write_random_llama(path, vocab_size=len(tok), hidden_size=shape.hidden_size,
                           num_layers=shape.num_layers, num_heads=shape.num_heads,
                           num_kv_heads=shape.num_kv_heads, intermediate_size=shape.intermediate_size,
                           max_position_embeddings=shape.max_position_embeddings, seed=shape.seed,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
        return str(path)

    def _datasets(self):
        from hfrl.data import PromptDataset, get_task

        data = self.cfg.data
        kw = dict(prompt_key=data.prompt_key, max_prompt_length=data.max_prompt_length,
                  truncation=data.truncation)
        if data.task is not None:
            task = get_task(data.task)
            train = PromptDataset.from_task(task, self.tokenizer, data.task_train_size, self.cfg.trainer.seed,
                                            "train", **kw)
            val = PromptDataset.from_task(task, self.tokenizer, data.val_size, self.cfg.trainer.seed, "val", **kw)
            return train, val
        train = PromptDataset.from_files(data.train_files, self.tokenizer, **kw)
        val = PromptDataset.from_files(data.val_files, self.tokenizer, **kw) if data.val_files else None
        return train, val

    def engine_cfg(self, role: str):
        """The role's engine config; a fresh model (built-in task) where model_path is empty, and a
        value head started from scratch when a value role reads a policy checkpoint."""
        cfg = self.cfg.engine_for(role)
        if not cfg.model_path and self.model_path is not None:
            cfg = dataclasses.replace(cfg, model_path=self.model_path)
        if role == "critic" and cfg.model_path == self.engine_cfg_path("actor"):
            cfg = dataclasses.replace(cfg, init_missing_value_head=True)
        return cfg

    def engine_cfg_path(self, role: str) -> str:
        return self.cfg.engine_for(role).model_path or (self.model_path or "")

    def role_group(self, worker_cls, role: str, *args, name: str | None = None, **kwargs) -> WorkerGroup:
        placement = self.plan.role(role)
        return WorkerGroup(worker_cls, placement.pool, placement.dims, *args, name=name or role, **kwargs)

    def has_role(self, role: str) -> bool:
        return any(p.role == role for p in self.plan.roles)

    def build_workers(self) -> None:
        cfg, tok = self.cfg, self.tokenizer
        self.num_mini_batches = cfg.data.train_batch_size // cfg.algorithm.mini_batch_size
        separate = self.has_role("rollout")   # generation on the rollout's pool: no hybrid engine
        self.actor = self.role_group(ActorWorker, "actor", self.engine_cfg("actor"), cfg.rollout,
                                     None if separate else cfg.hybrid, cfg.algorithm, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id, num_mini_batches=self.num_mini_batches)
        self.rollout = None
        if separate:
            self.rollout = self.role_group(RolloutWorker, "rollout", self.engine_cfg("actor"), cfg.rollout,
                                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                           links=self.plan.weight_sync_groups())
        self.ref = None
        if self.has_role("ref") and cfg.algorithm.kl_coef > 0:
            self.ref = self.role_group(PolicyWorker, "ref", self.engine_cfg("ref"), cfg.rollout.temperature)
        self.critic = None
        if self.has_role("critic"):
            self.critic = self.role_group(CriticWorker, "critic", self.engine_cfg("critic"), cfg.algorithm,
                                          num_mini_batches=self.num_mini_batches)
        if self.has_role("reward"):
            self.reward = self.role_group(RewardModelWorker, "reward", self.engine_cfg("reward"))
        else:   # rule rewards run on the actor's ranks, each on the rows it holds
            pool = self.plan.role("actor").pool
            self.reward = WorkerGroup(RuleRewardWorker, pool, ParallelDims(dp=len(pool)), cfg.data.reward_fn,
                                      cfg.data.task, self.tokenizer_source, name="rule_reward")

    @property
    def generator(self) -> WorkerGroup:
        """The group that generates: the rollout role when enabled, else the actor."""
        return self.rollout if self.rollout is not None else self.actor

    def sync_rollout(self) -> list[Future]:
        """Send the actor's weights to the rollout role (nothing without one). Non-blocking; issued
        after the actor's update, so the actor's ranks send the updated weights, and before the next
        generate, which the rollout's ranks then run after receiving them. The call on the pool
        without rank 0 goes first: rank 0 runs its own share inline, and the broadcast needs both."""
        if self.rollout is None:
            return []
        links = self.plan.weight_sync_groups()
        dims = self.plan.role("rollout").dims
        rollout_tp = tuple(dims.coord(i).tp for i in range(dims.world_size))   # in pool order, as links[s][1:]
        calls = [(self.rollout, "receive_weights", (links,)), (self.actor, "send_weights", (links, rollout_tp, dims.tp))]
        if 0 in self.rollout.pool.ranks:
            calls.reverse()
        futures = {name: getattr(group, name)(*args, blocking=False) for group, name, args in calls}
        return [futures["send_weights"], futures["receive_weights"]]

    def trainable(self) -> dict[str, WorkerGroup]:
        """The roles whose weights a checkpoint must hold."""
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    # ---- the step's inputs ----------------------------------------------------------------------
    def prompt_batch(self, dataset, indices: list[int], step: int, seeded: bool = True) -> Batch:
        """prompt_ids/prompt_mask (B, P) left-padded to the batch's longest prompt, per-prompt seeds."""
        from hfrl.rollout.sampling import spread_seeds

        ids = [dataset.prompt_ids[i] for i in indices]
        width = max(len(x) for x in ids)
        prompt_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros(len(ids), width, dtype=torch.long)
        for row, x in enumerate(ids):   # B rows of a prompt batch, once per step
            prompt_ids[row, width - len(x):] = torch.tensor(x, dtype=torch.long)
            prompt_mask[row, width - len(x):] = 1
        seed = self.cfg.rollout.seed if self.cfg.rollout.seed is not None else self.cfg.trainer.seed
        seeds = spread_seeds(seed, len(ids), salt=step) if seeded else [-1] * len(ids)
        return Batch({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                      "seed": torch.tensor(seeds, dtype=torch.long), "index": torch.tensor(indices)},
                     {"prompt_text": [dataset.prompts[i] for i in indices],
                      "ground_truth": [dataset.ground_truths[i] for i in indices]}, meta={"step": step})

    # ---- the algorithm ----------------------------------------------------------------------------
    @abstractmethod
    def step(self, prompts: Batch) -> dict[str, float]:
        """One iteration of the algorithm on the step's prompts; returns the step's metrics."""

    def ref_log_probs(self, gen: Future) -> Future | None:
        if self.ref is None:
            return None
        return self.ref.compute_log_probs(gen, key="ref_log_probs", blocking=False)

    def collect(self, step_start: float, futures: dict[str, Future | None], data: Future,
                updates: list[Future]) -> dict[str, float]:
        """The step's metrics: each stage's timing and stats from its Future's meta (no rows fetched),
        the update metrics, the paper's throughput (prompt + response tokens per second)."""
        metrics: dict[str, float] = {}
        for future in futures.values():
            if future is not None:
                metrics.update({k: v for k, v in future.meta.items() if isinstance(v, (int, float))})
        metrics.update({k: v for k, v in data.meta.items() if isinstance(v, (int, float))})
        for update in updates:   # the roles' updates, then the weight sync (sync_rollout) if any
            metrics.update(update.result()[0])
        elapsed = time.perf_counter() - step_start
        metrics["timing_s/step"] = elapsed
        tokens = metrics.get("perf/total_tokens", 0.0)
        metrics["perf/throughput"] = tokens / elapsed
        metrics["perf/throughput_per_rank"] = tokens / elapsed / self.runtime.world_size
        metrics["actor/kl_coef"] = self.kl_ctrl.value
        kl = metrics.get("actor/kl_seq/mean")
        if kl is not None and math.isfinite(kl):
            self.kl_ctrl.update(kl, int(metrics.get("perf/num_sequences", 0)))
        return metrics

    # ---- validation -------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Greedy responses to the held-out prompts, scored like training rollouts."""
        if self.val_data is None or len(self.val_data) == 0:
            return {}
        start = time.perf_counter()
        prompts = self.prompt_batch(self.val_data, list(range(len(self.val_data))), 0, seeded=False)
        gen = self.generator.generate(prompts, greedy=True, blocking=False)
        scores = self.reward.score(gen)["scores"]
        metrics = {"val/score/mean": float(scores.mean()), "val/score/max": float(scores.max()),
                   "timing_s/validate": time.perf_counter() - start}
        if not self.has_role("reward"):   # rule rewards: 1 is a right answer
            metrics["val/accuracy"] = float((scores >= 1.0).float().mean())
        return metrics

    # ---- checkpoints ------------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> Path:
        return self.run_dir / CHECKPOINTS / f"step_{step:08d}"

    def save(self, step: int) -> Path:
        final = self.checkpoint_dir(step)
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for role, group in self.trainable().items():
            group.save(str(tmp / role))
        state = {"step": step, "algorithm": self.algorithm, "roles": sorted(self.trainable()),
                 "kl_ctrl": self.kl_ctrl.state_dict(), **self.extra_state()}
        (tmp / STATE_FILE).write_text(json.dumps(state))   # last: marks the folder complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune()
        return final

    def _prune(self) -> None:
        keep = self.cfg.trainer.keep_checkpoints
        done = complete_checkpoints(self.run_dir)
        for old in done[:-keep] if keep else []:
            (old / STATE_FILE).unlink(missing_ok=True)   # first: a deletion cut short leaves a folder marked incomplete
            shutil.rmtree(old, ignore_errors=True)
        remove_incomplete_checkpoints(self.run_dir)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def resume(self) -> int:
        """The step to start at: that of the newest complete checkpoint, restored, or 0. Starting
        over (trainer.resume=false) moves an earlier run's checkpoints aside, to
        checkpoints.previous/, so they are neither resumed nor mixed with this run's. The temporary
        folders of saves a killed run interrupted are settled first (remove_incomplete_checkpoints)."""
        self.notices.extend(remove_incomplete_checkpoints(self.run_dir, keep_damaged=not self.cfg.trainer.resume))
        done = complete_checkpoints(self.run_dir)
        if done and not self.cfg.trainer.resume:
            previous = self.run_dir / f"{CHECKPOINTS}.previous"
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(self.run_dir / CHECKPOINTS, previous)
            self.notices.append(f"trainer.resume=false: the earlier run's checkpoints moved to {previous}")
            return 0
        if not done:
            return 0
        path = done[-1]
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except ValueError as err:
            raise ValueError(f"{path / STATE_FILE} is not valid JSON ({err}): a damaged checkpoint. Move {path} "
                             "out of the way to resume from an older checkpoint, or start over with "
                             "--no-resume (trainer.resume=false)") from err
        theirs = (state.get("algorithm"), state.get("roles"))
        if theirs != (self.algorithm, sorted(self.trainable())):
            raise ValueError(f"{path} is a checkpoint of algorithm {theirs[0]!r} with trained roles {theirs[1]}, "
                             f"but this run is {self.algorithm!r} with {sorted(self.trainable())}: use another "
                             "trainer.run_dir, or start over with --no-resume (trainer.resume=false)")
        for role, group in self.trainable().items():
            try:
                group.load(str(path / role))
            except (ValueError, RemoteError) as err:   # e.g. the model's shape changed since the checkpoint
                first = str(err).strip().split("\n", 1)[0]
                raise ValueError(f"resuming from the checkpoint {path / role} failed: {first} (if the model or "
                                 "its settings changed on purpose, start over with --no-resume "
                                 "(trainer.resume=false) or use another trainer.run_dir)") from err
        self.kl_ctrl.load_state_dict(state["kl_ctrl"])
        self.load_extra_state(state)
        return int(state["step"])

    # ---- the run --------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        tcfg = self.cfg.trainer
        start_step = self.resume()
        (self.run_dir / "config.yaml").write_text(_dump(self.cfg))
        if not start_step:  # an earlier run here without a checkpoint to resume (or --no-resume): keep its log
            previous = set_aside(self.run_dir / "metrics.jsonl")
            if previous is not None:
                self.notices.append(f"starting at step 0: the earlier run's metrics moved to {previous}")
        log = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=start_step)
        bar = ProgressBar(tcfg.total_steps, start_step, tcfg.progress_bar)
        for notice in self.notices:
            bar.write(f"hfrl train: {notice}")
        if start_step:
            bar.write(f"hfrl train: resumed from {self.checkpoint_dir(start_step)} at step {start_step}")
        summary: dict[str, Any] = {"start_step": start_step}
        for future in self.sync_rollout():   # the rollout starts from the actor's weights, resumed or handed over
            future.wait()
        try:
            if start_step == 0 and tcfg.eval_every:
                summary["val_before"] = self.validate()
                log.write({"step": 0, **summary["val_before"]})
            for step in range(start_step, tcfg.total_steps):
                step_start = time.perf_counter()
                prompts = self.prompt_batch(self.train_data, self.sampler.indices(step), step)
                metrics = {"step": step + 1, **self.step(prompts)}
                if tcfg.eval_every and (step + 1) % tcfg.eval_every == 0:
                    metrics.update(self.validate())
                if tcfg.save_every and (step + 1) % tcfg.save_every == 0 and step + 1 < tcfg.total_steps:
                    self.save(step + 1)
                metrics["timing_s/iteration"] = time.perf_counter() - step_start
                if (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.total_steps:
                    log.write(metrics)
                bar.update(metrics)
                summary.setdefault("first", metrics)
                summary["last"] = metrics
            if start_step < tcfg.total_steps or not complete_checkpoints(self.run_dir):
                summary["checkpoint"] = str(self.save(tcfg.total_steps))
            if tcfg.export_hf and (start_step < tcfg.total_steps or not (self.run_dir / "actor_hf").is_dir()):
                summary["export"] = self.export()
        finally:
            bar.close()
            log.close()
        summary["plot"] = plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
        summary["transport"] = self.runtime.transport.stats.snapshot()   # rank 0's byte counters
        return summary

    def export(self) -> str:
        path = self.run_dir / "actor_hf"
        self.actor.export_hf(str(path))
        self.tokenizer.save_pretrained(str(path))
        return str(path)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders holding trainer_state.json, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step_") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def remove_incomplete_checkpoints(run_dir: Path, keep_damaged: bool = False) -> list[str]:
    """Settle what a run killed while saving or pruning left in its checkpoints folder; call only when
    no save is under way. Returns one line per folder saying what was done.

    - ``.step_N.tmp`` (a save writes it, then renames it into place) holding a readable
      trainer_state.json (written last) is whole and newer than any ``step_N``: renamed into place,
      replacing a ``step_N`` the kill may have left half-deleted. Never lost.
    - Any other ``.step_N.tmp`` is a save that never finished: deleted (it is as large as a checkpoint
      and can never be resumed).
    - ``step_N`` without trainer_state.json and older than a complete checkpoint is a deletion cut
      short (pruning removes that file first, and never prunes the newest): deleted.
    - ``step_N`` without trainer_state.json and newer than every complete checkpoint is no pruning
      leftover (saves are renamed into place whole) but a damaged checkpoint: never deleted. With
      ``keep_damaged`` False a ValueError names it and the ways on; True leaves it (starting over
      moves the whole folder aside)."""
    root = Path(run_dir) / CHECKPOINTS
    done = []
    for tmp in sorted(root.glob(".step_*.tmp")) if root.is_dir() else []:
        final = root / tmp.name[1:-len(".tmp")]
        if _readable_state(tmp):
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            done.append(f"recovered {final} from the complete save {tmp.name} that a killed run had not renamed")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            done.append(f"deleted {tmp}: an incomplete checkpoint left by an interrupted save")
    complete = complete_checkpoints(run_dir)
    newest = int(complete[-1].name.split("_")[1]) if complete else -1
    for folder in sorted(root.glob("step_*")) if root.is_dir() else []:
        if not folder.is_dir() or (folder / STATE_FILE).exists():
            continue
        try:
            step = int(folder.name.split("_")[1])
        except (IndexError, ValueError):
            continue  # not a folder this trainer wrote: left alone
        if step < newest:
            shutil.rmtree(folder, ignore_errors=True)
            done.append(f"deleted {folder}: a checkpoint whose deletion was cut short (no {STATE_FILE})")
        elif not keep_damaged:
            older = f"resume from {complete[-1].name}" if complete else "start over"
            raise ValueError(
                f"checkpoint {folder} has no {STATE_FILE} and is newer than every complete checkpoint, so "
                f"it is damaged, not a pruning leftover; it was left as it is. Move it out of {root} to "
                f"{older}, or pass trainer.resume=false to move all checkpoints aside and start over")
    return done


def missing_ground_truth_notice(data, train_data) -> str | None:
    """A notice when a reward function scores rows none of which has a ground truth: a column
    named otherwise ("answer") reaches it as None for every response, silently."""
    from hfrl.data.datasets import GROUND_TRUTH_KEY

    if not data.reward_fn or any(truth is not None for truth in train_data.ground_truths):
        return None
    return (f"no row of data.train_files has a {GROUND_TRUTH_KEY!r} field: the reward function "
            f"{data.reward_fn!r} gets ground_truth=None for every response (if it needs the answer, "
            f"name that column {GROUND_TRUTH_KEY!r})")


def _readable_state(folder: Path) -> bool:
    try:
        json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return True


def _needs_fresh_model(config) -> bool:
    return config.data.task is not None and not config.engine_for("actor").model_path


def _dump(config) -> str:
    from hfrl.config import dump_yaml

    return dump_yaml(config)
