"""Data-layer throughput: cache preparation on ptbxl-mini and batch loading from the cache.

    python benchmarks/data_throughput.py [--data ../shared/data] [--workers 2] [--json out.json]

Targets on 2 CPU cores: prepare >= 300 records/s (ptbxl-mini, 100 Hz WFDB -> 8 leads at
250 Hz x 10 s), loader >= 20,000 samples/s of 8 x 2500 float32 in batches of 64. The
machine's load average is printed with the numbers: other processes slow both down.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def default_data() -> Path:
    env = os.environ.get("SSL4ECG_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def bench_prepare(data: Path, out: Path, workers: int) -> dict:
    """Prepare ptbxl-mini into ``out``; wall time of the whole command and of each phase."""
    from ssl4ecg.data.build import prepare, resolve_data_section
    from ssl4ecg.data.preprocess import Preprocessing, warm_up
    from ssl4ecg.registry import Registry
    from ssl4ecg.data.sources import register_real_sources

    registry = Registry()
    register_real_sources(registry)
    section = resolve_data_section({"source": "ptbxl", "path": str(data / "ptbxl-mini")}, registry)
    t0 = time.perf_counter()
    warm_up(Preprocessing.from_section(section))  # one-off scipy import, reported separately
    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    manifest = prepare(section, registry, out, workers=workers)
    wall = time.perf_counter() - t1
    t2 = time.perf_counter()
    prepare(section, registry, out, workers=workers)  # up to date: nothing to do
    again = time.perf_counter() - t2
    n = manifest["counts"]["records"]
    return {"records": n, "workers": manifest["workers"], "seconds": round(wall, 3),
            "records_per_s": round(n / wall, 1), "scipy_import_s": round(t_import, 3),
            "up_to_date_rerun_s": round(again, 3), "phases_s": manifest["timings"],
            "processing_records_per_s": round(n / manifest["timings"]["process"], 1)}


def bench_loader(cache: Path, batch_size: int, seconds: float, prefetch: int, crop: int | None) -> dict:
    """Samples per second of a BatchLoader over the memory-mapped cache, page cache warm."""
    from ssl4ecg.data.cache import open_cache
    from ssl4ecg.data.loader import BatchLoader

    records, _ = open_cache(cache)
    loader = BatchLoader(records, batch_size, seed=0, prefetch=prefetch, crop_samples=crop)
    for _ in loader:  # warm the page cache
        pass
    count, epochs = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in loader:
            count += len(batch)
        epochs += 1
    elapsed = time.perf_counter() - start
    return {"shape": list(records.signals.shape[1:]) if crop is None else [records.signals.shape[1], crop],
            "batch_size": batch_size, "prefetch": prefetch, "epochs": epochs,
            "samples_per_s": round(count / elapsed, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data(), help="the shared data folder")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loader-seconds", type=float, default=5.0)
    parser.add_argument("--keep", type=Path, default=None, help="keep the cache in this folder")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    if not (args.data / "ptbxl-mini").is_dir():
        print(f"ptbxl-mini not found under {args.data}; set --data or SSL4ECG_SHARED_DATA", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="ssl4ecg-bench-"))
    cache = args.keep or tmp / "ptbxl-mini"
    if args.keep and cache.exists():
        shutil.rmtree(cache)
    try:
        results = {"cpu_count": os.cpu_count(), "load_average_before": [round(x, 2) for x in os.getloadavg()]}
        results["prepare"] = bench_prepare(args.data, cache, args.workers)
        results["loader"] = bench_loader(cache, args.batch_size, args.loader_seconds, prefetch=2, crop=None)
        results["loader_no_prefetch"] = bench_loader(cache, args.batch_size, args.loader_seconds, 0, None)
        results["loader_random_crop_2250"] = bench_loader(cache, args.batch_size, args.loader_seconds, 2, 2250)
        results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    p = results["prepare"]
    print(f"prepare ptbxl-mini: {p['records']} records in {p['seconds']:.2f} s with {p['workers']} workers "
          f"= {p['records_per_s']:.0f} records/s (target >= 300); scipy import {p['scipy_import_s']:.2f} s; "
          f"up-to-date rerun {p['up_to_date_rerun_s']:.2f} s\n  phases (s): {p['phases_s']}; "
          f"reading + preprocessing alone: {p['processing_records_per_s']:.0f} records/s")
    for key in ("loader", "loader_no_prefetch", "loader_random_crop_2250"):
        r = results[key]
        print(f"{key}: {r['samples_per_s']:.0f} samples/s of {r['shape']} float32, batch {r['batch_size']}, "
              f"prefetch {r['prefetch']} (target >= 20,000)")
    print(f"load average before/after: {results['load_average_before']} / {results['load_average_after']} "
          f"on {results['cpu_count']} cores")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
