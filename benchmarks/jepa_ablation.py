"""Small-budget ECG-JEPA ablation on ptbxl-mini, run by the framework itself.

Every configuration is ``recipes/jepa_small.toml`` plus a few ``--set`` overrides (one lever
against the settings the recipe had before the study, :data:`BEFORE`), pretrained
for the same number of optimiser steps (so the study is reproducible with its seed and does
not depend on machine load), probed with the same linear probe (the default converged L-BFGS
probe, L2 chosen on validation, test once, bootstrap 95 % intervals), and gathered by
``ssl4ecg compare``:

    python benchmarks/jepa_ablation.py --data ../shared/data/ptbxl-mini --steps 400 --jobs 2

The table lands in ``bench_out/jepa_ablation_400/table.md`` (and .csv/.json, plus plots). A run
scored with another probe protocol than the current one (e.g. by an older version) is not
retrained: its saved encoder is re-scored with ``ssl4ecg eval`` into ``<out>/rescored/<name>``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from rescore import is_current, rescore  # noqa: E402

#: the settings jepa_small had before this study (run-relative EMA, the paper's targets): the
#: "base" row, and the starting point of every one-lever row
BEFORE = ["objective.ema_start=0.99", "objective.ema_end=0.999", "objective.target_norm='layer'"]

#: name -> overrides of recipes/jepa_small.toml
CONFIGS: dict[str, list[str]] = {
    "base": BEFORE,
    "teacher_representation": [*BEFORE, "objective.evaluate='teacher'"],
    "target_norm_batch": [*BEFORE, "objective.target_norm='layer_batch'"],
    "paper_ema": [*BEFORE, "objective.ema_start=0.996", "objective.ema_end=1.0"],
    "lr_2.5e-4": [*BEFORE, "train.lr=2.5e-4"],
    "paper_ema_target_norm_batch": [],  # = the current recipes/jepa_small.toml
    "target_norm_batch_lr_1e-3": [*BEFORE, "objective.target_norm='layer_batch'", "train.lr=1e-3"],
    "random_masks": [*BEFORE, "masker.name='random'"],
    "native_100hz_patch25": [*BEFORE, "data.sampling_rate=100.0", "encoder.patch_size=25"],
    "mean_pooling": [*BEFORE, "encoder.pool='mean'"],
    "per_sample_masks": [*BEFORE, "masker.per_sample=true"],
    "short_blocks": [*BEFORE, "masker.scale_min=0.1", "masker.scale_max=0.15"],
    "predictor_192_4": [*BEFORE, "objective.predictor_dim=192", "objective.predictor_depth=4"],
    "lr_1e-3": [*BEFORE, "train.lr=1e-3"],
    "random_init": ["train.max_steps=0"],
    "random_init_mean_pooling": ["train.max_steps=0", "encoder.pool='mean'"],
}

#: the common protocol of every row (the linear probe's defaults)
PROTOCOL = ["eval.0.name='linear_probe'"]


def rescore_one(name: str, args) -> tuple[str, int, float]:
    """Score the saved encoder of a run made under an older probe protocol."""
    start = time.time()
    code = rescore(Path(args.out) / name, Path(args.out) / "rescored" / name, Path(args.out) / "logs" / f"{name}.log")
    return name, code, time.time() - start


def _call(name: str, cmd: list[str], args) -> tuple[str, int, float]:
    log = Path(args.out) / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "a") as handle:
        code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    return name, code, time.time() - start


def result_dir(name: str, args) -> Path:
    """Where the current result of configuration ``name`` lives (its run, or its re-scoring)."""
    run_dir = Path(args.out) / name
    return run_dir if is_current(run_dir) else Path(args.out) / "rescored" / name


def run_one(name: str, overrides: list[str], args) -> tuple[str, int, float]:
    out = Path(args.out) / name
    if is_current(out):
        return name, 0, 0.0  # done before: the study resumes where it stopped
    if (out / "encoder.pt").exists() and (out / "metrics.json").exists():
        return rescore_one(name, args)  # trained before, scored with an older probe
    sets = [f"data.source='ptbxl'", f"data.path='{Path(args.data).resolve()}'", f"train.max_steps={args.steps}",
            "train.max_minutes=0.0", "train.num_threads=1", f"train.precision='{args.precision}'",
            f"run.seed={args.seed}", *PROTOCOL, *overrides]
    cmd = [sys.executable, "-m", "ssl4ecg", "run", str(REPO / "recipes" / "jepa_small.toml"), "--out", str(out),
           "--overwrite"]  # an unfinished run is moved aside (never deleted) and redone
    for item in sets:
        cmd += ["--set", item]
    return _call(name, cmd, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ptbxl-mini"))
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps per configuration")
    parser.add_argument("--precision", default="auto",
                        help="auto: bf16 autocast where the CPU has bf16 units, as jepa_small runs; "
                             "deterministic on one machine (fp32 for bit-equality across machines)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument("--out", default="bench_out/jepa_ablation_400")
    args = parser.parse_args()
    names = [n for n in CONFIGS if not args.only or n in args.only.split(",")]
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        for name, code, seconds in pool.map(lambda n: run_one(n, CONFIGS[n], args), names):
            print(f"{'ok    ' if code == 0 else 'FAILED'} {name} ({seconds / 60:.1f} min)", flush=True)
    runs = [str(result_dir(n, args)) for n in CONFIGS if is_current(result_dir(n, args))]
    out = Path(args.out)
    for fmt in ("md", "csv", "json"):
        extra = ["--plots", str(out / "plots")] if fmt == "md" else []
        subprocess.check_call([sys.executable, "-m", "ssl4ecg", "compare", *runs, "--format", fmt,
                               "--out", str(out / f"table.{fmt}"), *extra], cwd=REPO)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
