"""Plumbing shared by the paper-figure scripts: command-line options, the results files, this
machine's calibrated profile, `hfrl train` runs under torchrun, and the CPU-scale models.

Every script writes one JSON object per line to stdout and to `results/<script>.jsonl` (rewritten
by each full run; `--quick` writes to a temporary folder unless `--out` is given, so a smoke run
never replaces the committed results), and draws `results/<script>.png`.

Two scales, one program:

- measured here ("CPU scale"): real `hfrl train` iterations under torchrun on this machine (gloo,
  one thread per rank), with the models of `benchmarks/e2e_throughput.py` (a ~17.7M-parameter Llama
  actor, its critic with a value head, small Llama reward and cost models) on 16 prompts of the
  built-in "add" task;
- simulated at the paper's scale: `hfrl.mapping` (cost model, simulator, search) with the
  A100-80GB profile and the paper's workload (prompt 1024 + response 1024, 1024 prompts).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = HERE / "results"
for _path in (str(ROOT), str(ROOT / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import e2e_throughput  # noqa: E402  (benchmarks/e2e_throughput.py: the measured-iteration helpers)

PAPER_DEVICE = "a100-80gb"
NUM_PROMPTS, PROMPT_LEN, MAX_NEW_TOKENS = 16, 8, 32
"""The CPU-scale batch: 16 prompts of about 8 tokens, at most 32 new tokens each."""
PROFILE_FILE = "this_machine_profile.json"


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short smoke run (fewer cases and iterations)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/paper/results; "
                                               "with --quick a new temporary folder)")
    p.add_argument("--profile", default=None, help="this machine's calibrated profile (JSON, as written by "
                                                   "`hfrl plan --calibrate --save-profile`); default: "
                                                   "calibrate now and save it in the results folder")
    p.add_argument("--no-png", action="store_true", help="skip the figure")
    return p


def out_dir(args) -> Path:
    if args.out:
        path = Path(args.out)
    elif args.quick:
        path = Path(tempfile.mkdtemp(prefix="hfrl-paper-quick-"))
    else:
        path = RESULTS
    path.mkdir(parents=True, exist_ok=True)
    return path


class Results:
    """One script's JSON lines: printed and written to `<out>/<name>.jsonl` as they come."""

    def __init__(self, name: str, out: Path):
        self.name, self.out = name, out
        self.path = out / f"{name}.jsonl"
        self.lines: list[dict] = []
        self._file = open(self.path, "w")

    def emit(self, **fields) -> dict:
        line = {"figure": self.name, **fields}
        text = json.dumps(line)
        print(text, flush=True)
        self._file.write(text + "\n")
        self._file.flush()
        self.lines.append(line)
        return line

    def of(self, kind: str) -> list[dict]:
        return [l for l in self.lines if l.get("kind") == kind]

    def png(self) -> Path:
        return self.out / f"{self.name}.png"

    def save_figure(self, fig) -> None:
        """Lay out `fig`, write it to `png()` and close it."""
        fig.tight_layout()
        fig.savefig(self.png(), dpi=100)
        pyplot().close(fig)

    def close(self) -> None:
        self._file.close()


def this_machine(args, results: Results):
    """This machine's DeviceProfile: `--profile`, or calibrated now (and saved beside the results)."""
    from hfrl.mapping import calibrate, load_profile, save_profile

    if args.profile:
        profile = load_profile(args.profile)
    else:
        profile = calibrate(threads=1)   # hfrl train's CPU ranks run one thread each
        save_profile(profile, str(results.out / PROFILE_FILE))
    results.emit(kind="profile", **profile.to_dict())
    return profile


def ranks_on(profile, ranks: int):
    """The profile `ranks` processes see: time-shared cores when they outnumber the profile's
    devices (DeviceProfile.oversubscribed), else the profile itself."""
    return profile.oversubscribed(ranks)


