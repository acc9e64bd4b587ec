"""Prepared caches are safe to share and hard to clobber: damaged files are refused at open
(sizes, ``.npy`` headers and sampled-page digests recorded at prepare time), ``data info``
fails on them, ``--verify`` reads every byte and scans for NaN/inf, damaged or stale shards of
an interrupted prepare are redone, and prepare's worker processes die with their parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ssl4ecg.data.cache import check_cache, open_cache, prepare_cache, verify_cache
from ssl4ecg.data.cli import data_app
from ssl4ecg.data.preprocess import Preprocessing
from ssl4ecg.data.synthetic import SyntheticSource
from ssl4ecg.errors import ConfigError, DataError

PP = Preprocessing(sampling_rate=100.0, seconds=4.0)
N = 40  # 40 x 8 x 400 float32 = 512 KB of signals


def _source(n: int = N) -> SyntheticSource:
    return SyntheticSource(n_records=n, sampling_rate=100.0, seconds=4.0, seed=5)


def _prepare(out: Path, **kw) -> dict:
    kw.setdefault("workers", 1)
    return prepare_cache(_source(), "synthetic", {"n_records": N}, PP, out, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A prepared cache and its records (copied to memory) to compare against."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    _prepare(out)
    records, manifest = open_cache(out)
    return out, np.array(records.signals), records.record_ids.tolist(), np.array(records.labels)


@pytest.fixture
def cache(reference, tmp_path):
    """A private copy of the reference cache."""
    out = tmp_path / "cache"
    out.mkdir()
    for f in reference[0].iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset if offset >= 0 else path.stat().st_size + offset)
        fh.write(data)


def _info(cache: Path, *args: str):
    return CliRunner().invoke(data_app, ["info", str(cache), *args])


# ----------------------------------------------------------------------------- 1. corruption

def test_manifest_records_sizes_and_sampled_digests(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    assert set(manifest["checks"]) == set(manifest["files"]) == {"signals.npy", "labels.npy", "meta.npz"}
    for name, check in manifest["checks"].items():
        assert check["size"] == (cache / name).stat().st_size
        assert len(check["sample_sha256"]) == 64


@pytest.mark.parametrize("offset", [200, -64, 300_000])
def test_ff_bytes_in_signals_are_refused_at_open(cache, offset):
    _poke(cache / "signals.npy", offset, b"\xff" * 64)  # 0xFFFF... is NaN in float32
    with pytest.raises(DataError, match=r"signals\.npy is damaged.*--force"):
        open_cache(cache)
    result = _info(cache)
    assert result.exit_code == 1 and "signals.npy is damaged" in result.output
    assert verify_cache(cache) == ["signals.npy"]


def test_large_cache_samples_pages_and_verify_reads_all(tmp_path):
    """Over 1 MiB only sampled pages are read at open; --verify still finds damage anywhere."""
    out = tmp_path / "big"
    prepare_cache(_source(120), "synthetic", {}, PP, out, workers=1)
    size = (out / "signals.npy").stat().st_size
    assert size > 16 * 65536
    _poke(out / "signals.npy", 128, b"\xff" * 64)  # inside the first sampled page
    with pytest.raises(DataError, match="signals.npy is damaged"):
        open_cache(out)
    _poke(out / "signals.npy", 128, b"\x00" * 64)
    # between sampled pages: the cheap check cannot see it, the full digest and the NaN scan do
    gap = 65536 + (size - 65536) // 30
    _poke(out / "signals.npy", gap, b"\xff" * 64)
    result = _info(out, "--verify")
    assert result.exit_code == 1 and "mismatch: signals.npy" in " ".join(result.output.split())


@pytest.mark.parametrize("name", ["signals.npy", "labels.npy", "meta.npz"])
def test_data_info_fails_on_a_missing_file(cache, name):
    (cache / name).unlink()
    result = _info(cache)
    assert result.exit_code == 1
    assert f"{name} is missing" in " ".join(result.output.split())
    with pytest.raises(DataError, match=f"{name} is missing.*--force"):
        open_cache(cache)


def test_truncated_file_is_refused_with_its_size(cache):
    path = cache / "signals.npy"
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)
    with pytest.raises(DataError, match=r"signals\.npy is \d+ bytes, the manifest recorded \d+"):
        check_cache(cache)


def _strip_checks(cache: Path) -> dict:
    """The cache as prepared before the digests existed (no ``checks``)."""
    manifest = json.loads((cache / "manifest.json").read_text())
    del manifest["checks"], manifest["manifest_sha256"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_edited_manifest_is_refused(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["leads"][1] == "II"
    manifest["leads"][1] = "V6"  # valid JSON, wrong content
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="manifest.json is damaged"):
        open_cache(cache)
    assert _info(cache).exit_code == 1


def test_cache_without_checks_opens_and_nan_is_caught(cache, reference):
    _strip_checks(cache)
    records, _ = open_cache(cache)
    np.testing.assert_array_equal(np.asarray(records.signals), reference[1])
    assert _info(cache).exit_code == 0
    _poke(cache / "signals.npy", -64, b"\xff" * 64)  # NaN in the last record: a sampled row
    with pytest.raises(DataError, match="non-finite"):
        open_cache(cache)


def test_verify_scans_for_nonfinite_values(cache):
    """A NaN that the recorded digests agree with (written before them) is still reported."""
    manifest = _strip_checks(cache)
    arr = np.load(cache / "signals.npy")
    arr[1, 2, 7] = np.inf  # not one of the sampled rows
    np.save(cache / "signals.npy", arr)
    del manifest["files"]["signals.npy"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    open_cache(cache)  # the cheap check samples rows only
    assert verify_cache(cache) == ["signals.npy"]


def test_same_options_reprepare_repairs_a_damaged_cache(cache, reference):
    _poke(cache / "signals.npy", 200, b"\xff" * 64)
    manifest = _prepare(cache)
    records, _ = open_cache(cache)
    np.testing.assert_array_equal(np.asarray(records.signals), reference[1])
    assert verify_cache(cache) == [] and manifest["timings"]["records_processed"] == N


# ----------------------------------------------------------------------------- 2. shards

def _interrupted(out: Path, after: int = 16) -> None:
    def stop(done, total):
        if done >= after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _prepare(out, shard_size=8, progress=stop)


def test_truncated_shard_is_redone(tmp_path, reference):
    out = tmp_path / "cache"
    _interrupted(out)
    shard = out / ".work" / "shard_000000.npy"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    manifest = _prepare(out, shard_size=8)
    records, _ = open_cache(out)
    np.testing.assert_array_equal(np.asarray(records.signals), reference[1])
    assert manifest["timings"]["records_processed"] == N - 8  # shard 1 was kept, shard 0 redone


def test_unreadable_shard_header_and_record_list_are_redone(tmp_path, reference):
    out = tmp_path / "cache"
    _interrupted(out)
    (out / ".work" / "shard_000000.npy").write_bytes(b"garbage")
    (out / ".work" / "shard_000001.json").write_text("{")
    _prepare(out, shard_size=8)
    np.testing.assert_array_equal(np.asarray(open_cache(out)[0].signals), reference[1])


def test_force_starts_clean(tmp_path, reference):
    out = tmp_path / "cache"
    _interrupted(out)
    shard = out / ".work" / "shard_000000.npy"
    _poke(shard, -64, b"\x00" * 64)  # same size, readable: only --force ignores it
    _prepare(out, shard_size=8, force=True)
    np.testing.assert_array_equal(np.asarray(open_cache(out)[0].signals), reference[1])


# ----------------------------------------------------------------------------- 3. orphans

def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_prepare_workers_die_with_a_killed_parent(tmp_path):
    cmd = [sys.executable, "-m", "ssl4ecg", "data", "prepare", "synthetic", "--out", str(tmp_path / "c"),
           "--workers", "2", "--set", "n_records=4000", "--set", "seconds=10.0", "--set", "sampling_rate=500.0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            workers = _children(proc.pid)
            if len(workers) >= 2:
                time.sleep(0.5)  # the workers are processing shards
                break
            time.sleep(0.05)
        assert proc.poll() is None and workers, "prepare ended before its workers started"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(5)
        assert [w for w in workers if _alive(w)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:  # the test's own processes: never left running, even on failure
            if _alive(w):
                os.kill(w, signal.SIGKILL)


# ----------------------------------------------------------------------------- 4. arguments, labels

def test_negative_workers_are_refused(tmp_path):
    result = CliRunner().invoke(data_app, ["prepare", "synthetic", "--out", str(tmp_path / "c"),
                                           "--workers", "-3"])
    assert result.exit_code == 2
    assert "--workers -3 is invalid" in result.output and not (tmp_path / "c").exists()
    with pytest.raises(ConfigError, match="workers = -3"):
        _prepare(tmp_path / "d", workers=-3)


def test_labels_with_wrong_row_count_name_the_file(cache):
    labels = np.load(cache / "labels.npy")
    np.save(cache / "labels.npy", labels[:-3])
    with pytest.raises(DataError, match=r"labels\.npy"):  # caught by the recorded size
        open_cache(cache)
    manifest = _strip_checks(cache)
    del manifest["files"]["labels.npy"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"labels\.npy holds \[{N - 3}, 5\], expected \[{N}, 5\]"):
        open_cache(cache)
