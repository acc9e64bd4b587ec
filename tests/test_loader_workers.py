"""Loader worker processes and pinned memory: the same batches and state as without workers, no
worker left after an iteration ends, is closed early or fails, or after the parent dies, memory
maps not copied when the loader is pickled for spawned workers."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from ssl4ecg.data.loader import BatchLoader, MixtureLoader, _file_region, _Loader, _reopen
from ssl4ecg.data.records import RecordSet
from ssl4ecg.errors import ConfigError, DataError

LEADS = ("I", "II", "V1")


def mapped_records(tmp_path, n=40, t=60, dtype=np.float32, prefix="r", seed=0, classes=("A", "B")):
    """Records whose signals are a memory-mapped .npy (as a cache holds them)."""
    rng = np.random.default_rng(seed)
    signals = rng.standard_normal((n, len(LEADS), t)).astype(dtype)
    signals[:, 0, 0] = np.arange(n)
    path = tmp_path / f"{prefix}-{np.dtype(dtype).name}.npy"
    np.save(path, signals)
    return RecordSet(
        signals=np.load(path, mmap_mode="r"), leads=LEADS, sampling_rate=100.0,
        record_ids=np.array([f"{prefix}{i}" for i in range(n)]),
        patient_ids=np.array([f"p{i // 2}" for i in range(n)]),
        splits=np.array(["train"] * n),
        labels=(rng.random((n, len(classes))) > 0.5).astype(np.float32),
        class_names=classes,
        extra={"heart_rate": np.arange(n, dtype=np.float32) + 60},
    )


def same(a, b) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert x.record_ids == y.record_ids and x.patient_ids == y.patient_ids
        assert x.signal.dtype == torch.float32 and torch.equal(x.signal, y.signal)
        assert torch.equal(x.labels, y.labels)
        assert x.extra.keys() == y.extra.keys() and all(torch.equal(x.extra[k], y.extra[k]) for k in x.extra)


def epochs(loader, n):
    out = []
    for epoch in range(n):
        loader.set_epoch(epoch)
        out.extend(loader)
    return out


def worker_pids() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("prefetch", [0, 2])
def test_workers_give_the_batches_of_workers_0_over_epochs(tmp_path, prefetch):
    rs = mapped_records(tmp_path, n=45, t=60)
    kwargs = dict(seed=3, crop_samples=40, drop_last=False)
    reference = epochs(BatchLoader(rs, 8, prefetch=0, **kwargs), 3)
    same(epochs(BatchLoader(rs, 8, prefetch=prefetch, workers=2, **kwargs), 3), reference)
    # a mixture of a float32 and a float16 cache: float32 batches, the float16 rows converted exactly
    half = mapped_records(tmp_path, n=30, t=60, dtype=np.float16, prefix="h", seed=1)
    mix = dict(samples_per_epoch=96, seed=5, crop_samples=50, indices=[np.arange(5, 45), None])
    ref_mix = epochs(MixtureLoader([rs, half], [1.0, 2.0], 16, prefetch=0, **mix), 2)
    same(epochs(MixtureLoader([rs, half], [1.0, 2.0], 16, prefetch=prefetch, workers=2, **mix), 2), ref_mix)
    row = next(i for i, rid in enumerate(ref_mix[0].record_ids) if rid.startswith("h"))
    rid = int(ref_mix[0].record_ids[row][1:])
    window = ref_mix[0].signal[row]
    full = torch.from_numpy(np.asarray(half.signals[rid], dtype=np.float32))
    assert any(torch.equal(window, full[:, s:s + 50]) for s in range(11))


def test_workers_resume_mid_epoch_bit_exactly(tmp_path):
    rs = mapped_records(tmp_path, n=64, t=50)
    kwargs = dict(seed=7, crop_samples=30)
    full = epochs(BatchLoader(rs, 5, **kwargs), 3)
    run = BatchLoader(rs, 5, workers=2, **kwargs)
    got = list(run)  # epoch 0
    for i, batch in enumerate(run):  # epoch 1, interrupted after 4 batches
        got.append(batch)
        if i == 3:
            break
    state = run.state_dict()
    assert (state["epoch"], state["position"]) == (1, 4)
    restarted = BatchLoader(rs, 5, workers=2, **kwargs)
    restarted.load_state_dict(state)
    for epoch in (1, 2):
        restarted.set_epoch(epoch)
        got.extend(restarted)
    same(got, full)
    assert restarted.state_dict() == {**BatchLoader(rs, 5, **kwargs).state_dict(), "epoch": 3, "position": 0}


@pytest.mark.parametrize("prefetch", [0, 2])
def test_closing_early_stops_the_workers(tmp_path, prefetch):
    rs = mapped_records(tmp_path, n=64)
    before = worker_pids()
    loader = BatchLoader(rs, 4, workers=2, prefetch=prefetch)
    batches = iter(loader)
    next(batches)
    started = worker_pids() - before
    assert len(started) == 2 and all(alive(p) for p in started)
    batches.close()
    assert not any(alive(p) for p in started) and not worker_pids() - before
    assert loader.position == 1
    # an abandoned iteration is closed when it is collected
    batches = iter(loader)
    next(batches)
    started = worker_pids() - before
    del batches
    assert started and not any(alive(p) for p in started)


def test_a_failing_batch_reaches_the_caller_and_stops_the_workers(tmp_path, monkeypatch):
    rs = mapped_records(tmp_path, n=64)
    original = _Loader._make_batch

    def failing(self, epoch, b, *args, **kwargs):
        if b == 3:
            raise DataError(f"record of batch {b} is damaged")
        return original(self, epoch, b, *args, **kwargs)

    monkeypatch.setattr(_Loader, "_make_batch", failing)  # forked workers inherit the patch
    before = worker_pids()
    loader = BatchLoader(rs, 4, workers=2)
    got = []
    with pytest.raises(DataError, match="record of batch 3 is damaged"):
        for batch in loader:
            got.append(batch)
    assert len(got) == 3 and loader.position == 3
    time.sleep(0.2)
    assert not worker_pids() - before


def test_workers_leave_the_global_random_streams_alone(tmp_path):
    rs = mapped_records(tmp_path)
    torch.manual_seed(11)
    np.random.seed(11)
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(11)
    np.random.seed(11)
    list(BatchLoader(rs, 8, workers=2, crop_samples=30))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


@pytest.mark.slow
@pytest.mark.parametrize("when", ["after the first batch", "while the workers start"])
def test_workers_exit_when_the_parent_is_killed(tmp_path, when):
    rs = mapped_records(tmp_path, n=400)
    np.save(tmp_path / "ids.npy", rs.record_ids)
    script = textwrap.dedent(f"""
        import multiprocessing, os, signal, sys, time
        import numpy as np
        import torch.utils.data.dataloader as dl
        from ssl4ecg.data.loader import BatchLoader
        from ssl4ecg.data.records import RecordSet

        def report(kill):
            print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
            if kill:
                os.kill(os.getpid(), signal.SIGKILL)

        if {when == "while the workers start"}:
            import torch.utils.data._utils.worker as w
            watch = w.ManagerWatchdog.__init__
            def slow_watch(self):  # a worker slow to start (a loaded machine): the parent dies first
                time.sleep(1.0)
                watch(self)
            w.ManagerWatchdog.__init__ = slow_watch
            start = dl._MultiProcessingDataLoaderIter.__init__
            def started(self, *args):
                start(self, *args)
                report(True)
            dl._MultiProcessingDataLoaderIter.__init__ = started
        rs = RecordSet(signals=np.load({str(tmp_path / "r-float32.npy")!r}, mmap_mode="r"),
                       leads=("I", "II", "V1"), sampling_rate=100.0,
                       record_ids=np.load({str(tmp_path / "ids.npy")!r}))
        batches = iter(BatchLoader(rs, 2, workers=2, prefetch=2))
        next(batches)
        report(False)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 20  # DataLoader workers look for their parent every 5 s
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)]


