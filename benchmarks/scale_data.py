"""Full-corpus scale, simulated: PTB-XL- and CODE-15%-size datasets in their real file formats,
prepared into caches and loaded as a pretraining mixture.

    python benchmarks/scale_data.py --root /work/scale_tmp                  # full size and 1/10
    python benchmarks/scale_data.py --root DIR --ptbxl 21837 --code15 50000 --fractions 1,0.1 \\
        --workers 2 --loader-workers 0,2 --json bench_out/scale_data.json [--keep]
    python benchmarks/scale_data.py --root DIR --generate-only --ptbxl 300 --code15 400

What it lays out under ``--root/<size>/`` (see ``ssl4ecg/data/sources/ptbxl.py`` and
``code15.py`` for the readers):

* ``ptbxl/``: ``ptbxl_database.csv`` (ecg_id, patient_id, age, sex, ..., scp_codes,
  strat_fold, filename_lr, filename_hr), ``scp_statements.csv``, and every record twice as
  WFDB format 16 (gain 1000/mV, 12 leads I..V6): ``records500/NN000/NNNNN_hr`` (500 Hz x 5000)
  and ``records100/NN000/NNNNN_lr`` (100 Hz x 1000, decimated from the 500 Hz record, as in the
  release). Patients hold 1.15 records on average and lie wholly in one of the ten folds.
* ``code15/``: ``exams_part{k}.hdf5`` of at most 20,000 exams each, ``tracings``
  ``[n + 1, 4096, 12]`` float32 (400 Hz, 10 s or 7 s zero-padded symmetrically, the last row
  an all-zero filler with ``exam_id`` 0) and ``exam_id``; ``exams.csv`` (exam_id, age, is_male,
  nn_predicted_age, 1dAVb, RBBB, LBBB, SB, ST, AF, patient_id, death, timey, normal_ecg,
  trace_file) with the labels at CODE-15%'s prevalences.

Waveforms are real ECGs: every record is one of the ptbxl-mini records (1,819 real PTB-XL
records at 100 Hz, band-passed and z-scored by their provider), upsampled, time-stretched by
0-12 % (heart rate), cropped at a random offset, scaled to 0.15-0.4 mV per unit, with
per-lead baseline wander (0.05-0.5 Hz, up to 0.1 mV) and white noise (5-15 uV) added. A PTB-XL
record keeps its base record's ``scp_codes`` (so labels match the waveform); CODE-15% labels
are drawn at the dataset's prevalences. Without the shared data, the bases come from the
synthetic dipole generator (``ssl4ecg/data/synthetic.py``) and a five-statement table.

Then it prepares each dataset with ``ssl4ecg data prepare`` (a subprocess, ``--workers``):
PTB-XL from records500 and from records100, CODE-15% (``pad_short``), all to the default
``[data]`` settings (8 leads, 250 Hz, 10 s), in float32 and float16, sampling every 0.2 s
``RssAnon`` / ``RssFile`` (``/proc/PID/status``) and ``Pss_Anon`` (``smaps_rollup``) of the
prepare process and its children. Forked workers share their parent's pages, so the sum of
``RssAnon`` counts shared pages once per process; ``Pss_Anon`` splits them and sums to the
physical anonymous memory. Finally, per dtype and round (``--loader-rounds``), it reads the
three caches' files once (page cache warm: this machine pages out memory left cold for a
while), then for each ``--loader-workers`` opens the caches, builds a ``MixtureLoader`` (equal
weights, ``train`` + ``val`` records, batches of ``--batch-size``) and measures the time from
opening the caches to the first batch and the samples/s over ``--loader-seconds``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PTBXL_FULL, CODE15_FULL = 21837, 50000
LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
CODE15_LABELS = ("1dAVb", "RBBB", "LBBB", "SB", "ST", "AF")
#: share of CODE-15% exams with each label (Ribeiro et al. 2020, the 6 abnormalities)
CODE15_PREVALENCE = (0.018, 0.027, 0.017, 0.017, 0.022, 0.020)
CODE15_PART = 20000
#: records per patient in PTB-XL v1.0.3 (21,799 records of 18,869 patients)
PTBXL_RECORDS_PER_PATIENT = 21799 / 18869
#: one statement per superclass, used when the real statement table is not available
_STATEMENTS = {"NORM": ("normal ECG", "NORM", "NORM"), "IMI": ("inferior myocardial infarction", "MI", "IMI"),
               "NDT": ("non-diagnostic T abnormalities", "STTC", "STTC"),
               "IVCD": ("non-specific intraventricular conduction disturbance", "CD", "IVCD"),
               "LVH": ("left ventricular hypertrophy", "HYP", "LVH")}


def default_data() -> Path:
    env = os.environ.get("SSL4ECG_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


# ----------------------------------------------------------------------------- waveforms

@dataclass
class Bases:
    """Real (or synthetic) 10 s records at 100 Hz the generated records are derived from."""

    signals: np.ndarray  # [M, 12, 1000] float32, about unit variance per lead
    scp_codes: list[str]  # PTB-XL scp_codes of each base record
    statements: Path | None  # the real scp_statements.csv, if available


def load_bases(data: Path | None = None, n_synthetic: int = 400) -> Bases:
    """The ptbxl-mini records if ``data`` holds them, else ``n_synthetic`` synthetic records."""
    mini = (data or default_data()) / "ptbxl-mini"
    if (mini / "ptbxl_database.csv").is_file():
        import pandas as pd

        from ssl4ecg.data.sources.wfdb_io import read_record

        db = pd.read_csv(mini / "ptbxl_database.csv")
        signals = np.stack([read_record(mini / name)[1] for name in db["filename_lr"]])
        return Bases(np.nan_to_num(signals).astype(np.float32), list(db["scp_codes"]), mini / "scp_statements.csv")
    from ssl4ecg.data.synthetic import SyntheticSource

    rs = SyntheticSource(n_records=n_synthetic, sampling_rate=100.0, seconds=10.0, seed=0).load()
    sig = rs.signals / rs.signals.std(axis=2, keepdims=True).clip(1e-3)
    code_of = {"NORM": "NORM", "MI": "IMI", "STTC": "NDT", "CD": "IVCD", "HYP": "LVH"}
    codes = [str({code_of[c]: 100.0 for c, on in zip(rs.class_names, row) if on}) for row in rs.labels]
    return Bases(sig.astype(np.float32), codes, None)


def perturbed(base: np.ndarray, rng: np.random.Generator, rate: int, n_out: int) -> np.ndarray:
    """A new ``[12, n_out]`` record in mV at ``rate`` Hz from a 100 Hz ``base`` record."""
    from scipy.signal import resample_poly

    stretch = int(rng.integers(0, 13))  # percent slower
    up = rate * (100 + stretch) // 100
    x = resample_poly(base, up, 100, axis=1)  # 1000 -> 10 * up samples
    start = int(rng.integers(0, x.shape[1] - n_out + 1))
    x = x[:, start:start + n_out] * rng.uniform(0.15, 0.4)
    t = np.arange(n_out) / rate
    freq = rng.uniform(0.05, 0.5, size=(12, 1))
    x += rng.uniform(0.0, 0.1, size=(12, 1)) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi, (12, 1)))
    x += rng.normal(0.0, rng.uniform(0.005, 0.015), size=x.shape)
    return x.astype(np.float32)


def write_wfdb(record: Path, signal_mv: np.ndarray, fs: int) -> None:
    """``record.hea`` + ``record.dat``: WFDB format 16, gain 1000/mV, leads I..V6 (as PTB-XL)."""
    digital = np.clip(np.rint(signal_mv * 1000.0), -32767, 32767).astype("<i2")  # [12, T]
    n_sig, n = digital.shape
    frames = np.ascontiguousarray(digital.T)
    (record.parent / (record.name + ".dat")).write_bytes(frames.tobytes())
    checksums = (digital.astype(np.int64).sum(axis=1) % 65536).tolist()
    lines = [f"{record.name} {n_sig} {fs} {n}"]
    lines += [f"{record.name}.dat 16 1000.0(0)/mV 16 0 {int(digital[i, 0])} {checksums[i]} 0 {LEADS[i]}"
              for i in range(n_sig)]
    (record.parent / (record.name + ".hea")).write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- PTB-XL

#: base signals of the running generation (set before forking: workers inherit, nothing is pickled)
_BASES: dict[str, np.ndarray] = {}


def _ptbxl_chunk(args) -> None:
    from scipy.signal import resample_poly

    root, ids, base_index, seed = args
    bases = _BASES["signals"]
    for ecg_id, j in zip(ids, base_index):
        rng = np.random.default_rng([seed, int(ecg_id)])
        hr = perturbed(bases[j], rng, 500, 5000)
        lr = resample_poly(hr, 1, 5, axis=1).astype(np.float32)
        folder = f"{(ecg_id // 1000) * 1000:05d}"
        write_wfdb(root / "records500" / folder / f"{ecg_id:05d}_hr", hr, 500)
        write_wfdb(root / "records100" / folder / f"{ecg_id:05d}_lr", lr, 100)


def generate_ptbxl(root: Path, n: int, bases: Bases, *, seed: int = 0, workers: int = 2) -> dict:
    """Lay out ``n`` PTB-XL records under ``root``; returns counts and seconds."""
    import pandas as pd

    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 1])
    ids = np.arange(1, n + 1)
    base_index = rng.integers(0, len(bases.signals), size=n)
    n_patients = max(1, round(n / PTBXL_RECORDS_PER_PATIENT))
    patient_of = np.concatenate([np.arange(n_patients), rng.integers(0, n_patients, size=n - n_patients)])
    rng.shuffle(patient_of)
    patient_ids = rng.permutation(np.arange(1, 3 * n_patients + 1))[:n_patients]  # sparse ids, like the release
    fold_of_patient = rng.integers(1, 11, size=n_patients)
    for folder in {f"{(i // 1000) * 1000:05d}" for i in ids}:
        for release in ("records500", "records100"):
            (root / release / folder).mkdir(parents=True, exist_ok=True)
    db = pd.DataFrame({
        "ecg_id": ids,
        "patient_id": patient_ids[patient_of].astype(float),
        "age": np.clip(rng.normal(62, 17, n), 18, 95).round(),
        "sex": rng.integers(0, 2, n),
        "height": np.where(rng.random(n) < 0.3, rng.normal(168, 9, n).round(), np.nan),
        "weight": np.where(rng.random(n) < 0.4, rng.normal(75, 14, n).round(), np.nan),
        "nurse": rng.integers(0, 12, n).astype(float),
        "site": rng.integers(0, 50, n).astype(float),
        "device": rng.choice(["CS-12   E", "AT-6 C 5.5", "CS100    3", "AT-60    3"], n),
        "recording_date": pd.Timestamp("1984-01-01") + pd.to_timedelta(rng.integers(0, 10 ** 8, n), unit="s"),
        "report": "generated record",
        "scp_codes": [bases.scp_codes[j] for j in base_index],
        "validated_by_human": rng.random(n) < 0.75,
        "strat_fold": fold_of_patient[patient_of],
        "filename_lr": [f"records100/{(i // 1000) * 1000:05d}/{i:05d}_lr" for i in ids],
        "filename_hr": [f"records500/{(i // 1000) * 1000:05d}/{i:05d}_hr" for i in ids],
    })
    db["recording_date"] = db["recording_date"].dt.strftime("%Y-%m-%d %H:%M:%S")
    db.to_csv(root / "ptbxl_database.csv", index=False)
    if bases.statements is not None:
        shutil.copy(bases.statements, root / "scp_statements.csv")
    else:
        table = pd.DataFrame(
            [{"": code, "description": d, "diagnostic": 1.0, "form": np.nan, "rhythm": np.nan,
              "diagnostic_class": cls, "diagnostic_subclass": sub} for code, (d, cls, sub) in _STATEMENTS.items()])
        table.to_csv(root / "scp_statements.csv", index=False)
    chunks = np.array_split(np.arange(n), max(1, min(n, 64)))
    tasks = [(root, ids[c], base_index[c], seed) for c in chunks if len(c)]
    _BASES["signals"] = bases.signals
    _map(_ptbxl_chunk, tasks, workers)
    seconds = time.perf_counter() - t0
    return {"records": n, "patients": int(len(np.unique(patient_of))), "seconds": round(seconds, 1),
            "records_per_s": round(n / seconds, 1), "bytes": _du(root)}


# ----------------------------------------------------------------------------- CODE-15%

def _code15_block(args) -> np.ndarray:
    """Tracings ``[len(rows), 4096, 12]`` of one block of exams."""
    rows, base_index, lengths, seed = args
    bases = _BASES["signals"]
    out = np.zeros((len(rows), 4096, 12), dtype=np.float32)
    for i, (row, j, length) in enumerate(zip(rows, base_index, lengths)):
        rng = np.random.default_rng([seed, 2, int(row)])
        x = perturbed(bases[j], rng, 400, int(length))
        pad = (4096 - length) // 2
        out[i, pad:pad + length] = x.T
    return out


def generate_code15(root: Path, n: int, bases: Bases, *, seed: int = 0, workers: int = 2,
                    part_size: int = CODE15_PART, block: int = 256) -> dict:
    """Lay out ``n`` CODE-15% exams under ``root``; returns counts and seconds."""
    import h5py
    import pandas as pd

    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 3])
    exam_ids = np.sort(rng.permutation(4_000_000)[:n] + 1)
    rng.shuffle(exam_ids)
    n_patients = max(1, round(n / 1.48))
    patient_of = np.concatenate([np.arange(n_patients), rng.integers(0, n_patients, size=n - n_patients)])
    rng.shuffle(patient_of)
    labels = rng.random((n, len(CODE15_LABELS))) < np.array(CODE15_PREVALENCE)
    age = np.clip(rng.normal(53, 18, n), 16, 100).round().astype(int)
    death = np.where(rng.random(n) < 0.4, np.where(rng.random(n) < 0.05, "True", "False"), "")
    table = pd.DataFrame({
        "exam_id": exam_ids, "age": age, "is_male": rng.random(n) < 0.4,
        "nn_predicted_age": (age + rng.normal(0, 8, n)).round(6),
        **{c: labels[:, k] for k, c in enumerate(CODE15_LABELS)},
        "patient_id": patient_of + 1, "death": death,
        "timey": np.where(death != "", rng.uniform(0, 8, n).round(4).astype(str), ""),
        "normal_ecg": ~labels.any(axis=1) & (rng.random(n) < 0.6),
        "trace_file": [f"exams_part{i // part_size}.hdf5" for i in range(n)],
    })
    table.to_csv(root / "exams.csv", index=False)
    base_index = rng.integers(0, len(bases.signals), size=n)
    lengths = np.where(rng.random(n) < 0.85, 4000, 2800)
    for part, first in enumerate(range(0, n, part_size)):
        count = min(part_size, n - first)
        path = root / f"exams_part{part}.hdf5"
        tmp = path.with_name(path.name + ".tmp")
        with h5py.File(tmp, "w") as h5:
            tracings = h5.create_dataset("tracings", shape=(count + 1, 4096, 12), dtype="float32")
            h5.create_dataset("exam_id", data=np.concatenate([exam_ids[first:first + count], [0]]).astype(np.int64))
            starts = range(first, first + count, block)
            tasks = [(np.arange(s, min(s + block, first + count)), base_index[s:s + block],
                      lengths[s:s + block], seed) for s in starts]
            _BASES["signals"] = bases.signals
            for s, data in zip(starts, _imap(_code15_block, tasks, workers)):
                tracings[s - first:s - first + len(data)] = data
            tracings[count] = 0.0  # the filler row of the real parts
        os.replace(tmp, path)
    seconds = time.perf_counter() - t0
    return {"exams": n, "parts": -(-n // part_size), "seconds": round(seconds, 1),
            "exams_per_s": round(n / seconds, 1), "bytes": _du(root)}


def _map(fn, tasks, workers: int) -> None:
    for _ in _imap(fn, tasks, workers):
        pass


def _imap(fn, tasks, workers: int):
    """``fn`` over ``tasks`` in order, in ``workers`` forked processes (1 = here)."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    import multiprocessing

    import scipy.signal  # noqa: F401 - imported once here, inherited by the forked workers

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(fn, tasks)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- measuring

