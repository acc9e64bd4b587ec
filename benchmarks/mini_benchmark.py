"""Mini benchmark: every method's small recipe under one protocol on ptbxl-mini, on CPU.

For each method it runs ``ssl4ecg run`` twice -- pretrained for a fixed time budget and at
random initialisation (``train.max_steps = 0``) -- with the same evaluators, plus the
baseline rows (the hand-crafted statistics model and the supervised-from-scratch encoder),
then ``ssl4ecg compare`` writes the head-to-head table (Markdown, CSV, JSON) and plots.

    python benchmarks/mini_benchmark.py --data ../shared/data/ptbxl-mini --minutes 5 --jobs 2

Every number comes from the framework's own ``ssl4ecg run`` / ``ssl4ecg compare``; the
resolved recipe of each run is in its run directory. A run scored under an older linear-probe
protocol is not retrained: its saved encoder is re-scored into ``<out>/rescored/<run>``
(``benchmarks/rescore.py``), and the table uses that.
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
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from rescore import is_current, rescore  # noqa: E402
from ssl4ecg.recipe import load_recipe  # noqa: E402

#: (row name, recipe) -- each method's small CPU recipe
METHODS = [
    ("jepa", "recipes/jepa_small.toml"),
    ("stmem", "recipes/stmem_small.toml"),
    ("simclr", "recipes/simclr_small.toml"),
    ("cmsc", "recipes/cmsc_small.toml"),
    ("cpc", "recipes/cpc_small.toml"),
]

#: the one evaluation protocol every row is scored with
EVALS = [
    {"name": "linear_probe", "id": "linear"},
    {"name": "low_shot", "id": "low_shot", "fractions": [0.01, 0.1], "trials": 3},
    {"name": "knn", "id": "knn"},
    {"name": "clustering", "id": "clustering"},
]


def write_recipe(recipe_path: str, out_dir: Path, data: str, minutes: float, random_init: bool,
                 evals: list[dict], threads: int) -> Path:
    """The method's recipe on ptbxl-mini with the common evaluators, written into ``out_dir``."""
    recipe = load_recipe(REPO / recipe_path)
    recipe.data.update({"source": "ptbxl", "path": str(Path(data).resolve()), "task": "superdiagnostic"})
    for key in ("n_records", "seed", "noise", "val_fraction", "test_fraction", "multi_label_fraction"):
        recipe.data.pop(key, None)  # synthetic-source keys of quickstart-style recipes
    recipe.eval_data = {}
    recipe.run["name"] = out_dir.name
    recipe.train["max_minutes"] = float(minutes)
    recipe.train["num_threads"] = threads
    if random_init:
        recipe.train["max_steps"] = 0
    recipe.evals = [dict(e) for e in evals]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "recipe.in.toml"
    path.write_text(recipe.to_toml())
    return path


def run(recipe: Path, run_dir: Path, log: Path) -> tuple[Path, int, float]:
    start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as handle:
        # an unfinished run from an interrupted benchmark is moved aside (never deleted) and redone
        code = subprocess.call([sys.executable, "-m", "ssl4ecg", "run", str(recipe), "--out", str(run_dir),
                                "--overwrite"],
                               stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return run_dir, code, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ptbxl-mini"))
    parser.add_argument("--minutes", type=float, default=5.0, help="pretraining budget per method")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    parser.add_argument("--out", default="bench_out/mini")
    parser.add_argument("--methods", default=",".join(m for m, _ in METHODS))
    args = parser.parse_args()
    out = Path(args.out).resolve()
    chosen = [m for m in METHODS if m[0] in args.methods.split(",")]
    jobs, stale = [], []
    for name, recipe in chosen:
        for random_init in (False, True):
            tag = f"{name}_{'random' if random_init else 'pretrained'}"
            run_dir = out / tag
            if (run_dir / "metrics.json").exists() and "linear" in (run_dir / "metrics.json").read_text():
                if not is_current(run_dir) and (run_dir / "encoder.pt").exists():
                    stale.append(run_dir)  # trained before, scored with an older probe
                continue  # finished before: the benchmark is resumable
            jobs.append((write_recipe(recipe, out / "recipes" / tag, args.data, args.minutes, random_init,
                                      EVALS, 1), run_dir, out / "logs" / f"{tag}.log"))
    # baseline rows: hand-crafted statistics, and encoders trained supervised from scratch
    # (base_lr 8e-3 = lr 1e-3 at batch 32: the paper's fine-tuning rule, base 1e-4, is far too
    # small to train an encoder from scratch in 10 epochs)
    supervised = [{"name": "finetune", "id": "supervised_scratch", "from_scratch": True, "base_lr": 8e-3}]
    baselines = [("baseline_stats", METHODS[0][1], [{"name": "stats_baseline", "id": "stats_baseline"}]),
                 ("baseline_supervised_resnet1d", "recipes/simclr_small.toml", supervised)]
    for tag, recipe, evals in baselines:
        run_dir = out / tag
        if not (run_dir / "metrics.json").exists():
            jobs.append((write_recipe(recipe, out / "recipes" / tag, args.data, 0, True, evals, 1),
                         run_dir, out / "logs" / f"{tag}.log"))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    print(f"{len(jobs)} runs, {args.jobs} at a time, {args.minutes} min pretraining each")
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        for run_dir, code, seconds in pool.map(lambda j: run(*j), jobs):
            print(f"{'ok ' if code == 0 else 'FAILED'} {run_dir.name} ({seconds / 60:.1f} min)", flush=True)
        rescored = lambda d: (d, rescore(d, out / "rescored" / d.name, out / "logs" / f"{d.name}.rescore.log"))
        for run_dir, code in pool.map(rescored, stale):
            print(f"{'ok ' if code == 0 else 'FAILED'} re-scored {run_dir.name}", flush=True)
    runs = sorted(p.parent for p in out.glob("*/metrics.json"))
    runs = [out / "rescored" / r.name if r in stale else r for r in runs]
    for fmt in ("md", "csv", "json"):
        subprocess.check_call([sys.executable, "-m", "ssl4ecg", "compare", *map(str, runs), "--format", fmt,
                               "--out", str(out / f"table.{fmt}")] + (["--plots", str(out / "plots")] if fmt == "md" else []),
                              cwd=REPO)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