@pytest.mark.slow
def test_spawned_workers_reopen_memory_maps_by_path(tmp_path):
    mapped = mapped_records(tmp_path, n=64, t=2000)
    in_memory = mapped_records(tmp_path, n=10, t=2000, prefix="m", seed=2)
    in_memory.signals = np.array(in_memory.signals)  # a part that is not mapped travels by value
    kwargs = dict(samples_per_epoch=48, seed=2, crop_samples=1500, indices=[np.arange(8, 60), None])
    loader = MixtureLoader([mapped, in_memory], [3, 1], 8, workers=1, start_method="spawn", **kwargs)
    size = len(pickle.dumps(loader))
    assert size < mapped.signals.nbytes / 4 and size > in_memory.signals.nbytes  # the map is not copied
    same(list(loader), list(MixtureLoader([mapped, in_memory], [3, 1], 8, **kwargs)))


def test_a_view_of_a_memory_map_reopens_at_its_place_and_refuses_a_rewritten_file(tmp_path):
    rs = mapped_records(tmp_path, n=20, t=60)
    view = rs.signals[4:12, 1:, 10:50]
    region = _file_region(view)
    assert region is not None and _file_region(np.array(view)) is None
    again = _reopen(region)
    assert isinstance(again, np.memmap) and not again.flags.writeable
    assert np.array_equal(again, view)
    assert np.array_equal(_reopen(_file_region(again[1:3])), view[1:3])
    os.utime(region[0], ns=(0, 0))
    with pytest.raises(DataError, match="changed after the loader opened it"):
        _reopen(region)


