"""Re-score saved encoders whose linear-probe results come from an older probe protocol.

A benchmark run keeps its ``encoder.pt``, so changing the evaluation protocol (e.g. the linear
probe's default solver) does not need retraining: ``ssl4ecg eval`` scores the saved encoder with
the run's own resolved recipe, its [[eval]] entries switched to the current probe solver, into
``<out>/<run name>``. Used by ``jepa_ablation.py`` and ``mini_benchmark.py``; also a command:

    python benchmarks/rescore.py bench_out/mini/simclr_pretrained bench_out/mini/simclr_random \\
        --out bench_out/mini/rescored
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: evaluators that train a linear probe (and so take its ``solver`` option)
PROBE_EVALUATORS = ("linear_probe", "low_shot", "reduced_leads")


def current_solver() -> str:
    from ssl4ecg.eval.linear_probe import LinearProbe

    return LinearProbe().solver


def is_current(run_dir: Path) -> bool:
    """Whether every probe result in ``run_dir/metrics.json`` uses the current default solver
    (and there is at least one probe result)."""
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        return False
    results = json.loads(path.read_text()).get("eval", {})
    probes = [r for r in results.values() if r.get("protocol", {}).get("evaluator") in PROBE_EVALUATORS]
    return bool(probes) and all(r["protocol"].get("solver") == current_solver() for r in probes)


def rescore_command(run_dir: Path, out: Path) -> list[str]:
    """The ``ssl4ecg eval`` command that re-scores ``run_dir``'s encoder into ``out``."""
    recipe = tomllib.loads((Path(run_dir) / "recipe.toml").read_text())
    cmd = [sys.executable, "-m", "ssl4ecg", "eval", str(run_dir), "--recipe", str(Path(run_dir) / "recipe.toml"),
           "--out", str(out)]
    for i, entry in enumerate(recipe.get("eval", [])):
        if entry.get("name") in PROBE_EVALUATORS:
            cmd += ["--set", f"eval.{i}.solver='{current_solver()}'"]
    return cmd


def rescore(run_dir: Path, out: Path, log: Path) -> int:
    """Re-score ``run_dir`` into ``out`` unless ``out`` is current already; the exit code."""
    if is_current(out):
        return 0
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        return subprocess.call(rescore_command(run_dir, out), stdout=handle, stderr=subprocess.STDOUT,
                               cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for run_dir in args.runs:
        target = args.out / run_dir.name
        code = rescore(run_dir, target, args.out / "logs" / f"{run_dir.name}.log")
        print(f"{'ok    ' if code == 0 else 'FAILED'} {run_dir} -> {target}", flush=True)


if __name__ == "__main__":
    main()
