"""Every impossible [run]/[train]/size value is one clear line before anything is created.

Each case goes through the command line and asserts: a non-zero exit, the message naming the
value, no traceback (the CLI ended on its own error path, not an exception) and no --out folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ssl4ecg.cli import app

from test_reliability_outdirs import RECIPE, TINY as TINY_ANY_STEPS, runner  # noqa: E402 - shared CLI helpers

TINY = [*TINY_ANY_STEPS, "--set", "train.max_steps=2"]

CASES = [
    ("train.epochs=-5", "epochs = -5 is invalid"),
    ("train.max_steps=-3", "max_steps = -3 is invalid"),
    ("train.warmup_epochs=-1", "warmup_epochs = -1 is invalid"),
    ("train.accum_steps=0", "accum_steps = 0 is invalid"),
    ("train.log_every=0", "log_every = 0 is invalid"),
    ("train.checkpoint_every=0", "checkpoint_every = 0 is invalid"),
    ("train.lr=-1", "lr = -1 is invalid"),
    ("train.lr=nan", "lr = nan is invalid"),
    ("train.lr=inf", "lr = inf is invalid"),
    ("train.min_lr=1.0", "min_lr = 1.0 is above lr"),
    ("train.betas=[0.9, 1.5]", "betas = [0.9, 1.5] is invalid"),
    ("train.batch_size=0", "batch_size = 0 is invalid"),
    ("train.max_minutes=-2.0", "max_minutes = -2.0 is invalid"),
    ("run.seed=-1", "seed = -1 is invalid"),
    ("run.name='../x'", "name = '../x' is invalid"),
    ("encoder.dim=100000000", "parameters"),
    ("objective.predictor_dim=100000000", "parameters"),
    ("data.seconds=1e9", "seconds = 1e+09"),
]


@pytest.mark.parametrize("override,message", CASES, ids=[c[0] for c in CASES])
def test_invalid_value_is_one_line_and_creates_nothing(tmp_path, override, message):
    out = tmp_path / "run"
    root = tmp_path / "root"
    result = runner.invoke(app, ["run", RECIPE, *TINY, "--set", override, "--set", f"run.out_root='{root}'",
                                 "--out", str(out)])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # the CLI's own error path
    text = " ".join(result.output.split())
    assert message in text and text.startswith("error:") and "Traceback" not in result.output
    assert not out.exists() and not root.exists()


def test_sizes_are_refused_with_an_estimate(tmp_path):
    result = runner.invoke(app, ["run", RECIPE, *TINY, "--set", "data.seconds=1e9", "--out", str(tmp_path / "r")])
    text = " ".join(result.output.split())
    assert "TB" in text and "memory available" in text and "Lower seconds" in text
    result = runner.invoke(app, ["run", RECIPE, *TINY, "--set", "encoder.dim=100000000", "--out", str(tmp_path / "r")])
    text = " ".join(result.output.split())
    assert "1.2e+17 parameters" in text and "PB" in text and "lower its width" in text


def test_default_folder_is_not_created_for_an_invalid_value(tmp_path):
    result = runner.invoke(app, ["run", RECIPE, *TINY, "--set", "train.log_every=0",
                                 "--set", f"run.out_root='{tmp_path / 'runs'}'"])
    assert result.exit_code == 2 and not (tmp_path / "runs").exists()


def test_resume_of_a_folder_with_an_invalid_recipe_is_one_line(tmp_path):
    """Folders older versions left behind (recipe.toml with log_every = 0, no checkpoint) resume cleanly or say why."""
    run_dir = tmp_path / "half"
    run_dir.mkdir()
    (run_dir / "recipe.toml").write_text(Path(RECIPE).read_text().replace("log_every = 5", "log_every = 0"))
    result = runner.invoke(app, ["run", "--resume", str(run_dir)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "log_every = 0 is invalid" in " ".join(result.output.split())


def test_command_line_process_prints_no_traceback(tmp_path):
    """The same through a real process: stderr holds one error line, the exit status is 2."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    proc = subprocess.run([sys.executable, "-m", "ssl4ecg", "run", RECIPE, *TINY, "--set", "train.epochs=-5",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "epochs = -5 is invalid" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and not out.exists()


def test_a_model_larger_than_the_memory_is_refused_with_its_estimate(tmp_path, monkeypatch):
    """Below the parameter limit, the estimate is compared with what the device has (here: 5 MB of RAM)."""
    import ssl4ecg.limits as limits

    monkeypatch.setattr(limits, "available_memory", lambda: 5 * 10**6)  # holds the 1.9 MB of signals
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", RECIPE, *TINY, "--set", "encoder.dim=256", "--set", "encoder.depth=2",
                                 "--out", str(out)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "parameters, needing about" in text and "cpu has 5.0 MB" in text, text
    assert not out.exists()
