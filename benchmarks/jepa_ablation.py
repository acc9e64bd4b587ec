"""Small-budget ECG-JEPA ablation on ptbxl-mini, run by the framework itself.

Every configuration is ``recipes/jepa_small.toml`` plus a few ``--set`` overrides, pretrained
for the same number of optimiser steps (so the study is reproducible with its seed and does
not depend on machine load), probed with the same linear probe (chosen on validation, test
once, bootstrap 95 % intervals), and gathered by ``ssl4ecg compare``:

    python benchmarks/jepa_ablation.py --data ../shared/data/ptbxl-mini --steps 100 --jobs 2

The table lands in ``bench_out/jepa_ablation/table.md`` (and .csv/.json, plus plots).
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

#: name -> overrides of recipes/jepa_small.toml (each one lever against the "base" row)
CONFIGS: dict[str, list[str]] = {
    "random_init": ["train.max_steps=0"],
    "base": [],
    "paper_ema": ["objective.ema_start=0.996", "objective.ema_end=1.0"],
    "native_100hz_patch25": ["data.sampling_rate=100.0", "encoder.patch_size=25"],
    "per_sample_masks": ["masker.per_sample=true"],
    "lr_1e-3": ["train.lr=1e-3"],
    "teacher_representation": ["objective.evaluate='teacher'"],
    "lead_mean_pooling": ["encoder.pool='lead_mean'"],
    "random_init_lead_mean": ["train.max_steps=0", "encoder.pool='lead_mean'"],
}

#: the common protocol of every row
PROTOCOL = ["eval.0.name='linear_probe'", "eval.0.lr_grid=[5e-4, 2e-3, 1e-2]"]


def run_one(name: str, overrides: list[str], args) -> tuple[str, int, float]:
    out = Path(args.out) / name
    if (out / "metrics.json").exists() and "linear_probe" in (out / "metrics.json").read_text():
        return name, 0, 0.0  # done before: the study resumes where it stopped
    sets = [f"data.source='ptbxl'", f"data.path='{Path(args.data).resolve()}'", f"train.max_steps={args.steps}",
            "train.max_minutes=0.0", "train.num_threads=1", f"train.precision='{args.precision}'",
            f"run.seed={args.seed}", *PROTOCOL, *overrides]
    cmd = [sys.executable, "-m", "ssl4ecg", "run", str(REPO / "recipes" / "jepa_small.toml"), "--out", str(out)]
    for item in sets:
        cmd += ["--set", item]
    log = Path(args.out) / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as handle:
        code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    return name, code, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ptbxl-mini"))
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps per configuration")
    parser.add_argument("--precision", default="fp32", help="fp32 keeps the study bit-reproducible")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument("--out", default="bench_out/jepa_ablation")
    args = parser.parse_args()
    names = [n for n in CONFIGS if not args.only or n in args.only.split(",")]
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        for name, code, seconds in pool.map(lambda n: run_one(n, CONFIGS[n], args), names):
            print(f"{'ok    ' if code == 0 else 'FAILED'} {name} ({seconds / 60:.1f} min)", flush=True)
    runs = [str(Path(args.out) / n) for n in CONFIGS if (Path(args.out) / n / "metrics.json").exists()]
    out = Path(args.out)
    for fmt in ("md", "csv", "json"):
        extra = ["--plots", str(out / "plots")] if fmt == "md" else []
        subprocess.check_call([sys.executable, "-m", "ssl4ecg", "compare", *runs, "--format", fmt,
                               "--out", str(out / f"table.{fmt}"), *extra], cwd=REPO)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