# ---- CPU-scale models and configs ---------------------------------------------------------------
@contextlib.contextmanager
def assets():
    """A temporary folder with the example models and prompts and the ~17.7M-parameter actor."""
    from examples.make_example_assets import write_models, write_prompts

    folder = Path(tempfile.mkdtemp(prefix="hfrl-paper-assets-"))
    try:
        write_models(folder)
        write_prompts(folder)
        e2e_throughput.write_17m(folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def base_config(algorithm: str, folder: Path, steps: int):
    """The CPU-scale job of `algorithm` (PPO, ReMax or Safe-RLHF), colocated, default layouts:
    e2e_throughput's case with the 17.7M actor (and critic), a reward model instead of a rule (as
    the paper's workloads have), 16 prompts, at most MAX_NEW_TOKENS new tokens."""
    from hfrl.config import Config, from_dict

    config = e2e_throughput.case_config(algorithm, algorithm, "colocate", folder, Path(tempfile.gettempdir()), steps)
    roles = {"reward": {"enabled": True, "engine": {"model_path": str(folder / "reward")}},
             "critic": {"engine": {"model_path": str(folder / "llama17m")}}}
    if algorithm not in ("ppo", "safe_rlhf"):
        roles.pop("critic")
    overrides = {"engine": {"model_path": str(folder / "llama17m")}, "data": {"reward_fn": None},
                 "roles": roles, "rollout": {"max_new_tokens": MAX_NEW_TOKENS},
                 "trainer": {"save_every": 0, "keep_checkpoints": 1}}
    config = from_dict(Config, overrides, base=config)
    config.validate(training=True)
    return config


def with_overrides(config, overrides: dict):
    from hfrl.config import Config, from_dict

    config = from_dict(Config, overrides, base=config)
    config.validate(training=True)
    return config


def mapping_overrides(mapping, algorithm: str, hybrid_mode: str | None = None) -> dict:
    """Config overrides that run `mapping` (hfrl.mapping.mapping_to_config), keeping the models."""
    from hfrl.mapping import mapping_to_config

    overrides = mapping_to_config(mapping, algorithm)
    overrides.pop("algorithm", None)
    if hybrid_mode:
        overrides["hybrid"] = {"mode": hybrid_mode}
    return overrides


def cpu_workload(config, algorithm: str):
    """The simulator's Workload for the CPU-scale job: each role's shape read from its model folder."""
    from hfrl.mapping import DATAFLOWS, ModelSpec, Workload

    roles = {s.role for s in DATAFLOWS[algorithm]}
    models = {}
    for role in roles:
        spec = ModelSpec.from_hf_config(config.engine_for(role).model_path)
        models[role] = spec.as_value_model() if role in ("critic", "reward", "cost") else spec
    return Workload(algorithm, models, prompt_len=PROMPT_LEN, response_len=MAX_NEW_TOKENS, num_prompts=NUM_PROMPTS,
                    n=config.rollout.n, mini_batch_size=config.algorithm.mini_batch_size,
                    ppo_epochs=config.algorithm.ppo_epochs, micro_batches=config.engine.num_micro_batches or 1)


# ---- measured iterations --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(config, ranks: int, tag: str, timeout_s: float = 600) -> list[dict]:
    """Run `hfrl train` on `ranks` local ranks (torchrun, gloo, one thread each); the metrics rows."""
    from hfrl.config import dump_yaml

    run_dir = Path(tempfile.mkdtemp(prefix=f"hfrl-paper-{tag}-"))
    try:
        config = with_overrides(config, {"trainer": {"run_dir": str(run_dir), "progress_bar": False,
                                                     "export_hf": False, "resume": False}})
        path = run_dir / "config.yaml"
        path.write_text(dump_yaml(config))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(_free_port()), "-m", "hfrl.cli", "train", str(path)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"hfrl train ({tag}, {ranks} ranks) ran past {timeout_s:.0f} s") from err
        metrics = run_dir / "metrics.jsonl"
        if proc.returncode or not metrics.is_file():
            raise RuntimeError(f"hfrl train ({tag}, {ranks} ranks) failed with exit code {proc.returncode}:\n"
                               f"{proc.stderr[-3000:]}")
        return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def measure(config, ranks: int, tag: str, algorithm: str) -> dict:
    """One measured case: e2e_throughput.summarise over the iterations after the first (warm-up)."""
    rows = train(config, ranks, tag)
    result = {"rows": rows, "roof_flops": 0.0, "transport": {"payload_recv": None}}
    out = e2e_throughput.summarise(tag, algorithm, ranks, config.placement.mode, result, 0)
    out.pop("rank0_payload_recv_bytes", None)
    return out


# ---- figures ----------------------------------------------------------------------------------
def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
