"""Embedded synthetic 12-lead ECG source: labelled records with known ground truth, no download.

Every record is drawn from a small cardiac-dipole model (see ``docs/data/synthetic.md``):

* one beat is a 3-D heart vector ``d(t)`` made of smooth, compactly supported lobes (two atrial
  P lobes, up to eight depolarisation lobes forming the QRS, an injury-current ST lobe and an
  asymmetric T lobe), with per-record amplitudes, axes and durations;
* beats are placed on a sinus rhythm with respiratory and random RR variability;
* the vector is projected onto lead vectors of leads I, II and V1-V6; noise (baseline wander,
  powerline, muscle) is added in the electrode domain (RA, LA, LL, V1-V6 referenced to the
  Wilson terminal); III, aVR, aVL and aVF are then derived from I and II, so Einthoven's and
  Goldberger's relations hold exactly, noise included;
* labels follow the PTB-XL diagnostic superclasses (NORM, MI, STTC, CD, HYP) and change the
  model's parameters the way the diseases change a real ECG (pathological Q waves and ST
  elevation in a territory, ST depression / T inversion, bundle-branch blocks, high voltage).

``extra`` carries the true heart rate, QRS, PR and QT durations of the drawn signal.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from scipy import fft as sfft

from ssl4ecg.data.records import RecordSet
from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import STANDARD_LEADS, DataSource

#: Diagnostic superclasses, in label-column order.
CLASS_NAMES: tuple[str, ...] = ("NORM", "MI", "STTC", "CD", "HYP")
#: Share of records whose first (primary) label is each class.
PRIMARY_SHARES: tuple[float, ...] = (0.40, 0.16, 0.16, 0.16, 0.12)
#: Relative chance of each second abnormal class given the first (rows/columns MI, STTC, CD, HYP).
_PAIR_WEIGHTS = np.array([
    [0.0, 0.40, 0.35, 0.25],
    [0.35, 0.0, 0.25, 0.40],
    [0.35, 0.30, 0.0, 0.35],
    [0.25, 0.50, 0.25, 0.0],
])

# Lobe slots of the beat model. Slots 2..9 are depolarisation (QRS) lobes.
P_RA, P_LA, SEPT, APEX, MAIN, MAIN_B, TERM, RBBB, RVH, QWAVE, TWAVE = range(11)
_N_SLOTS = 11
_QRS = slice(SEPT, QWAVE + 1)

# Electrodes RA, LA, LL, V1..V6 -> leads I, II, V1..V6 (precordials against the Wilson terminal).
_ELECTRODE_TO_LEAD = np.block([
    [np.array([[-1.0, 1.0, 0.0], [-1.0, 0.0, 1.0]]), np.zeros((2, 6))],  # I = LA - RA, II = LL - RA
    [np.full((6, 3), -1.0 / 3.0), np.eye(6)],  # Vk = Vk - (RA + LA + LL) / 3
])

# Mean precordial lead vectors: horizontal angle (deg, from the left towards anterior),
# inferior component and gain (precordial electrodes sit closer to the heart).
_PRECORDIAL_ANGLE = np.array([118.0, 95.0, 75.0, 55.0, 32.0, 8.0])
_PRECORDIAL_Y = np.array([-0.05, -0.02, 0.05, 0.15, 0.20, 0.25])
_PRECORDIAL_GAIN = np.array([1.1, 1.9, 2.0, 1.9, 1.6, 1.05])

# Infarct territories: the outward direction of the wall (x left, y inferior, z anterior).
_TERRITORIES = np.array([
    [0.0, 1.0, 0.1],    # inferior: II, III, aVF
    [0.15, 0.1, 1.0],   # anterior: V1-V4
    [1.0, -0.35, 0.15],  # lateral: I, aVL, V5, V6
])
_CHUNK = 64  # records synthesised at a time (bounds memory; fixed so results never depend on it)


def _unit(v: np.ndarray) -> np.ndarray:
    """``v`` scaled to unit length along the last axis."""
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _axis(alpha_deg: np.ndarray, beta_deg: np.ndarray) -> np.ndarray:
    """Unit vectors at frontal angle ``alpha`` (0 = left, 90 = inferior), elevation ``beta`` (+ = anterior)."""
    a, b = np.radians(alpha_deg), np.radians(beta_deg)
    return np.stack([np.cos(b) * np.cos(a), np.cos(b) * np.sin(a), np.sin(b)], axis=-1)


def _project_out(v: np.ndarray, direction: np.ndarray, k: np.ndarray | float) -> np.ndarray:
    """``v`` minus ``k`` times its positive component along unit ``direction`` (rows)."""
    along = np.maximum(np.sum(v * direction, axis=-1, keepdims=True), 0.0)
    return v - np.asarray(k).reshape(-1, 1) * along * direction


def _check_options(n_records, sampling_rate, seconds, seed, val_fraction, test_fraction, noise,
                   multi_label_fraction) -> None:
    """Raise one ConfigError naming the first bad option."""
    def real(x) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))

    def fail(key, value, need):
        raise ConfigError(f"synthetic source: '{key}' {need}, got {value!r}.")

    if not isinstance(n_records, numbers.Integral) or isinstance(n_records, bool) or n_records < 1:
        fail("n_records", n_records, "must be an integer >= 1")
    if not real(sampling_rate) or sampling_rate < 50:
        fail("sampling_rate", sampling_rate, "must be a number >= 50 (Hz); narrow QRS lobes need it")
    if not real(seconds) or seconds < 1:
        fail("seconds", seconds, "must be a number >= 1 (a record should hold about one beat)")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        fail("seed", seed, "must be an integer >= 0")
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not real(value) or not 0.0 <= value < 1.0:
            fail(key, value, "must be a number in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        fail("val_fraction", val_fraction,
             f"plus 'test_fraction' ({test_fraction!r}) must be < 1 to leave records for training")
    if not real(noise) or noise < 0:
        fail("noise", noise, "must be a number >= 0 (0 = clean signals, 1 = default noise)")
    if not real(multi_label_fraction) or not 0.0 <= multi_label_fraction <= 1.0:
        fail("multi_label_fraction", multi_label_fraction, "must be a number in [0, 1]")


class SyntheticSource(DataSource):
    """Synthetic 12-lead ECGs from a cardiac-dipole model, labelled like PTB-XL superclasses.

    Options: ``n_records`` records of ``seconds`` s at ``sampling_rate`` Hz, drawn from
    ``seed``; ``val_fraction`` / ``test_fraction`` of them go to the val/test splits
    (stratified by label combination); ``noise`` scales all noise (0 = clean);
    ``multi_label_fraction`` of the abnormal records carry a second abnormal class.
    """

    def __init__(
        self,
        n_records: int = 1200,
        sampling_rate: float = 500.0,
        seconds: float = 10.0,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        noise: float = 1.0,
        multi_label_fraction: float = 0.1,
    ) -> None:
        _check_options(n_records, sampling_rate, seconds, seed, val_fraction, test_fraction, noise,
                       multi_label_fraction)
        self.n_records = int(n_records)
        self.sampling_rate = float(sampling_rate)
        self.seconds = float(seconds)
        self.seed = int(seed)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.noise = float(noise)
        self.multi_label_fraction = float(multi_label_fraction)

    @property
    def n_samples(self) -> int:
        """Samples per record: ``round(seconds * sampling_rate)``."""
        return int(round(self.seconds * self.sampling_rate))

    def load(self) -> RecordSet:
        """Generate every record (deterministic in the options) as a RecordSet."""
        label_seq, param_seq, split_seq, noise_seq = np.random.SeedSequence(self.seed).spawn(4)
        n, fs, n_samples = self.n_records, self.sampling_rate, self.n_samples
        labels = _assign_labels(np.random.default_rng(label_seq), n, self.multi_label_fraction)
        p = _draw_parameters(np.random.default_rng(param_seq), labels, self.seconds)

        signals = np.empty((n, 12, n_samples), dtype=np.float32)
        heart_rate = np.empty(n, dtype=np.float64)
        n_chunks = (n + _CHUNK - 1) // _CHUNK
        for c, chunk_seq in enumerate(noise_seq.spawn(n_chunks)):
            rows = slice(c * _CHUNK, min(n, (c + 1) * _CHUNK))
            rng = np.random.default_rng(chunk_seq)
            cardiac, heart_rate[rows] = _cardiac(p, rows, fs, n_samples)
            leads8 = cardiac.astype(np.float32)
            if self.noise > 0:
                leads8 += _noise(p, rows, fs, n_samples, rng, self.noise)
            _write_12_leads(signals[rows], leads8)

        splits = _assign_splits(np.random.default_rng(split_seq), labels, self.val_fraction,
                                self.test_fraction)
        ids = np.array([f"syn{i:05d}" for i in range(n)])
        extra = {
            "heart_rate": heart_rate.astype(np.float32),
            "qrs_ms": (1000.0 * p["qrs"]).astype(np.float32),
            "pr_ms": (1000.0 * p["pr"]).astype(np.float32),
            "qt_ms": (1000.0 * p["qt"]).astype(np.float32),
        }
        return RecordSet(signals=signals, leads=STANDARD_LEADS, sampling_rate=fs, record_ids=ids,
                         patient_ids=ids.copy(), splits=splits, labels=labels,
                         class_names=CLASS_NAMES, extra=extra)


# --------------------------------------------------------------------------- labels and splits

def _largest_remainder(total: int, shares: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``shares``."""
    raw = total * shares / shares.sum()
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def _assign_labels(rng: np.random.Generator, n: int, multi_label_fraction: float) -> np.ndarray:
    """Multi-hot labels ``[n, 5]``: exact primary-class counts, then second abnormal classes."""
    counts = _largest_remainder(n, np.asarray(PRIMARY_SHARES))
    primary = rng.permutation(np.repeat(np.arange(len(CLASS_NAMES)), counts))
    labels = np.zeros((n, len(CLASS_NAMES)), dtype=np.float32)
    labels[np.arange(n), primary] = 1.0
    abnormal = np.flatnonzero(primary > 0)
    n_multi = int(round(multi_label_fraction * len(abnormal)))
    for i in rng.permutation(abnormal)[:n_multi]:
        weights = _PAIR_WEIGHTS[primary[i] - 1]
        labels[i, 1 + rng.choice(4, p=weights / weights.sum())] = 1.0
    return labels