def _status(pid: int) -> dict[str, int]:
    """RssAnon, RssFile, RssShmem (kB) and Pss_Anon (kB) of one process (empty if it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0])
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss_Anon:"):
                    out["Pss_Anon"] = int(line.split()[1])
    except (OSError, ValueError):
        return {}
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from ``/proc/PID/task/*/children``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return out


class MemorySampler:
    """Peak of the summed memory of a process tree, sampled every ``interval`` seconds."""

    KEYS = ("RssAnon", "RssFile", "RssShmem", "Pss_Anon")

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.peak = {k: 0 for k in self.KEYS}
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        stats = [s for s in map(_status, process_tree(self.pid)) if s]
        self.samples += 1
        self.peak_processes = max(self.peak_processes, len(stats))
        for k in self.KEYS:
            self.peak[k] = max(self.peak[k], sum(s.get(k, 0) for s in stats))

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        mb = {f"peak_{k}_MB": round(v / 1024, 1) for k, v in self.peak.items()}
        return {**mb, "peak_processes": self.peak_processes, "samples": self.samples}


def prepare_measured(source: str, path: Path, out: Path, sets: list[str], workers: int) -> dict:
    """``ssl4ecg data prepare`` in a subprocess, its wall time and the peak memory of its tree."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ssl4ecg", "data", "prepare", source, str(path), "--out", str(out),
           "--workers", str(workers)] + [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    log = out.with_name(out.name + ".log")
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "120"})
        with MemorySampler(proc.pid) as sampler:
            rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); see {log}")
    manifest = json.loads((out / "manifest.json").read_text())
    n = manifest["counts"]["records"]
    return {
        "command": " ".join(["ssl4ecg"] + cmd[3:]),
        "records": n, "dropped": manifest["counts"]["dropped"], "dtype": manifest["dtype"],
        "shape": manifest["shape"], "workers": manifest["workers"],
        "wall_s": round(wall, 2), "records_per_s_wall": round(n / wall, 1),
        "prepare_s": manifest["prepare_seconds"], "records_per_s": round(n / manifest["prepare_seconds"], 1),
        "timings": manifest["timings"],
        "signals_bytes": (out / "signals.npy").stat().st_size, "cache_bytes": _du(out),
        **sampler.report(),
    }


