"""Run every paper-figure script, then rebuild the table in benchmarks/paper/README.md from their
results.

    python benchmarks/paper/run_all.py            # results/*.jsonl + *.png, README table (< 20 min, 2 cores)
    python benchmarks/paper/run_all.py --quick    # smoke run: a temporary folder and a copy of the README
    python benchmarks/paper/run_all.py --only fig14_transition fig16_search_time

This machine is calibrated once (hfrl.mapping.calibrate, ~45 s) and the profile is passed to every
script that searches a CPU-scale mapping. fig09_11_e2e runs before scaling, which reads its
simulated lines. Each script's wall time goes to results/run_all.jsonl. With --only, the other
scripts' lines there are kept, and the machine profile already in the results folder is reused (so
every figure's search ran on one calibration); pass --profile to use another.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import table  # noqa: E402
from common import PROFILE_FILE, RESULTS  # noqa: E402

PROFILED = ("fig09_11_e2e", "fig12_placement", "scaling")
"""Scripts that search a mapping for this machine (they take --profile)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every script's --quick, in a temporary folder")
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/paper/results, "
                                                    "with --quick a temporary folder)")
    parser.add_argument("--readme", default=None, help="README to rewrite (default: benchmarks/paper/README.md; "
                                                       "with --quick a copy in the results folder)")
    parser.add_argument("--profile", default=None, help="a calibrated profile of this machine (default: calibrate)")
    parser.add_argument("--only", nargs="+", choices=table.SCRIPTS, default=None, help="run only these scripts")
    parser.add_argument("--no-png", action="store_true")
    args = parser.parse_args()
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="hfrl-paper-quick-")) if args.quick
                                           else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    readme = Path(args.readme) if args.readme else (out / "README.md" if args.quick else HERE / "README.md")
    if args.quick and not args.readme:
        shutil.copy(HERE / "README.md", readme)
    start = time.perf_counter()
    scripts = [s for s in table.SCRIPTS if args.only is None or s in args.only]
    profile = args.profile
    if profile is None and args.only and (out / PROFILE_FILE).exists():
        profile = str(out / PROFILE_FILE)
    reused = profile == str(out / PROFILE_FILE)   # the calibration line stays only with its profile
    kept = _kept_records(out / "run_all.jsonl", scripts, reused) if args.only else []
    log = open(out / "run_all.jsonl", "w")
    log.writelines(kept)
    log.flush()

    def record(**fields):
        text = json.dumps({"figure": "run_all", **fields})
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    if profile is None and any(s in PROFILED for s in scripts):
        from hfrl.mapping import calibrate, save_profile

        t0 = time.perf_counter()
        profile = str(out / PROFILE_FILE)
        save_profile(calibrate(threads=1), profile)   # one thread per rank, as hfrl train runs
        record(kind="wall_time", script="calibrate", seconds=round(time.perf_counter() - t0, 1))
    failed = []
    for name in scripts:
        cmd = [sys.executable, str(HERE / f"{name}.py"), "--out", str(out)]
        cmd += ["--profile", profile] if name in PROFILED else []
        cmd += ["--quick"] if args.quick else []
        cmd += ["--no-png"] if args.no_png else []
        t0 = time.perf_counter()
        code = subprocess.run(cmd).returncode
        record(kind="wall_time", script=name, seconds=round(time.perf_counter() - t0, 1), exit_code=code)
        if code:
            failed.append(name)
    print(table.update_readme(out, readme), flush=True)
    record(kind="wall_time", script="total", seconds=round(time.perf_counter() - start, 1), failed=failed,
           readme=str(readme))
    log.close()
    return 1 if failed else 0


def _kept_records(path: Path, rerun: list[str], keep_calibration: bool) -> list[str]:
    """The lines of an earlier run_all.jsonl that this --only run does not replace: other scripts'
    wall times (not the old total), and the calibration's when its profile is reused."""
    if not path.exists():
        return []
    replaced = set(rerun) | {"total"} | (set() if keep_calibration else {"calibrate"})
    lines = [line if line.endswith("\n") else line + "\n" for line in path.read_text().splitlines()]
    return [line for line in lines if line.strip() and json.loads(line).get("script") not in replaced]


if __name__ == "__main__":
    sys.exit(main())
