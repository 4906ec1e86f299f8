"""Command line: `hfrl train`, `hfrl plan`, `hfrl layout`, `hfrl config`. Every command works under any
launcher.

    hfrl train [CONFIG.yaml] [section.key=value ...] [--resume | --no-resume]
    hfrl plan --algo ppo --model-size 7b --devices 16 --device a100-80gb [--json] [--out plan.yaml]
    hfrl layout [CONFIG.yaml] [section.key=value ...] [--world-size N] [--json]
    hfrl config [CONFIG.yaml] [section.key=value ...] [--describe]

Under torchrun/srun/mpirun every rank runs the same command; only rank 0 prints. A configuration
error is reported by every rank (each would hit it before any collective) as one line,
`hfrl COMMAND: error: ...` naming the file (line:column), key or value, and exits with code 2.
The dry run (`--world-size N`) loads and validates exactly as the launched run does, so both
refuse the same configs with the same line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from hfrl.config import Config, describe, dump_yaml, load_config


def _rank_for_messages() -> tuple[int, int]:
    from hfrl.distributed.env import detect_env

    try:
        denv = detect_env()
        return denv.rank, denv.world_size
    except ValueError:
        return 0, 1


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="CONFIG.yaml | section.key=value",
                        help="an optional YAML config file first, then overrides such as "
                             "roles.actor.tp=2")


def _split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    path = None
    if args and "=" not in args[0]:
        path, args = args[0], args[1:]
    for extra in args:
        if "=" not in extra:
            raise ValueError(f"argument {extra!r}: only the first argument may be a config file; "
                             "the rest must be section.key=value overrides")
    return path, list(args)


def cmd_layout(ns: argparse.Namespace) -> int:
    config = load_config(*_split_config_args(ns.args))   # config errors answer before torch loads
    from hfrl.distributed.layout import format_report, run_layout

    report = run_layout(config, dry_run_world_size=ns.world_size)
    if report is not None and "actor" in report["plan"]["roles"]:
        from hfrl.distributed.parallel_dims import ParallelDims
        from hfrl.hybrid_engine.accounting import layout_report

        lay = report["plan"]["roles"]["actor"]["layout"]
        dims = ParallelDims(pp=lay["pp"], tp=lay["tp"], dp=lay["dp"], pg=lay["pg"], tg=lay["tg"],
                            grouping=lay["grouping"])
        actor = config.engine_for("actor")
        report["transition"] = layout_report(dims, actor.model_path or None, actor.dtype)
    if report is not None:
        print(json.dumps(report, indent=None if ns.compact else 1) if ns.json
              else format_report(report, max_groups=None if ns.all_groups else 16))
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} ranks: give 1 or more")
    return value


def cmd_train(ns: argparse.Namespace) -> int:
    """Train: the config file (or the built-in default job) with overrides, on every launched rank.
    Started without a launcher, it checks the job and starts --nproc-per-node local ranks under
    torchrun itself (2 by default: `hfrl train` alone runs the default job as the README says)."""
    from hfrl.distributed.env import detect_env
    from hfrl.trainers.job import check_job, default_config

    path, overrides = _split_config_args(ns.args)
    if ns.resume is not None:
        overrides.append(f"trainer.resume={str(ns.resume).lower()}")
    config = default_config(overrides) if path is None else load_config(path, overrides, training=True)
    if detect_env().launcher == "none" and ns.nproc_per_node > 1:
        check_job(config, world_size=ns.nproc_per_node)   # one error line here, not one per rank
        return _launch_local(ns)
    from hfrl.trainers import train

    env = detect_env()
    if ns.resume and env.rank == 0:
        from pathlib import Path

        from hfrl.trainers.base import complete_checkpoints

        if not complete_checkpoints(Path(config.trainer.run_dir)):
            print(f"hfrl train: --resume: {config.trainer.run_dir} holds no complete checkpoint yet; "
                  "starting at step 0", flush=True)
    summary = train(config)
    if summary is not None:
        print(_summary_text(summary, config), flush=True)
    return 0


def _launch_local(ns: argparse.Namespace) -> int:
    """Run this same command on ns.nproc_per_node local ranks under torchrun (replaces the process)."""
    from hfrl.distributed.env import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ns.nproc_per_node),
           "--master-port", str(free_port()), "-m", "hfrl.cli", *ns.argv]
    sys.stdout.flush()
    os.execv(sys.executable, cmd)
    return 0   # not reached


def _summary_text(summary: dict, config) -> str:
    lines = [f"hfrl train: {config.algorithm.name} finished at step {config.trainer.total_steps} "
             f"in {config.trainer.run_dir}"]
    start = summary.get("start_step", 0)
    if start >= config.trainer.total_steps:
        lines.append(f"  nothing to train: {config.trainer.run_dir} holds a checkpoint at step {start}; "
                     "--no-resume starts over, a larger trainer.total_steps goes on")
    elif start:
        lines.append(f"  resumed at step {start}")
    first, last = summary.get("first") or {}, summary.get("last") or {}
    for key, name in (("critic/score/mean", "reward"), ("actor/reward_kl_penalty/mean", "kl")):
        if key in first and key in last:
            lines.append(f"  {name}: first step {first[key]:.4f} -> last step {last[key]:.4f}")
    before, after = summary.get("val_before") or {}, last
    if "val/score/mean" in before and "val/score/mean" in after:
        lines.append(f"  validation reward (greedy): {before['val/score/mean']:.4f} before -> "
                     f"{after['val/score/mean']:.4f} after")
    for key in ("checkpoint", "export", "plot"):
        if summary.get(key):
            lines.append(f"  {key}: {summary[key]}")
    return "\n".join(lines)


def _model_spec(size: str):
    from pathlib import Path

    from hfrl.mapping import ModelSpec

    return ModelSpec.from_hf_config(size) if Path(size).exists() else ModelSpec.from_name(size)


def plan_workload(ns: argparse.Namespace):
    """The workload `hfrl plan` searches for: the algorithm's roles with the given model shapes."""
    from hfrl.mapping import DATAFLOWS, Workload

    if ns.algo not in DATAFLOWS:
        raise ValueError(f"--algo {ns.algo!r}: expected one of {sorted(DATAFLOWS)}")
    actor = _model_spec(ns.model_size)
    critic = _model_spec(ns.critic_size) if ns.critic_size else actor
    roles = sorted({stage.role for stage in DATAFLOWS[ns.algo]})
    models = {role: (actor if role in ("actor", "ref") else critic.as_value_model()) for role in roles}
    return Workload(algorithm=ns.algo, models=models, prompt_len=ns.prompt_len, response_len=ns.response_len,
                    num_prompts=ns.num_prompts, n=ns.n)


