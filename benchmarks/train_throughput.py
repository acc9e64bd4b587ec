"""Training-step throughput: samples/s, FLOPs, matmul-rate utilisation and peak memory, in one run.

For ECG-JEPA at the small (encoder 192/4/4, predictor 96/2/4, batch 32) and paper
(768/12/16, predictor 384/6/12, batch 8) configurations -- 8 leads x 2500 samples,
patch 50, multi-block masks, drop path 0.1 -- it times the full training step (forward,
backward, AdamW from ``ssl4ecg.train.optim``, EMA update) in float32 and bf16 autocast
(``ssl4ecg.train.device.autocast``, as the loop uses them). Precisions are interleaved
within every repeat so their ratio is measured under the same load, and the mask
generator is reset per precision so both see the same masks.

Printed per configuration: samples/s (median and best of the repeats), the bf16/fp32
ratio, the ratio to the issue's reference numbers (a plain fp32 implementation: 0.7
samples/s paper, 19 samples/s small, on this 2-core machine), model FLOPs per sample
(forward + backward of student and predictor, forward of the teacher; linear layers and
attention counted by ``torch.utils.flop_counter.FlopCounterMode``, CroPA attention
counted as the keys it actually uses, i.e. the factorised path's products), the
fp32/bf16 GEMM rate at the model's Linear shapes measured just before and just after each
variant's steps in every round, utilisation = FLOPs/sample x samples/s / that GEMM rate,
where the step's time goes (one profiled step per variant: the matmuls' share of the step,
their achieved rate against the probe, the utilisation ceiling if nothing but the matmuls took
time, and the largest other ops), and peak memory (on CPU the peak
RSS of a fresh process doing two steps, with its RSS before the steps;
``torch.cuda.max_memory_allocated`` on CUDA). Samples per
CPU-second (process CPU time) are printed too: with one thread they are far less
sensitive than wall-clock time to other jobs on a shared machine.

    python benchmarks/train_throughput.py                       # JEPA small + paper
    python benchmarks/train_throughput.py --configs small --repeats 5 --methods jepa,stmem,simclr
    python benchmarks/train_throughput.py --compile             # also time torch.compile'd steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssl4ecg.interfaces import JEPA_LEADS, Batch, SignalSpec, StepInfo  # noqa: E402
from ssl4ecg.nn.attention_cropa import use_backend  # noqa: E402
from ssl4ecg.registry import get_registry  # noqa: E402
from ssl4ecg.train.device import autocast, cpu_has_bf16_units  # noqa: E402
from ssl4ecg.train.optim import make_optimizer, param_groups  # noqa: E402

#: the issue's reference: a plain float32 implementation on this 2-core machine (samples/s)
REFERENCE_SAMPLES_PER_S = {"small": 19.0, "paper": 0.7}
#: speed-up over the reference the issue asks for, and the fp32 utilisation target
TARGET_SPEEDUP, TARGET_FP32_UTILISATION = 1.5, 0.90

JEPA_CONFIGS: dict[str, dict[str, Any]] = {
    "small": {"encoder": {"dim": 192, "depth": 4, "heads": 4},
              "objective": {"predictor_dim": 96, "predictor_depth": 2, "predictor_heads": 4}, "batch": 32},
    "paper": {"encoder": {"dim": 768, "depth": 12, "heads": 16},
              "objective": {"predictor_dim": 384, "predictor_depth": 6, "predictor_heads": 12}, "batch": 8},
}
#: other methods: their small recipes (built through the registry)
METHOD_RECIPES = {m: f"recipes/{m}_small.toml" for m in ("stmem", "simclr", "cmsc", "cpc")}


@dataclass
class Workload:
    """One objective, its optimiser and a fixed batch: everything a timed step needs."""

    name: str
    objective: torch.nn.Module
    batch: Batch
    device: torch.device
    optimizer: torch.optim.Optimizer = field(init=False)
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    step_index: int = 0

    def __post_init__(self) -> None:
        self.objective.to(self.device).train()
        self.batch = self.batch.to(self.device)
        self.optimizer = make_optimizer(self.objective, 1e-4, 0.05, (0.9, 0.999), self.device)
        self._fused: torch.optim.Optimizer | None = None

    def fused_optimizer(self) -> torch.optim.Optimizer:
        """AdamW with ``fused=True`` over the same groups (``ssl4ecg.train.optim`` fuses on CUDA only)."""
        if self._fused is None:
            groups = param_groups(self.objective, 0.05)
            self._fused = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), fused=True)
        return self._fused

    def step(self, precision: str, loss_fn: Callable | None = None, fused_adamw: bool = False) -> float:
        """One training step as the loop does it; returns the loss."""
        info = StepInfo(step=self.step_index, total_steps=10_000, epoch=0, generator=self.generator)
        with autocast(self.device, precision):
            out = (loss_fn or self.objective.loss)(self.batch, info)
        out.loss.backward()
        optimizer = self.fused_optimizer() if fused_adamw else self.optimizer
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.objective.after_step(info)
        self.step_index += 1
        return float(out.loss.detach())


def jepa_workload(config: str, device: torch.device, seed: int = 0) -> Workload:
    """The JEPA objective at ``config`` with random signals (throughput does not depend on values)."""
    registry = get_registry()
    spec = SignalSpec(JEPA_LEADS, 250.0, 2500)
    cfg = JEPA_CONFIGS[config]
    torch.manual_seed(seed)
    encoder = registry.build("encoder", "cropa_vit", dict(cfg["encoder"]), "encoder", spec=spec)
    masker = registry.build("masker", "multiblock", {}, "masker", spec=spec)
    objective = registry.build("objective", "jepa", dict(cfg["objective"]), "objective",
                               encoder=encoder, masker=masker, spec=spec, registry=registry)
    signal = torch.randn(cfg["batch"], spec.n_leads, spec.n_samples, generator=torch.Generator().manual_seed(seed))
    return Workload(f"jepa-{config}", objective, Batch(signal=signal, leads=spec.leads, sampling_rate=250.0), device)


def recipe_workload(method: str, device: torch.device, seed: int = 0) -> Workload:
    """Another method's step at its small recipe's encoder/objective/masker and batch size."""
    from ssl4ecg.recipe import load_recipe

    recipe = load_recipe(REPO / METHOD_RECIPES[method])
    registry = get_registry()
    data = recipe.data
    leads = tuple(data.get("leads", JEPA_LEADS))
    rate = float(data.get("sampling_rate", 250.0))
    spec = SignalSpec(leads, rate, int(round(float(data.get("seconds", 10.0)) * rate)))
    options = lambda section: {k: v for k, v in section.items() if k != "name"}  # noqa: E731
    torch.manual_seed(seed)
    encoder = registry.build("encoder", recipe.encoder["name"], options(recipe.encoder), "encoder", spec=spec)
    masker = None
    if recipe.masker:
        masker = registry.build("masker", recipe.masker["name"], options(recipe.masker), "masker", spec=spec)
    objective = registry.build("objective", recipe.objective["name"], options(recipe.objective), "objective",
                               encoder=encoder, masker=masker, spec=spec, registry=registry)
    batch_size = int(recipe.train.get("batch_size", 32))
    signal = torch.randn(batch_size, spec.n_leads, spec.n_samples, generator=torch.Generator().manual_seed(seed))
    extra = {}
    patient_ids = [f"p{i // 2}" for i in range(batch_size)]  # CMSC: pairs of records per patient
    batch = Batch(signal=signal, leads=leads, sampling_rate=rate, extra=extra,
                  record_ids=[f"r{i}" for i in range(batch_size)], patient_ids=patient_ids)
    return Workload(f"{method}-small", objective, batch, device)


# ---------------------------------------------------------------------------- FLOPs
def _sdpa_cpu_flops(query, key, value, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def flops_per_sample(work: Workload) -> float:
    """Forward + backward FLOPs of one fp32 step (optimiser and EMA excluded), per sample.

    The masks advance the workload's generator; callers reset it before timing.
    """
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for _ in range(3):  # masks vary the visible count: average a few draws
        info = StepInfo(step=0, total_steps=10_000, epoch=0, generator=work.generator)
        counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with counter:
            work.objective.loss(work.batch, info).loss.backward()
        work.optimizer.zero_grad(set_to_none=True)
        counts.append(counter.get_total_flops())
    return statistics.mean(counts) / len(work.batch)


# ---------------------------------------------------------------------------- GEMM rate
def gemm_shapes(work: Workload) -> list[tuple[int, int, int]]:
    """``(M, K, N)`` of the model's Linear layers at the batch's token count (teacher grid)."""
    shapes = []
    n_rows = len(work.batch)
    encoder = getattr(work.objective, "encoder", None)
    tokens = n_rows * (getattr(encoder, "n_slots", 50) * work.batch.signal.shape[1])
    for module in work.objective.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
            shapes.append((tokens, module.in_features, module.out_features))
    unique = sorted(set(shapes), key=lambda s: -s[1] * s[2])[:4]
    return [(min(m, 8192), k, n) for m, k, n in unique]


def gemm_rate(shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device,
              seconds: float = 0.6) -> float:
    """Sustained FLOP/s of ``x @ w.T`` over ``shapes`` in ``dtype`` (best of 3 rounds)."""
    best = 0.0
    operands = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype))
                for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    for x, w in operands:  # warm-up
        x @ w.T
    for _ in range(3):
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3 or reps == 0:
            for x, w in operands:
                x @ w.T
            reps += 1
        _sync(device)
        best = max(best, reps * flops / (time.perf_counter() - start))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- where the time goes
#: the matrix multiplies of a step (the ops a GEMM probe measures); everything else is "other"
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def _matmul_flops(name: str, shapes: list) -> int:
    """FLOPs of one matmul call from its recorded input shapes (0 when they are missing)."""
    try:
        if name in ("aten::addmm", "aten::baddbmm"):
            shapes = shapes[1:]
        a, b = shapes[0], shapes[1]
        if name in ("aten::bmm", "aten::baddbmm"):
            return 2 * a[0] * a[1] * a[2] * b[2]
        return 2 * a[0] * a[1] * b[1]
    except (IndexError, TypeError):
        return 0


def step_breakdown(run: Callable[[], float], top: int = 6) -> dict[str, Any]:
    """Profile one step of ``run``: the matmuls' share of the step and their achieved rate.

    Returns the step's wall time under the profiler, the matmuls' time and FLOPs (from the
    recorded shapes), and the ``top`` other ops by time. Op times are the calling thread's
    wall time per op (the profiler's self time; intra-op threads work inside it), so shares
    add up to about the step. The profiler itself adds a few per cent.
    """
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    wall = time.perf_counter() - start
    matmul_seconds, matmul_flops, other = 0.0, 0, {}
    for event in prof.key_averages(group_by_input_shape=True):
        seconds = event.self_cpu_time_total / 1e6
        if event.key in MATMUL_OPS:
            matmul_seconds += seconds
            matmul_flops += _matmul_flops(event.key, event.input_shapes) * event.count
        elif seconds > 0:
            other[event.key] = other.get(event.key, 0.0) + seconds
    largest = sorted(other.items(), key=lambda kv: -kv[1])[:top]
    return {"wall_s": wall, "matmul_s": matmul_seconds, "matmul_flops": matmul_flops,
            "matmul_share": matmul_seconds / wall, "other_top": {k: v / wall for k, v in largest}}


# ---------------------------------------------------------------------------- memory
def peak_memory_mb(workload: str, precision: str, device: torch.device, threads: int) -> dict | None:
    """Peak memory of two training steps.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: a fresh process builds the workload and
    runs two steps; ``peak`` is its peak RSS (``VmHWM``, everything: interpreter,
    libraries, model, optimiser state, activations) and ``before`` its RSS before the steps.
    RSS depends on the allocator's caching, so differences below ~10 % are noise.
    """
    if device.type == "cuda":
        work = _build(workload, device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            work.step(precision)
        return {"peak": torch.cuda.max_memory_allocated(device) / 2**20, "before": None}
    command = [sys.executable, __file__, "--_memory-probe", workload, precision, "--threads", str(threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=True)
        before, peak = (float(v) for v in done.stdout.strip().splitlines()[-1].split())
        return {"peak": peak, "before": before}
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def _memory_probe(workload: str, precision: str) -> None:
    """Print the RSS before two steps and the peak RSS (MiB)."""
    work = _build(workload, torch.device("cpu"))
    before = _current_rss_mb()
    for _ in range(2):
        work.step(precision)
    print(before, _peak_rss_mb())


def _current_rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """VmHWM (this process image's peak RSS); ``ru_maxrss`` would include the parent's RSS
    at fork time, which Linux carries across ``exec``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_times() -> list[int] | None:
    """The machine's aggregate CPU time counters (Linux ``/proc/stat``), or None elsewhere."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None


def stolen_share(start: list[int] | None, end: list[int] | None) -> float | None:
    """Share of CPU time the hypervisor gave to other guests between two :func:`cpu_times`.

    On a shared virtual machine this is the noise floor of every timing here: at 25 % steal
    a step takes a third longer than on the same vCPUs alone.
    """
    if not start or not end or len(start) < 8 or len(end) < 8:
        return None
    delta = [b - a for a, b in zip(start, end)]
    total = sum(delta[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return delta[7] / total if total > 0 else None


def _build(workload: str, device: torch.device) -> Workload:
    method, config = workload.split("-", 1)
    return jepa_workload(config, device) if method == "jepa" else recipe_workload(method, device)


# ---------------------------------------------------------------------------- timing
def _with_backend(backend: str, fn: Callable, *args: Any) -> Any:
    with use_backend(backend):
        return fn(*args)


def time_steps(work: Workload, variants: dict[str, Callable[[], float]], steps: int, repeats: int,
               device: torch.device, probes: dict[str, Callable[[], float]]) -> tuple[dict, dict, dict]:
    """Seconds per step of each variant and the GEMM rates around it, ``repeats`` interleaved rounds.

    The GEMM probes run before the first variant of a round and after every variant; a
    variant's rate is the mean of the probes just before and just after its steps. On a
    shared machine whose speed drifts within seconds, that pairs every step time with the
    matrix-multiply rate of the same moment (``rates[probe][variant]``, one value per round).
    """
    for run in variants.values():  # warm-up (and compile) each variant
        run()
        run()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in variants}
    rates: dict[str, dict[str, list[float]]] = {p: {name: [] for name in variants} for p in probes}
    for _ in range(repeats):
        before = {p: probe() for p, probe in probes.items()}
        for name, run in variants.items():
            work.generator.manual_seed(1)  # same masks for every variant
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(steps):
                run()
            _sync(device)
            seconds[name].append((time.perf_counter() - start) / steps)
            cpu_seconds[name].append((time.process_time() - cpu_start) / steps)
            after = {p: probe() for p, probe in probes.items()}
            for p in probes:
                rates[p][name].append((before[p] + after[p]) / 2)
            before = after
    return seconds, cpu_seconds, rates


def variant_precision(name: str) -> str:
    """The precision a variant runs in: ``"fp32-plain"`` and ``"bf16+compile"`` -> ``"fp32"``, ``"bf16"``."""
    return name.split("+")[0].split("-")[0]


def benchmark(workload: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """All numbers for one workload."""
    work = _build(workload, device)
    n = len(work.batch)
    flops = flops_per_sample(work)
    shapes = gemm_shapes(work)
    precisions = [p for p in args.precisions.split(",") if p]
    variants: dict[str, Callable[[], float]] = {}
    if not args.no_plain and workload.startswith("jepa"):
        # the issue's reference: a plain fp32 step, CroPA as SDPA with the dense [N, N] mask
        variants["fp32-plain"] = lambda: _with_backend("dense", work.step, "fp32")
    variants.update({p: (lambda p=p: work.step(p)) for p in precisions})
    if args.fused_adamw:
        for p in precisions:
            variants[f"{p}+fusedadam"] = lambda p=p: work.step(p, fused_adamw=True)
    if args.compile:
        compiled = torch.compile(work.objective.loss)
        for p in precisions:
            variants[f"{p}+compile"] = lambda p=p: work.step(p, compiled)
    gemm_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    probes = {p: (lambda d=gemm_dtypes[p]: gemm_rate(shapes, d, device, seconds=0.3))
              for p in ("fp32", "bf16") if p == "fp32" or p in precisions}
    seconds, cpu_seconds, rates = time_steps(work, variants, args.steps, args.repeats, device, probes)
    result: dict[str, Any] = {
        "workload": workload, "batch": n, "flops_per_sample": flops, "gemm_shapes": shapes,
        "gemm_rate": {p: statistics.median(r for rounds in per_variant.values() for r in rounds)
                      for p, per_variant in rates.items()},
        "gemm_rate_rounds": rates,
        "seconds_per_step_rounds": seconds, "cpu_seconds_per_step_rounds": cpu_seconds, "variants": {},
    }
    config = workload.split("-", 1)[1]
    reference = REFERENCE_SAMPLES_PER_S.get(config) if workload.startswith("jepa") else None
    for name, values in seconds.items():
        per_s = [n / s for s in values]
        base = variant_precision(name)
        entry = {
            "samples_per_s_median": statistics.median(per_s), "samples_per_s_best": max(per_s),
            # samples per CPU-second of this process (all threads): robust to other jobs at 1 thread
            "samples_per_cpu_s_median": statistics.median(n / c for c in cpu_seconds[name]),
            # per round: achieved FLOP/s over the GEMM rate measured around the variant's steps
            "utilisation_vs_fp32_gemm": statistics.median(
                flops * r / g for r, g in zip(per_s, rates["fp32"][name])),
            "peak_memory_mb": None if args.no_memory or name != base
            else peak_memory_mb(workload, base, device, args.threads),
        }
        if base in rates and base != "fp32":
            entry[f"utilisation_vs_{base}_gemm"] = statistics.median(
                flops * r / g for r, g in zip(per_s, rates[base][name]))
        if reference:
            entry["vs_reference"] = entry["samples_per_s_median"] / reference
            entry["best_vs_reference"] = entry["samples_per_s_best"] / reference
        result["variants"][name] = entry
    if not args.no_breakdown:
        for name, run in variants.items():
            work.generator.manual_seed(1)
            base = variant_precision(name)
            parts = step_breakdown(run)
            if not name.endswith("-plain"):  # (the plain path's attention is SDPA, not matmuls)
                # the utilisation this step would reach if everything but its matmuls took no time
                parts["ceiling_vs_fp32_gemm"] = flops * n / parts["matmul_s"] / result["gemm_rate"]["fp32"]
            parts["matmul_rate_vs_own_gemm"] = (parts["matmul_flops"] / parts["matmul_s"]
                                                / result["gemm_rate"].get(base, result["gemm_rate"]["fp32"]))
            result["variants"][name]["breakdown"] = parts
    for baseline in ("fp32", "fp32-plain"):
        if baseline in seconds:
            for name in seconds:
                ratios = [a / b for a, b in zip(seconds[baseline], seconds[name])]
                result["variants"][name][f"speedup_vs_{baseline}_same_round"] = statistics.median(ratios)
    return result


def report(result: dict[str, Any], reference: float | None) -> str:
    """The human-readable table of one workload, with the issue's targets checked."""
    rate = result["gemm_rate"]
    lines = [f"\n== {result['workload']}  (batch {result['batch']}, "
             f"{result['flops_per_sample'] / 1e9:.2f} GFLOP/sample fwd+bwd, GEMM rate fp32 {rate['fp32'] / 1e9:.1f}"
             + (f" / bf16 {rate['bf16'] / 1e9:.1f}" if "bf16" in rate else "")
             + " GFLOP/s; medians of the rounds, ratios per round)"]
    plain = "fp32-plain" in result["variants"]
    header = (f"{'variant':14s} {'samples/s':>9s} {'best':>6s} {'/CPU-s':>7s} {'x fp32':>6s}"
              + (f" {'x plain':>7s}" if plain else "")
              + f" {'util fp32':>9s} {'util own':>8s}"
              + (f" {'x ref':>6s} {'x ref best':>10s}" if reference else "") + f" {'peak RSS MB (before steps)':>26s}")
    lines.append(header)
    for name, e in result["variants"].items():
        base = variant_precision(name)
        own = e.get(f"utilisation_vs_{base}_gemm", e["utilisation_vs_fp32_gemm"])
        row = (f"{name:14s} {e['samples_per_s_median']:9.2f} {e['samples_per_s_best']:6.2f} "
               f"{e['samples_per_cpu_s_median']:7.2f} "
               + (f"{e['speedup_vs_fp32_same_round']:6.2f}" if "speedup_vs_fp32_same_round" in e else f"{'-':>6s}")
               + (f" {e['speedup_vs_fp32-plain_same_round']:7.2f}" if plain else "")
               + f" {e['utilisation_vs_fp32_gemm']:9.1%} {own:8.1%}")
        if reference:
            row += f" {e['vs_reference']:6.2f} {e['best_vs_reference']:10.2f}"
        mem = e["peak_memory_mb"]
        if mem is None:
            row += f" {'-':>26s}"
        else:
            row += f" {mem['peak']:19.0f}" + (f" ({mem['before']:.0f})" if mem["before"] is not None else "")
        lines.append(row)
    broken_down = {name: e["breakdown"] for name, e in result["variants"].items() if "breakdown" in e}
    if broken_down:
        lines.append("where a step's time goes (one profiled step per variant):")
        lines.append(f"{'variant':14s} {'matmul share':>12s} {'matmul GFLOP/s':>14s} {'x own GEMM rate':>15s} "
                     f"{'ceiling util fp32':>17s}  largest other ops (share of the step)")
        for name, parts in broken_down.items():
            others = ", ".join(f"{k.replace('aten::', '')} {v:.0%}" for k, v in parts["other_top"].items())
            lines.append(f"{name:14s} {parts['matmul_share']:12.1%} {parts['matmul_flops'] / parts['matmul_s'] / 1e9:14.1f} "
                         f"{parts['matmul_rate_vs_own_gemm']:15.1%} "
                         + (f"{parts['ceiling_vs_fp32_gemm']:17.1%}" if "ceiling_vs_fp32_gemm" in parts else f"{'-':>17s}")
                         + f"  {others}")
    if reference:
        best = max(result["variants"].values(), key=lambda e: e["samples_per_s_median"])
        verdict = "MET" if best["vs_reference"] >= TARGET_SPEEDUP else "NOT met"
        lines.append(f"target >= {TARGET_SPEEDUP}x the reference {reference} samples/s: {verdict} here "
                     f"(median {best['vs_reference']:.2f}x, best round {best['best_vs_reference']:.2f}x)")
        if plain:
            top = max(e.get("speedup_vs_fp32-plain_same_round", 0.0) for e in result["variants"].values())
            lines.append(f"  load-independent proxy: fastest variant vs plain fp32 in the same round {top:.2f}x")
        fp32 = result["variants"].get("fp32")
        if fp32:
            verdict = "MET" if fp32["utilisation_vs_fp32_gemm"] >= TARGET_FP32_UTILISATION else "NOT met"
            lines.append(f"target fp32 utilisation >= {TARGET_FP32_UTILISATION:.0%}: {verdict} "
                         f"({fp32['utilisation_vs_fp32_gemm']:.1%})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="small,paper", help="JEPA configurations: small, paper")
    parser.add_argument("--methods", default="jepa", help="jepa and/or stmem, simclr, cmsc, cpc (small recipes)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (variants interleaved)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd objectives")
    parser.add_argument("--fused-adamw", action="store_true",
                        help="also time steps with fused AdamW (ssl4ecg.train.optim fuses on CUDA only)")
    parser.add_argument("--no-plain", action="store_true",
                        help="skip the plain-fp32 (dense CroPA mask) JEPA variant")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-breakdown", action="store_true",
                        help="skip the profiled step per variant (matmul share and rate, largest other ops)")
    parser.add_argument("--json", type=Path, help="write all numbers here")
    parser.add_argument("--_memory-probe", nargs=2, metavar=("WORKLOAD", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._memory_probe:
        _memory_probe(*args._memory_probe)
        return 0
    device = torch.device(args.device)
    workloads = []
    for method in args.methods.split(","):
        if method == "jepa":
            workloads += [f"jepa-{c}" for c in args.configs.split(",") if c]
        elif method:
            workloads.append(f"{method}-small")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}, "
          f"bf16 units: {cpu_has_bf16_units()}, load {os.getloadavg()[0]:.2f} "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    results = []
    for workload in workloads:
        counters = cpu_times()
        result = benchmark(workload, args, device)
        result["load_after"] = os.getloadavg()[0]
        result["cpu_time_stolen"] = stolen_share(counters, cpu_times())
        results.append(result)
        reference = REFERENCE_SAMPLES_PER_S.get(workload.split("-", 1)[1]) if workload.startswith("jepa") else None
        stolen = result["cpu_time_stolen"]
        print(report(result, reference) + f"\n(load {result['load_after']:.2f}"
              + (f", CPU time stolen by the hypervisor {stolen:.0%}" if stolen is not None else "") + ")", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
