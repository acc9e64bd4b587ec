"""Signal preprocessing: resampling, lead selection, band-pass, normalisation, cropping.

Every record goes through :func:`process_record` in this order:

1. select the requested leads by name (aliases such as ``DI``/``AVR`` are understood),
   deriving III, aVR, aVL, aVF (and I or II) from the limb leads when asked;
2. reject a record whose selected leads hold NaN or infinite samples (it is dropped with
   the reason: a gap in an ECG cannot be filled without inventing signal, and the
   datasets we target have very few such records);
3. polyphase resampling to the target rate (:func:`scipy.signal.resample_poly`);
4. zero-phase Butterworth band-pass (order 4, :func:`scipy.signal.sosfiltfilt`);
5. cut a longer record to the target length (window at the start, centre, or a random
   position drawn from the record id for training splits);
6. per-record normalisation (``record``: one mean/std for the whole record, ``lead``: one
   per lead); ``dataset`` normalisation uses train-split statistics and is applied to the
   assembled set (:func:`dataset_stats`, :func:`apply_dataset_norm`);
7. zero-pad a record that is shorter than asked by at most 1 % of the length (rounding of
   odd record lengths); longer shortfalls drop the record unless ``pad_short`` is set.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np

from ssl4ecg.errors import ConfigError, DataError, did_you_mean
from ssl4ecg.interfaces import JEPA_LEADS, STANDARD_LEADS

NORMALIZE = ("none", "record", "lead", "dataset")
CROPS = ("start", "center", "random")
#: shortfall (fraction of the asked length) that is always padded instead of dropping
SHORT_TOLERANCE = 0.01
#: a lead whose standard deviation is below this is flat: normalising leaves it at zero
FLAT_STD = 1e-6
BANDPASS_ORDER = 4
#: upsampling factor above which a rate is taken for a corrupt header (memory grows with it)
MAX_RESAMPLE_FACTOR = 100
#: largest up/down term of a polyphase ratio (the filter has 20 taps per unit)
MAX_RESAMPLE_TERMS = 10_000

_ALIASES = {
    "i": "I", "ii": "II", "iii": "III", "avr": "aVR", "avl": "aVL", "avf": "aVF",
    "di": "I", "dii": "II", "diii": "III", "d1": "I", "d2": "II", "d3": "III",
    "lead i": "I", "lead ii": "II", "lead iii": "III",
    **{f"v{i}": f"V{i}" for i in range(1, 7)},
}

#: leads computed from others (Einthoven and Goldberger): name -> (needed leads, formula)
_DERIVED = {
    "III": (("I", "II"), lambda d: d["II"] - d["I"]),
    "aVR": (("I", "II"), lambda d: -(d["I"] + d["II"]) / 2),
    "aVL": (("I", "II"), lambda d: d["I"] - d["II"] / 2),
    "aVF": (("I", "II"), lambda d: d["II"] - d["I"] / 2),
    "I": (("II", "III"), lambda d: d["II"] - d["III"]),
    "II": (("I", "III"), lambda d: d["I"] + d["III"]),
}


def canonical_lead(name: str) -> str:
    """The standard spelling of a lead name (``'DI'`` -> ``'I'``, ``'AVR'`` -> ``'aVR'``).

    Names that are not one of the 12 standard leads are returned unchanged.
    """
    key = str(name).strip().lower()
    mapped = _ALIASES.get(key)
    return mapped if mapped else str(name).strip()


def check_lead_names(leads: Sequence[str], key: str = "leads") -> tuple[str, ...]:
    """Canonical names of requested leads; unknown or repeated names raise :class:`ConfigError`."""
    out = []
    for lead in leads:
        name = canonical_lead(lead)
        if name not in STANDARD_LEADS:
            raise ConfigError(
                f"[data] {key}: '{lead}' is not one of the 12 standard leads."
                f"{did_you_mean(str(lead), STANDARD_LEADS)}")
        if name in out:
            raise ConfigError(f"[data] {key}: lead '{name}' is listed twice.")
        out.append(name)
    if not out:
        raise ConfigError(f"[data] {key} is empty: name at least one lead.")
    return tuple(out)


def select_leads(
    signal: np.ndarray, have: Sequence[str], want: Sequence[str], *, derive: bool = True
) -> np.ndarray:
    """Rows of ``signal`` (axis -2 is the lead axis) for the leads ``want``, in that order.

    ``have`` names the rows (any spelling :func:`canonical_lead` understands). Missing limb
    leads are derived from two others when ``derive`` is true; a lead that is missing and
    cannot be derived raises :class:`DataError` naming what the record has.
    """
    names = [canonical_lead(n) for n in have]
    index = {}
    for i, n in enumerate(names):
        index.setdefault(n, i)
    if list(want) == names:
        return signal
    if all(lead in index for lead in want):
        return signal[..., [index[lead] for lead in want], :]
    rows = {}
    missing = []
    for lead in want:
        if lead in index:
            rows[lead] = signal[..., index[lead], :]
            continue
        recipe = _DERIVED.get(lead) if derive else None
        if recipe is not None and all(r in index for r in recipe[0]):
            rows[lead] = recipe[1]({r: signal[..., index[r], :] for r in recipe[0]})
        else:
            missing.append(lead)
    if missing:
        hint = "" if derive else " (derive_leads is off)"
        raise DataError(
            f"lead(s) {', '.join(missing)} missing and not derivable{hint}; the record has "
            f"{', '.join(map(str, have)) or 'no leads'}")
    return np.stack([rows[lead] for lead in want], axis=-2)


@lru_cache(maxsize=64)
def _polyphase_filter(up: int, down: int) -> tuple[np.ndarray, int, int]:
    """Anti-aliasing FIR for ``up/down`` resampling, padded for alignment (cached per ratio).

    The same design as :func:`scipy.signal.resample_poly` with its defaults: a Kaiser
    (beta 5) windowed sinc of ``20 * max(up, down) + 1`` taps at cutoff ``1/max(up, down)``,
    scaled by ``up``, zero-padded so that output sample 0 lines up with input sample 0.
    Returns (filter, leading padding, samples to drop at the start of the output).
    """
    from scipy.signal import firwin

    max_rate = max(up, down)
    half_len = 10 * max_rate
    h = firwin(2 * half_len + 1, 1.0 / max_rate, window=("kaiser", 5.0)) * up
    pre_pad = down - half_len % down
    return h, pre_pad, (half_len + pre_pad) // down


def _upfirdn_length(n_taps: int, n_in: int, up: int, down: int) -> int:
    return ((n_in - 1) * up + n_taps - 1) // down + 1


def resample(signal: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    """Polyphase resampling along the last axis from ``fs_in`` to ``fs_out`` Hz (float32).

    Numerically :func:`scipy.signal.resample_poly` (default Kaiser window, zero padding at
    the edges), with the filter designed once per rate pair instead of once per record.
    """
    if fs_in <= 0 or fs_out <= 0:
        raise DataError(f"cannot resample from {fs_in} Hz to {fs_out} Hz")
    if abs(fs_in - fs_out) < 1e-9 * fs_out:
        return np.asarray(signal, dtype=np.float32)
    from scipy.signal import upfirdn

    if not math.isfinite(fs_out / fs_in) or fs_out / fs_in > MAX_RESAMPLE_FACTOR:
        raise DataError(f"cannot resample from {fs_in} Hz to {fs_out} Hz: the rates differ by more "
                        f"than {MAX_RESAMPLE_FACTOR} times (is the sampling rate in the header right?)")
    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    if ratio.numerator == 0 or abs(float(ratio) - fs_out / fs_in) > 1e-4 * fs_out / fs_in:
        raise DataError(f"no polyphase ratio close to {fs_in} Hz -> {fs_out} Hz")
    up, down = ratio.numerator, ratio.denominator
    if max(up, down) > MAX_RESAMPLE_TERMS:
        raise DataError(f"no polyphase ratio with small terms for {fs_in} Hz -> {fs_out} Hz "
                        f"({up}/{down}); is the sampling rate in the header right?")
    h, pre_pad, pre_remove = _polyphase_filter(up, down)
    n_in = signal.shape[-1]
    n_out = -(-n_in * up // down)
    post_pad = 0
    while _upfirdn_length(len(h) + pre_pad + post_pad, n_in, up, down) < n_out + pre_remove:
        post_pad += 1
    h = np.concatenate([np.zeros(pre_pad), h, np.zeros(post_pad)])
    y = upfirdn(h, np.asarray(signal, dtype=np.float64), up, down, axis=-1)
    return y[..., pre_remove:pre_remove + n_out].astype(np.float32)


@lru_cache(maxsize=32)
def _butter(low: float, high: float, fs: float, order: int):
    from scipy.signal import butter

    if low > 0 and high > 0:
        return butter(order, [low, high], btype="bandpass", fs=fs, output="sos")
    if high > 0:
        return butter(order, high, btype="lowpass", fs=fs, output="sos")
    return butter(order, low, btype="highpass", fs=fs, output="sos")


def check_bandpass(band: Sequence[float], sampling_rate: float) -> tuple[float, ...]:
    """``[]`` (off) or ``[low, high]`` in Hz with ``0 <= low < high < fs/2``; ``low = 0`` means low-pass."""
    band = tuple(float(x) for x in band)
    if not band:
        return ()
    nyquist = sampling_rate / 2
    if len(band) != 2 or not (0 <= band[0] < band[1] < nyquist):
        raise ConfigError(
            f"[data] bandpass must be [] (off) or [low, high] in Hz with 0 <= low < high < "
            f"{nyquist:g} (half the sampling rate), got {list(band)}.")
    return band


def bandpass(signal: np.ndarray, fs: float, low: float, high: float, order: int = BANDPASS_ORDER) -> np.ndarray:
    """Zero-phase Butterworth band-pass along the last axis (``low = 0``: low-pass only)."""
    from scipy.signal import sosfiltfilt

    sos = _butter(float(low), float(high), float(fs), int(order))
    pad = 3 * (2 * len(sos) + 1)
    if signal.shape[-1] <= pad:
        raise DataError(f"record of {signal.shape[-1]} samples is too short to band-pass filter")
    return sosfiltfilt(sos, signal, axis=-1).astype(np.float32)


def normalize_record(signal: np.ndarray, mode: str) -> np.ndarray:
    """Z-score one record (``[..., L, T]``): ``record`` over everything, ``lead`` per lead, ``none``."""
    if mode == "none":
        return signal
    x = np.asarray(signal, dtype=np.float64)
    axes = (-2, -1) if mode == "record" else (-1,)
    mean = x.mean(axis=axes, keepdims=True)
    std = x.std(axis=axes, keepdims=True)
    std = np.where(std > FLAT_STD, std, 1.0)
    return ((x - mean) / std).astype(np.float32)


def crop_offset(length: int, n: int, crop: str, record_id: str = "", split: str = "") -> int:
    """Start of the ``n``-sample window kept from a ``length``-sample record.

    ``random`` draws the offset from the record id (the same record always gets the same
    window) for training data; validation and test records take the centre window so that
    evaluation never depends on a random draw.
    """
    if length <= n or crop == "start":
        return 0
    if crop == "center" or split in ("val", "test"):
        return (length - n) // 2
    rng = np.random.default_rng(zlib.crc32(record_id.encode("utf-8")))
    return int(rng.integers(0, length - n + 1))


def fit_length(
    signal: np.ndarray, n: int, *, pad_short: bool = False, fs: float | None = None
) -> np.ndarray:
    """Pad a record shorter than ``n`` samples (the caller has already cut longer ones).

    A shortfall of at most :data:`SHORT_TOLERANCE` is always zero-padded; a longer one is
    padded only with ``pad_short``, otherwise :class:`DataError`.
    """
    t = signal.shape[-1]
    if t >= n:
        return signal[..., :n]
    if not pad_short and (n - t) > SHORT_TOLERANCE * n:
        if fs:
            raise DataError(
                f"record is {t / fs:.2f} s long, shorter than the {n / fs:.2f} s asked; lower "
                f"[data] seconds or set pad_short = true to zero-pad short records")
        raise DataError(f"record has {t} samples, fewer than the {n} asked")
    out = np.zeros(signal.shape[:-1] + (n,), dtype=np.float32)
    out[..., :t] = signal
    return out


def check_finite(signal: np.ndarray) -> None:
    """:class:`DataError` naming the count of NaN/inf samples, if any."""
    if not np.isfinite(signal).all():
        bad = int((~np.isfinite(signal)).sum())
        raise DataError(f"signal holds {bad} NaN or infinite samples (records with gaps are dropped)")


@dataclass(frozen=True)
class Preprocessing:
    """The per-record preprocessing a ``[data]`` section asks for (see the module docstring)."""

    sampling_rate: float = 250.0
    seconds: float = 10.0
    leads: tuple[str, ...] = JEPA_LEADS
    derive_leads: bool = True
    bandpass: tuple[float, ...] = ()
    normalize: str = "none"
    crop: str = "start"
    pad_short: bool = False

    FIELDS = ("sampling_rate", "seconds", "leads", "derive_leads", "bandpass", "normalize",
              "crop", "pad_short")

    def __post_init__(self) -> None:
        if not (isinstance(self.sampling_rate, (int, float)) and self.sampling_rate > 0):
            raise ConfigError(f"[data] sampling_rate must be a positive number of Hz, got {self.sampling_rate!r}.")
        if not (isinstance(self.seconds, (int, float)) and self.seconds > 0):
            raise ConfigError(f"[data] seconds must be positive, got {self.seconds!r}.")
        if self.normalize not in NORMALIZE:
            raise ConfigError(f"[data] normalize '{self.normalize}' is not valid.{did_you_mean(self.normalize, NORMALIZE)}")
        if self.crop not in CROPS:
            raise ConfigError(f"[data] crop '{self.crop}' is not valid.{did_you_mean(self.crop, CROPS)}")
        object.__setattr__(self, "sampling_rate", float(self.sampling_rate))
        object.__setattr__(self, "seconds", float(self.seconds))
        object.__setattr__(self, "leads", check_lead_names(self.leads))
        object.__setattr__(self, "bandpass", check_bandpass(self.bandpass, self.sampling_rate))
        if self.n_samples < 1:
            raise ConfigError(f"[data] seconds {self.seconds} at {self.sampling_rate} Hz gives no sample.")

    @property
    def n_samples(self) -> int:
        """Samples per record: ``round(seconds * sampling_rate)``."""
        return int(round(self.seconds * self.sampling_rate))

    @property
    def record_normalize(self) -> str:
        """The per-record part of ``normalize`` (``dataset`` is applied to the whole set later)."""
        return "none" if self.normalize == "dataset" else self.normalize

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> "Preprocessing":
        """The preprocessing of a (resolved) ``[data]`` section."""
        kwargs = {k: section[k] for k in cls.FIELDS if k in section}
        for key in ("leads", "bandpass"):
            if key in kwargs:
                if isinstance(kwargs[key], str) or not isinstance(kwargs[key], (list, tuple)):
                    raise ConfigError(f"[data] {key} must be a list, got {kwargs[key]!r}.")
                kwargs[key] = tuple(kwargs[key])
        for key in ("derive_leads", "pad_short"):
            if key in kwargs and not isinstance(kwargs[key], bool):
                raise ConfigError(f"[data] {key} must be true or false, got {kwargs[key]!r}.")
        return cls(**kwargs)

    def as_dict(self) -> dict[str, Any]:
        """JSON/TOML-friendly dict of the fields (tuples as lists)."""
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def process_record(
    signal: np.ndarray,
    leads: Sequence[str],
    fs: float,
    pp: Preprocessing,
    *,
    record_id: str = "",
    split: str = "",
) -> np.ndarray:
    """One raw record ``[leads, T]`` -> ``[len(pp.leads), pp.n_samples]`` float32 (see module doc).

    Raises :class:`DataError` with the reason when the record cannot be used.
    """
    signal = np.asarray(signal)
    if signal.ndim != 2 or signal.shape[0] != len(leads):
        raise DataError(f"signal has shape {signal.shape} for {len(leads)} lead names")
    if signal.shape[1] == 0:
        raise DataError("signal is empty")
    if not fs or not math.isfinite(fs) or fs <= 0:
        raise DataError(f"invalid sampling rate {fs!r}")
    x = select_leads(signal, leads, pp.leads, derive=pp.derive_leads)
    check_finite(x)
    x = resample(x, fs, pp.sampling_rate)
    if pp.bandpass:
        x = bandpass(x, pp.sampling_rate, *pp.bandpass)
    n = pp.n_samples
    if x.shape[-1] > n:
        start = crop_offset(x.shape[-1], n, pp.crop, record_id, split)
        x = x[:, start:start + n]
    x = normalize_record(x, pp.record_normalize)
    x = fit_length(x, n, pad_short=pp.pad_short, fs=pp.sampling_rate)
    out = np.ascontiguousarray(x, dtype=np.float32)
    check_finite(out)
    return out


def warm_up(pp: Preprocessing, rates: Sequence[float] = (100.0, 250.0, 360.0, 400.0, 500.0, 1000.0)) -> None:
    """Import scipy's signal tools and design the filters for common source rates now.

    Called before worker processes are forked so that they inherit the imports (several
    seconds on a busy machine) and the cached filter designs instead of redoing them.
    """
    import scipy.io  # noqa: F401 - imported for the children
    import scipy.signal  # noqa: F401

    for rate in rates:
        try:
            resample(np.zeros((1, 64), dtype=np.float32), rate, pp.sampling_rate)
        except DataError:
            pass
    if pp.bandpass:
        _butter(float(pp.bandpass[0]), float(pp.bandpass[1]), pp.sampling_rate, BANDPASS_ORDER)


def multi_crop(signals: np.ndarray, n: int, n_crops: int) -> np.ndarray:
    """``n_crops`` evenly spaced ``n``-sample windows: ``[..., L, T]`` -> ``[..., n_crops, L, n]``.

    The first window starts at 0 and the last ends at ``T`` (ST-MEM's test-time protocol:
    average the predictions over the crops).
    """
    t = signals.shape[-1]
    if n > t:
        raise ConfigError(f"crop of {n} samples is longer than the records ({t} samples).")
    if n_crops < 1:
        raise ConfigError(f"multi-crop needs at least one crop, got {n_crops}.")
    starts = np.linspace(0, t - n, n_crops).round().astype(int) if n_crops > 1 else [(t - n) // 2]
    return np.stack([signals[..., s:s + n] for s in starts], axis=-3)


def dataset_stats(
    signals: np.ndarray, index: np.ndarray | None = None, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Per-lead mean and standard deviation over the records at ``index`` (float64, chunked)."""
    rows = np.arange(len(signals)) if index is None else np.asarray(index)
    if len(rows) == 0:
        raise DataError("dataset normalisation needs training records, and the train split is empty")
    n_leads = signals.shape[1]
    total = np.zeros(n_leads)
    total_sq = np.zeros(n_leads)
    count = 0
    for start in range(0, len(rows), chunk):
        block = np.asarray(signals[np.sort(rows[start:start + chunk])], dtype=np.float64)
        total += block.sum(axis=(0, 2))
        total_sq += np.square(block).sum(axis=(0, 2))
        count += block.shape[0] * block.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean, np.where(std > FLAT_STD, std, 1.0)


def apply_dataset_norm(signals: np.ndarray, mean: Sequence[float], std: Sequence[float],
                       chunk: int = 512) -> np.ndarray:
    """``(signals - mean) / std`` per lead as a new float32 array (chunked for memory maps)."""
    mean = np.asarray(mean, dtype=np.float32)[None, :, None]
    std = np.asarray(std, dtype=np.float32)[None, :, None]
    out = np.empty(signals.shape, dtype=np.float32)
    for start in range(0, len(signals), chunk):
        out[start:start + chunk] = (np.asarray(signals[start:start + chunk], dtype=np.float32) - mean) / std
    return out