def cmd_plan(ns: argparse.Namespace) -> int:
    """Auto-mapping: the fastest placement and layouts for the workload on --devices devices."""
    import time

    import yaml

    from hfrl.mapping import calibrate, get_profile, mapping_to_config, save_profile, search

    if ns.calibrate:
        device = calibrate()
        if ns.save_profile:
            save_profile(device, ns.save_profile)
    else:
        device = get_profile(ns.device)
    workload = plan_workload(ns)
    start = time.perf_counter()
    ranked = search(workload, ns.devices, device, top_k=ns.top_k, time_shared=ns.time_shared)
    elapsed = time.perf_counter() - start
    if ns.out:
        with open(ns.out, "w") as f:
            yaml.safe_dump(mapping_to_config(ranked[0].mapping, ns.algo), f, sort_keys=False,
                           default_flow_style=None)
    if ns.json:
        print(json.dumps({"device": device.to_dict(), "devices": ns.devices, "search_s": elapsed,
                          "mappings": [_estimate_dict(e) for e in ranked]}, indent=1))
    else:
        print(_plan_text(ranked, device, ns, elapsed))
    return 0


def _estimate_dict(estimate) -> dict:
    m = estimate.mapping
    return {"total_s": estimate.total_s, "stages_s": estimate.stages, "transition_s": estimate.transition_s,
            "placement": [list(s) for s in m.placement], "allocation": list(m.allocation),
            "plans": {p.role: {"devices": p.num_devices, "pp": p.train.pp, "tp": p.train.tp, "dp": p.train.dp,
                               **({"pg": p.gen.pg, "tg": p.gen.tg} if p.gen is not None else {})}
                      for p in m.plans},
            "describe": m.describe()}


def _plan_text(ranked, device, ns, elapsed: float) -> str:
    lines = [f"hfrl plan: {ns.algo}, actor {ns.model_size}" + (f", critic {ns.critic_size}" if ns.critic_size else "")
             + f", {ns.devices} x {device.name}"
             + (f" time-sharing {device.devices_per_node} cores" if getattr(ns, "time_shared", False)
                and ns.devices > device.devices_per_node else "")
             + f", prompt {ns.prompt_len} + response {ns.response_len}, "
             f"{ns.num_prompts} prompts x {ns.n} (searched in {elapsed:.2f} s)"]
    for i, est in enumerate(ranked):
        tag = "best" if i == 0 else f"#{i + 1}"
        lines.append(f"{tag:>5}  {est.total_s:9.4g} s/iteration  {est.mapping.describe()}")
        if i == 0:
            stages = ", ".join(f"{k} {v:.3g} s" for k, v in est.stages.items())
            lines.append(f"       stages: {stages}; transition {est.transition_s:.3g} s")
    if ns.out:
        lines.append(f"wrote {ns.out}: hfrl layout --world-size {ns.devices} {ns.out}")
    return "\n".join(lines)


