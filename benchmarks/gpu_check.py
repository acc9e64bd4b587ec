"""One prepared GPU check of ssl4ecg, written as a JSON report after every part.

    python benchmarks/gpu_check.py --out REPORT.json             # on a CUDA host, from the repo root
    python benchmarks/gpu_check.py --dry-run --out REPORT.json   # CPU: every part that needs no CUDA, tiny
    python benchmarks/gpu_check.py --only recipes,resume --out REPORT.json

Parts (each recorded with status pass / fail / skipped, seconds, reason and details):

1. ``environment`` -- torch / CUDA / NCCL versions, GPU name and memory, bf16 support, which
   optional packages are missing and what that turns off;
2. ``imports`` -- a fresh ``python -c`` imports every module of ssl4ecg and plugins/ with
   ``wfdb`` and ``tomli_w`` blocked and ssl4ecg's distribution metadata hidden, builds the
   registry (built-in plugins from pyproject.toml) and round-trips every recipe through TOML;
3. ``cuda_tests`` -- ``pytest -m cuda`` (counts from its JUnit XML);
4. ``recipes`` -- quickstart and every ``*_small`` recipe on the synthetic source, no evaluators,
   50 steps in bf16 on CUDA: loss finite and falling, no fallback warnings, recompilations
   (``TORCH_LOGS=recompiles`` and ``flex_stats()``), samples/s;
5. ``jepa_paper_step`` -- the jepa_mb encoder/predictor (ViT-B 768/12/16, predictor 384/6/12,
   8 leads x 2500 samples, batch 64) trained in bf16 in-process: samples/s over 20 steps
   after warm-up, peak memory, model FLOPs per step and utilisation of the measured bf16 GEMM rate;
6. ``flex_vs_dense`` -- CroPA through FlexAttention against the dense masked path, forward and
   backward, head dims 48 and 64, several visible-slot counts; compilations over 20 varying steps;
7. ``torchrun_nccl`` -- a 1-process ``torchrun`` run: did it initialise an NCCL process group?
8. ``resume`` -- N steps, a simulated crash right after the step-N checkpoint, ``--resume`` to
   2N, against an uninterrupted 2N-step run (max abs weight difference; bit-exact on CPU).

``--dry-run`` runs 1, 2, 4-6 and 8 on the CPU at tiny sizes (flex forward only) and marks the
CUDA-only parts skipped. Every part runs in a child process with its own timeout inside the
``--budget-s`` of the whole check; the parent never imports torch, so a stuck device cannot hang
it, and a killed part keeps the details it had written. Nothing needs to be installed: the
repository root and plugins/ go on ``sys.path`` and ``PYTHONPATH``. Runs of the CLI go through
``gpu_check.py --_ssl4ecg ARGS`` = ``python -m ssl4ecg ARGS`` plus a probe that records process-group
initialisation, ``flex_stats()`` and dynamo counters (and can exit right after a checkpoint).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "plugins"
for _path in (str(PLUGINS), str(REPO), str(Path(__file__).resolve().parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from ssl4ecg.io import atomic_write_text  # noqa: E402 - after the path setup; imports no torch

PARTS = ("environment", "imports", "cuda_tests", "recipes", "jepa_paper_step", "flex_vs_dense",
         "torchrun_nccl", "resume")
#: parts with no CPU variant: skipped by --dry-run with this reason
CUDA_ONLY = {"cuda_tests": "needs a CUDA GPU (pytest -m cuda runs only there)",
             "torchrun_nccl": "needs a CUDA GPU (NCCL)"}
#: seconds each part may take: (on CUDA, in --dry-run); --timeout PART=S overrides
PART_TIMEOUTS = {"environment": (60, 60), "imports": (60, 60), "cuda_tests": (120, 60), "recipes": (180, 120),
                 "jepa_paper_step": (150, 60), "flex_vs_dense": (120, 60), "torchrun_nccl": (90, 60),
                 "resume": (120, 90)}
#: a part is skipped when less than this is left of --budget-s
MIN_PART_SECONDS = 20.0
RECIPES = ("quickstart", "jepa_small", "stmem_small", "simclr_small", "cmsc_small", "cpc_small", "vqvae_small")
EXPECTED_OBJECTIVES = ("jepa", "stmem", "simclr", "cmsc", "cpc", "vqvae")
#: optional packages and what their absence turns off
OPTIONAL = {
    "wfdb": "WFDB record reading (ptbxl, cinc, folder sources) and the clinical WFDB comparison; "
            "this check uses data.source = synthetic",
    "tomli_w": "none: recipe.toml is written by ssl4ecg.recipe.dumps_toml's built-in writer",
    "deepfake_ecg": "the deepfake source (not used by this check)",
}
#: stderr lines that mean a fast path was abandoned
FALLBACK = re.compile(r"falls? back|fallback|RuntimeWarning", re.IGNORECASE)
RECOMPILE = re.compile(r"Recompiling function")
PROBE_ENV, EXIT_ENV = "SSL4ECG_GPU_CHECK_PROBE", "SSL4ECG_GPU_CHECK_EXIT_AFTER_CHECKPOINT"
#: exit code of a run the probe stopped right after its checkpoint (the simulated crash)
EXIT_AFTER_CHECKPOINT = 75


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of child processes: repository root and plugins/ first on PYTHONPATH."""
    env = dict(os.environ)
    parts = [str(REPO), str(PLUGINS)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env.update(extra or {})
    return env


def clean_json(value: Any) -> Any:
    """``value`` with non-finite floats as strings ("nan", "inf"), so the report is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(clean_json(data), indent=1, default=str) + "\n")


def tail(path: Path, chars: int = 2000) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group of ``proc`` (started with a new session), SIGKILL after ``grace`` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ============================================================================ the parent
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON report (rewritten after every part)")
    parser.add_argument("--dry-run", action="store_true", help="CPU only, tiny sizes; CUDA-only parts skipped")
    parser.add_argument("--only", default="", help=f"comma-separated parts to run, of: {', '.join(PARTS)}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the whole check (default 450 on CUDA, 300 in --dry-run)")
    parser.add_argument("--timeout", action="append", default=[], metavar="PART=SECONDS",
                        help="override one part's timeout (repeatable)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="recipe runs at a time (1 gives samples/s of a GPU not shared with another run)")
    parser.add_argument("--work", type=Path, default=None, help="folder for run directories (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    selected = [p.strip() for p in args.only.split(",") if p.strip()] or list(PARTS)
    for name in selected:
        if name not in PARTS:
            parser.error(f"--only: unknown part '{name}'; choose from {', '.join(PARTS)}")
    args.selected = selected
    args.timeouts = {name: PART_TIMEOUTS[name][1 if args.dry_run else 0] for name in PARTS}
    for item in args.timeout:
        name, _, seconds = item.partition("=")
        if name not in PARTS:
            parser.error(f"--timeout {item}: unknown part '{name}'; choose from {', '.join(PARTS)}")
        try:
            args.timeouts[name] = float(seconds)
        except ValueError:
            parser.error(f"--timeout {item}: '{seconds}' is not a number of seconds")
    if args.budget_s is None:
        args.budget_s = 300.0 if args.dry_run else 450.0
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be at least 1")
    return args


_LIVE_PARTS: set[subprocess.Popen] = set()


def kill_live_parts() -> None:
    """Stop every part's process group still running (the check was interrupted)."""
    for proc in list(_LIVE_PARTS):
        kill_group(proc, grace=2.0)


def run_part(name: str, timeout: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run one part in a child process (own session) with ``timeout``; its result, or why it has none."""
    result_path, log_path = work / f"{name}.result.json", work / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_part", name, "--_result", str(result_path),
           "--_work", str(work / name), "--_seconds", f"{timeout:.1f}", "--jobs", str(args.jobs)]
    if args.dry_run:
        cmd.append("--dry-run")
    start = time.monotonic()
    timed_out = interrupted = False
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO,
                                start_new_session=True)
        _LIVE_PARTS.add(proc)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
        except KeyboardInterrupt:  # the check was stopped: keep what the part had written
            interrupted = True
            kill_group(proc, grace=2.0)
        except BaseException:
            kill_group(proc)
            raise
        finally:
            _LIVE_PARTS.discard(proc)
    seconds = time.monotonic() - start
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = {}
    details = result.get("details", {})
    status, reason = result.get("status"), result.get("reason", "")
    if interrupted:
        status, reason = "fail", "gpu_check was interrupted while this part ran"
    elif timed_out:
        status, reason = "fail", f"timed out after {timeout:.0f} s and was killed; details hold what it finished"
    elif proc.returncode != 0 or status not in ("pass", "fail", "skipped"):
        status, reason = "fail", f"the part's process exited with code {proc.returncode} without a result"
    entry = {"status": status, "seconds": round(seconds, 1), "reason": reason, "details": details}
    if status == "fail":
        entry["log_tail"] = tail(log_path)
    if interrupted:
        entry["interrupted"] = True
    return entry


def new_report(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    return {
        "check": "ssl4ecg gpu_check", "version": 1, "mode": "dry-run" if args.dry_run else "cuda",
        "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "finished": None, "seconds": 0.0,
        "budget_s": args.budget_s, "work_dir": str(work),
        "parts": {name: {"status": "pending", "seconds": 0.0, "reason": "", "details": {}} for name in PARTS},
        "optional_missing": {}, "counts": {},
    }


def summary_line(name: str, entry: dict[str, Any]) -> str:
    text = entry["details"].get("summary") or entry.get("reason", "")
    if entry["status"] == "fail" and entry.get("reason") and entry["reason"] not in text:
        text = f"{entry['reason']}; {text}" if text else entry["reason"]
    return f"  {name:16s} {entry['status']:7s} {entry['seconds']:6.1f} s  {text}"


def main_parent(argv: list[str]) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    work = (args.work or Path(tempfile.mkdtemp(prefix="ssl4ecg_gpu_check_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report = new_report(args, work)
    start = time.monotonic()
    deadline = start + args.budget_s
    lock = threading.RLock()
    state: dict[str, Any] = {"cuda_available": None}
    stopping = threading.Event()  # set when the check is interrupted: no part starts after it

    def save() -> None:
        with lock:
            report["seconds"] = round(time.monotonic() - start, 1)
            counts = {s: 0 for s in ("pass", "fail", "skipped")}
            for entry in report["parts"].values():
                if entry["status"] in counts:
                    counts[entry["status"]] += 1
            report["counts"] = counts
            write_json(out, report)

    def skip_reason(name: str) -> str:
        if name not in args.selected:
            return "not selected (--only)"
        if args.dry_run and name in CUDA_ONLY:
            return f"--dry-run: {CUDA_ONLY[name]}"
        if state["cuda_available"] is False and not args.dry_run:
            return "no CUDA device (see environment); use --dry-run on a CPU"
        return ""

    def execute(name: str) -> None:
        entry = report["parts"][name]
        if stopping.is_set():
            return
        remaining = deadline - time.monotonic()
        reason = skip_reason(name) or (f"time budget spent ({max(remaining, 0):.0f} s of --budget-s "
                                       f"{args.budget_s:.0f} left)" if remaining < MIN_PART_SECONDS else "")
        if reason:
            with lock:
                entry.update(status="skipped", reason=reason)
            save()
            return
        timeout = min(args.timeouts[name], remaining)
        with lock:
            entry.update(status="running")
        save()
        print(f"[gpu_check] {name} (timeout {timeout:.0f} s) ...", flush=True)
        result = run_part(name, timeout, args, work)
        if stopping.is_set():
            result.update(status="fail", reason="gpu_check was interrupted while this part ran")
        interrupted = result.pop("interrupted", False)
        with lock:
            entry.update(result)
            if name == "environment":
                state["cuda_available"] = entry["details"].get("cuda_available")
                report["optional_missing"] = entry["details"].get("optional_missing", {})
        print(summary_line(name, entry), flush=True)
        save()
        if interrupted:
            raise KeyboardInterrupt("interrupted while a part ran")

    def on_term(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    save()
    try:
        if args.dry_run and args.jobs > 1:
            # on the CPU the parts are independent: overlap them (on CUDA they run one at a time)
            pool = ThreadPoolExecutor(max_workers=args.jobs)
            try:
                longest_first = sorted(PARTS, key=lambda n: -args.timeouts[n])
                for future in [pool.submit(execute, name) for name in longest_first]:
                    future.result()
            except BaseException:
                stopping.set()
                kill_live_parts()
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            for name in PARTS:
                execute(name)
    except KeyboardInterrupt as exc:
        stopping.set()
        kill_live_parts()
        with lock:
            for entry in report["parts"].values():
                if entry["status"] in ("running", "pending"):
                    entry.update(status="fail" if entry["status"] == "running" else "skipped",
                                 reason=f"gpu_check was interrupted ({exc})")
    finally:
        report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        save()
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nssl4ecg gpu_check ({report['mode']}) {report['seconds']:.0f} s -> {out}")
    for name, entry in report["parts"].items():
        print(summary_line(name, entry))
    for module, effect in report["optional_missing"].items():
        print(f"  optional {module} missing: {effect}")
    failed = [n for n, e in report["parts"].items() if e["status"] == "fail"]
    print("FAILED: " + ", ".join(failed) if failed else "nothing failed")
    return 1 if failed else 0


# ============================================================================ a part's child process
class PartContext:
    """What a part's function gets: sizes, a work folder, its details and a runner for subprocesses."""

    def __init__(self, name: str, result: Path, work: Path, dry_run: bool, jobs: int, seconds: float) -> None:
        self.name, self.result, self.work, self.dry_run, self.jobs = name, result, work, dry_run, jobs
        self.deadline = time.monotonic() + seconds - 3.0  # leave time to write the result
        self.details: dict[str, Any] = {}
        self.lock = threading.RLock()  # the SIGTERM handler may run while the main thread holds it
        self.live: set[subprocess.Popen] = set()
        work.mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def save(self, status: str = "running", reason: str = "") -> None:
        with self.lock:
            write_json(self.result, {"status": status, "reason": reason, "details": self.details})

    def record(self, key: str, value: Any) -> None:
        """Set ``details[key]`` and write the result file (so a kill keeps it)."""
        with self.lock:
            self.details[key] = value
        self.save()

    def run(self, cmd: list[str], timeout: float, log_stem: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run ``cmd`` in its own session, stdout/stderr to files; killed after ``min(timeout, remaining)``."""
        timeout = max(1.0, min(timeout, self.remaining()))
        out_path, err_path = self.work / f"{log_stem}.stdout", self.work / f"{log_stem}.stderr"
        start, timed_out = time.monotonic(), False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env or child_env(), cwd=REPO,
                                    start_new_session=True)
            with self.lock:
                self.live.add(proc)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_group(proc)
            finally:
                with self.lock:
                    self.live.discard(proc)
        return {"rc": proc.returncode, "timed_out": timed_out, "timeout_s": round(timeout, 1),
                "seconds": round(time.monotonic() - start, 1), "stdout": out_path, "stderr": err_path}

    def kill_all(self) -> None:
        with self.lock:
            procs = list(self.live)
        for proc in procs:
            kill_group(proc, grace=2.0)


def main_child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--_part", dest="part", required=True, choices=PARTS)
    parser.add_argument("--_result", dest="result", type=Path, required=True)
    parser.add_argument("--_work", dest="work", type=Path, required=True)
    parser.add_argument("--_seconds", dest="seconds", type=float, required=True)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    ctx = PartContext(args.part, args.result, args.work, args.dry_run, args.jobs, args.seconds)

    def on_term(signum, frame):  # noqa: ARG001 - the parent's timeout: stop our own children too
        ctx.kill_all()
        ctx.save("fail", "killed at its timeout")
        os._exit(1)

    signal.signal(signal.SIGTERM, on_term)
    ctx.save()
    try:
        status, reason = PART_FUNCTIONS[args.part](ctx)
    except Exception as exc:  # noqa: BLE001 - any error is this part's failure, with its traceback
        ctx.details["traceback"] = traceback.format_exc()[-4000:]
        status, reason = "fail", f"{type(exc).__name__}: {exc}"
    ctx.save(status, reason)
    return 0


# ---------------------------------------------------------------------------- shared helpers
def _flex_stats() -> dict[str, Any] | None:
    """``ssl4ecg.nn.attention_cropa.flex_stats()`` if this version has it, else None."""
    try:
        from ssl4ecg.nn import attention_cropa

        stats = getattr(attention_cropa, "flex_stats", None)
        return dict(stats()) if callable(stats) else None
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not fail the part
        return {"error": f"{type(exc).__name__}: {exc}"}


def _dynamo_counts() -> dict[str, int] | None:
    """Frames torch.compile compiled (recompilations included) and graphs it produced so far."""
    try:
        from torch._dynamo.utils import counters

        return {"frames": int(counters["frames"]["total"]), "unique_graphs": int(counters["stats"]["unique_graphs"])}
    except Exception:  # noqa: BLE001 - private counters may move between torch versions
        return None


def _delta(after: dict | None, before: dict | None) -> dict[str, Any] | None:
    if not after or not before:
        return None
    return {k: v - before[k] for k, v in after.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(before.get(k), (int, float))}


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fallback_lines(stderr: str, limit: int = 5) -> list[str]:
    """Lines of ``stderr`` that report a fallback or a RuntimeWarning (at most ``limit``)."""
    return [line.strip()[:300] for line in stderr.splitlines() if FALLBACK.search(line)][:limit]


def recompile_count(stderr: str) -> int:
    """Recompilations logged under ``TORCH_LOGS=recompiles``."""
    return len(RECOMPILE.findall(stderr))


def derive_recipe(name: str, out: Path, n_records: int) -> Path:
    """``recipes/NAME.toml`` on the synthetic source (source-specific keys dropped), without evaluators."""
    from ssl4ecg.data.build import DATA_DEFAULTS
    from ssl4ecg.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / f"{name}.toml")
    drop = ("source", "path", "cache", "cache_dir", "mixture", "workers")
    recipe.data = {**{k: v for k, v in recipe.data.items() if k in DATA_DEFAULTS and k not in drop},
                   "source": "synthetic", "n_records": int(n_records)}
    recipe.eval_data, recipe.evals = {}, []
    path = out / f"{name}.toml"
    atomic_write_text(path, recipe.to_toml())
    return path


def cli_command(*args: str) -> list[str]:
    """``python -m ssl4ecg ARGS`` through this file's probe."""
    return [sys.executable, str(Path(__file__).resolve()), "--_ssl4ecg", *args]


def sets(values: dict[str, Any]) -> list[str]:
    """``--set section.key=value`` arguments, values in TOML syntax (strings quoted, booleans lower case)."""
    out: list[str] = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value)
        else:
            text = repr(value)
        out += ["--set", f"{key}={text}"]
    return out


def run_summary(result: dict[str, Any], run_dir: Path, probe_path: Path) -> dict[str, Any]:
    """What one CLI run did: exit, steps, losses, samples/s, fallbacks, recompilations, flex counters."""
    stderr = result["stderr"].read_text(errors="replace") if result["stderr"].exists() else ""
    log = read_log(run_dir)
    losses = [r.get("loss") for r in log]
    finite = bool(losses) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses)
    try:
        pretrain = json.loads((run_dir / "metrics.json").read_text()).get("pretrain", {})
    except (OSError, ValueError):
        pretrain = {}
    try:
        probe = json.loads(probe_path.read_text())
    except (OSError, ValueError):
        probe = {}
    out = {
        "rc": result["rc"], "timed_out": result["timed_out"], "seconds": result["seconds"],
        "steps": pretrain.get("steps"), "logged": len(log),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "finite": finite, "falling": bool(finite and len(losses) > 1 and losses[-1] < losses[0]),
        "samples_per_s": pretrain.get("samples_per_s"), "precision": pretrain.get("precision"),
        "fallback_lines": fallback_lines(stderr), "recompiles_logged": recompile_count(stderr),
        "flex_stats": probe.get("flex_stats"), "dynamo": probe.get("dynamo"),
        "init_process_group": probe.get("init_process_group"),
    }
    if result["rc"] not in (0, EXIT_AFTER_CHECKPOINT) or result["timed_out"]:
        out["stderr_tail"] = stderr[-2000:]
    return out


# ---------------------------------------------------------------------------- 1. environment
def part_environment(ctx: PartContext) -> tuple[str, str]:
    import importlib.metadata
    import importlib.util
    import platform

    import torch

    from ssl4ecg.nn.attention_cropa import flex_available
    from ssl4ecg.registry import builtin_plugin_modules, get_registry

    d = ctx.details
    d.update(python=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count(),
             torch=torch.__version__, cuda_runtime=torch.version.cuda, cuda_available=torch.cuda.is_available(),
             flex_attention_available=flex_available())

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    d["packages"] = {n: version(n) for n in ("numpy", "scipy", "scikit-learn", "timm", "einops", "h5py", "pluggy",
                                             "rich", "typer", "pytest", "hypothesis", "pandas", "triton")}
    def importable(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # e.g. blocked with sys.modules[module] = None
            return False

    d["optional_missing"] = {m: effect for m, effect in OPTIONAL.items() if not importable(m)}
    d["ssl4ecg_installed"] = version("ssl4ecg") is not None
    d["plugins_from"] = ("entry points of the installed package" if d["ssl4ecg_installed"] else
                         f"pyproject.toml fallback: {', '.join(builtin_plugin_modules())}")
    d["objectives"] = get_registry().names("objective")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        nccl = torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else None
        d.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                 gpu_memory_gib=round(props.total_memory / 2**30, 1),
                 capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported(),
                 cudnn=torch.backends.cudnn.version(),
                 nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl)
        d["summary"] = (f"{props.name}, {d['gpu_memory_gib']} GiB, bf16 {d['bf16_supported']}, "
                        f"torch {torch.__version__}, "
                        f"CUDA {torch.version.cuda}, NCCL {d['nccl']}")
    else:
        d["summary"] = f"no CUDA; torch {torch.__version__}, {os.cpu_count()} CPUs"
    missing = sorted(set(EXPECTED_OBJECTIVES) - set(d["objectives"]))
    if missing:
        return "fail", f"objectives {missing} are not registered (plugins from {d['plugins_from']})"
    if ctx.dry_run:
        return "pass", ""
    if not torch.cuda.is_available():
        return "fail", "CUDA is not available; on a machine without a GPU run with --dry-run"
    if not d["bf16_supported"]:
        return "fail", f"{d['gpu']} does not support bf16; the recipes here train in bf16"
    return "pass", ""


# ---------------------------------------------------------------------------- 2. imports
IMPORT_CHECK = r"""
import importlib, importlib.metadata as md, json, math, pkgutil, sys, warnings
from pathlib import Path
sys.modules["wfdb"] = None      # absent on the GPU host: any top-level import fails here
sys.modules["tomli_w"] = None
_dist, _eps = md.distribution, md.entry_points
def _distribution(name):
    if name == "ssl4ecg":
        raise md.PackageNotFoundError(name)
    return _dist(name)
def _entry_points(**params):
    return md.EntryPoints(()) if params.get("group") == "ssl4ecg" else _eps(**params)
md.distribution, md.entry_points = _distribution, _entry_points   # as if ssl4ecg were not pip-installed
repo = Path(sys.argv[1])
import ssl4ecg
names = ["ssl4ecg"] + [m.name for m in pkgutil.walk_packages(ssl4ecg.__path__, "ssl4ecg.")]
for folder in sorted(p for p in (repo / "plugins").iterdir() if (p / "__init__.py").exists()):
    module = importlib.import_module(folder.name)
    names += [folder.name] + [m.name for m in pkgutil.walk_packages(module.__path__, folder.name + ".")]
failed = {}
for name in names:
    if name.rsplit(".", 1)[-1] == "__main__":
        continue
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
from ssl4ecg.registry import collect
from ssl4ecg.recipe import load_recipe, tomllib
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    registry = collect()
roundtrip = {}
for path in sorted((repo / "recipes").glob("*.toml")):
    try:
        recipe = load_recipe(path)
        roundtrip[path.stem] = tomllib.loads(recipe.to_toml()) == recipe.to_dict()
    except Exception as exc:
        roundtrip[path.stem] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"modules": len(names), "failed": failed, "objectives": registry.names("objective"),
                  "encoders": registry.names("encoder"),
                  "packages": sorted({c.package for c in registry.components()}),
                  "warnings": [str(w.message) for w in caught], "recipes_roundtrip": roundtrip,
                  "tomli_w_used": sys.modules.get("tomli_w") is not None}))
"""


def part_imports(ctx: PartContext) -> tuple[str, str]:
    result = ctx.run([sys.executable, "-c", IMPORT_CHECK, str(REPO)], 60, "import_check")
    stdout = result["stdout"].read_text(errors="replace").strip().splitlines()
    if result["rc"] != 0 or not stdout:
        ctx.details["stderr_tail"] = tail(result["stderr"])
        return "fail", f"the import check exited with code {result['rc']}"
    found = json.loads(stdout[-1])
    ctx.details.update(found, blocked=["wfdb", "tomli_w", "ssl4ecg distribution metadata"])
    problems = []
    if found["failed"]:
        problems.append(f"{len(found['failed'])} modules failed to import: {', '.join(found['failed'])}")
    missing = sorted(set(EXPECTED_OBJECTIVES) - set(found["objectives"]))
    if missing:
        problems.append(f"objectives {missing} missing without the package metadata")
    bad = {k: v for k, v in found["recipes_roundtrip"].items() if v is not True}
    if bad:
        problems.append(f"recipes that do not round-trip through TOML: {bad}")
    if found["warnings"]:
        problems.append(f"warnings while collecting plugins: {found['warnings']}")
    ctx.details["summary"] = (f"{found['modules']} modules, {len(found['packages'])} plugin packages, "
                              f"{len(found['recipes_roundtrip'])} recipes round-trip; wfdb and tomli_w blocked")
    return ("fail", "; ".join(problems)) if problems else ("pass", "")


# ---------------------------------------------------------------------------- 3. pytest -m cuda
def parse_junit(path: Path) -> dict[str, Any]:
    """Per-test outcomes and collection errors from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    tests, collection_errors = [], []
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "") + "\n" + (node.text or "")
                break
        if outcome == "error" and not case.get("classname") and "collection failure" in message:
            missing = re.search(r"No module named '([^']+)'|import of ([\w.]+) halted", message)
            name = (missing.group(1) or missing.group(2)).split(".")[0] if missing else None
            collection_errors.append({"module": case.get("name"), "missing_module": name,
                                      "message": message.strip()[-600:]})
            continue
        tests.append({"id": test_id, "outcome": outcome, "message": message.strip()[-600:] if message.strip() else ""})
    return {"tests": tests, "collection_errors": collection_errors}


def part_cuda_tests(ctx: PartContext) -> tuple[str, str]:
    junit = ctx.work / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rfEs",
           "--continue-on-collection-errors", f"--junitxml={junit}"]
    result = ctx.run(cmd, ctx.remaining(), "pytest")
    stdout = result["stdout"].read_text(errors="replace")
    ctx.details.update(rc=result["rc"], timed_out=result["timed_out"], output_tail=stdout[-3000:])
    if result["timed_out"]:
        return "fail", f"pytest -m cuda did not finish in {result['timeout_s']} s"
    if not junit.exists():
        return "fail", f"pytest exited with code {result['rc']} and wrote no JUnit report"
    parsed = parse_junit(junit)
    counts: dict[str, int] = {}
    for test in parsed["tests"]:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    optional_only = [e for e in parsed["collection_errors"] if e["missing_module"] in OPTIONAL]
    other_errors = [e for e in parsed["collection_errors"] if e["missing_module"] not in OPTIONAL]
    ctx.details.update(counts=counts, failed=[t for t in parsed["tests"] if t["outcome"] in ("failed", "error")],
                       skipped=[t for t in parsed["tests"] if t["outcome"] == "skipped"],
                       collection_errors_optional=[f"{e['module']} (needs {e['missing_module']})"
                                                   for e in optional_only],
                       collection_errors=other_errors)
    ctx.details["summary"] = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no tests"
    if optional_only:
        ctx.details["summary"] += f"; {len(optional_only)} test modules not collected (optional packages missing)"
    if counts.get("failed") or counts.get("error") or other_errors:
        return "fail", f"{counts.get('failed', 0)} failed, {counts.get('error', 0)} errors, " \
                       f"{len(other_errors)} test modules could not be collected"
    if not parsed["tests"]:
        return "skipped", "no tests are marked cuda"
    if not counts.get("passed"):
        return "fail", "every CUDA test was skipped on a CUDA host; see details.skipped for the reasons"
    return "pass", ""


# ---------------------------------------------------------------------------- 4. recipes
def part_recipes(ctx: PartContext) -> tuple[str, str]:
    dry = ctx.dry_run
    recipes_dir = ctx.work / "recipes"
    recipes_dir.mkdir(parents=True, exist_ok=True)
    steps = 3 if dry else 50
    overrides = {"train.max_steps": steps, "train.max_minutes": 0.0, "train.epochs": 1000,
                 "train.log_every": 1 if dry else 5, "train.checkpoint_every": 100000,
                 "run.device": "cpu" if dry else "cuda", "train.precision": "fp32" if dry else "bf16"}
    if dry:
        overrides.update({"train.batch_size": 8, "train.num_threads": 1})
    ctx.details.update(steps=steps, overrides=overrides, jobs=ctx.jobs, recipes={},
                       note="no evaluators; [data] switched to the synthetic source"
                            + ("" if ctx.jobs == 1 or dry else f"; {ctx.jobs} runs share the GPU at a time"))

    def one(name: str) -> tuple[str, dict[str, Any]]:
        try:
            path = derive_recipe(name, recipes_dir, 48 if dry else 512)
        except Exception as exc:  # noqa: BLE001 - report the recipe, go on with the others
            return name, {"ok": False, "problems": [f"cannot derive the recipe: {type(exc).__name__}: {exc}"]}
        run_dir, probe = ctx.work / "runs" / name, ctx.work / f"{name}.probe.json"
        env = child_env({PROBE_ENV: str(probe), "TORCH_LOGS": "recompiles"})
        result = ctx.run(cli_command("run", str(path), *sets(overrides), "--out", str(run_dir)),
                         60 if dry else 120, name, env)
        out = run_summary(result, run_dir, probe)
        problems = []
        if result["timed_out"]:
            problems.append(f"timed out after {result['timeout_s']} s")
        elif result["rc"] != 0:
            problems.append(f"exit code {result['rc']}")
        if out["steps"] != steps:
            problems.append(f"trained {out['steps']} steps, not {steps}")
        if not out["finite"]:
            problems.append("loss not finite (or not logged)")
        elif not dry and not out["falling"]:
            problems.append(f"loss not falling ({out['first_loss']:.4g} -> {out['last_loss']:.4g})")
        if out["fallback_lines"]:
            problems.append(f"fallback warnings: {out['fallback_lines'][:2]}")
        flex = out["flex_stats"] or {}
        if flex.get("fallbacks") or flex.get("failed"):
            problems.append(f"flex fell back: {flex}")
        out.update(ok=not problems, problems=problems)
        return name, out

    with ThreadPoolExecutor(max_workers=max(1, ctx.jobs)) as pool:
        for name, out in pool.map(one, RECIPES):
            ctx.details["recipes"][name] = out
            ctx.save()
    results = ctx.details["recipes"]
    bad = {n: r["problems"] for n, r in results.items() if not r["ok"]}
    rates = ", ".join(f"{n} {r['samples_per_s']:.0f}/s" for n, r in results.items()
                      if isinstance(r.get("samples_per_s"), (int, float)))
    ctx.details["summary"] = f"{len(results) - len(bad)}/{len(results)} ok; samples/s: {rates}"
    if bad:
        return "fail", "; ".join(f"{n}: {', '.join(p)}" for n, p in bad.items())
    return "pass", ""


# ---------------------------------------------------------------------------- 5. the paper-size JEPA step
def build_workload(recipe_path: Path, overrides: list[str], batch_size: int, device):
    """The recipe's encoder, masker and objective on random signals of its [data] shape, ready to step."""
    import torch

    from ssl4ecg.interfaces import JEPA_LEADS, Batch, SignalSpec
    from ssl4ecg.recipe import load_recipe
    from ssl4ecg.registry import get_registry
    from train_throughput import Workload

    recipe = load_recipe(recipe_path, overrides)
    registry = get_registry()
    leads = tuple(recipe.data.get("leads", JEPA_LEADS))
    rate = float(recipe.data.get("sampling_rate", 250.0))
    spec = SignalSpec(leads, rate, int(round(float(recipe.data.get("seconds", 10.0)) * rate)))

    def options(section: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in section.items() if k != "name"}

    torch.manual_seed(0)
    encoder = registry.build("encoder", recipe.encoder["name"], options(recipe.encoder), "encoder", spec=spec)
    masker = registry.build("masker", recipe.masker["name"], options(recipe.masker), "masker", spec=spec)
    objective = registry.build("objective", recipe.objective["name"], options(recipe.objective), "objective",
                               encoder=encoder, masker=masker, spec=spec, registry=registry)
    signal_ = torch.randn(batch_size, spec.n_leads, spec.n_samples, generator=torch.Generator().manual_seed(0))
    return Workload(recipe_path.stem, objective, Batch(signal=signal_, leads=leads, sampling_rate=rate), device)


def part_jepa_paper_step(ctx: PartContext) -> tuple[str, str]:
    import torch

    from ssl4ecg.nn import attention_cropa
    from train_throughput import _sync, flops_per_sample, gemm_rate

    dry = ctx.dry_run
    if not dry and not torch.cuda.is_available():
        return "fail", "CUDA is not available"
    device = torch.device("cpu" if dry else "cuda")
    precision = "fp32" if dry else "bf16"
    tiny = ["encoder.dim=32", "encoder.depth=1", "encoder.heads=2", "objective.predictor_dim=16",
            "objective.predictor_depth=1", "objective.predictor_heads=2"]
    batch = 4 if dry else 64
    warmup, timed = (1, 2) if dry else (8, 20)
    d = ctx.details
    d.update(recipe="recipes/jepa_mb.toml", size="tiny (dry run)" if dry else "paper", batch=batch,
             precision=precision, warmup_steps=warmup, timed_steps=timed, device=str(device))
    if dry:
        torch.set_num_threads(1)
    n = 256 if dry else 8192
    gemm_dtype = torch.float32 if dry else torch.bfloat16
    rate = gemm_rate([(n, n, n)], gemm_dtype, device, seconds=0.3 if dry else 1.0)
    ctx.record("gemm", {"shape": [n, n, n], "dtype": str(gemm_dtype), "tflops": rate / 1e12})
    work = build_workload(REPO / "recipes" / "jepa_mb.toml", tiny if dry else [], batch, device)
    d["parameters_m"] = sum(p.numel() for p in work.objective.parameters()) / 1e6
    n_tokens = work.batch.signal.shape[1] * getattr(work.objective.encoder, "n_slots", 50)
    probe = torch.zeros(1, n_tokens, 3, device=device, dtype=torch.float32 if dry else torch.bfloat16,
                        requires_grad=True)
    d["backend"] = attention_cropa.resolve_backend("auto", probe)  # what the student's CroPA runs on
    with attention_cropa.use_backend("factorised"):  # CroPA counted as the keys it attends (not 400 x 400)
        flops_step = flops_per_sample(work) * batch
    ctx.record("flops_per_step_tflop", flops_step / 1e12)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    flex0, dyn0 = _flex_stats(), _dynamo_counts()
    losses = []
    start = time.perf_counter()
    for _ in range(warmup):
        losses.append(work.step(precision))
    _sync(device)
    ctx.record("warmup_s", time.perf_counter() - start)
    flex1, dyn1 = _flex_stats(), _dynamo_counts()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(timed):
        losses.append(work.step(precision))
    _sync(device)
    seconds = time.perf_counter() - start
    flex2, dyn2 = _flex_stats(), _dynamo_counts()
    samples_per_s = timed * batch / seconds
    achieved = flops_step * timed / seconds
    d.update(step_ms=1000 * seconds / timed, samples_per_s=samples_per_s, achieved_tflops=achieved / 1e12,
             mfu_vs_measured_gemm=achieved / rate, losses=losses, flex_stats=flex2,
             compiles_warmup={"flex": _delta(flex1, flex0), "dynamo": _delta(dyn1, dyn0)},
             compiles_timed={"flex": _delta(flex2, flex1), "dynamo": _delta(dyn2, dyn1)},
             peak_memory_gib=(torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None),
             flops_note="model FLOPs: forward+backward of student and predictor, teacher forward (FlopCounterMode, "
                        "mean of 3 mask draws), CroPA counted as the keys attended; optimiser and EMA excluded")
    d["summary"] = (f"{samples_per_s:.1f} samples/s ({d['step_ms']:.0f} ms/step), {achieved / 1e12:.1f} TFLOP/s = "
                    f"{achieved / rate:.0%} of the measured {'bf16' if not dry else 'fp32'} GEMM rate "
                    f"{rate / 1e12:.1f} TFLOP/s"
                    + (f", peak {d['peak_memory_gib']:.1f} GiB" if d["peak_memory_gib"] else "")
                    + f", backend {d['backend']}")
    problems = []
    if not all(math.isfinite(v) for v in losses):
        problems.append(f"non-finite loss: {losses}")
    flex = flex2 or {}
    if flex.get("fallbacks") or flex.get("failed"):
        problems.append(f"FlexAttention fell back: {flex}")
    timed_compiles = (d["compiles_timed"]["dynamo"] or {}).get("frames", 0)
    if timed_compiles:
        d["warning"] = f"{timed_compiles} compilations during the timed steps: samples/s is understated"
    return ("fail", "; ".join(problems)) if problems else ("pass", "")


# ---------------------------------------------------------------------------- 6. flex vs dense
def part_flex_vs_dense(ctx: PartContext) -> tuple[str, str]:
    import torch

    from ssl4ecg.nn.attention_cropa import CroPAGrid, cropa_attention, flex_available

    dry = ctx.dry_run
    if not flex_available():
        return "fail", "torch.nn.attention.flex_attention cannot be imported in this torch"
    if not dry and not torch.cuda.is_available():
        return "fail", "CUDA is not available"
    device = torch.device("cpu" if dry else "cuda")
    heads, n_leads, batch = (2, 8, 2) if dry else (4, 8, 2)
    problems: list[str] = []
    if dry:
        ctx.details["compile_loop"] = "skipped: on CPU FlexAttention runs eager (no compilation)"
    else:
        # first, from a cold start: compilations over 20 training-like steps (bf16, head dim 48, with grad)
        rng = torch.Generator().manual_seed(1)
        counts = [int(torch.randint(6, 51, (1,), generator=rng)) for _ in range(20)]
        flex0, dyn0 = _flex_stats(), _dynamo_counts()
        start = time.perf_counter()
        for n_slots in counts:
            grid = CroPAGrid(n_leads, n_slots)
            qkv = torch.randn(batch, grid.n_tokens, 3 * heads * 48, device=device, dtype=torch.bfloat16,
                              requires_grad=True)
            cropa_attention(qkv, heads, grid, backend="flex").float().sum().backward()
        torch.cuda.synchronize()
        loop = {"visible_slot_counts": counts, "distinct": len(set(counts)), "seconds": time.perf_counter() - start,
                "flex": _delta(_flex_stats(), flex0), "dynamo": _delta(_dynamo_counts(), dyn0)}
        ctx.record("compile_loop", loop)
        flex_compiles = (loop["flex"] or {}).get("compilations")
        compiles = flex_compiles if isinstance(flex_compiles, int) else (loop["dynamo"] or {}).get("frames")
        if isinstance(compiles, int) and compiles > 3:
            problems.append(f"{compiles} compilations over 20 steps with {loop['distinct']} distinct visible counts "
                            "(expected about 2: static, then one dynamic-shape graph)")
    # agreement with the dense masked path, against a float64 reference from the same inputs
    tolerance = {torch.float32: 2e-3, torch.bfloat16: 3e-2}  # max abs error / max abs reference
    if dry:
        settings = [(hd, torch.float32, (50, 23, 7)) for hd in (48, 64)]
    else:
        settings = [(48, torch.bfloat16, (50, 33, 17)), (64, torch.bfloat16, (50, 33, 17)),
                    (64, torch.float32, (50, 17))]
    backward = not dry  # FlexAttention on CPU runs forward-only here
    generator = torch.Generator().manual_seed(0)
    cases = []

    def rel(a, b) -> float:
        return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))

    for head_dim, dtype, slot_counts in settings:
        for n_slots in slot_counts:
            grid = CroPAGrid(n_leads, n_slots)
            # every path starts from the same values (rounded to dtype): errors are the computation's only
            base = torch.randn(batch, grid.n_tokens, 3 * heads * head_dim, generator=generator).to(dtype)
            cotangent = torch.randn(batch, grid.n_tokens, heads * head_dim, generator=generator).to(device)
            results = {}
            for backend, work_dtype in (("flex", dtype), ("dense", dtype), ("reference", torch.float64)):
                qkv = base.to(device=device, dtype=work_dtype).requires_grad_(backward)
                out = cropa_attention(qkv, heads, grid, backend="dense" if backend == "reference" else backend)
                grad = None
                if backward:
                    (out.double() * cotangent.double()).sum().backward()
                    grad = qkv.grad
                results[backend] = (out.detach(), grad)
            ref_out, ref_grad = results["reference"]
            case = {"head_dim": head_dim, "dtype": str(dtype).replace("torch.", ""), "n_slots": n_slots,
                    "forward_err_flex": rel(results["flex"][0], ref_out),
                    "forward_err_dense": rel(results["dense"][0], ref_out)}
            if backward:
                case["backward_err_flex"] = rel(results["flex"][1], ref_grad)
                case["backward_err_dense"] = rel(results["dense"][1], ref_grad)
            tol = tolerance[dtype]  # or no worse than twice the dense path's own rounding error
            case["ok"] = all(case[f"{kind}_err_flex"] <= max(tol, 2 * case[f"{kind}_err_dense"])
                             for kind in ("forward", "backward") if f"{kind}_err_flex" in case)
            if not case["ok"]:
                problems.append(f"flex differs from dense at head dim {head_dim}, {case['dtype']}, "
                                f"{n_slots} slots: {case}")
            cases.append(case)
            ctx.record("cases", cases)
    ctx.details["tolerance"] = {str(k).replace("torch.", ""): v for k, v in tolerance.items()}
    ctx.details["flex_stats"] = _flex_stats()
    flex = ctx.details["flex_stats"] or {}
    if flex.get("fallbacks") or flex.get("failed"):
        problems.append(f"FlexAttention fell back: {flex}")
    worst = max(cases, key=lambda c: c["forward_err_flex"])
    loop = ctx.details["compile_loop"]
    ctx.details["summary"] = (f"{sum(c['ok'] for c in cases)}/{len(cases)} cases agree"
                              + (" (forward only, CPU)" if dry else " forward+backward")
                              + f"; worst forward error {worst['forward_err_flex']:.1e}"
                              + ("" if dry else f"; 20 varying steps compiled {loop['flex']} (flex), "
                                                f"{loop['dynamo']} (dynamo)"))
    return ("fail", "; ".join(problems)) if problems else ("pass", "")


