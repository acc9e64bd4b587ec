"""benchmarks/gpu_check.py: the report's shape, the CPU dry run, timeouts, budgets and the parsers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402

DRY_RUN_PARTS = ("environment", "imports", "recipes", "jepa_paper_step", "flex_vs_dense", "resume")


def _check(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return done, time.monotonic() - start


def _assert_report_shape(report: dict) -> None:
    assert report["check"] == "ssl4ecg gpu_check" and report["finished"]
    assert list(report["parts"]) == list(gpu_check.PARTS)
    for name, entry in report["parts"].items():
        assert entry["status"] in ("pass", "fail", "skipped"), (name, entry)
        assert isinstance(entry["seconds"], (int, float)) and isinstance(entry["details"], dict)
        assert isinstance(entry["reason"], str)
        if entry["status"] == "skipped":
            assert entry["reason"], name
    assert sum(report["counts"].values()) == len(gpu_check.PARTS)


@pytest.mark.slow
def test_dry_run_passes_every_cpu_part_and_skips_the_cuda_ones(tmp_path):
    out = tmp_path / "REPORT.json"
    done, seconds = _check("--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    _assert_report_shape(report)
    assert report["mode"] == "dry-run"
    parts = report["parts"]
    for name in DRY_RUN_PARTS:
        assert parts[name]["status"] == "pass", (name, parts[name])
    for name in gpu_check.CUDA_ONLY:
        assert parts[name]["status"] == "skipped" and "CUDA" in parts[name]["reason"]
    recipes = parts["recipes"]["details"]["recipes"]
    assert set(recipes) == set(gpu_check.RECIPES)
    for name, result in recipes.items():
        assert result["ok"] and result["steps"] == 3 and result["finite"], (name, result)
        assert result["samples_per_s"] > 0 and result["fallback_lines"] == []
    imports = parts["imports"]["details"]
    assert imports["failed"] == {} and set(gpu_check.EXPECTED_OBJECTIVES) <= set(imports["objectives"])
    assert imports["tomli_w_used"] is False and all(v is True for v in imports["recipes_roundtrip"].values())
    step = parts["jepa_paper_step"]["details"]
    assert step["flops_per_step_tflop"] > 0 and 0 < step["mfu_vs_measured_gemm"] < 1.5
    assert all(c["ok"] and c["forward_err_flex"] < 1e-4 for c in parts["flex_vs_dense"]["details"]["cases"])
    resume = parts["resume"]["details"]
    assert resume["bit_exact"] and resume["log_steps_contiguous"] and resume["crashed"]["rc"] == 75
    assert "nothing failed" in done.stdout
    print(f"dry run: {seconds:.0f} s")


@pytest.mark.slow
def test_a_part_past_its_timeout_is_killed_and_the_others_still_run(tmp_path):
    out = tmp_path / "REPORT.json"
    done, seconds = _check("--dry-run", "--only", "environment,imports", "--timeout", "environment=1",
                           "--out", str(out), timeout=120)
    assert done.returncode == 1  # a part failed
    report = json.loads(out.read_text())
    _assert_report_shape(report)
    env = report["parts"]["environment"]
    assert env["status"] == "fail" and "timed out after 1 s" in env["reason"]
    assert report["parts"]["imports"]["status"] == "pass"
    assert report["parts"]["recipes"] == {**report["parts"]["recipes"], "status": "skipped",
                                          "reason": "not selected (--only)"}
    assert "FAILED: environment" in done.stdout


def test_parts_are_skipped_once_the_budget_is_spent(tmp_path):
    out = tmp_path / "REPORT.json"
    done, seconds = _check("--dry-run", "--budget-s", "5", "--out", str(out), timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    _assert_report_shape(report)
    for name in DRY_RUN_PARTS:
        assert report["parts"][name]["status"] == "skipped"
        assert "time budget spent" in report["parts"][name]["reason"]
    assert seconds < 30


def test_unknown_part_names_are_rejected_with_the_choices(tmp_path):
    done, _ = _check("--only", "recipe", "--out", str(tmp_path / "r.json"), timeout=60)
    assert done.returncode == 2
    assert "unknown part 'recipe'" in done.stderr and "recipes" in done.stderr
    done, _ = _check("--timeout", "resume=soon", "--out", str(tmp_path / "r.json"), timeout=60)
    assert done.returncode == 2 and "'soon' is not a number of seconds" in done.stderr


def test_parse_junit_counts_outcomes_and_separates_optional_collection_errors(tmp_path):
    (tmp_path / "test_needs_wfdb.py").write_text("import wfdb_not_installed_here\n")
    (tmp_path / "test_needs_tomli_w.py").write_text("import tomli_w.sub_module_that_is_missing\n")
    (tmp_path / "test_broken.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "test_blocked.py").write_text("import sys\nsys.modules['blocked_mod'] = None\nimport blocked_mod\n")
    (tmp_path / "test_gpu.py").write_text(
        "import pytest\n"
        "@pytest.mark.cuda\ndef test_ok(): pass\n"
        "@pytest.mark.cuda\ndef test_bad(): assert 1 == 2\n"
        "@pytest.mark.cuda\ndef test_skip(): pytest.skip('no gpu')\n"
        "def test_not_cuda(): pass\n")
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                    "--continue-on-collection-errors", f"--junitxml={junit}", "-W", "ignore", str(tmp_path)],
                   capture_output=True, text=True, timeout=120, cwd=tmp_path)
    parsed = gpu_check.parse_junit(junit)
    outcomes = {t["id"].split("::")[-1]: t["outcome"] for t in parsed["tests"]}
    assert outcomes == {"test_ok": "passed", "test_bad": "failed", "test_skip": "skipped"}
    errors = {e["module"].split(".")[-1]: e["missing_module"] for e in parsed["collection_errors"]}
    assert errors == {"test_needs_wfdb": "wfdb_not_installed_here", "test_needs_tomli_w": "tomli_w",
                      "test_blocked": "blocked_mod", "test_broken": None}


def test_fallback_and_recompile_lines_are_found_in_stderr():
    stderr = "\n".join([
        "loading...",
        "/x/attention_cropa.py:12: RuntimeWarning: FlexAttention failed (boom); CroPA falls back to the dense path",
        "W1204 torch/_dynamo/guards.py:123] [0/1] [__recompiles] Recompiling function flex_attention in /x.py:1",
        "W1204 torch/_dynamo/guards.py:123] [0/2] [__recompiles] Recompiling function flex_attention in /x.py:1",
        "UserWarning: something harmless",
        "using the Fallback kernel",
    ])
    assert gpu_check.fallback_lines(stderr) == [stderr.splitlines()[1], "using the Fallback kernel"]
    assert gpu_check.recompile_count(stderr) == 2
    assert gpu_check.fallback_lines("all good\nno warnings") == []


def test_derived_recipe_is_synthetic_without_evaluators_and_resolves(tmp_path):
    from ssl4ecg.recipe import load_recipe, resolve
    from ssl4ecg.registry import get_registry

    path = gpu_check.derive_recipe("simclr_small", tmp_path, 96)
    arguments = gpu_check.sets({"train.max_steps": 50, "run.device": "cpu", "train.max_minutes": 0.0,
                                "train.compile": False})
    assert arguments[::2] == ["--set"] * 4
    recipe = load_recipe(path, arguments[1::2])
    assert recipe.data["source"] == "synthetic" and recipe.data["n_records"] == 96
    assert "path" not in recipe.data and "task" not in recipe.data and recipe.evals == []
    assert recipe.data["normalize"] == "lead" and recipe.data["sampling_rate"] == 100.0  # preprocessing kept
    assert recipe.train["max_steps"] == 50 and recipe.run["device"] == "cpu" and recipe.train["compile"] is False
    assert recipe.train["max_minutes"] == 0.0 and isinstance(recipe.train["max_minutes"], float)
    resolved = resolve(recipe, get_registry())
    assert resolved.objective["name"] == "simclr" and len(resolved.objective["augmentations"]) == 6


def test_report_json_is_strict_even_with_non_finite_numbers(tmp_path):
    path = tmp_path / "r.json"
    gpu_check.write_json(path, {"loss": float("nan"), "rate": [float("inf"), 1.5], "nested": {"x": float("-inf")}})
    parsed = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert parsed == {"loss": "nan", "rate": ["inf", 1.5], "nested": {"x": "-inf"}}


@pytest.mark.slow
def test_probe_under_one_process_torchrun_reports_the_process_group(tmp_path, monkeypatch):
    """The torchrun part's plumbing on the CPU (gloo): the probe sees whether a group was initialised."""
    from ssl4ecg.train import distributed

    recipe = gpu_check.derive_recipe("quickstart", tmp_path, 48)
    probe = tmp_path / "probe.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", str(SCRIPT),
           "--_ssl4ecg", "run", str(recipe),
           *gpu_check.sets({"train.max_steps": 2, "train.max_minutes": 0.0, "train.batch_size": 8,
                            "run.device": "cpu", "train.precision": "fp32", "train.num_threads": 1,
                            "encoder.dim": 32, "encoder.depth": 1, "encoder.heads": 2}),
           "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO,
                          env=gpu_check.child_env({gpu_check.PROBE_ENV: str(probe), "OMP_NUM_THREADS": "1"}))
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = json.loads(probe.read_text())
    monkeypatch.setenv("WORLD_SIZE", "1")  # what torchrun sets for one process
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "gpu-check-test")
    expected = distributed.launched_by_torchrun()
    groups = recorded["init_process_group"]
    assert bool(groups) == expected
    if groups:
        assert groups[0] == {"backend": "gloo", "world_size": 1, "rank": 0}
    assert recorded["flex_stats"] is None or recorded["flex_stats"]["fallbacks"] == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["pretrain"]["steps"] == 2


def _processes_mentioning(text: str) -> dict[int, str]:
    """Live processes whose command line contains ``text``: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:  # ended meanwhile
                continue
            if text in cmdline:
                found[int(entry.name)] = cmdline
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find left-over processes")
def test_sigterm_stops_the_check_its_parts_and_their_runs_and_keeps_the_report(tmp_path):
    out, work = tmp_path / "REPORT.json", tmp_path / "work"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--dry-run", "--jobs", "1", "--only", "recipes,resume",
                             "--work", str(work), "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until a recipe run (a grandchild) is under way
        if any("--_ssl4ecg" in cmdline for cmdline in _processes_mentioning(str(work)).values()):
            break
        time.sleep(0.2)
    proc.terminate()
    proc.wait(timeout=30)
    time.sleep(1.0)
    assert _processes_mentioning(str(work)) == {}
    report = json.loads(out.read_text())
    _assert_report_shape(report)
    assert report["parts"]["recipes"]["status"] == "fail"
    assert "interrupted" in report["parts"]["recipes"]["reason"]
    assert report["parts"]["resume"]["status"] == "skipped" and "interrupted" in report["parts"]["resume"]["reason"]