def cmd_config(ns: argparse.Namespace) -> int:
    if ns.describe:
        print("\n".join(describe(Config)))
        return 0
    config = load_config(*_split_config_args(ns.args))
    if _rank_for_messages()[0] == 0:
        print(dump_yaml(config), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfrl", description="HybridFlow without Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    layout = sub.add_parser("layout", help="print (and check) the placement plan and every "
                                           "process group")
    _add_config_args(layout)
    layout.add_argument("--world-size", type=int, default=None,
                        help="dry run for N ranks without a launcher (fake backend); 1 to "
                             "2^20 ranks")
    layout.add_argument("--json", action="store_true", help="print the report as JSON")
    layout.add_argument("--compact", action="store_true", help="one-line JSON")
    layout.add_argument("--all-groups", action="store_true",
                        help="list every group of every axis (default: the first 16 per axis; "
                             "--json always has all)")
    layout.set_defaults(func=cmd_layout)

    train = sub.add_parser("train", help="run an RL job (no config: PPO on the built-in task, the "
                                         "default job)")
    _add_config_args(train)
    train.add_argument("--resume", dest="resume", action="store_true", default=None,
                       help="continue from the newest checkpoint in trainer.run_dir (the default)")
    train.add_argument("--no-resume", dest="resume", action="store_false",
                       help="start over even if trainer.run_dir holds checkpoints")
    train.add_argument("--nproc-per-node", type=_positive_int, default=2,
                       help="without a launcher, start this many local ranks under torchrun (default 2; 1 runs "
                            "in this process); under torchrun/srun/mpirun the launcher decides")
    train.set_defaults(func=cmd_train)

    plan = sub.add_parser("plan", help="auto-mapping: search placements and layouts for an RL workload")
    plan.add_argument("--algo", default="ppo", help="ppo, remax, safe_rlhf or grpo (default ppo)")
    plan.add_argument("--model-size", default="7b", help="actor and reference: 1.3b, 7b, 13b, 34b, 70b, or a local "
                                                         "HF config.json / model folder")
    plan.add_argument("--critic-size", default=None, help="critic, reward and cost models (default: the actor's)")
    plan.add_argument("--devices", type=int, required=True, help="number of devices to map onto")
    plan.add_argument("--device", default="a100-80gb", help="a100-80gb, h100-80gb, or a profile JSON file "
                                                            "(--calibrate --save-profile writes one)")
    plan.add_argument("--prompt-len", type=int, default=1024)
    plan.add_argument("--response-len", type=int, default=1024)
    plan.add_argument("--num-prompts", type=int, default=1024, help="prompts per iteration")
    plan.add_argument("--n", type=int, default=1, help="responses per prompt")
    plan.add_argument("--top-k", type=int, default=5, help="mappings listed (best first)")
    plan.add_argument("--json", action="store_true", help="print the ranked mappings as JSON")
    plan.add_argument("--out", default=None, help="write the best mapping as a config (pools, roles, layouts)")
    plan.add_argument("--calibrate", action="store_true", help="measure this machine into a device profile and "
                                                               "plan for it")
    plan.add_argument("--time-shared", action="store_true",
                      help="the --devices ranks are processes on this machine's cores, more of them than cores "
                           "(a calibrated CPU profile): rank placements with the cores time-shared among busy ranks")
    plan.add_argument("--save-profile", default=None, help="with --calibrate: write the profile as JSON")
    plan.set_defaults(func=cmd_plan)

    config = sub.add_parser("config", help="print the resolved config as YAML")
    _add_config_args(config)
    config.add_argument("--describe", action="store_true",
                        help="list every key with its type, default and meaning")
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = build_parser().parse_args(argv)
    ns.argv = argv
    try:
        return ns.func(ns)
    except SystemExit as stop:   # a rank ending because rank 0 failed (hfrl.run's serve loop)
        if stop.code and _groups_left_open():
            from hfrl.controller.watchdog import ROOT_FIRST_S

            time.sleep(ROOT_FIRST_S)   # rank 0, which holds the error, exits first (see ROOT_FIRST_S)
            _exit_now(stop.code if isinstance(stop.code, int) else 1)
        raise
    except Exception as err:
        user_error = isinstance(err, (ValueError, TypeError))
        if os.environ.get("HFRL_DEBUG") or not (user_error or _groups_left_open()):
            raise
        if not user_error and not getattr(err, "hfrl_reported", False):
            traceback.print_exc()   # a bug's traceback is still shown, once
        rank, world = _rank_for_messages()
        where = f" (rank {rank}/{world})" if world > 1 else ""
        # one line per rank, even for a foreign message; for other errors the first line, as the
        # traceback above has the rest (a remote error's own traceback too)
        message = " ".join(str(err).split("\n")) if user_error else str(err).strip().split("\n", 1)[0]
        kind = "" if user_error else f"{type(err).__name__}: "
        print(f"hfrl {ns.command}: error{where}: {kind}{message}", file=sys.stderr)
        code = 2 if user_error else 1
        if _groups_left_open():
            _exit_now(code)
        return code


def _groups_left_open() -> bool:
    """Whether a failed hfrl.run left its process groups to the process's exit (it does after a
    failure: the watchdog's threads may still wait on peers)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def _exit_now(code: int) -> None:
    """End a failed rank without the interpreter's teardown: with threads still blocked in gloo
    receives, tearing the groups down aborts the process (SIGABRT, "terminate called without an
    active exception"), which a launcher then reports as the failure's root cause instead of the
    error. Everything the run wrote is closed by now; only the streams need flushing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    # Unbuffered enough for launchers that interleave ranks' output.
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
