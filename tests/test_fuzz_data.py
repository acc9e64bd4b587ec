"""Property-based fuzzing of the data side: WFDB headers, signal files and ``.mat`` files.

Real files (copied, never modified in place) are truncated, byte-flipped, given impossible
field values or replaced by random bytes and by ``.mat`` files with the wrong variables,
shapes and dtypes. Every input ends in the record read correctly or one
:class:`~ssl4ecg.errors.DataError` / per-record drop reason -- never another exception, a
hang (each example runs under an alarm) or a runaway allocation (under an address-space
limit), and never a lost cache. Example budgets and the seed are fixed so CI is reproducible.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import tempfile
import time
import warnings
from pathlib import Path

try:
    import resource
except ImportError:  # not on Windows: examples run without the memory limit
    resource = None

import numpy as np
import pytest
import scipy.io
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import ssl4ecg.data.cache as cache_mod
from ssl4ecg.data.build import prepare, resolve_data_section
from ssl4ecg.data.cache import open_cache, prepare_cache, read_in_memory, read_manifest, verify_cache
from ssl4ecg.data.cli import data_app
from ssl4ecg.data.preprocess import Preprocessing, process_record
from ssl4ecg.data.sources import register_real_sources
from ssl4ecg.data.sources.base import read_split_file
from ssl4ecg.data.sources.cinc import CinCSource
from ssl4ecg.data.sources.cpsc2018 import CPSC2018Source, CPSC2018Warning
from ssl4ecg.data.sources.folder import FolderSource
from ssl4ecg.data.sources.wfdb_io import parse_header, read_record
from ssl4ecg.errors import ConfigError, DataError
from ssl4ecg.registry import Registry

SEED = 20261122
SUPPRESS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]


def fuzz(n: int):
    """Fixed budget, derandomised, no example database (CI reruns exactly the same inputs)."""
    return settings(max_examples=n, deadline=None, suppress_health_check=SUPPRESS, derandomize=True,
                    database=None)


PTBXL = Path("ptbxl-mini/records100/00000/00009_lr")
CINC = Path("cinc-sample/ptbxl-hr/HR06000")
CPSC = Path("cinc-sample/cpsc2018-raw/A1980.mat")
PP = Preprocessing()
REFERENCE = b"Recording,First_label,Second_label,Third_label\nA1980,1,,\nA1981,2,3,\n"


# ----------------------------------------------------------------------------- guards

class Hang(BaseException):
    """An example ran over its time budget (BaseException: no reader's ``except`` swallows it)."""


def _vm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def bounded(seconds: int = 20, headroom: int = 3 << 30):
    """Fail an example that runs over ``seconds`` or maps more than ``headroom`` new bytes."""
    def on_alarm(signum, frame):
        raise Hang(f"fuzz example ran over {seconds} s")

    has_alarm = hasattr(signal, "SIGALRM")
    if has_alarm:
        old_handler = signal.signal(signal.SIGALRM, on_alarm)
        pending = signal.alarm(seconds)  # another timer (e.g. pytest-timeout) is restored after
        started = time.monotonic()
    limits = resource.getrlimit(resource.RLIMIT_AS) if resource is not None else None
    vm = _vm_bytes()
    if limits and vm is not None and (limits[1] == resource.RLIM_INFINITY or vm + headroom < limits[1]):
        resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, limits[1]))
    try:
        yield
    finally:
        if limits:
            resource.setrlimit(resource.RLIMIT_AS, limits)
        if has_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old_handler)
            if pending:
                signal.alarm(max(1, pending - int(time.monotonic() - started)))


@contextlib.contextmanager
def scratch(tmp_path: Path):
    """A fresh folder per example (pytest's tmp_path is shared by all examples of a test)."""
    path = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def check_reason(reason: str) -> None:
    """A drop reason is a message, not a crash or an allocation failure in disguise."""
    assert reason.strip()
    assert not reason.startswith("unexpected"), reason
    assert "MemoryError" not in reason, reason


def read_or_reason(fn):
    """``(fn(), None)`` or ``(None, message)`` for a DataError; any other exception propagates."""
    try:
        return fn(), None
    except DataError as exc:
        check_reason(str(exc))
        return None, str(exc)


# ----------------------------------------------------------------------------- strategies
#
# Strategies draw short descriptions of the damage (so that a failing example prints
# readably); apply_* turn them into bytes from the real files.

INTERESTING = b" \t\n\r#/()+x:.-0123456789eE\x00\xff\xb2"
POS = st.integers(0, 2**20)  # taken modulo the length of the data

byte_ops = st.lists(st.one_of(
    st.tuples(st.just("flip"), POS, st.sampled_from(INTERESTING) | st.integers(0, 255)),
    st.tuples(st.just("flip"), POS, st.sampled_from(INTERESTING) | st.integers(0, 255)),
    st.tuples(st.just("insert"), POS, st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("delete"), POS, st.integers(1, 16)),
    st.tuples(st.just("truncate"), POS),
), max_size=4)