def loader_measured(caches: list[Path], batch_size: int, workers: int, seconds: float,
                    prefetch: int = 2) -> dict:
    """Time from opening ``caches`` to the first mixture batch, then samples/s for ``seconds``."""
    from ssl4ecg.data.cache import open_cache
    from ssl4ecg.data.loader import MixtureLoader

    with MemorySampler(os.getpid()) as sampler:
        t0 = time.perf_counter()
        parts = [open_cache(c)[0] for c in caches]
        indices = [np.flatnonzero(np.isin(rs.splits, ["train", "val"])) for rs in parts]
        loader = MixtureLoader(parts, [1.0] * len(parts), batch_size, indices=indices, seed=0,
                               prefetch=prefetch, workers=workers)
        batches = iter(loader)
        first = next(batches)
        t_first = time.perf_counter() - t0
        assert first.signal.dtype.is_floating_point and first.signal.shape[0] == batch_size
        count, n_batches, epochs = 0, 0, 0
        start = time.perf_counter()
        while True:
            for batch in batches:
                count += len(batch)
                n_batches += 1
                if time.perf_counter() - start >= seconds:
                    break
            else:
                epochs += 1
                batches = iter(loader)
                continue
            batches.close()
            break
        elapsed = time.perf_counter() - start
    return {"caches": [str(c) for c in caches], "records": [len(ix) for ix in indices],
            "batch_size": batch_size, "workers": workers, "prefetch": prefetch,
            "first_batch_s": round(t_first, 3), "batches": n_batches, "epochs_completed": epochs,
            "samples_per_s": round(count / elapsed, 1), "dtype": str(parts[0].signals.dtype),
            **sampler.report()}