def test_worker_options_are_checked(tmp_path):
    rs = mapped_records(tmp_path)
    for bad in (-1, True, 1.5):
        with pytest.raises(ConfigError, match="workers must be an integer >= 0"):
            BatchLoader(rs, 4, workers=bad)
    with pytest.raises(ConfigError, match="start_method 'thread' is not one of"):
        BatchLoader(rs, 4, workers=1, start_method="thread")
    with pytest.raises(ConfigError, match="float32 or float16 signals, got float64"):
        BatchLoader(RecordSet(signals=np.zeros((4, 3, 10)), leads=LEADS, sampling_rate=100.0,
                              record_ids=np.arange(4)), 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_pin_memory_without_cuda_gives_the_same_pageable_batches(tmp_path):
    rs = mapped_records(tmp_path)
    for workers in (0, 2):
        pinned = list(BatchLoader(rs, 8, seed=1, pin_memory=True, workers=workers))
        assert not any(b.signal.is_pinned() for b in pinned)
        same(pinned, list(BatchLoader(rs, 8, seed=1)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pin_memory_gives_page_locked_batches_with_cuda(tmp_path):
    rs = mapped_records(tmp_path)
    half = mapped_records(tmp_path, dtype=np.float16, prefix="h")
    for workers, prefetch in ((0, 0), (0, 2), (2, 2)):
        loaders = [BatchLoader(rs, 8, seed=1, pin_memory=True, workers=workers, prefetch=prefetch),
                   MixtureLoader([rs, half], [1, 1], 8, seed=1, pin_memory=True, workers=workers, prefetch=prefetch)]
        references = [BatchLoader(rs, 8, seed=1), MixtureLoader([rs, half], [1, 1], 8, seed=1)]
        for loader, reference in zip(loaders, references):
            batches = list(loader)
            assert all(b.signal.is_pinned() and b.labels.is_pinned() for b in batches)
            assert all(v.is_pinned() for b in batches for v in b.extra.values())
            same(batches, list(reference))
            on_gpu = batches[0].to("cuda", non_blocking=True)
            torch.cuda.synchronize()
            assert torch.equal(on_gpu.signal.cpu(), batches[0].signal)