def apply_bytes(ops, blob: bytes) -> bytes:
    """``blob`` with flipped, inserted or deleted bytes, or cut short."""
    data = bytearray(blob)
    for op in ops:
        i = op[1] % (len(data) + 1)
        if op[0] == "flip" and i < len(data):
            data[i] = op[2]
        elif op[0] == "insert":
            data[i:i] = op[2]
        elif op[0] == "delete":
            del data[i:i + op[2]]
        elif op[0] == "truncate":
            del data[i:]
    return bytes(data)


RECORD_VALUES = {
    1: st.sampled_from(["0", "1", "11", "13", "-1", "abc", "1e3", "\xb2", "99999999999999999999"])
       | st.integers(-3, 20).map(str),
    2: st.sampled_from(["0", "-100", "abc", "nan", "inf", "-inf", "1e-300", "1e400", "5e-324", "0.001",
                        "0.5", "100/50", "100(0)/x", "1e9", "250", "500", "/"])
       | st.floats(-1e6, 1e6).map(repr),
    3: st.sampled_from(["0", "-5", "1", "999", "1001", "x", str(10**9), str(10**12), "99999999999999999999",
                        "9" * 400])
       | st.integers(-10, 10**7).map(str),
}
SIGNAL_VALUES = {
    0: st.sampled_from(["missing.dat", "-", "../00009_lr.dat", "00009_lr.hea", "x.mat", "HR06000.mat",
                        "a\x00b.dat"]),
    1: st.sampled_from(["16", "61", "80", "24", "32", "212", "8", "160", "310", "311", "0", "1", "999", "516",
                        "16x2", "16x0", "16:3", "16+24", "16+99999999999999999999", "16x1+2", "abc",
                        "\xb2", "16x", "-16", "16x1+24", "80+7"]),
    2: st.sampled_from(["1000.0(0)/mV", "0", "0(0)/mV", "-1000/mV", "nan", "inf", "1e400", "abc", "1000(",
                        "1000(x)/mV", "1000(0", "/mV", "200", "1e-300", "1000.0(99999999999999999999)/mV",
                        "1000(-32768)/uV", "1e-45", "1e39", "1000(" + "9" * 400 + ")/mV"]),
    3: st.sampled_from(["16", "0", "-1", "abc", "99"]),
    4: st.sampled_from(["0", "-5", "abc", "99999999999999999999", "1e3", "-32768", "-" + "9" * 400]),
    5: st.sampled_from(["0", "abc", "-1"]),
    6: st.sampled_from(["0", "abc", "-1"]),
    7: st.sampled_from(["0", "abc", "-1"]),
    8: st.sampled_from(["", "X1", "avr", "DI", "V7", "I I", "II", "\xb2", "[red]"]),
}


@st.composite
def field_edits(draw):
    """Impossible field values, dropped, repeated or cut-off lines, an odd comment."""
    edits = []
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.integers(1, 3))
        edits.append(("record", field, draw(RECORD_VALUES[field])))
    for _ in range(draw(st.integers(0, 4))):
        field = draw(st.integers(0, 8))
        if draw(st.booleans()):
            edits.append(("signal", draw(st.integers(0, 30)), field, draw(SIGNAL_VALUES[field])))
        else:
            edits.append(("signals", field, draw(SIGNAL_VALUES[field])))
    op = draw(st.sampled_from(["drop", "duplicate", "cut", "comment"]))
    if op == "cut":
        edits.append((op, draw(st.integers(0, 30)), draw(st.integers(0, 9))))
    elif op == "comment":
        edits.append((op, draw(st.text(max_size=30))))
    elif draw(st.booleans()):
        edits.append((op, draw(st.integers(0, 30))))
    return edits


def apply_fields(edits, text: str) -> bytes:
    body = [ln.split() for ln in text.splitlines() if ln and not ln.startswith("#")]
    comments = [ln for ln in text.splitlines() if ln.startswith("#")]
    for edit in edits:
        if edit[0] == "record" and edit[1] < len(body[0]):
            body[0][edit[1]] = edit[2]
        elif edit[0] == "signal" and len(body) > 1:
            line = body[1 + edit[1] % (len(body) - 1)]
            if edit[2] < len(line):
                line[edit[2]] = edit[3]
        elif edit[0] == "signals":
            for line in body[1:]:
                if edit[1] < len(line):
                    line[edit[1]] = edit[2]
        elif edit[0] == "drop":
            del body[edit[1] % len(body)]
        elif edit[0] == "duplicate":
            i = edit[1] % len(body)
            body.insert(i, list(body[i]))
        elif edit[0] == "cut":
            i = edit[1] % len(body)
            body[i] = body[i][:edit[2]]
        elif edit[0] == "comment":
            comments.append("#" + edit[1].replace("\n", " "))
    lines = [" ".join(tok) for tok in body] + comments
    return ("\n".join(lines) + "\n").encode("latin-1", errors="replace")


