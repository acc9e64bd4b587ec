"""Weights and checkpoints load without running code: crafted pickles are refused through the CLI.

The payload is a real pickle whose ``__reduce__`` creates a file when it is unpickled; each
test asserts that the file never appears and that the message names the file and what to do.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ssl4ecg.cli import app

runner = CliRunner()
RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml")
TINY_TOML = """
[run]
name = "tiny"
[data]
source = "synthetic"
n_records = 60
sampling_rate = 100.0
seconds = 10.0
leads = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
[encoder]
name = "cropa_vit"
dim = 16
depth = 1
heads = 2
[objective]
name = "jepa"
predictor_dim = 16
predictor_depth = 1
predictor_heads = 2
[masker]
name = "multiblock"
[train]
batch_size = 8
max_steps = 2
max_minutes = 0.0
precision = "fp32"
"""


class _Payload:
    """Unpickling this runs ``exec``, which creates ``marker``: what an attacker's file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _plant(path: Path, marker: Path, **fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**fields, "payload": _Payload(marker)}, path)


def _assert_refused(result, marker: Path, file_name: str) -> None:
    assert not marker.exists(), "the crafted pickle ran code"
    assert result.exit_code != 0, result.output
    text = " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert file_name in text and "refused" in text and "builtins.exec" in text, text


def test_eval_refuses_a_crafted_encoder_file(tmp_path):
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "shared_run"
    _plant(run_dir / "encoder.pt", marker, format="ssl4ecg-encoder-v1")
    result = runner.invoke(app, ["eval", str(run_dir), "--recipe", RECIPE, "--out", str(tmp_path / "ev")])
    _assert_refused(result, marker, "encoder.pt")
    assert "ssl4ecg import" in result.output  # what to do instead
    assert not (tmp_path / "ev").exists()


def test_embed_refuses_a_crafted_encoder_file(tmp_path):
    marker = tmp_path / "pwned"
    encoder = tmp_path / "downloaded.pt"
    _plant(encoder, marker, format="ssl4ecg-encoder-v1")
    result = runner.invoke(app, ["embed", str(encoder), str(tmp_path), "--out", str(tmp_path / "z.npz")])
    _assert_refused(result, marker, "downloaded.pt")
    assert not (tmp_path / "z.npz").exists()


def test_resume_refuses_a_crafted_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.toml").write_text(TINY_TOML)
    _plant(run_dir / "checkpoints" / "last.pt", marker, step=1)
    result = runner.invoke(app, ["run", "--resume", str(run_dir)])
    _assert_refused(result, marker, "last.pt")
    assert "without --resume" in " ".join(result.output.split())