# ---------------------------------------------------------------------------- 7. torchrun, one process
def part_torchrun_nccl(ctx: PartContext) -> tuple[str, str]:
    path = derive_recipe("quickstart", ctx.work, 256)
    run_dir, probe = ctx.work / "run", ctx.work / "probe.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(Path(__file__).resolve()), "--_ssl4ecg", "run", str(path),
           *sets({"train.max_steps": 10, "train.max_minutes": 0.0, "train.epochs": 1000, "train.log_every": 5,
                  "run.device": "cuda", "train.precision": "bf16"}), "--out", str(run_dir)]
    result = ctx.run(cmd, ctx.remaining(), "torchrun", child_env({PROBE_ENV: str(probe)}))
    out = run_summary(result, run_dir, probe)
    ctx.details.update(out)
    groups = out.get("init_process_group") or []
    ctx.details["summary"] = (f"process group: {groups[0]['backend']} world {groups[0]['world_size']}" if groups
                              else "no process group initialised") + f"; {out['steps']} steps"
    if result["timed_out"] or result["rc"] != 0:
        return "fail", f"torchrun exited with code {result['rc']}" + (" (timed out)" if result["timed_out"] else "")
    if not groups:
        return "fail", ("a 1-process torchrun did not initialise a process group "
                        "(ssl4ecg.train.distributed.launched_by_torchrun() may require WORLD_SIZE > 1)")
    if groups[0]["backend"] != "nccl":
        return "fail", f"the process group uses {groups[0]['backend']}, not nccl"
    if out["steps"] != 10 or not out["finite"]:
        return "fail", f"trained {out['steps']} steps (finite loss: {out['finite']})"
    return "pass", ""


