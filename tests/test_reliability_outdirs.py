"""Output folders are never clobbered: --out on an existing folder is refused or moved aside, never
overwritten; eval --out never writes into a run; default folders are unique within one second.

Every test compares a snapshot (names and bytes of every file) of the folders it protects.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ssl4ecg.cli import app

runner = CliRunner()
RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml")
TINY = ["--set", "data.n_records=60", "--set", "data.sampling_rate=100.0", "--set", "encoder.dim=16",
        "--set", "encoder.depth=1", "--set", "encoder.heads=2", "--set", "objective.predictor_dim=16",
        "--set", "objective.predictor_depth=1", "--set", "objective.predictor_heads=2",
        "--set", "train.batch_size=8", "--set", "train.max_minutes=0.0", "--set", "train.precision='fp32'",
        "--set", "eval.0.name='knn'"]


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _one_line(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny run (2 steps, checkpoints, metrics, log)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = _run("run", RECIPE, *TINY, "--set", "train.max_steps=2", "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished_run, target)
    return target


def test_run_out_on_a_finished_run_is_refused_and_changes_nothing(run_copy):
    before = snapshot(run_copy)
    result = _run("run", RECIPE, *TINY, "--set", "train.max_steps=2", "--out", run_copy)
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = _one_line(result)
    assert "already holds a run" in text and f"--resume {run_copy}" in text and "--overwrite" in text
    assert snapshot(run_copy) == before  # log.jsonl not appended, metrics/encoder not replaced
    assert not list(run_copy.parent.glob("run.old-*"))


def test_run_out_on_a_folder_that_is_not_a_run_is_refused(tmp_path):
    user = tmp_path / "mine"
    (user / "checkpoints").mkdir(parents=True)
    (user / "metrics.json").write_text('{"my": "results"}')
    (user / "checkpoints" / "last.pt").write_bytes(b"my checkpoint")
    before = snapshot(user)
    result = _run("run", RECIPE, *TINY, "--set", "train.max_steps=0", "--out", user)
    assert result.exit_code == 2 and "not empty" in _one_line(result)
    assert snapshot(user) == before and not (user / "checkpoints" / "previous.pt").exists()


def test_overwrite_moves_the_old_run_aside_and_keeps_every_byte(run_copy):
    before = snapshot(run_copy)
    result = _run("run", RECIPE, *TINY, "--set", "train.max_steps=0", "--out", run_copy, "--overwrite")
    assert result.exit_code == 0, result.output
    moved = list(run_copy.parent.glob("run.old-*"))
    assert len(moved) == 1 and snapshot(moved[0]) == before
    fresh = snapshot(run_copy)
    assert "metrics.json" in fresh and "log.jsonl" not in fresh and "checkpoints/last.pt" not in fresh


def test_overwrite_twice_keeps_both_old_folders(tmp_path):
    target = tmp_path / "out"
    for content in ("first", "second"):
        target.mkdir()
        (target / "notes.txt").write_text(content)
        result = _run("run", RECIPE, *TINY, "--set", "train.max_steps=0", "--out", target, "--overwrite")
        assert result.exit_code == 0, result.output
        shutil.rmtree(target)  # the new run's own output, not the user's
    kept = sorted((p / "notes.txt").read_text() for p in tmp_path.glob("out.old-*"))
    assert kept == ["first", "second"]


def test_a_run_that_fails_before_training_puts_the_moved_folder_back(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    before = snapshot(user)
    # batch_size is only compared with the records once they are loaded, inside the run
    result = _run("run", RECIPE, *TINY, "--set", "train.batch_size=1000", "--set", "train.max_steps=2",
                  "--out", user, "--overwrite")
    assert result.exit_code == 2 and "batch_size 1000" in _one_line(result)
    assert snapshot(user) == before and not list(tmp_path.glob("mine.old-*"))


def test_resume_and_overwrite_contradict(run_copy):
    result = _run("run", "--resume", run_copy, "--overwrite")
    assert result.exit_code == 2 and "only one of them" in _one_line(result)


def test_eval_cannot_write_into_the_run_it_evaluates(run_copy):
    before = snapshot(run_copy)
    for out in (run_copy, run_copy / "checkpoints", run_copy / "metrics.json", run_copy.parent):
        for extra in ([], ["--overwrite"]):
            result = _run("eval", run_copy, "--recipe", RECIPE, *TINY, "--out", out, *extra)
            assert result.exit_code == 2, (out, result.output)
            assert "Traceback" not in result.output and "--out" in result.output
    assert snapshot(run_copy) == before  # metrics.json and recipe.toml untouched
    assert not list(run_copy.parent.glob("*.old-*"))


def test_eval_cannot_write_into_another_training_run(finished_run, run_copy, tmp_path):
    before = snapshot(run_copy)
    result = _run("eval", finished_run, "--recipe", RECIPE, *TINY, "--out", run_copy, "--overwrite")
    assert result.exit_code == 2 and "training run directory" in _one_line(result)
    assert snapshot(run_copy) == before


def test_eval_into_an_earlier_evaluation_needs_overwrite(finished_run, tmp_path):
    out = tmp_path / "ev"
    assert _run("eval", finished_run, "--recipe", RECIPE, *TINY, "--out", out).exit_code == 0
    first = snapshot(out)
    again = _run("eval", finished_run, "--recipe", RECIPE, *TINY, "--out", out)
    assert again.exit_code == 2 and "not empty" in _one_line(again) and snapshot(out) == first
    third = _run("eval", finished_run, "--recipe", RECIPE, *TINY, "--out", out, "--overwrite")
    assert third.exit_code == 0, third.output
    (moved,) = tmp_path.glob("ev.old-*")
    assert snapshot(moved) == first and "metrics.json" in snapshot(out)


def test_default_run_folders_are_unique_within_one_second(tmp_path, monkeypatch):
    import ssl4ecg.rundirs as rundirs

    monkeypatch.setattr(rundirs, "stamp", lambda: "20260101-000000")  # every run "starts" in the same second
    made = []
    for _ in range(2):
        result = _run("run", RECIPE, *TINY, "--set", "train.max_steps=0", "--set", f"run.out_root='{tmp_path}'")
        assert result.exit_code == 0, result.output
    made = sorted(p.name for p in (tmp_path / "quickstart").iterdir())
    assert made == ["20260101-000000", "20260101-000000-2"]
    assert all((tmp_path / "quickstart" / m / "metrics.json").exists() for m in made)


def test_concurrent_claims_never_share_a_folder(tmp_path):
    from ssl4ecg.rundirs import claim_new_dir

    claims, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        claims.append(claim_new_dir(tmp_path, "same-second").path)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(claims)) == 8 and all(p.is_dir() for p in claims)


def test_unwritable_out_is_one_clear_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for command in (["run", RECIPE, *TINY, "--set", "train.max_steps=0"],):
        result = _run(*command, "--out", blocker / "run")
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert "cannot create or write there" in _one_line(result)
    assert blocker.read_text() == "x"


def test_out_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("{}")
    result = _run("run", RECIPE, *TINY, "--set", "train.max_steps=0", "--out", target, "--overwrite")
    assert result.exit_code == 2 and "is a file" in _one_line(result) and target.read_text() == "{}"


@pytest.mark.slow
def test_under_torchrun_rank0_decides_for_every_rank(run_copy, tmp_path):
    """Two processes: a refused --out stops both ranks with the message (no hang); a default folder is shared."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ssl4ecg",
           "run", RECIPE, *TINY, "--set", "train.max_steps=0"]
    before = snapshot(run_copy)
    refused = subprocess.run(cmd + ["--out", str(run_copy)], capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode != 0
    assert " ".join(refused.stderr.split()).count("already holds a run") == 2  # both ranks say why
    assert snapshot(run_copy) == before
    root = tmp_path / "root"
    ok = subprocess.run(cmd + ["--set", f"run.out_root='{root}'"], capture_output=True, text=True, timeout=300,
                        env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert len(list((root / "quickstart").iterdir())) == 1  # both ranks used rank 0's folder