#: damage to a header: ("bytes", ops) or ("fields", edits)
header_damage = st.tuples(st.just("bytes"), byte_ops) | st.tuples(st.just("fields"), field_edits())


def apply_header(damage, text: str) -> bytes:
    kind, what = damage
    return apply_bytes(what, text.encode("latin-1")) if kind == "bytes" else apply_fields(what, text)


#: damage to a file that is there: as stored, cut, byte-level, random or empty
stored_damage = st.one_of(
    st.just(("asis",)), st.tuples(st.just("cut"), POS), st.tuples(st.just("bytes"), byte_ops),
    st.tuples(st.just("random"), st.binary(max_size=256)), st.just(("empty",)))
#: damage to a signal file, which may also be missing
signal_damage = stored_damage | st.just(("missing",))


def apply_signal(damage, blob: bytes) -> bytes | None:
    kind = damage[0]
    if kind == "cut":
        return blob[:damage[1] % (len(blob) + 1)]
    if kind == "bytes":
        return apply_bytes(damage[1], blob)
    return {"asis": blob, "random": damage[-1], "empty": b"", "missing": None}[kind]


def _savemat(variables: dict, fmt: str = "5") -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables, format=fmt)
    return buf.getvalue()


#: an array a MATLAB file can hold in the place of a signal: (kind, shape, fill, seed); half of
#: them have the shape of the real records (12 leads, 5000 samples) so that the dtype matters
array_spec = st.tuples(
    st.sampled_from(["int16", "int8", "int64", "uint64", "float32", "float64", "complex128", "bool", "chars",
                     "digits", "cell", "struct", "sparse"]),
    st.just((12, 5000)) | st.sampled_from([(12, 4999), (12, 5001), (12, 0), (11, 5000), (5000, 12), (12,),
                                           (2, 12, 10), (1, 1), (0, 0), (12, 10)]),
    st.sampled_from(["zeros", "random", "extreme", "nan"]),
    st.integers(0, 2**16))


def make_array(spec):
    kind, shape, fill, rng_seed = spec
    if kind == "chars":
        return np.full(shape, "ab")
    if kind == "digits":
        return np.full(shape, "7")
    if kind == "cell":  # small: 60,000 cells take seconds to write and read
        shape = tuple(min(d, 12) for d in shape)
        cell = np.empty(shape, dtype=object)
        for ix in np.ndindex(shape):
            cell[ix] = np.zeros(2)
        return cell
    if kind == "struct":
        return {"val": np.zeros((12, 10)), "data": "x"}
    if kind == "sparse":
        import scipy.sparse

        return scipy.sparse.csc_matrix(np.eye(12, 50))
    values = np.random.default_rng(rng_seed).normal(0, 1000, size=shape)
    if fill == "zeros":
        values = np.zeros(shape)
    elif fill == "extreme":
        values = np.full(shape, 1e300 if kind == "float64" else -32768.0)
    elif fill == "nan":
        values = np.full(shape, np.nan)
    if kind in ("float32", "float64", "complex128"):
        return values.astype(kind)
    if kind == "bool":
        return np.nan_to_num(values) > 0
    return np.nan_to_num(values).clip(np.iinfo(kind).min, np.iinfo(kind).max).astype(kind)


#: a challenge .mat: damaged bytes, a damaged MAT v4 header field, or another variable
challenge_mat_damage = st.one_of(
    st.tuples(st.just("bytes"), stored_damage),
    st.tuples(st.just("head"), st.integers(0, 5),
              st.sampled_from([0, 1, 3, 10, 11, 12, 13, 30, 40, 63, 64, 5000, 4999, -1, 2**31 - 1])),
    st.tuples(st.just("savemat"), st.sampled_from(["val", "val", "foo", "VAL", "ECG"]), array_spec,
              st.sampled_from(["4", "5"])),
    st.just(("missing",)))


def apply_challenge_mat(damage, blob: bytes) -> bytes | None:
    kind = damage[0]
    if kind == "missing":
        return None
    if kind == "bytes":
        return apply_signal(damage[1], blob)
    if kind == "head":  # MAT v4: type, rows, columns, imaginary flag, name length (int32 each), name
        head = bytearray(blob[:24])
        if damage[1] < 5:
            head[4 * damage[1]:4 * damage[1] + 4] = int(damage[2]).to_bytes(4, "little", signed=True)
        else:
            head[20:24] = [b"vax\x00", b"VAL\x00", b"\x00\x00\x00\x00", b"val1"][damage[2] % 4]
        return bytes(head) + blob[24:]
    _, name, spec, fmt = damage
    try:
        return _savemat({name: make_array(spec)}, fmt)
    except (TypeError, ValueError, NotImplementedError):  # a kind MAT v4 cannot hold
        return _savemat({name: make_array(spec)}, "5")


