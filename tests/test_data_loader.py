"""Batch loaders: determinism per (seed, epoch), bit-exact mid-epoch resume, disjoint rank shards,
crops, mixtures, and throughput from a memory-mapped file."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssl4ecg.data.loader import BatchLoader, MixtureLoader
from ssl4ecg.data.records import RecordSet
from ssl4ecg.errors import ConfigError


def make_records(n=50, leads=2, t=40, classes=("A", "B"), prefix="r", seed=0):
    rng = np.random.default_rng(seed)
    signals = rng.standard_normal((n, leads, t)).astype(np.float32)
    signals[:, 0, 0] = np.arange(n)  # sample identity readable from the signal
    return RecordSet(
        signals=signals, leads=("I", "II")[:leads], sampling_rate=100.0,
        record_ids=np.array([f"{prefix}{i}" for i in range(n)]),
        patient_ids=np.array([f"p{i // 2}" for i in range(n)]),
        splits=np.array(["train"] * n),
        labels=(rng.random((n, len(classes))) > 0.5).astype(np.float32) if classes else None,
        class_names=tuple(classes or ()),
        extra={"heart_rate": np.arange(n, dtype=np.float32) + 60, "dx": np.array(["x"] * n)},
    )


def ids(batches):
    return [b.record_ids for b in batches]


@pytest.mark.parametrize("prefetch", [0, 3])
def test_same_seed_and_epoch_same_batches(prefetch):
    rs = make_records()
    a = list(BatchLoader(rs, 8, seed=3, prefetch=prefetch))
    b = list(BatchLoader(rs, 8, seed=3, prefetch=0))
    assert ids(a) == ids(b) and len(a) == 50 // 8
    for x, y in zip(a, b):
        assert torch.equal(x.signal, y.signal) and torch.equal(x.labels, y.labels)
    first = a[0]
    row = int(first.record_ids[0][1:])
    assert torch.equal(first.signal[0], torch.from_numpy(rs.signals[row]))
    assert first.extra["heart_rate"][0].item() == 60 + row and "dx" not in first.extra
    assert first.patient_ids[0] == f"p{row // 2}" and first.leads == ("I", "II")
    other_seed = list(BatchLoader(rs, 8, seed=4, prefetch=prefetch))
    assert ids(other_seed) != ids(a)


def test_epochs_differ_and_iteration_advances_the_epoch():
    loader = BatchLoader(make_records(), 10, seed=0, prefetch=0)
    e0 = ids(loader)
    assert loader.epoch == 1 and loader.position == 0
    e1 = ids(loader)
    assert e0 != e1
    loader.set_epoch(0)
    assert ids(loader) == e0
    loader.set_epoch(1)
    assert ids(loader) == e1
    ordered = ids(BatchLoader(make_records(), 10, shuffle=False, prefetch=0))
    assert ordered[0] == [f"r{i}" for i in range(10)]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_mid_epoch_resume_is_bit_exact(prefetch):
    rs = make_records(n=64, t=50)
    kwargs = dict(seed=7, crop_samples=30, prefetch=prefetch)
    reference = BatchLoader(rs, 5, **kwargs)
    full = []
    for epoch in range(3):
        reference.set_epoch(epoch)
        full.extend(reference)
    # interrupted after 4 batches of epoch 1
    run = BatchLoader(rs, 5, **kwargs)
    got = []
    run.set_epoch(0)
    got.extend(run)
    run.set_epoch(1)
    for i, batch in enumerate(run):
        got.append(batch)
        if i == 3:
            break
    state = run.state_dict()
    assert state["epoch"] == 1 and state["position"] == 4
    restarted = BatchLoader(rs, 5, **kwargs)
    restarted.load_state_dict(state)
    for epoch in range(1, 3):
        restarted.set_epoch(epoch)  # the loop calls set_epoch again: position is kept
        got.extend(restarted)
    assert len(got) == len(full) == 3 * (64 // 5)
    for x, y in zip(got, full):
        assert x.record_ids == y.record_ids and torch.equal(x.signal, y.signal)


def test_resume_refuses_other_settings():
    state = BatchLoader(make_records(), 8, seed=1).state_dict()
    with pytest.raises(ConfigError, match="batch_size was 8 in the checkpoint and is 4 now"):
        BatchLoader(make_records(), 4, seed=1).load_state_dict(state)
    with pytest.raises(ConfigError, match="n_records"):
        BatchLoader(make_records(n=40), 8, seed=1).load_state_dict(state)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(10, 120), world=st.integers(1, 5), batch=st.integers(1, 7),
       drop_last=st.booleans(), seed=st.integers(0, 1000))
def test_rank_shards_disjoint_equal_and_covering(n, world, batch, drop_last, seed):
    rs = make_records(n=n, t=4, classes=None)
    if drop_last and (n // world) // batch == 0:
        with pytest.raises(ConfigError, match="give no full batch"):
            BatchLoader(rs, batch, world_size=world, rank=0, seed=seed, drop_last=drop_last)
        return
    loaders = [BatchLoader(rs, batch, world_size=world, rank=r, seed=seed, drop_last=drop_last, prefetch=0)
               for r in range(world)]
    shares = [[i for b in ld for i in b.record_ids] for ld in loaders]
    assert len({len(s) for s in shares}) == 1  # equal size on every rank
    assert len({len(ld) for ld in loaders}) == 1
    if drop_last:
        flat = [i for s in shares for i in s]
        assert len(flat) == len(set(flat))  # disjoint
        assert len(flat) >= (n // world) * world - world * (batch - 1)
    else:
        assert set().union(*map(set, shares)) == set(rs.record_ids)  # every record seen
        per = -(-n // world)
        assert len(shares[0]) == per
        assert sum(len(s) for s in shares) - n < world  # only the padding repeats


def test_rank_shards_split_one_epoch_order():
    rs = make_records(n=40, t=4)
    whole = [i for b in BatchLoader(rs, 20, seed=5, shuffle=True, prefetch=0) for i in b.record_ids]
    r0 = [i for b in BatchLoader(rs, 5, seed=5, world_size=2, rank=0, prefetch=0) for i in b.record_ids]
    r1 = [i for b in BatchLoader(rs, 5, seed=5, world_size=2, rank=1, prefetch=0) for i in b.record_ids]
    assert r0 == whole[0::2] and r1 == whole[1::2]


def test_random_crops_deterministic_in_bounds_and_varied():
    rs = make_records(n=16, t=100)
    rs.signals[:] = np.arange(100, dtype=np.float32)  # value = time index
    a = list(BatchLoader(rs, 4, seed=2, crop_samples=60, prefetch=0))
    b = list(BatchLoader(rs, 4, seed=2, crop_samples=60, prefetch=2))
    starts = torch.cat([x.signal[:, 0, 0] for x in a])
    assert all(torch.equal(x.signal, y.signal) for x, y in zip(a, b))
    assert a[0].signal.shape == (4, 2, 60)
    assert starts.min() >= 0 and starts.max() <= 40 and len(set(starts.tolist())) > 4
    assert torch.all(a[0].signal[:, :, -1] - a[0].signal[:, :, 0] == 59)
    center = next(iter(BatchLoader(rs, 4, crop_samples=60, crop="center", prefetch=0)))
    assert torch.all(center.signal[:, :, 0] == 20)
    assert BatchLoader(rs, 4, crop_samples=60).spec.n_samples == 60
    with pytest.raises(ConfigError, match=r"crop_samples 200 must be in \[1, 100\]"):
        BatchLoader(rs, 4, crop_samples=200)


def test_indices_restrict_the_loader_without_copying():
    rs = make_records(n=30)
    idx = np.arange(10, 20)
    seen = {i for b in BatchLoader(rs, 2, indices=idx, prefetch=0) for i in b.record_ids}
    assert seen == {f"r{i}" for i in range(10, 20)}
    with pytest.raises(ConfigError, match="indices must lie in"):
        BatchLoader(rs, 2, indices=[50])


def test_mixture_weights_determinism_and_resume():
    a = make_records(n=40, prefix="a", seed=1)
    b = make_records(n=200, prefix="b", seed=2)
    mix = MixtureLoader([a, b], [3.0, 1.0], 16, samples_per_epoch=800, seed=0, prefetch=0)
    batches = list(mix)
    drawn = [i for x in batches for i in x.record_ids]
    share_a = sum(i.startswith("a") for i in drawn) / len(drawn)
    assert 0.70 < share_a < 0.80  # weight 3:1
    a_ids = [i for i in drawn if i.startswith("a")]
    assert set(a_ids) == set(a.record_ids)  # the small part cycles through all its records
    part = batches[0].extra["mixture_part"]
    assert set(part.tolist()) <= {0.0, 1.0}
    rows = [int(i[1:]) for i in batches[0].record_ids]
    for k, (rid, row) in enumerate(zip(batches[0].record_ids, rows)):
        src = a if rid.startswith("a") else b
        assert torch.equal(batches[0].signal[k], torch.from_numpy(src.signals[row]))
    assert batches[0].labels is not None  # same classes in both parts
    again = MixtureLoader([a, b], [3.0, 1.0], 16, samples_per_epoch=800, seed=0, prefetch=2)
    assert ids(again) == ids(batches)
    resumed = MixtureLoader([a, b], [3.0, 1.0], 16, samples_per_epoch=800, seed=0)
    resumed.load_state_dict({**mix.state_dict(), "epoch": 0, "position": 20})
    assert ids(resumed) == ids(batches)[20:]
    with pytest.raises(ConfigError, match="weights"):
        MixtureLoader([a, b], [1.0, 1.0], 16, samples_per_epoch=800).load_state_dict(mix.state_dict())
    unlabelled = make_records(n=30, prefix="c", classes=None)
    assert next(iter(MixtureLoader([a, unlabelled], [1, 1], 8))).labels is None
    shards = [[i for x in MixtureLoader([a, b], [1, 1], 8, world_size=2, rank=r, prefetch=0)
               for i in zip(x.record_ids, x.extra["mixture_part"].tolist())] for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 120


def test_mixture_rejects_mismatched_parts():
    a = make_records(n=20, t=40)
    b = make_records(n=20, t=50)
    with pytest.raises(ConfigError, match="differ in leads, rate or length"):
        MixtureLoader([a, b], [1, 1], 4)
    with pytest.raises(ConfigError, match="non-negative"):
        MixtureLoader([a, a], [1, -1], 4)


def test_throughput_from_a_memory_map(tmp_path):
    """8 x 2500 float32 records from a memory-mapped .npy: at least 5,000 samples/s even on a busy
    2-core machine (benchmarks/data_throughput.py measures the 20,000 samples/s target)."""
    n = 1024
    path = tmp_path / "signals.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 8, 2500))
    mm[:] = np.random.default_rng(0).standard_normal((n, 8, 2500), dtype=np.float32)
    mm.flush()
    del mm
    signals = np.load(path, mmap_mode="r")
    rs = RecordSet(signals=signals, leads=("I", "II", "V1", "V2", "V3", "V4", "V5", "V6"), sampling_rate=250.0,
                   record_ids=np.arange(n).astype(str))
    loader = BatchLoader(rs, 64, seed=0, prefetch=2)
    list(loader)  # page cache warm
    start = time.perf_counter()
    count = sum(len(b) for b in loader)
    rate = count / (time.perf_counter() - start)
    assert count == n and rate > 5000, rate