def _assign_splits(rng: np.random.Generator, labels: np.ndarray, val_fraction: float,
                   test_fraction: float) -> np.ndarray:
    """train/val/test per record by systematic sampling over records sorted by label combination.

    Exactly ``round(n * test_fraction)`` records go to test and about ``n * val_fraction`` to
    val; every label combination is split in the same proportions (within one record).
    """
    n = len(labels)
    stratum = labels.astype(np.int64) @ (1 << np.arange(labels.shape[1]))
    order = np.lexsort((rng.random(n), stratum))
    splits = np.full(n, "train", dtype="<U5")

    def pick(count: int, fraction: float) -> np.ndarray:
        k = np.arange(count)
        return np.floor((k + 1) * fraction + 0.5) > np.floor(k * fraction + 0.5)

    is_test = pick(n, test_fraction)
    splits[order[is_test]] = "test"
    rest = order[~is_test]
    if len(rest):
        val_share = val_fraction / (1.0 - test_fraction)
        splits[rest[pick(len(rest), val_share)]] = "val"
    return splits


# --------------------------------------------------------------------------- per-record model

def _draw_parameters(rng: np.random.Generator, labels: np.ndarray, seconds: float) -> dict:
    """Every per-record parameter of the beat model, the rhythm and the noise (all records at once)."""
    n = len(labels)
    u = lambda lo, hi: rng.uniform(lo, hi, n)  # noqa: E731
    chance = lambda p: rng.random(n) < p  # noqa: E731
    jitter = lambda base, sd: _unit(np.asarray(base, float) + sd * rng.standard_normal((n, 3)))  # noqa: E731
    col = lambda v: np.asarray(v).reshape(-1, 1)  # noqa: E731
    _, mi, sttc, cd, hyp = (labels[:, k] > 0 for k in range(5))

    # ---- rhythm
    hr = np.where(chance(0.8), rng.normal(68.0, 11.0, n), u(85.0, 128.0)).clip(45.0, 130.0)
    rr = 60.0 / hr

    # ---- QRS duration and conduction disease
    qrs_d = rng.normal(0.092, 0.008, n).clip(0.076, 0.108)
    cd_kind = rng.choice(3, size=n, p=[0.35, 0.40, 0.25])  # 0 LBBB, 1 RBBB, 2 IVCD
    lbbb, rbbb, ivcd = cd & (cd_kind == 0), cd & (cd_kind == 1), cd & (cd_kind == 2)
    hyp_kind_rvh = chance(0.12)
    lvh, rvh = hyp & ~hyp_kind_rvh, hyp & hyp_kind_rvh
    qrs_d = np.where(hyp, np.minimum(qrs_d + u(0.006, 0.018), 0.118), qrs_d)
    qrs_cd = np.select([cd_kind == 0, cd_kind == 1], [u(0.13, 0.17), u(0.12, 0.16)], u(0.12, 0.145))
    qrs_total = np.where(cd, qrs_cd, qrs_d)  # onset-to-offset span actually drawn (checked below)
    early = np.where(rbbb, qrs_d, qrs_total)  # the part laid out like a normal QRS

    # ---- timing of the lobes (relative to QRS onset, seconds)
    center = np.zeros((n, _N_SLOTS))
    half_l = np.full((n, _N_SLOTS), 0.01)
    half_r = np.full((n, _N_SLOTS), 0.01)

    def put(slot, c, wl, wr=None):
        center[:, slot], half_l[:, slot] = c, wl
        half_r[:, slot] = wl if wr is None else wr

    put(SEPT, np.where(lbbb, 0.10, 0.12) * early, np.where(lbbb, 0.10, 0.12) * early)
    put(APEX, 0.32 * early, 0.17 * early)
    put(MAIN, np.where(lbbb, 0.38, 0.50) * early, np.where(ivcd, 0.34, 0.28) * early)
    put(MAIN_B, 0.70 * early, 0.30 * early)
    put(TERM, 0.83 * early, 0.17 * early)
    rbbb_start = 0.6 * qrs_d
    put(RBBB, 0.5 * (rbbb_start + qrs_total), 0.5 * (qrs_total - rbbb_start))
    put(RVH, 0.45 * early, 0.22 * early)
    q_half = u(0.018, 0.028)  # pathological Q: 36-56 ms
    put(QWAVE, q_half, q_half)

    # P wave and PR interval
    pr = (u(0.125, 0.19) - 0.0006 * (hr - 70.0)).clip(0.11, 0.20)
    pr = np.where(cd & chance(0.25), u(0.21, 0.30), pr)  # first-degree AV block
    lae = hyp & chance(0.35)
    p_dur = np.minimum(u(0.08, 0.11) + np.where(lae, u(0.01, 0.025), 0.0), pr - 0.03)
    put(P_RA, -pr + 0.30 * p_dur, 0.30 * p_dur)
    put(P_LA, -pr + 0.62 * p_dur, 0.38 * p_dur)

    # QT (Fridericia), T wave
    qtc = rng.normal(0.405, 0.018, n).clip(0.36, 0.445)
    qtc = np.where(sttc & chance(0.25), qtc + u(0.035, 0.08), qtc)  # long QT
    qt = qtc * np.cbrt(rr) + 0.8 * np.maximum(qrs_total - 0.095, 0.0)
    qt = np.minimum(np.maximum(qt, qrs_total + 0.13), 0.88 * 0.9 * rr)
    t_width = u(0.55, 0.70) * (qt - qrs_total)
    put(TWAVE, qt - 0.42 * t_width, 0.58 * t_width, 0.42 * t_width)

    # ---- vectors (mV); h scales the whole heart (body habitus), overlapping classes in voltage
    h = col(np.exp(rng.normal(0.0, 0.17, n)))
    vec = np.zeros((n, _N_SLOTS, 3))
    alpha = rng.normal(48.0, 22.0, n).clip(-30.0, 100.0)
    beta = u(-28.0, -10.0)
    alpha = np.where(lbbb, u(-20.0, 60.0), alpha)
    beta = np.where(lbbb, u(-45.0, -25.0), beta)
    alpha = np.where(rvh, u(100.0, 150.0), alpha)
    beta = np.where(lvh, beta - u(4.0, 12.0), beta)
    main_dir = _axis(alpha, beta)
    main_amp = u(1.2, 1.9)
    main_amp = np.where(lvh, main_amp * u(1.6, 2.4), main_amp)
    main_amp = np.where(rvh, main_amp * u(0.5, 0.8), main_amp)
    main_amp = np.where(ivcd, main_amp * u(0.75, 1.0), main_amp)

    sept_dir = np.where(col(lbbb), jitter((0.7, 0.2, -0.4), 0.15), jitter((-0.55, 0.25, 0.8), 0.15))
    vec[:, SEPT] = h * col(u(0.12, 0.28)) * sept_dir
    vec[:, APEX] = h * col(np.where(lbbb, 0.0, u(0.25, 0.6))) * jitter((0.35, 0.55, 0.75), 0.15)
    vec[:, MAIN] = h * col(np.where(lbbb, main_amp * u(0.65, 0.9), main_amp)) * main_dir
    vec[:, MAIN_B] = h * col(np.where(lbbb, main_amp * u(0.6, 0.85), 0.0)) * main_dir
    term_amp = np.where(lbbb, 0.0, u(0.15, 0.4) * np.select([rbbb, ivcd], [0.4, 1.6], 1.0))
    vec[:, TERM] = h * col(term_amp) * jitter((-0.45, -0.55, -0.7), 0.15)
    vec[:, RBBB] = h * col(np.where(rbbb, u(0.5, 0.9), 0.0)) * jitter((-0.75, -0.1, 0.65), 0.12)
    vec[:, RVH] = h * col(np.where(rvh, u(0.7, 1.3), 0.0)) * jitter((-0.55, 0.3, 0.78), 0.12)

    p_amp = h * col(u(0.08, 0.18))
    vec[:, P_RA] = p_amp * jitter((0.15, 0.9, 0.45), 0.15)
    vec[:, P_LA] = p_amp * col(np.where(lae, 1.8, 1.0)) * jitter((0.85, 0.35, -0.45), 0.15)

    t_alpha = (0.6 * alpha.clip(-30, 90) + 20.0 + rng.normal(0.0, 10.0, n))
    t_vec = h * col(u(0.22, 0.45)) * _axis(t_alpha, u(5.0, 30.0))
    st_vec = h * col(u(0.0, 0.05)) * jitter((0.1, 0.25, 1.0), 0.1)  # benign anterior J elevation

    # conduction disease: secondary (discordant) ST-T changes
    discordant = -main_dir * col(u(0.3, 0.55))
    t_vec = np.where(col(lbbb), h * discordant, t_vec)
    st_vec = np.where(col(lbbb), -h * main_dir * col(u(0.06, 0.18)), st_vec)
    t_vec = t_vec + col(rbbb) * h * col(u(0.1, 0.25)) * _unit(np.array([0.6, 0.1, -0.8]))
    st_vec = st_vec + col(rbbb) * h * 0.04 * _unit(np.array([0.5, 0.0, -0.85]))

    # hypertrophy: LV strain, RV strain
    strain = lvh & chance(0.45)
    st_vec = st_vec - col(strain) * h * col(u(0.05, 0.15)) * main_dir
    t_vec = np.where(col(strain), _project_out(t_vec, main_dir, 1.0 + u(0.4, 0.9)), t_vec)
    rv_dir = _unit(np.array([-0.4, 0.0, 0.9]))
    t_vec = t_vec - col(rvh) * h * col(u(0.1, 0.25)) * rv_dir
    st_vec = st_vec - col(rvh) * h * 0.04 * rv_dir

    # myocardial infarction in a territory
    territory = _unit(_TERRITORIES[rng.choice(3, size=n, p=[0.4, 0.4, 0.2])]
                      + 0.15 * rng.standard_normal((n, 3)))
    severity = u(0.35, 1.0)
    has_q = mi & chance(0.7)
    has_ste = mi & (~has_q | chance(0.3))
    has_tinv = has_q & ~has_ste & chance(0.6)
    loss = np.where(has_q, 0.5 + 0.4 * severity, 0.0)
    for slot in (SEPT, APEX, MAIN, MAIN_B):
        vec[:, slot] = _project_out(vec[:, slot], territory, loss)
    vec[:, QWAVE] = -h * col(np.where(has_q, severity * u(0.3, 0.7), 0.0)) * territory
    st_vec = st_vec + h * col(np.where(has_ste, severity * u(0.12, 0.3), 0.0)) * territory
    t_vec = t_vec + h * col(np.where(has_ste, u(0.05, 0.25), 0.0)) * territory
    t_vec = np.where(col(has_tinv), _project_out(t_vec, territory, 1.0 + u(0.2, 0.6))
                     - h * col(u(0.0, 0.1)) * territory, t_vec)

    # ST depression / T-wave changes
    s2 = u(0.4, 1.0)
    kind = rng.random(n)
    has_std = sttc & ((kind < 0.35) | (kind >= 0.75))
    has_t = sttc & (kind >= 0.35)
    st_vec = st_vec - h * col(np.where(has_std, s2 * u(0.08, 0.22), 0.0)) * jitter((0.45, 0.75, 0.4), 0.15)
    t_vec = np.where(col(has_std & ~has_t), t_vec * col(u(0.5, 0.9)), t_vec)
    region = np.concatenate([_unit(np.array([[1.0, -0.2, 0.3], [0.0, 1.0, 0.15], [0.2, 0.1, 1.0]])),
                             np.zeros((1, 3))])[rng.choice(4, size=n)]
    is_global = ~region.any(axis=1)
    region = np.where(col(is_global), _unit(t_vec + 1e-12), region)
    flat = chance(0.3)
    inverted = _project_out(t_vec, region, 1.0 + s2 * u(0.4, 1.0))
    t_vec = np.where(col(has_t & flat), t_vec * col(u(0.1, 0.35)), t_vec)
    t_vec = np.where(col(has_t & ~flat), inverted, t_vec)
    vec[:, TWAVE] = t_vec

    # ---- lead vectors: I, II exact; precordials jittered (electrode placement, chest wall)
    lead_vec = np.zeros((n, 8, 3))
    lead_vec[:, 0] = (1.0, 0.0, 0.0)
    lead_vec[:, 1] = (0.5, math.sqrt(3.0) / 2.0, 0.0)
    angle = np.radians(_PRECORDIAL_ANGLE + rng.normal(0.0, 6.0, (n, 6)))
    gain = _PRECORDIAL_GAIN * np.exp(rng.normal(0.0, 0.08, (n, 6))) * np.exp(rng.normal(0.0, 0.1, (n, 1)))
    lead_vec[:, 2:] = gain[..., None] * np.stack(
        [np.cos(angle), _PRECORDIAL_Y + rng.normal(0.0, 0.05, (n, 6)), np.sin(angle)], axis=-1)

    # ---- ground truth from the lobes actually drawn
    active = np.linalg.norm(vec, axis=-1) > 0
    qrs_on = np.where(active[:, _QRS], (center - half_l)[:, _QRS], np.inf).min(axis=1)
    qrs_off = np.where(active[:, _QRS], (center + half_r)[:, _QRS], -np.inf).max(axis=1)
    if not (np.allclose(qrs_on, 0.0) and np.allclose(qrs_off - qrs_on, qrs_total)):  # pragma: no cover
        raise RuntimeError("synthetic: QRS lobes do not span the drawn QRS duration")

    return {
        "rr": rr, "center": center, "half_l": half_l, "half_r": half_r, "vec": vec,
        "st_vec": st_vec, "st_start": qrs_total, "st_peak": center[:, TWAVE], "st_end": qt,
        "lead_vec": lead_vec,
        "qrs": qrs_off - qrs_on, "pr": pr, "qt": qt,
        # rhythm variability
        "phase": rng.random(n), "rsa": u(0.0, 0.05) * np.minimum(rr, 1.2),
        "rr_jitter": u(0.003, 0.02), "resp_f": u(0.15, 0.4), "resp_phase": u(0.0, 2 * np.pi),
        "resp_amp": u(0.0, 0.08), "rr_noise": rng.standard_normal((n, int(seconds / 0.35) + 8)),
        # noise levels (mV at noise = 1)
        "wander": u(0.02, 0.15), "line_f": np.where(chance(0.5), 50.0, 60.0), "line": u(0.0, 0.05),
        "emg": np.exp(u(np.log(0.004), np.log(0.04))),
    }