ODD = ["Female", "Male", "", "?", 61, -1, 1e9, np.nan, "zeros(0)", "ones(2,2)", "struct"]

#: a CPSC2018 .mat: damaged bytes, or struct ECG with odd fields / layout
cpsc_mat_damage = st.one_of(
    st.tuples(st.just("bytes"), st.tuples(st.just("cut"), POS) | st.tuples(st.just("bytes"), byte_ops)),
    st.tuples(st.just("savemat"), st.sampled_from(["struct", "struct", "plain", "struct_array", "wrong_name"]),
              st.sampled_from(ODD), st.sampled_from(ODD), array_spec,
              st.sets(st.sampled_from(["sex", "age", "data"]), max_size=2)))


def _odd(value):
    return {"zeros(0)": np.zeros(0), "ones(2,2)": np.ones((2, 2)), "struct": {"x": 1}}.get(value, value) \
        if isinstance(value, str) else value


def apply_cpsc_mat(damage, blob: bytes) -> bytes:
    if damage[0] == "bytes":
        return apply_signal(damage[1], blob)
    _, layout, sex, age, spec, missing = damage
    fields = {"sex": _odd(sex), "age": _odd(age), "data": make_array(spec)}
    for key in missing:
        del fields[key]
    if layout == "plain":
        return _savemat({"ECG": fields.get("data", np.zeros(3))})
    if layout == "wrong_name":
        return _savemat({"ecg": fields})
    if layout == "struct_array":
        arr = np.empty((1, 2), dtype=[(k, object) for k in fields])
        for k in fields:
            for j in range(2):
                arr[k][0, j] = fields[k]
        return _savemat({"ECG": arr})
    return _savemat({"ECG": fields})


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def registry():
    reg = Registry()
    register_real_sources(reg)
    return reg


class Real(tuple):
    """Contents of real files, shown by name in failing examples (not as 100 kB of bytes)."""

    def __new__(cls, name: str, *parts):
        self = super().__new__(cls, parts)
        self.name = name
        return self

    def __repr__(self) -> str:
        return f"<real {self.name}>"


@pytest.fixture
def ptbxl_files(shared_data):
    """Text of a real PTB-XL header and bytes of its signal file."""
    return Real(str(PTBXL), (shared_data / PTBXL).with_suffix(".hea").read_text(),
                (shared_data / PTBXL).with_suffix(".dat").read_bytes())


@pytest.fixture
def cinc_files(shared_data):
    """Text of a real challenge header and bytes of its MAT v4 file."""
    return Real(str(CINC), (shared_data / CINC).with_suffix(".hea").read_text(),
                (shared_data / CINC).with_suffix(".mat").read_bytes())


@pytest.fixture
def cpsc_file(shared_data):
    """Bytes of a real CPSC2018 .mat file (MAT v5, struct ECG)."""
    return Real(str(CPSC), (shared_data / CPSC).read_bytes())


