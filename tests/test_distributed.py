"""DDP through torchrun on CPU (gloo): identical replicas, single-process equivalence, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_plugins import EXTERNAL_PLUGIN, _install

pytestmark = pytest.mark.slow

TINY_JEPA = [
    "--set", "data.n_records=80", "--set", "data.sampling_rate=100.0",
    "--set", "encoder.dim=32", "--set", "encoder.depth=1", "--set", "encoder.heads=2",
    "--set", "objective.predictor_dim=16", "--set", "objective.predictor_depth=1",
    "--set", "objective.predictor_heads=2", "--set", "train.batch_size=8", "--set", "train.max_steps=4",
    "--set", "train.max_minutes=0.0", "--set", "train.precision='fp32'", "--set", "train.checkpoint_every=2",
    "--set", "train.log_every=1", "--set", "train.num_threads=1",
]


def _torchrun(args: list[str], env: dict | None = None, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "ssl4ecg", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=full_env)


def _ssl4ecg(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ssl4ecg", *args], capture_output=True, text=True,
                          timeout=300, env=full_env)


def _with_plugin(tmp_path: Path, dist: str, module: str, source: str) -> dict:
    """Install a test plugin under ``tmp_path``; the environment that makes subprocesses see it."""
    _install(tmp_path, dist, module, source)
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}


def _tiny_conv_recipe(tmp_path: Path, name: str, n_records: int, train_and_evals: str) -> Path:
    """A recipe training the test plugin's tiny_conv encoder on synthetic data; ``train_and_evals`` holds
    the ``[train]`` lines and any ``[[eval]]`` tables."""
    recipe = tmp_path / f"{name}.toml"
    recipe.write_text(f"""
[run]
name = "{name}"
[data]
source = "synthetic"
n_records = {n_records}
sampling_rate = 100.0
[encoder]
name = "tiny_conv"
[objective]
name = "predict_lead_rms"
[train]{train_and_evals}""")
    return recipe


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_jepa_ddp_replicas_identical_and_resume_in_one_process(tmp_path):
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml")
    run_dir = tmp_path / "ddp"
    result = _torchrun(["run", recipe, *TINY_JEPA, "--set", "eval.0.epochs=1", "--out", str(run_dir)])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["pretrain"]["world_size"] == 2
    assert metrics["pretrain"]["replicas_identical"] is True  # student AND EMA teacher
    assert metrics["pretrain"]["steps"] == 4
    assert metrics["pretrain"]["samples"] == 4 * 8 * 2
    assert "linear_probe" in metrics["eval"]
    # resume the 2-process checkpoint of step 2 in a single process
    ckpt_dir = run_dir / "checkpoints"
    (ckpt_dir / "last.pt").unlink()
    assert torch.load(ckpt_dir / "previous.pt", weights_only=False)["step"] == 2
    (run_dir / "metrics.json").unlink()
    result = _ssl4ecg(["run", "--resume", str(run_dir)])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["pretrain"]["world_size"] == 1
    assert metrics["pretrain"]["steps"] == 4
    assert [r["step"] for r in _log(run_dir)] == [1, 2, 3, 4]


def test_ddp_loss_matches_single_process_on_the_same_global_batch(tmp_path):
    env = _with_plugin(tmp_path, "ext-ssl-plugin", "ext_ssl_plugin", EXTERNAL_PLUGIN)
    recipe = _tiny_conv_recipe(tmp_path, "rms", 96, """
epochs = 1
max_steps = 5
lr = 1e-3
warmup_epochs = 0.0
precision = "fp32"
log_every = 1
num_threads = 1
""")
    ddp = _torchrun(["run", str(recipe), "--set", "train.batch_size=8", "--out", str(tmp_path / "ddp")], env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = _ssl4ecg(["run", str(recipe), "--set", "train.batch_size=16", "--out", str(tmp_path / "one")], env)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = _log(tmp_path / "ddp"), _log(tmp_path / "one")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-6)


SLOW_EVAL_PLUGIN = EXTERNAL_PLUGIN.replace("@hookimpl", '''
import time

from ssl4ecg.interfaces import Evaluator


class SlowEvaluator(Evaluator):
    """Takes longer than the process group's timeout (a long fine-tune stands in)."""

    def __init__(self, seconds: float = 1.0):
        self.seconds = seconds

    def evaluate(self, encoder, records, context):
        import torch.distributed

        time.sleep(self.seconds)
        return {"slept": self.seconds, "group_active": torch.distributed.is_initialized()}


@hookimpl''').replace('    registry.add("objective", "predict_lead_rms", PredictLeadRms)',
                      '    registry.add("objective", "predict_lead_rms", PredictLeadRms)\n'
                      '    registry.add("evaluator", "slow_eval", SlowEvaluator)')


def test_evaluation_longer_than_the_group_timeout_does_not_kill_the_job(tmp_path):
    """Only rank 0 evaluates; the other ranks must not wait for it in a collective that times out."""
    env = {**_with_plugin(tmp_path, "ext-slow-plugin", "ext_slow_plugin", SLOW_EVAL_PLUGIN),
           "SSL4ECG_DIST_TIMEOUT_MINUTES": "0.1"}  # 6 s; the evaluator takes 15 s
    recipe = _tiny_conv_recipe(tmp_path, "slow", 64, """
epochs = 1
max_steps = 2
batch_size = 8
precision = "fp32"
num_threads = 1
[[eval]]
name = "slow_eval"
seconds = 15.0
""")
    result = _torchrun(["run", str(recipe), "--out", str(tmp_path / "run")], env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval"]["slow_eval"]["slept"] == 15.0
    assert metrics["eval"]["slow_eval"]["group_active"] is False  # nobody waits on rank 0
    assert metrics["pretrain"]["world_size"] == 2


def test_a_bad_group_timeout_is_one_clear_error(tmp_path):
    result = _ssl4ecg(["run", str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml"),
                       "--out", str(tmp_path / "r")],
                      {"SSL4ECG_DIST_TIMEOUT_MINUTES": "soon", "TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "1",
                       "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"})
    assert result.returncode != 0
    assert "SSL4ECG_DIST_TIMEOUT_MINUTES = 'soon' is not a positive number of minutes" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