def test_unsafe_last_checkpoint_is_not_skipped_for_previous(tmp_path):
    """A tampered last.pt stops the resume; it is never silently passed over for previous.pt."""
    from ssl4ecg.safeload import UnsafeFileError
    from ssl4ecg.train.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(2)})
    save_checkpoint(tmp_path, {"step": 2, "w": torch.ones(2)})
    _plant(tmp_path / "last.pt", tmp_path / "pwned", step=3)
    with pytest.raises(UnsafeFileError, match="last.pt"):
        load_checkpoint(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_round_trip_keeps_every_random_state(tmp_path):
    """numpy's RNG state (an ndarray) is written as a tensor and restored exactly, under weights_only."""
    from ssl4ecg.train.checkpoint import capture_rank_state, load_checkpoint, save_checkpoint, set_rng_state

    module = torch.nn.Linear(2, 2)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(9)
    state = {"step": 3, "ranks": [capture_rank_state(gen, gen)], "monitor": {"initial_std": np.float64(0.5)},
             "loader": {"n_records": np.int64(40)}, "objective": module.state_dict()}
    expected = (random.random(), np.random.rand(), torch.rand(1))
    save_checkpoint(tmp_path, state)
    # the file itself loads with plain weights_only=True: no numpy, no custom globals
    raw = torch.load(tmp_path / "last.pt", weights_only=True)
    assert isinstance(raw["ranks"][0]["rng"]["numpy"][1], dict)
    loaded = load_checkpoint(tmp_path)
    numpy_state = loaded["ranks"][0]["rng"]["numpy"]
    assert isinstance(numpy_state[1], np.ndarray) and numpy_state[1].dtype == np.uint32
    assert type(loaded["monitor"]["initial_std"]) is float and type(loaded["loader"]["n_records"]) is int
    assert hasattr(loaded["objective"], "_metadata")  # module state dict versions survive
    set_rng_state(loaded["ranks"][0]["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_checkpoints_written_before_this_change_still_load(tmp_path):
    """Old checkpoints pickled numpy's RNG state as an ndarray: numpy's array constructors are allowed."""
    from ssl4ecg.train.checkpoint import load_checkpoint

    np.random.seed(11)
    old = {"step": 4, "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                              "torch": torch.get_rng_state()},
           "generator": torch.Generator().get_state(), "monitor": {"initial_std": np.float64(1.5)}}
    (tmp_path / "last.pt").write_bytes(b"")
    torch.save(old, tmp_path / "last.pt")  # exactly what save_checkpoint used to write
    with pytest.raises(Exception):  # plain weights_only refuses numpy, which is why it is allowed explicitly
        torch.load(tmp_path / "last.pt", weights_only=True)
    loaded = load_checkpoint(tmp_path)
    assert loaded["step"] == 4
    np.testing.assert_array_equal(loaded["rng"]["numpy"][1], old["rng"]["numpy"][1])


def test_saving_an_arbitrary_object_is_refused_with_its_place(tmp_path):
    from ssl4ecg.errors import CheckpointError
    from ssl4ecg.train.checkpoint import save_checkpoint

    with pytest.raises(CheckpointError, match=r"objective\.extra.*pathlib"):
        save_checkpoint(tmp_path, {"step": 1, "objective": {"extra": Path("x")}})
    assert not (tmp_path / "last.pt").exists()


def test_saved_encoder_loads_weights_only_and_round_trips(tmp_path):
    from ssl4ecg.artifacts import load_encoder, save_encoder
    from ssl4ecg.interfaces import SignalSpec
    from ssl4ecg.registry import get_registry

    spec = SignalSpec(("I", "II"), 100.0, 1000)
    options = {"dim": 16, "depth": 1, "heads": 2, "patch_size": 50}
    encoder = get_registry().build("encoder", "cropa_vit", options, "encoder", spec=spec)
    path = save_encoder(tmp_path / "encoder.pt", encoder, "cropa_vit", options,
                        {"sampling_rate": 100.0, "leads": ["I", "II"], "seconds": np.float64(10.0)})
    torch.load(path, weights_only=True)  # no error: only tensors and plain values
    again, meta = load_encoder(path)
    assert meta["preprocess"]["seconds"] == 10.0 and type(meta["preprocess"]["seconds"]) is float
    for (k, a), b in zip(encoder.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_encoder_file_claiming_a_huge_model_is_refused_before_building(tmp_path):
    """A file's options are checked on the meta device: dim = 10**8 is refused, not allocated."""
    from ssl4ecg.artifacts import FORMAT, load_encoder
    from ssl4ecg.errors import CheckpointError, ConfigError

    path = tmp_path / "huge.pt"
    torch.save({"format": FORMAT, "component": "cropa_vit",
                "options": {"dim": 10**8, "depth": 2, "heads": 2, "patch_size": 50},
                "spec": {"leads": ["I"], "sampling_rate": 100.0, "n_samples": 1000},
                "preprocess": {}, "state_dict": {}}, path)
    with pytest.raises(ConfigError, match="parameters"):
        load_encoder(path)
    torch.save({"format": FORMAT, "component": "cropa_vit"}, path)
    with pytest.raises(CheckpointError, match="damaged"):
        load_encoder(path)


def test_a_plain_pickle_file_is_refused_too(tmp_path):
    """Not every attacker uses torch.save: a bare pickle stream is refused the same way."""
    import pickle

    from ssl4ecg.artifacts import load_encoder
    from ssl4ecg.safeload import UnsafeFileError

    marker = tmp_path / "pwned"
    path = tmp_path / "encoder.pt"
    path.write_bytes(pickle.dumps({"format": "ssl4ecg-encoder-v1", "x": _Payload(marker)}))
    with pytest.raises(UnsafeFileError, match="builtins.exec"):
        load_encoder(path)
    assert not marker.exists()


def test_a_damaged_file_is_reported_as_damaged_not_as_unsafe(tmp_path):
    from ssl4ecg.artifacts import load_encoder
    from ssl4ecg.errors import CheckpointError
    from ssl4ecg.safeload import UnsafeFileError

    path = tmp_path / "encoder.pt"
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable encoder file") as info:
        load_encoder(path)
    assert not isinstance(info.value, UnsafeFileError)