def warm(caches: list[Path]) -> dict:
    """Read the caches' signal files once, sequentially (into the page cache); seconds and MB/s."""
    t0 = time.perf_counter()
    total = 0
    for cache in caches:
        with open(cache / "signals.npy", "rb", buffering=0) as fh:
            while chunk := fh.read(1 << 24):
                total += len(chunk)
    seconds = time.perf_counter() - t0
    return {"bytes": total, "seconds": round(seconds, 2), "MB_per_s": round(total / 1e6 / seconds, 1)}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_size(root: Path, n_ptbxl: int, n_code15: int, args, bases: Bases) -> dict:
    """Generate (unless present), prepare and load one dataset size."""
    out: dict = {"ptbxl_records": n_ptbxl, "code15_exams": n_code15, "load_before": load_average()}
    ptbxl, code15 = root / "ptbxl", root / "code15"
    if not (ptbxl / "ptbxl_database.csv").is_file():
        out["generate_ptbxl"] = generate_ptbxl(ptbxl, n_ptbxl, bases, workers=args.gen_workers)
    if not (code15 / "exams.csv").is_file():
        out["generate_code15"] = generate_code15(code15, n_code15, bases, workers=args.gen_workers)
    if args.generate_only:
        return out
    jobs = {"ptbxl500": ("ptbxl", ptbxl, ["records=records500"]),
            "ptbxl100": ("ptbxl", ptbxl, ["records=records100"]),
            "code15": ("code15", code15, ["pad_short=true"])}
    caches: dict[str, dict[str, Path]] = {}
    out["prepare"] = {}
    for dtype in args.dtypes:
        for name, (source, path, sets) in jobs.items():
            cache = root / "caches" / f"{name}-{dtype}"
            print(f"prepare {name} {dtype} ...", flush=True)
            result = prepare_measured(source, path, cache, sets + [f"cache_dtype={dtype}"], args.workers)
            result["load"] = load_average()
            out["prepare"][f"{name}-{dtype}"] = result
            caches.setdefault(dtype, {})[name] = cache
            print(json.dumps(result), flush=True)
    out["loader"] = []
    for dtype in args.dtypes:
        for round_ in range(args.loader_rounds):
            # the page cache first holds the caches (this machine evicts cold pages within
            # minutes); the first batch is then timed from opening them, samples/s in steady state
            warmed = warm(list(caches[dtype].values()))
            for workers in args.loader_workers:
                print(f"loader {dtype} workers={workers} round {round_} ...", flush=True)
                result = loader_measured(list(caches[dtype].values()), args.batch_size, workers,
                                         args.loader_seconds)
                result.update(round=round_, warm=warmed, load=load_average())
                out["loader"].append(result)
                print(json.dumps(result), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="where datasets and caches go (not the repo)")
    parser.add_argument("--data", type=Path, default=default_data(), help="shared data (ptbxl-mini bases)")
    parser.add_argument("--ptbxl", type=int, default=PTBXL_FULL)
    parser.add_argument("--code15", type=int, default=CODE15_FULL)
    parser.add_argument("--fractions", default="1,0.1", help="dataset sizes as fractions of --ptbxl/--code15")
    parser.add_argument("--workers", type=int, default=2, help="prepare workers")
    parser.add_argument("--gen-workers", type=int, default=2, help="processes generating the data")
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--loader-workers", default="0,2")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--loader-seconds", type=float, default=15.0)
    parser.add_argument("--loader-rounds", type=int, default=2, help="interleaved rounds of every loader setting")
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the generated data and caches")
    parser.add_argument("--json", type=Path, default=REPO / "bench_out" / "scale_data.json")
    args = parser.parse_args(argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.loader_workers = [int(w) for w in args.loader_workers.split(",") if w]
    fractions = [float(f) for f in args.fractions.split(",") if f]
    if args.root.resolve().is_relative_to(REPO):
        parser.error(f"--root {args.root} is inside the repository; put the datasets elsewhere")
    bases = load_bases(args.data)
    report = {"machine": {"cpus": os.cpu_count(), "load": load_average()},
              "bases": {"records": len(bases.signals), "real": bases.statements is not None}, "sizes": {}}
    try:
        for fraction in fractions:
            n_ptbxl = max(1, math.ceil(args.ptbxl * fraction))
            n_code15 = max(1, math.ceil(args.code15 * fraction))
            root = args.root / f"ptbxl{n_ptbxl}-code{n_code15}"
            print(f"== {root}", flush=True)
            report["sizes"][root.name] = run_size(root, n_ptbxl, n_code15, args, bases)
            if not args.keep and not args.generate_only:
                shutil.rmtree(root)
    finally:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, args.json)
    print(f"report: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