# --------------------------------------------------------------------------- synthesis

def _lobes(tau: np.ndarray, center: np.ndarray, half_l: np.ndarray, half_r: np.ndarray) -> np.ndarray:
    """Raised-cosine pulses ``[n, K, L]`` with separate left/right half-widths, zero outside."""
    d = tau[None, None, :] - center[..., None]
    w = np.where(d < 0, half_l[..., None], half_r[..., None])
    x = d / w
    return np.where(np.abs(x) < 1.0, 0.5 + 0.5 * np.cos(np.pi * x), 0.0)


def _st_shape(tau: np.ndarray, start: np.ndarray, peak: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Injury-current plateau ``[n, L]``: 20 ms rise from the J point, flat to the T peak, falls to T end."""
    rise = 0.02
    t = tau[None, :]
    s, p, e = start[:, None], peak[:, None], end[:, None]
    up = 0.5 - 0.5 * np.cos(np.pi * np.clip((t - s) / rise, 0.0, 1.0))
    down = 0.5 + 0.5 * np.cos(np.pi * np.clip((t - p) / (e - p), 0.0, 1.0))
    return np.where(t < p, up, down) * (t >= s) * (t < e)


def _cardiac(p: dict, rows: slice, fs: float, n_samples: int):
    """Noise-free leads I, II, V1-V6 ``[n, 8, T]`` of ``rows`` and their true mean heart rate."""
    sel = lambda key: p[key][rows]  # noqa: E731
    rr, n = sel("rr"), len(sel("rr"))
    center, half_l, half_r = sel("center"), sel("half_l"), sel("half_r")
    pre = int(math.ceil((-(center - half_l).min() + 0.01) * fs))
    post = int(math.ceil(((center + half_r).max() + 0.01) * fs))
    tau = (np.arange(pre + post + 1) - pre) / fs

    # beat template in dipole space [n, 3, L]
    template = np.matmul(sel("vec").transpose(0, 2, 1), _lobes(tau, center, half_l, half_r))
    template += _st_shape(tau, sel("st_start"), sel("st_peak"), sel("st_end"))[:, None, :] \
        * sel("st_vec")[:, :, None]

    # beat onsets: a sinus rhythm with respiratory sinus arrhythmia and random RR jitter
    noise = sel("rr_noise")
    n_beats = noise.shape[1]
    first = -post / fs - sel("phase") * rr
    nominal = first[:, None] + np.arange(n_beats)[None, :] * rr[:, None]
    resp = 2 * np.pi * sel("resp_f")[:, None] * nominal + sel("resp_phase")[:, None]
    factor = 1.0 + sel("rsa")[:, None] * np.sin(resp) + sel("rr_jitter")[:, None] * noise
    intervals = rr[:, None] * factor.clip(0.9, 1.1)
    onset_t = first[:, None] + np.concatenate([np.zeros((n, 1)), np.cumsum(intervals, axis=1)[:, :-1]], 1)
    onset = np.rint(onset_t * fs).astype(np.int64)
    weight = 1.0 + sel("resp_amp")[:, None] * np.sin(2 * np.pi * sel("resp_f")[:, None] * onset_t)
    if (onset[:, -1] < n_samples + pre).any():  # pragma: no cover - guarded by the beat budget
        raise RuntimeError("synthetic: beat budget too small for the record length")

    # true mean heart rate: consecutive QRS onsets inside the record; a record too short to
    # hold two onsets takes the RR intervals that overlap it instead
    inside = (onset >= 0) & (onset < n_samples)
    first_in = np.where(inside, onset, np.iinfo(np.int64).max).min(axis=1)
    last_in = np.where(inside, onset, -1).max(axis=1)
    count = inside.sum(axis=1)
    overlap = (onset[:, 1:] >= 0) & (onset[:, :-1] < n_samples)
    rr_overlap = (np.diff(onset, axis=1) * overlap).sum(axis=1) / overlap.sum(axis=1)
    span = np.where(count >= 2, (last_in - first_in) / np.maximum(count - 1, 1), rr_overlap)
    heart_rate = 60.0 * fs / span

    # place the template at every onset: impulse train (extended by pre/post) convolved with it
    ext = n_samples + pre + post
    idx = onset + post
    keep = (idx >= 0) & (idx < ext)
    train = np.zeros((n, ext))
    r, b = np.nonzero(keep)
    train[r, idx[r, b]] = weight[r, b]
    size = sfft.next_fast_len(ext + template.shape[-1] - 1, real=True)
    dipole = sfft.irfft(sfft.rfft(train, size)[:, None, :] * sfft.rfft(template, size), size)
    dipole = dipole[..., pre + post: pre + post + n_samples]
    return np.matmul(sel("lead_vec"), dipole), heart_rate


def _sin_cos(freq: np.ndarray, fs: float, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``sin`` and ``cos`` of ``2 pi freq t`` on the sample grid, ``[..., K, T]`` float32 each.

    Uses ``exp(i w k) = exp(i w B k1) * exp(i w k0)`` with ``k = B k1 + k0``: two short tables
    and one complex product per sample instead of a sine and a cosine per sample.
    """
    block = max(1, int(math.isqrt(n_samples)))
    n_blocks = -(-n_samples // block)
    w = (2 * np.pi * np.asarray(freq, dtype=np.float64) / fs)[..., None]
    coarse = np.exp(1j * w * (block * np.arange(n_blocks))).astype(np.complex64)
    fine = np.exp(1j * w * np.arange(block)).astype(np.complex64)
    z = (coarse[..., :, None] * fine[..., None, :]).reshape(*coarse.shape[:-1], -1)[..., :n_samples]
    return np.ascontiguousarray(z.imag), np.ascontiguousarray(z.real)


def _noise(p: dict, rows: slice, fs: float, n_samples: int, rng: np.random.Generator,
           scale: float) -> np.ndarray:
    """Electrode-domain noise mapped to leads I, II, V1-V6: ``[n, 8, T]`` float32 (mV).

    Baseline wander (three sinusoids of 0.05-0.45 Hz per record with per-electrode amplitude
    and phase) and powerline interference (50 or 60 Hz, nearly common-mode, so only electrode
    differences reach the leads; omitted at or above the Nyquist frequency) are written as
    sin/cos basis signals times per-electrode coefficients; muscle noise is white Gaussian per
    electrode (limb electrodes noisier) under a slowly varying, bursty envelope.
    """
    n = len(p["rr"][rows])
    to_lead = _ELECTRODE_TO_LEAD

    # periodic components: basis [n, 8, T] = sin and cos of 3 wander + 1 line frequency
    line_f = p["line_f"][rows]
    freq = np.concatenate([rng.uniform(0.05, 0.45, (n, 3)), line_f[:, None]], axis=1)
    basis = np.concatenate(_sin_cos(freq, fs, n_samples), axis=1)
    amp = np.empty((n, 9, 4))
    amp[..., :3] = rng.uniform(0.0, 1.0, (n, 9, 3)) * p["wander"][rows, None, None]
    amp[..., 3] = (p["line"][rows] * (line_f < fs / 2))[:, None] * rng.uniform(0.3, 1.0, (n, 9))
    phase = np.empty((n, 9, 4))
    phase[..., :3] = rng.uniform(0.0, 2 * np.pi, (n, 9, 3))
    phase[..., 3] = rng.uniform(0.0, 2 * np.pi, (n, 1)) + rng.normal(0.0, 0.5, (n, 9))
    coef = np.concatenate([amp * np.cos(phase), amp * np.sin(phase)], axis=2)  # [n, 9, 8]
    leads = np.matmul((to_lead @ coef).astype(np.float32), basis)

    # muscle noise, mixed straight into the leads, then shaped by the burst envelope
    electrode_gain = np.r_[np.ones(3), np.full(6, 0.6)] * rng.uniform(0.5, 1.0, (n, 9))
    mix = (to_lead[None] * (p["emg"][rows, None] * electrode_gain)[:, None, :]).astype(np.float32)
    emg = np.matmul(mix, rng.standard_normal((n, 9, n_samples), dtype=np.float32))
    env_sin, env_cos = _sin_cos(rng.uniform(0.1, 1.5, (n, 3)), fs, n_samples)
    env_phase = rng.uniform(0.0, 2 * np.pi, (n, 1, 3)).astype(np.float32)
    env = np.matmul(np.cos(env_phase), env_sin) + np.matmul(np.sin(env_phase), env_cos)
    emg *= np.exp(np.float32(0.5) * env)
    leads += emg
    leads *= np.float32(scale)
    return leads


def _write_12_leads(out: np.ndarray, leads8: np.ndarray) -> None:
    """Fill ``out [n, 12, T]`` from I, II, V1-V6, deriving III, aVR, aVL, aVF from I and II."""
    lead_i, lead_ii = leads8[:, 0], leads8[:, 1]
    half = np.float32(0.5)
    out[:, 0] = lead_i
    out[:, 1] = lead_ii
    out[:, 2] = lead_ii - lead_i
    out[:, 3] = -(lead_i + lead_ii) * half
    out[:, 4] = lead_i - lead_ii * half
    out[:, 5] = lead_ii - lead_i * half
    out[:, 6:] = leads8[:, 2:]