# ---------------------------------------------------------------------------- 8. resume
def part_resume(ctx: PartContext) -> tuple[str, str]:
    import torch

    dry = ctx.dry_run
    n = 3 if dry else 10
    path = derive_recipe("quickstart", ctx.work, 48 if dry else 256)
    overrides = {"train.max_steps": 2 * n, "train.checkpoint_every": n, "train.max_minutes": 0.0,
                 "train.epochs": 1000, "train.log_every": 1, "run.device": "cpu" if dry else "cuda",
                 "train.precision": "fp32" if dry else "bf16"}
    if dry:
        overrides.update({"train.batch_size": 8, "train.num_threads": 1})
    straight, crashed = ctx.work / "straight", ctx.work / "crashed"
    d = ctx.details
    d.update(n=n, overrides=overrides)
    cap = 60 if dry else 120
    jobs = [(straight, {}), (crashed, {EXIT_ENV: str(n)})]
    with ThreadPoolExecutor(max_workers=min(2, ctx.jobs)) as pool:
        first = list(pool.map(lambda job: ctx.run(cli_command("run", str(path), *sets(overrides), "--out", str(job[0])),
                                                  cap, job[0].name, child_env(job[1])), jobs))
    d["straight"] = run_summary(first[0], straight, ctx.work / "none")
    d["crashed"] = {"rc": first[1]["rc"], "logged_steps": len(read_log(crashed)), "timed_out": first[1]["timed_out"]}
    ctx.save()
    if first[0]["rc"] != 0 or first[0]["timed_out"]:
        return "fail", f"the uninterrupted run failed (code {first[0]['rc']})"
    if first[1]["rc"] != EXIT_AFTER_CHECKPOINT:
        d["crashed"]["stderr_tail"] = tail(first[1]["stderr"])
        return "fail", f"the run to interrupt exited with {first[1]['rc']}, not {EXIT_AFTER_CHECKPOINT} after step {n}"
    resumed = ctx.run(cli_command("run", "--resume", str(crashed)), cap, "resumed", child_env())
    d["resumed"] = run_summary(resumed, crashed, ctx.work / "none")
    if resumed["rc"] != 0 or resumed["timed_out"]:
        return "fail", f"--resume exited with code {resumed['rc']}"
    steps = [r["step"] for r in read_log(crashed)]
    d["log_steps_contiguous"] = steps == list(range(1, 2 * n + 1))

    def max_diff(a: dict, b: dict) -> float:
        return max(((x.double() - b[k].double()).abs().max().item() for k, x in a.items()
                    if torch.is_tensor(x) and x.is_floating_point() and x.numel()), default=0.0)

    enc_a = torch.load(straight / "encoder.pt", map_location="cpu", weights_only=False)["state_dict"]
    enc_b = torch.load(crashed / "encoder.pt", map_location="cpu", weights_only=False)["state_dict"]
    last_a = torch.load(straight / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    last_b = torch.load(crashed / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    mid_a = torch.load(straight / "checkpoints" / "previous.pt", map_location="cpu", weights_only=False)
    d["max_abs_diff_encoder"] = max_diff(enc_a, enc_b)
    d["max_abs_diff_objective"] = max_diff(last_a["objective"], last_b["objective"])  # student, teacher, predictor
    d["update_size_last_n_steps"] = max_diff(last_a["objective"], mid_a["objective"])
    d["relative_diff"] = d["max_abs_diff_objective"] / max(d["update_size_last_n_steps"], 1e-30)
    d["bit_exact"] = d["max_abs_diff_objective"] == 0.0
    losses_a = {r["step"]: r["loss"] for r in read_log(straight)}
    d["max_abs_loss_diff"] = max((abs(r["loss"] - losses_a[r["step"]]) for r in read_log(crashed)
                                  if r["step"] in losses_a), default=None)
    d["summary"] = (f"{2 * n} steps, crash after {n}: max |dw| encoder {d['max_abs_diff_encoder']:.2e}, "
                    f"objective {d['max_abs_diff_objective']:.2e} = {d['relative_diff']:.1%} of the last {n} steps' "
                    f"update; bit-exact {d['bit_exact']}")
    if not d["log_steps_contiguous"]:
        return "fail", f"log.jsonl steps after resuming are {steps}, not 1..{2 * n}"
    if last_b["step"] != 2 * n:
        return "fail", f"the resumed run ended at step {last_b['step']}, not {2 * n}"
    if dry and not d["bit_exact"]:
        return "fail", f"resume on CPU is not bit-exact (max abs diff {d['max_abs_diff_objective']:.3e})"
    if not dry and d["relative_diff"] > 0.05:
        return "fail", (f"the resumed weights differ by {d['relative_diff']:.1%} of the last {n} steps' update "
                        "(more than CUDA non-determinism explains)")
    return "pass", ""


PART_FUNCTIONS: dict[str, Callable[[PartContext], tuple[str, str]]] = {
    "environment": part_environment, "imports": part_imports, "cuda_tests": part_cuda_tests,
    "recipes": part_recipes, "jepa_paper_step": part_jepa_paper_step, "flex_vs_dense": part_flex_vs_dense,
    "torchrun_nccl": part_torchrun_nccl, "resume": part_resume,
}


# ============================================================================ the CLI probe
def main_ssl4ecg(argv: list[str]) -> int:
    """``python -m ssl4ecg ARGV`` recording process-group initialisation, flex and dynamo counters.

    ``$SSL4ECG_GPU_CHECK_PROBE`` names the JSON file written at exit; with
    ``$SSL4ECG_GPU_CHECK_EXIT_AFTER_CHECKPOINT=N`` the process exits with code 75 right after
    writing the step-N checkpoint (a crash at a known point, for the resume part).
    """
    import atexit

    import ssl4ecg  # noqa: F401 - before torch, as `python -m ssl4ecg` (sets OMP_WAIT_POLICY)
    import torch.distributed as tdist

    probe: dict[str, Any] = {"argv": argv, "init_process_group": []}
    probe_path = os.environ.get(PROBE_ENV)
    original_init = tdist.init_process_group

    def init_process_group(*args: Any, **kwargs: Any):
        out = original_init(*args, **kwargs)
        probe["init_process_group"].append({"backend": str(tdist.get_backend()), "world_size": tdist.get_world_size(),
                                            "rank": tdist.get_rank()})
        return out

    tdist.init_process_group = init_process_group

    def dump() -> None:
        if probe_path:
            probe.update(flex_stats=_flex_stats(), dynamo=_dynamo_counts())
            write_json(Path(probe_path), probe)

    stop_at = int(os.environ.get(EXIT_ENV, "0") or 0)
    if stop_at > 0:
        from ssl4ecg.train import loop

        save = loop.Trainer.save

        def save_then_exit(self) -> None:
            save(self)
            if self.state.step == stop_at and not self.state.done:
                probe["exited_after_checkpoint"] = stop_at
                dump()
                os._exit(EXIT_AFTER_CHECKPOINT)

        loop.Trainer.save = save_then_exit
    atexit.register(dump)
    from ssl4ecg.cli import main

    sys.argv = ["ssl4ecg", *argv]
    main()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_ssl4ecg"]:
        return main_ssl4ecg(argv[1:])
    if argv[:1] == ["--_part"]:
        return main_child(argv)
    return main_parent(argv)


if __name__ == "__main__":
    raise SystemExit(main())
