"""Loader worker processes and pinned memory: samples/s of a MixtureLoader over memory-mapped caches.

    python benchmarks/loader_workers.py [--records 12000] [--workers 0,2,4,8] [--dtypes float32,float16]
        [--device cuda] [--seconds 8] [--json bench_out/loader_workers.json]

Writes three caches' ``signals.npy`` (``--records`` each, 8 leads x 2500 samples, ECG-like
values that need no generator: a sine mixture with a per-record phase) under a temporary
folder, reads them once (page cache warm), then for every dtype, ``--workers`` setting and
pinning (``off`` and, with ``--device cuda``, ``on``) opens the caches, builds a
``MixtureLoader`` (equal weights, ``--batch-size``) and measures the time to the first batch
and the samples/s over ``--seconds``. With ``--device cuda`` every batch is copied to the GPU
(``non_blocking`` when pinned) and reduced there, so the numbers include the host-to-device
copy a training step would wait for. Complements ``scale_data.py``, which measures the real
formats on this 2-core machine; this one is for a many-core GPU host.
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_cache(path: Path, n: int, dtype: str, seed: int) -> Path:
    """``path/signals.npy`` with ``n`` records [8, 2500] of ECG-like values, written block by block."""
    path.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(path / "signals.npy", mode="w+", dtype=dtype, shape=(n, 8, 2500))
    t = np.arange(2500) / 250.0
    base = (np.sin(2 * np.pi * 1.2 * t) ** 15 + 0.2 * np.sin(2 * np.pi * 0.3 * t)).astype(np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, n, 512):
        rows = min(512, n - start)
        shift = rng.integers(0, 2500, size=rows)
        idx = (np.arange(2500)[None, :] + shift[:, None]) % 2500
        block = base[idx][:, None, :] * rng.uniform(0.5, 1.5, size=(rows, 8, 1)).astype(np.float32)
        out[start:start + rows] = block
    out.flush()
    del out
    return path


def records_of(path: Path):
    from ssl4ecg.data.records import RecordSet

    signals = np.load(path / "signals.npy", mmap_mode="r")
    return RecordSet(signals=signals, leads=("I", "II", "V1", "V2", "V3", "V4", "V5", "V6"),
                     sampling_rate=250.0, record_ids=np.arange(len(signals)).astype(str))


def measure(paths: list[Path], batch_size: int, workers: int, pin: bool, device: str, seconds: float) -> dict:
    import torch

    from ssl4ecg.data.loader import MixtureLoader

    t0 = time.perf_counter()
    parts = [records_of(p) for p in paths]
    loader = MixtureLoader(parts, [1.0] * len(parts), batch_size, seed=0, workers=workers, pin_memory=pin)
    batches = iter(loader)
    total = torch.zeros((), device=device)

    def consume(batch):
        nonlocal total
        signal = batch.signal.to(device, non_blocking=pin)
        total = total + signal[:, 0, 0].sum()

    consume(next(batches))
    if device != "cpu":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    count, start = 0, time.perf_counter()
    pinned = True
    while time.perf_counter() - start < seconds:
        for batch in batches:
            pinned = pinned and batch.signal.is_pinned()
            consume(batch)
            count += len(batch)
            if time.perf_counter() - start >= seconds:
                break
        else:
            batches = iter(loader)
            continue
        batches.close()
    if device != "cpu":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"dtype": str(parts[0].signals.dtype), "workers": workers, "pin_memory": pin,
            "batches_pinned": bool(pinned), "first_batch_s": round(first, 3),
            "samples_per_s": round(count / elapsed, 1), "samples": count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=12000, help="records per cache (3 caches)")
    parser.add_argument("--workers", default="0,2,4,8")
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--root", type=Path, default=None, help="where the caches go (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=REPO / "bench_out" / "loader_workers.json")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="ssl4ecg-loader-", dir=args.root))
    report = {"cpus": os.cpu_count(), "device": args.device, "batch_size": args.batch_size,
              "records_per_cache": args.records, "results": []}
    if args.device != "cpu":
        report["gpu"] = torch.cuda.get_device_name(0)
    try:
        for dtype in [d for d in args.dtypes.split(",") if d]:
            t0 = time.perf_counter()
            paths = [write_cache(root / f"{dtype}-{k}", args.records, dtype, k) for k in range(3)]
            written = time.perf_counter() - t0
            for p in paths:  # page cache warm
                with open(p / "signals.npy", "rb", buffering=0) as fh:
                    while fh.read(1 << 24):
                        pass
            print(f"{dtype}: 3 caches of {args.records} records written in {written:.1f} s", flush=True)
            for pin in ([False, True] if args.device != "cpu" else [False]):
                for workers in [int(w) for w in args.workers.split(",") if w]:
                    result = measure(paths, args.batch_size, workers, pin, args.device, args.seconds)
                    result["load"] = [round(x, 2) for x in os.getloadavg()]
                    report["results"].append(result)
                    print(json.dumps(result), flush=True)
            shutil.rmtree(root / f"{dtype}-0"), shutil.rmtree(root / f"{dtype}-1"), shutil.rmtree(root / f"{dtype}-2")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
