"""Attention cost vs sequence length: CroPA (dense masked, factorised) and full attention.

The token grid is ``leads x slots`` (lead-major, as ECG-JEPA); the number of slots grows
(longer records or smaller patches) at a fixed lead count, so tokens ``N = leads * slots``.
For each N it times forward+backward (training) and forward-only (teacher) of one
attention core on a packed ``qkv`` ``[B, N, 3 * D]``, in float32 and bf16:

* ``full``       -- SDPA without a mask (what CroPA is an ablation of);
* ``dense``      -- SDPA with the cached ``[N, N]`` CroPA bool mask;
* ``factorised`` -- the exact lead-wise + slot-wise attention with one shared softmax
  (:mod:`ssl4ecg.nn.attention_cropa`), cost ``O(N (S + L))`` instead of ``O(N^2)``.

Times are per call (best of the repeats), measured as process CPU time with one thread by
default, so other jobs on a shared machine inflate them less than wall-clock time would.

    python benchmarks/attention_scaling.py
    python benchmarks/attention_scaling.py --slots 25,50,100,200 --batch 8 --heads 16 --dim 768
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssl4ecg.nn.attention_cropa import CroPAGrid, cropa_attention, packed_sdpa  # noqa: E402

PATHS = ("full", "dense", "factorised")


def run_path(path: str, qkv: torch.Tensor, heads: int, grid: CroPAGrid) -> torch.Tensor:
    if path == "full":
        return packed_sdpa(qkv, heads, None)
    return cropa_attention(qkv, heads, grid, backend=path)


def time_call(fn, repeats: int, clock=time.process_time) -> float:
    """Best time of ``repeats`` calls (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def measure(path: str, batch: int, heads: int, dim: int, grid: CroPAGrid, dtype: torch.dtype,
            train: bool, repeats: int, clock) -> float:
    qkv = torch.randn(batch, grid.n_tokens, 3 * dim, dtype=dtype, requires_grad=train)

    def step():
        with torch.set_grad_enabled(train):
            out = run_path(path, qkv, heads, grid)
            if train:
                out.backward(torch.ones_like(out))
                qkv.grad = None

    return time_call(step, repeats, clock)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leads", type=int, default=8)
    parser.add_argument("--slots", default="12,25,50,100,200", help="slots per lead (N = leads x slots)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wall", action="store_true", help="wall-clock instead of process CPU time")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.process_time
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print(f"torch {torch.__version__}, threads {args.threads}, batch {args.batch}, dim {args.dim}, "
          f"heads {args.heads}, leads {args.leads}, {'wall' if args.wall else 'CPU'} time, "
          f"load {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}")
    header = f"{'dtype':5s} {'mode':7s} {'slots':>5s} {'tokens':>6s} " + " ".join(f"{p:>11s}" for p in PATHS)
    header += f" {'dense/fact':>10s}"
    print(header)
    for name in args.dtypes.split(","):
        for train in (True, False):
            for slots in (int(s) for s in args.slots.split(",")):
                grid = CroPAGrid(args.leads, slots)
                ms = {p: 1e3 * measure(p, args.batch, args.heads, args.dim, grid, dtypes[name], train,
                                       args.repeats, clock) for p in PATHS}
                print(f"{name:5s} {'fwd+bwd' if train else 'fwd':7s} {slots:5d} {grid.n_tokens:6d} "
                      + " ".join(f"{ms[p]:9.1f}ms" for p in PATHS)
                      + f" {ms['dense'] / ms['factorised']:10.2f}", flush=True)
    print(f"(load {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
