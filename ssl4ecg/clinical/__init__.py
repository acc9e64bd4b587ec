"""Clinical ECG features: R peaks, wave delineation and the measurements cardiologists use.

Heart rate, RR variability (SDNN, RMSSD), PR, QRS, QT, QTc (Bazett, Fridericia), frontal QRS
axis, ST level at J+60 ms of every lead and the Sokolow-Lyon and Cornell voltages, measured on
multi-lead records with a multi-lead R-peak detector and a median-beat delineator. A feature
that cannot be measured is NaN, never 0. See ``docs/clinical_features.md``.

Main entry points::

    from ssl4ecg.clinical import extract_features, features_for, measure_record

    feats, names = extract_features(records, workers=2)   # [N, F] float32, NaN = missing
    feats, names = features_for(records)                   # the same, cached on disk
    measure_record(signal, leads, sampling_rate)           # {name: value} for one record
"""

from ssl4ecg.clinical.delineation import Delineation, delineate
from ssl4ecg.clinical.features import (
    EXTRA_PREFIX,
    FEATURE_NAMES,
    FEATURE_UNITS,
    GLOBAL_FEATURES,
    LEADS12,
    attach_features,
    clinical_targets,
    content_key,
    default_cache_dir,
    extract_features,
    features_for,
    features_from,
    load_features,
    measure_record,
    record_features,
    save_features,
)
from ssl4ecg.clinical.rpeaks import Detection, detect_r_peaks

__all__ = [
    "Delineation", "Detection", "EXTRA_PREFIX", "FEATURE_NAMES", "FEATURE_UNITS", "GLOBAL_FEATURES",
    "LEADS12", "attach_features", "clinical_targets", "content_key", "default_cache_dir", "delineate", "detect_r_peaks",
    "extract_features", "features_for", "features_from", "load_features", "measure_record",
    "record_features", "save_features",
]