def _write(folder: Path, name: str, hea: bytes | None, sig: bytes | None, sig_ext: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if hea is not None:
        (folder / f"{name}.hea").write_bytes(hea)
    if sig is not None:
        (folder / f"{name}{sig_ext}").write_bytes(sig)


def load_records_of(source):
    """Every record of ``source`` read and preprocessed as ``load_records`` does (no cache)."""
    return read_in_memory(source, source.name, PP)


def _reference(folder: Path, source_cls, **options) -> np.ndarray:
    """The preprocessed signal of the single good record in ``folder``."""
    records = load_records_of(source_cls(path=str(folder), **options))
    assert len(records) == 1 and not records.dropped
    return records.signals[0]


def check_good_and_fuzzed(records, good: str, fuzzed: str, reference: np.ndarray) -> None:
    """The good record loads as alone; the fuzzed one loads or is dropped with a reason."""
    ids = list(records.record_ids)
    reasons = dict(records.dropped)
    assert good in ids, reasons
    np.testing.assert_array_equal(records.signals[ids.index(good)], reference)
    assert (fuzzed in ids) != (fuzzed in reasons)
    for reason in reasons.values():
        check_reason(reason)
    if fuzzed in ids:
        x = records.signals[ids.index(fuzzed)]
        assert x.shape == (len(PP.leads), PP.n_samples) and np.isfinite(x).all()


# ----------------------------------------------------------------------------- WFDB headers

def _check_header(root: Path, blob: bytes, original: str) -> None:
    """Parse and read a record with header ``blob``: a consistent result or one DataError."""
    header, _ = read_or_reason(lambda: parse_header(root / "00009_lr.hea"))
    if header is not None:
        assert np.isfinite(header.fs) and header.fs > 0
        assert header.n_samples is None or header.n_samples >= 0
        assert header.multi_segment or len(header.signals) == header.n_sig
        assert all(np.isfinite(s.gain) and s.gain != 0 for s in header.signals)
    result, _ = read_or_reason(lambda: read_record(root / "00009_lr"))
    if blob == original.encode("latin-1"):
        assert result is not None  # nothing changed: the record reads
    if result is None:
        return
    header, sig = result
    assert sig.ndim == 2 and sig.dtype == np.float32 and sig.shape[0] == len(header.lead_names)
    if header.n_samples is not None and not header.multi_segment:
        assert sig.shape[1] == header.n_samples
    out, _ = read_or_reason(lambda: process_record(sig, header.lead_names, header.fs, PP))
    if out is not None:
        assert out.shape == (len(PP.leads), PP.n_samples) and np.isfinite(out).all()


#: headers that once crashed a reader or ran away with memory (kept as regression examples)
CRASHERS = [
    ("fields", [("signal", 0, 1, "\xb2")]),  # ValueError: int('²') although '²'.isdigit()
    ("fields", [("signal", 0, 0, "a\x00b.dat")]),  # ValueError: embedded null byte in a file name
    ("fields", [("record", 2, "0.001")]),  # resampling 0.001 Hz -> 250 Hz asked for 16 GB
    ("fields", [("record", 2, "5e-324")]),  # OverflowError: infinite resampling ratio
    ("fields", [("signals", 1, "8"), ("record", 3, str(10**10))]),  # wfdb allocated 10^10 samples
    ("fields", [("signal", 0, 1, "16x2")]),  # wfdb returned 923 of the 1000 samples announced
    ("fields", [("signals", 1, "212"), ("signal", 0, 1, "8"), ("record", 3, "9" * 400)]),  # OverflowError
    ("fields", [("signal", 0, 2, "1000(" + "9" * 400 + ")/mV")]),  # OverflowError: baseline to float32
    ("fields", [("signal", 0, 4, "-" + "9" * 400)]),  # OverflowError: ADC zero (the baseline) to float32
]


def regressions(**others):
    """Run every header of :data:`CRASHERS` as an explicit example (``others``: the other arguments)."""
    def wrap(test):
        for damage in CRASHERS:
            test = example(damage=damage, **others)(test)
        return test
    return wrap


@seed(SEED)
@fuzz(150)
@regressions()
@given(damage=header_damage)
def test_fuzzed_wfdb_headers_parse_or_fail_clearly(damage, ptbxl_files, tmp_path):
    hea, dat = ptbxl_files
    blob = apply_header(damage, hea)
    with scratch(tmp_path) as root, bounded():
        _write(root, "00009_lr", blob, dat, ".dat")
        _check_header(root, blob, hea)


@seed(SEED)
@fuzz(150)
@given(edits=st.lists(st.one_of(
    st.integers(1, 3).flatmap(lambda f: st.tuples(st.just("record"), st.just(f), RECORD_VALUES[f])),
    st.integers(0, 8).flatmap(lambda f: st.tuples(st.just("signals"), st.just(f), SIGNAL_VALUES[f]))),
    min_size=1, max_size=2))
def test_wfdb_header_field_values(edits, ptbxl_files, tmp_path):
    """One or two fields (the record line's, or one column of every signal line) set to odd values."""
    hea, dat = ptbxl_files
    blob = apply_fields(edits, hea)
    with scratch(tmp_path) as root, bounded():
        _write(root, "00009_lr", blob, dat, ".dat")
        _check_header(root, blob, hea)


@seed(SEED)
@fuzz(150)
@regressions(signal=("asis",))
@given(damage=header_damage | st.none(), signal=signal_damage)
def test_folder_source_drops_a_fuzzed_record_and_keeps_the_good_one(damage, signal, ptbxl_files, tmp_path):
    hea, dat = ptbxl_files
    blob = None if damage is None else apply_header(damage, hea)
    sig = apply_signal(signal, dat)
    with scratch(tmp_path) as root, bounded():
        _write(root / "a", "00009_lr", hea.encode(), dat, ".dat")
        reference = _reference(root, FolderSource)
        _write(root / "b", "00009_lr", blob, sig, ".dat")
        if blob is None:  # a signal file without a header is not a record
            assert list(load_records_of(FolderSource(path=str(root))).record_ids) == ["a/00009_lr"]
            return
        records = load_records_of(FolderSource(path=str(root)))
        check_good_and_fuzzed(records, "a/00009_lr", "b/00009_lr", reference)
        raw = FolderSource(path=str(root)).load()  # the raw path (no preprocessing) drops the same way
        assert "a/00009_lr" in raw.record_ids
        for _, reason in raw.dropped:
            check_reason(reason)


# ----------------------------------------------------------------------------- .mat files

def _cinc_pair(root: Path, hea: str, mat: bytes, blob: bytes | None, sig: bytes | None) -> None:
    """A good challenge record in ``a/`` and the fuzzed one in ``b/``: the source reads both."""
    _write(root / "a", "HR06000", hea.encode(), mat, ".mat")
    reference = _reference(root, CinCSource, val_fraction=0.0, test_fraction=0.0)
    _write(root / "b", "HR06000", blob, sig, ".mat")
    records = load_records_of(CinCSource(path=str(root), val_fraction=0.0, test_fraction=0.0))
    check_good_and_fuzzed(records, "a/HR06000", "b/HR06000", reference)
    result, _ = read_or_reason(lambda: read_record(root / "b" / "HR06000"))
    if result is not None:
        header, sig = result
        assert sig.dtype == np.float32 and sig.shape[0] == len(header.lead_names) == header.n_sig


@seed(SEED)
@fuzz(100)
@given(header=header_damage | st.none(), mat=challenge_mat_damage)
def test_cinc_source_with_fuzzed_header_and_mat(header, mat, cinc_files, tmp_path):
    hea, blob = cinc_files
    with scratch(tmp_path) as root, bounded():
        _cinc_pair(root, hea, blob, hea.encode() if header is None else apply_header(header, hea),
                   apply_challenge_mat(mat, blob))


@seed(SEED)
@fuzz(100)
@given(name=st.sampled_from(["val", "val", "val", "foo", "ECG"]), spec=array_spec, fmt=st.sampled_from(["4", "5"]))
@example(name="val", spec=("chars", (12, 5000), "zeros", 0), fmt="5")  # once ValueError: float('ab')
def test_cinc_source_with_mat_variables_of_any_shape_and_dtype(name, spec, fmt, cinc_files, tmp_path):
    hea, blob = cinc_files
    with scratch(tmp_path) as root, bounded():
        _cinc_pair(root, hea, blob, hea.encode(), apply_challenge_mat(("savemat", name, spec, fmt), blob))


@seed(SEED)
@fuzz(120)
@given(mat=cpsc_mat_damage)
def test_cpsc2018_source_with_fuzzed_mat(mat, cpsc_file, tmp_path):
    sig = apply_cpsc_mat(mat, cpsc_file[0])
    with scratch(tmp_path) as root, bounded(), warnings.catch_warnings():
        warnings.simplefilter("ignore", CPSC2018Warning)
        (root / "A1980.mat").write_bytes(cpsc_file[0])
        reference = _reference(root, CPSC2018Source, val_fraction=0.0, test_fraction=0.0)
        (root / "A1981.mat").write_bytes(sig)
        records = load_records_of(CPSC2018Source(path=str(root), val_fraction=0.0, test_fraction=0.0))
        check_good_and_fuzzed(records, "A1980", "A1981", reference)
        raw, _ = read_or_reason(lambda: CPSC2018Source(path=str(root)).read(
            next(e for e in CPSC2018Source(path=str(root)).scan().entries if e.record_id == "A1981")))
        if raw is not None:
            assert raw.signal.dtype == np.float32 and raw.signal.shape[0] == 12
            assert set(raw.extra) == {"age", "sex"}


CSV_CELLS = st.sampled_from(["record", "split", "record_id", "Recording", "First_label", "train", "val", "test",
                             "a/00009_lr", "A1980", "1", "9", "10", "", "x", "\xb2", '"', "\x00", "\ufeffrecord"])


def csv_files(valid: bytes):
    """Random text or bytes, a valid CSV file damaged byte by byte, or rows of odd cells."""
    rows = st.lists(st.lists(CSV_CELLS, max_size=4), max_size=4)
    return st.one_of(st.text(max_size=80).map(lambda t: t.encode("utf-8", errors="replace")),
                     st.binary(max_size=80), byte_ops.map(lambda ops: apply_bytes(ops, valid)),
                     rows.map(lambda r: "\n".join(",".join(cells) for cells in r).encode("utf-8")))


@seed(SEED)
@fuzz(100)
@given(content=csv_files(REFERENCE))
@example(content=b"Recording,First_label\nA1980,\xc2\xb2\n")  # once ValueError: int('\xb2')
@example(content=b"\x80Recording,First_label\n")  # once UnicodeDecodeError
def test_cpsc2018_reference_csv_fuzzed(content, cpsc_file, tmp_path):
    with scratch(tmp_path) as root, bounded():
        (root / "A1980.mat").write_bytes(cpsc_file[0])
        (root / "REFERENCE.csv").write_bytes(content)
        try:
            scan = CPSC2018Source(path=str(root)).scan()
        except DataError as exc:
            check_reason(str(exc))
            return
        assert len(scan.entries) + len(scan.dropped) == 1
        for reason in dict(scan.dropped).values():
            check_reason(reason)


@seed(SEED)
@fuzz(100)
@given(content=csv_files(b"record,split\na/00009_lr,train\nb/00009_lr,val\n") | st.tuples(
    st.permutations(["record", "split", "x"]),
    st.lists(st.lists(st.sampled_from(["train", "val", "test", "a", "", "\xb2"]), max_size=4), max_size=4),
).map(lambda t: "\n".join(",".join(r) for r in [t[0], *t[1]]).encode("utf-8")))
@example(content=b"split,record\ntrain\n")  # once AttributeError: the short row has no record cell
@example(content=b"record,split\n\x80,train\n")  # once UnicodeDecodeError
def test_folds_file_fuzzed(content, tmp_path):
    with scratch(tmp_path) as root, bounded():
        (root / "folds.csv").write_bytes(content)
        try:
            table = read_split_file(root / "folds.csv")
        except DataError as exc:
            check_reason(str(exc))
            return
        assert set(table.values()) <= {"train", "val", "test"}
        assert all(isinstance(k, str) for k in table)


# ----------------------------------------------------------------------------- caches

def _cli_info(cache: Path) -> str:
    result = CliRunner().invoke(data_app, ["info", str(cache), "--verify", "--dropped", "10"])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


@seed(SEED)
@fuzz(40)
@given(data=st.data())
def test_cache_over_fuzzed_records_is_complete(data, ptbxl_files, registry, tmp_path):
    hea, dat = ptbxl_files
    damages = data.draw(st.lists(st.tuples(header_damage, signal_damage), min_size=1, max_size=3), label="records")
    fuzzed = [(apply_header(h, hea), apply_signal(d, dat)) for h, d in damages]
    with scratch(tmp_path) as root, bounded(60):
        _write(root / "good", "00009_lr", hea.encode(), dat, ".dat")
        for i, (blob, sig) in enumerate(fuzzed):
            _write(root / f"f{i}", "00009_lr", blob, sig, ".dat")
        section = resolve_data_section({"source": "folder", "path": str(root)}, registry)
        manifest = prepare(section, registry, root / "cache", workers=1)
        records, on_disk = open_cache(root / "cache")
        assert on_disk == manifest and verify_cache(root / "cache") == []
        assert manifest["source"] == "folder" and manifest["shape"] == [len(records), len(PP.leads), PP.n_samples]
        ids = set(records.record_ids.tolist())
        dropped = dict(map(tuple, manifest["dropped"]))
        assert "good/00009_lr" in ids and not ids & set(dropped)
        assert ids | set(dropped) == {"good/00009_lr"} | {f"f{i}/00009_lr" for i in range(len(fuzzed))}
        assert manifest["counts"]["listed"] == len(fuzzed) + 1 == len(ids) + len(dropped)
        for reason in dropped.values():
            check_reason(reason)
        text = _cli_info(root / "cache")  # exit code 0: checksums verified
        assert "mismatch" not in text
        if dropped:
            assert f"dropped {len(dropped)} records:" in text


def _snapshot(cache: Path):
    records, manifest = open_cache(cache)
    return records.record_ids.tolist(), np.array(records.signals), manifest["plan_hash"]


@seed(SEED)
@fuzz(40)
@given(data=st.data())
def test_reprepare_over_a_cache_never_loses_it(data, ptbxl_files, registry, tmp_path):
    hea, dat = ptbxl_files
    with scratch(tmp_path) as root, bounded(60):
        for i in range(3):
            _write(root / f"r{i}", "00009_lr", hea.encode(), dat, ".dat")
        out = root / "cache"
        section = resolve_data_section({"source": "folder", "path": str(root)}, registry)
        prepare(section, registry, out, workers=1)
        before = _snapshot(out)
        for i in range(3):  # damage some or all inputs, then prepare again into the same folder
            if data.draw(st.booleans(), label=f"damage r{i}"):
                blob = apply_header(data.draw(header_damage, label=f"header r{i}"), hea)
                sig = apply_signal(data.draw(signal_damage, label=f"signal r{i}"), dat)
                (root / f"r{i}" / "00009_lr.dat").unlink()
                _write(root / f"r{i}", "00009_lr", blob, sig, ".dat")
        options = data.draw(st.sampled_from([{}, {"sampling_rate": 100.0}, {"seconds": 5.0}]), label="options")
        force = data.draw(st.booleans(), label="force")
        section = resolve_data_section({"source": "folder", "path": str(root), **options}, registry)
        try:
            manifest = prepare(section, registry, out, workers=1, force=force)
        except (ConfigError, DataError) as exc:
            check_reason(str(exc))
            after = _snapshot(out)  # the finished cache is still there, unchanged
            assert after[0] == before[0] and after[2] == before[2]
            np.testing.assert_array_equal(after[1], before[1])
        else:
            records, on_disk = open_cache(out)
            assert on_disk["plan_hash"] == manifest["plan_hash"] and verify_cache(out) == []
            assert len(records) + len(on_disk["dropped"]) == 3
        _cli_info(out)


def test_interrupted_forced_reprepare_keeps_the_old_cache(ptbxl_files, tmp_path, monkeypatch):
    hea, dat = ptbxl_files
    root = tmp_path / "data"
    for i in range(4):
        _write(root / f"r{i}", "00009_lr", hea.encode(), dat, ".dat")
    out = tmp_path / "cache"
    src = FolderSource(path=str(root))
    prepare_cache(src, "folder", {"path": str(root)}, PP, out, workers=1, shard_size=1)
    before = _snapshot(out)

    def interrupt(done, total):
        if done >= 2:
            raise KeyboardInterrupt

    other = Preprocessing(sampling_rate=100.0)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(src, "folder", {"path": str(root)}, other, out, workers=1, shard_size=1,
                      force=True, progress=interrupt)
    after = _snapshot(out)  # interrupted while processing records: the old cache still reads
    assert after[0] == before[0] and after[2] == before[2]
    np.testing.assert_array_equal(after[1], before[1])

    def write_then_interrupt(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    original = cache_mod._write_signals
    monkeypatch.setattr(cache_mod, "_write_signals", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):  # interrupted after writing the new signals
        prepare_cache(src, "folder", {"path": str(root)}, other, out, workers=1, shard_size=1, force=True)
    monkeypatch.undo()
    after = _snapshot(out)
    assert after[0] == before[0] and after[2] == before[2] and verify_cache(out) == []
    np.testing.assert_array_equal(after[1], before[1])
    manifest = prepare_cache(src, "folder", {"path": str(root)}, other, out, workers=1, shard_size=1, force=True)
    assert manifest["shape"] == [4, 8, 1000] and read_manifest(out)["plan_hash"] == manifest["plan_hash"]
    assert not (out / ".work").exists() and verify_cache(out) == []
    # all inputs now unreadable: a forced re-prepare fails and the finished cache stays
    for i in range(4):
        (root / f"r{i}" / "00009_lr.dat").write_bytes(b"")
    with pytest.raises(DataError, match="no usable record"):
        prepare_cache(src, "folder", {"path": str(root), "x": 1}, PP, out, workers=1, force=True)
    assert json.loads((out / "manifest.json").read_text())["plan_hash"] == manifest["plan_hash"]
    assert open_cache(out)[0].record_ids.tolist() == [f"r{i}/00009_lr" for i in range(4)]


# ----------------------------------------------------------------------------- a prepared cache's files

@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """A small prepared cache (12 synthetic records) and its records, read back intact."""
    from ssl4ecg.data.synthetic import SyntheticSource

    out = tmp_path_factory.mktemp("small_cache") / "cache"
    prepare_cache(SyntheticSource(n_records=12, sampling_rate=100.0, seconds=4.0, seed=1), "synthetic", {},
                  Preprocessing(sampling_rate=100.0, seconds=4.0), out, workers=1)
    return out, _records_of(open_cache(out)[0])


def _records_of(records) -> dict:
    return {"signals": np.array(records.signals), "record_ids": records.record_ids.tolist(),
            "patient_ids": records.patient_ids.tolist(), "splits": records.splits.tolist(),
            "labels": np.array(records.labels), "leads": records.leads, "rate": records.sampling_rate,
            "extra": {k: np.asarray(v).tolist() for k, v in records.extra.items()}}


@seed(SEED)
@fuzz(120)
@given(name=st.sampled_from(["signals.npy", "signals.npy", "labels.npy", "meta.npz", "manifest.json"]), ops=byte_ops)
def test_fuzzed_cache_files_open_identically_or_fail_clearly(name, ops, small_cache, tmp_path):
    """Flipped, inserted or deleted bytes and truncations of a cache file: the cache opens with
    exactly the same records, or :func:`open_cache` raises one DataError naming the file."""
    cache, expected = small_cache
    with scratch(tmp_path) as root, bounded():
        shutil.copytree(cache, root / "c")
        blob = (cache / name).read_bytes()
        (root / "c" / name).write_bytes(apply_bytes(ops, blob))
        try:
            records, _ = open_cache(root / "c")
        except DataError as exc:
            check_reason(str(exc))
            assert name in str(exc) and "again" in str(exc)
            return
        got = _records_of(records)
        for key in ("signals", "labels"):
            np.testing.assert_array_equal(got.pop(key), expected[key])
        assert got == {k: v for k, v in expected.items() if k not in ("signals", "labels")}
