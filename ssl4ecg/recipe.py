"""Recipes: TOML files naming the data, encoder, objective, masker, training and evaluators.

A recipe has the sections ``[run]``, ``[data]``, ``[eval_data]`` (optional: the labelled
data evaluators use when it differs from the pretraining data; keys not given are taken
from ``[data]``), ``[encoder]``, ``[objective]``, ``[masker]`` (optional), ``[train]`` and
a list ``[[eval]]``. ``[run]`` and ``[train]`` have fixed schemas (below); the keys of the
component sections are the keyword arguments of the named component, checked against the
registry by :func:`resolve`. Every unknown key is an error that names it and suggests the
closest valid key.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

try:
    import tomli_w
except ImportError:  # optional: a bare host without it writes recipes with dumps_toml's own writer
    tomli_w = None

from ssl4ecg.errors import ConfigError, did_you_mean
from ssl4ecg.registry import check_type

SECTIONS = ("run", "data", "eval_data", "encoder", "objective", "masker", "train", "eval")

RUN_DEFAULTS: dict[str, Any] = {
    "name": "run",  # run directory name under out_root
    "seed": 0,  # seeds torch, numpy, random, the data order, masks and augmentations
    "device": "auto",  # auto | cpu | cuda | cuda:N | mps
    "out_root": "runs",  # default parent of run directories
    # precision of frozen-feature extraction and fine-tuning in [[eval]]: fp32 | bf16 | train (the
    # [train] precision). fp32 by default: bf16 keeps 8 significant bits, and the spread between
    # records of a young encoder's pooled features can be ~1 % of their mean.
    "eval_precision": "fp32",
}

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "batch_size": 32,
    "lr": 1e-4,  # peak learning rate after warm-up
    "min_lr": 0.0,  # end of the cosine schedule
    "weight_decay": 0.05,  # not applied to biases, norms and other 1-D parameters
    "betas": [0.9, 0.999],
    "warmup_epochs": 1.0,
    "max_steps": -1,  # -1: no cap; 0: skip pretraining (random-init baseline)
    "max_minutes": 0.0,  # 0: no time budget; else training ends cleanly after this long
    "grad_clip": 0.0,  # 0: off; else max global grad norm
    "accum_steps": 1,  # gradient accumulation (effective batch = batch_size * accum_steps)
    "precision": "auto",  # auto (bf16 on CUDA and bf16-capable CPUs) | bf16 | fp32
    "log_every": 10,
    "checkpoint_every": 200,  # optimiser steps between checkpoints (and one at the end)
    "num_threads": 0,  # torch CPU threads; 0 keeps torch's default
    "compile": False,  # torch.compile the objective
    "nan_policy": "stop",  # stop | skip: what a NaN/inf loss does
    "max_skipped": 10,  # with nan_policy = "skip": stop after this many skipped steps
    "loader_workers": 0,  # processes building batches (0 = a background thread)
    "pin_memory": "auto",  # auto (on when training on CUDA) | on | off
}

COMPONENT_SECTIONS = {"encoder": "encoder", "objective": "objective", "masker": "masker"}

#: the largest integer a [run]/[train] key may hold (fits int64 arithmetic in every counter)
MAX_INT = 2**62


@dataclass(frozen=True)
class ValueRule:
    """What a [run]/[train] number means: its range (``low``/``high``, ``None`` = unbounded).

    ``low_open`` makes ``low`` exclusive. Floats must also be finite; ``items`` checks every
    element of a list and ``length`` its length.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    meaning: str = ""
    length: int | None = None

    def describe(self, kind: str) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_bound(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {_bound(self.high)}")
        return f"{kind} {' and '.join(parts)}".strip()


def _bound(value: float) -> str:
    """A range limit as people read it: 2**62 rather than 4.61169e+18."""
    if isinstance(value, int) and value >= 2**16:
        for offset in (0, 1):
            k = (value + offset).bit_length() - 1
            if value + offset == 2**k:
                return f"2**{k}" + (" - 1" if offset else "")
    return f"{value:g}"


#: one rule per numeric [run]/[train] key, checked by :func:`check_values` when a recipe is read
VALUE_RULES: dict[tuple[str, str], ValueRule] = {
    ("run", "seed"): ValueRule(0, 2**32 - 1, meaning="it seeds torch, numpy, random and the data order"),
    ("train", "epochs"): ValueRule(1, MAX_INT, meaning="passes over the pretraining data; "
                                                       "train.max_steps=0 skips pretraining"),
    ("train", "batch_size"): ValueRule(1, 2**31 - 1, meaning="records per step and process"),
    ("train", "loader_workers"): ValueRule(0, 256, meaning="processes building batches; 0 = a background thread"),
    ("train", "lr"): ValueRule(0, low_open=True, meaning="the peak learning rate; "
                                                        "train.max_steps=0 skips pretraining"),
    ("train", "min_lr"): ValueRule(0, meaning="the learning rate at the end of the cosine schedule"),
    ("train", "weight_decay"): ValueRule(0, meaning="AdamW's decoupled weight decay"),
    ("train", "betas"): ValueRule(0, 1, high_open=True, length=2, meaning="AdamW's two moment decay rates"),
    ("train", "warmup_epochs"): ValueRule(0, meaning="epochs of linear learning-rate warm-up"),
    ("train", "max_steps"): ValueRule(-1, MAX_INT, meaning="-1 = no cap, 0 = skip pretraining"),
    ("train", "max_minutes"): ValueRule(0, meaning="0 = no time budget"),
    ("train", "grad_clip"): ValueRule(0, meaning="0 = off, else the largest global gradient norm"),
    ("train", "accum_steps"): ValueRule(1, 2**20, meaning="micro-batches per optimiser step"),
    ("train", "log_every"): ValueRule(1, MAX_INT, meaning="optimiser steps between log lines"),
    ("train", "checkpoint_every"): ValueRule(1, MAX_INT, meaning="optimiser steps between checkpoints"),
    ("train", "num_threads"): ValueRule(0, 2**16, meaning="0 keeps torch's default"),
    ("train", "max_skipped"): ValueRule(0, MAX_INT, meaning="non-finite steps skipped before stopping"),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_values(section: str, values: dict[str, Any], source: str = "<memory>") -> None:
    """Check every number of [run]/[train] ``values`` against :data:`VALUE_RULES` (type, finite, range).

    Raises :class:`ConfigError` with one line naming the key, the value, the allowed range and
    what the key means.
    """
    import math

    for key, value in values.items():
        rule = VALUE_RULES.get((section, key))
        if rule is None:
            continue
        default = (RUN_DEFAULTS if section == "run" else TRAIN_DEFAULTS)[key]
        if rule.length is not None:
            items = value if isinstance(value, (list, tuple)) else None
            ok = items is not None and len(items) == rule.length
            items = items if ok else []
            kind = f"a list of {rule.length} numbers each"
        else:
            items = [value]
            ok = True
            kind = "an integer" if isinstance(default, int) else "a finite number"
        for item in items:
            if isinstance(default, int) and rule.length is None:
                ok = ok and isinstance(item, int) and not isinstance(item, bool)
            else:
                ok = ok and _is_number(item) and math.isfinite(item)
            if not ok:
                break
            if rule.low is not None:
                ok = item > rule.low if rule.low_open else item >= rule.low
            if ok and rule.high is not None:
                ok = item < rule.high if rule.high_open else item <= rule.high
        if not ok:
            raise ConfigError(f"{source}: [{section}] {key} = {value!r} is invalid: it must be "
                              f"{rule.describe(kind)} ({rule.meaning}).")
    merged = {**TRAIN_DEFAULTS, **values} if section == "train" else {}
    if merged and merged["min_lr"] > merged["lr"]:
        raise ConfigError(f"{source}: [train] min_lr = {merged['min_lr']!r} is above lr = {merged['lr']!r}; "
                          "the cosine schedule decays from lr down to min_lr, so make min_lr <= lr.")
    if section == "run" and "name" in values:
        name = values["name"]
        if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
            raise ConfigError(f"{source}: [run] name = {name!r} is invalid: it names the run's folder under "
                              "out_root, so use a non-empty name without / or \\ (e.g. name = \"jepa_small\").")


@dataclass
class Recipe:
    """A parsed recipe: plain dictionaries per section plus the file it came from."""

    run: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    eval_data: dict[str, Any] = field(default_factory=dict)
    encoder: dict[str, Any] = field(default_factory=dict)
    objective: dict[str, Any] = field(default_factory=dict)
    masker: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)
    source: str = "<memory>"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("run", "data", "eval_data", "encoder", "objective", "masker", "train"):
            value = getattr(self, name)
            if value:
                out[name] = _toml_safe(value)
        if self.evals:
            out["eval"] = [_toml_safe(e) for e in self.evals]
        return out

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    def eval_id(self, index: int) -> str:
        """The id of evaluator ``index`` (its ``id`` key, else its name, numbered if repeated)."""
        entry = self.evals[index]
        if "id" in entry:
            return str(entry["id"])
        name = entry.get("name", f"eval{index}")
        same = [i for i, e in enumerate(self.evals) if e.get("name") == name and "id" not in e]
        return name if len(same) == 1 else f"{name}_{same.index(index)}"


def _toml_safe(value: Any) -> Any:
    """Drop ``None`` values (TOML has no null) and turn tuples into lists, recursively."""
    if isinstance(value, dict):
        return {k: _toml_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_toml_safe(v) for v in value]
    return value


def dumps_toml(doc: dict[str, Any]) -> str:
    """TOML text of ``doc`` (str, int, float incl. nan/inf, bool, lists, tables, arrays of tables).

    Uses ``tomli_w`` when it is installed, else a small writer for exactly those types.
    """
    if tomli_w is not None:
        return tomli_w.dumps(doc)
    lines: list[str] = []
    _write_table(lines, (), doc)
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _write_table(lines: list[str], path: tuple[str, ...], table: dict[str, Any]) -> None:
    """Append ``table``'s keys: scalars and inline arrays first, then its tables and arrays of tables."""
    nested = {k: v for k, v in table.items() if isinstance(v, dict) or _is_table_array(v)}
    for key, value in table.items():
        if key not in nested:
            lines.append(f"{_toml_key(key)} = {_toml_value(value, (*path, key))}")
    for key, value in nested.items():
        full = ".".join(_toml_key(k) for k in (*path, key))
        for entry in ([value] if isinstance(value, dict) else value):
            lines += ["", f"[{full}]" if isinstance(value, dict) else f"[[{full}]]"]
            _write_table(lines, (*path, key), entry)


def _toml_key(key: Any) -> str:
    if not isinstance(key, str):
        raise ConfigError(f"TOML keys must be strings, got {key!r}")
    bare = key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key)
    return key if bare else _toml_string(key)


def _toml_string(text: str) -> str:
    escapes = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    out = []
    for c in text:
        if c in escapes:
            out.append(escapes[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any, path: tuple[str, ...]) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, path) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v, (*path, k))}" for k, v in value.items()) + "}"
    raise ConfigError(f"recipe value {'.'.join(map(str, path))} = {value!r} ({type(value).__name__}) cannot be "
                      "written as TOML; use a string, number, boolean, list or table")


def parse_recipe(text: str, source: str = "<memory>") -> Recipe:
    """Parse recipe TOML text (sections only; component keys are checked by :func:`resolve`)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return recipe_from_dict(raw, source)


def recipe_from_dict(raw: dict[str, Any], source: str = "<memory>") -> Recipe:
    """Build a :class:`Recipe` from a parsed TOML document, checking section names and types."""
    for key, value in raw.items():
        if key not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{key}].{did_you_mean(key, SECTIONS)}")
        if key == "eval":
            if isinstance(value, dict):  # a single [eval] table instead of [[eval]]
                value = [value]
                raw[key] = value
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"{source}: [[eval]] must be a list of tables, e.g. [[eval]] name = \"linear_probe\"")
        elif not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a table ([{key}]), got {type(value).__name__}")
    recipe = Recipe(
        run=dict(raw.get("run", {})),
        data=dict(raw.get("data", {})),
        eval_data=dict(raw.get("eval_data", {})),
        encoder=dict(raw.get("encoder", {})),
        objective=dict(raw.get("objective", {})),
        masker=dict(raw.get("masker", {})),
        train=dict(raw.get("train", {})),
        evals=[dict(e) for e in raw.get("eval", [])],
        source=source,
    )
    _check_fixed(recipe.run, RUN_DEFAULTS, "run", source)
    _check_fixed(recipe.train, TRAIN_DEFAULTS, "train", source)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file and apply ``--set section.key=value`` overrides."""
    path = Path(path)
    if path.is_dir():
        tomls = sorted(p.name for p in path.glob("*.toml"))
        if (path / "recipe.toml").is_file():  # a run directory keeps the recipe it ran
            hint = (f"give a recipe .toml file, e.g. {path / 'recipe.toml'} (to continue an interrupted "
                    f"run directory: `ssl4ecg run --resume {path}`)")
        elif tomls:
            hint = f"give one of its recipe files, e.g. {path / tomls[0]} ({len(tomls)} .toml files there)"
        else:
            hint = "give a recipe .toml file; recipes ship in the repository's recipes/ folder"
        raise ConfigError(f"recipe {path} is a directory, not a recipe file: {hint}.")
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}. Recipes ship in the repository's recipes/ folder.")
    raw = _parse_toml(path.read_text(encoding="utf-8"), str(path))
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw, str(path))


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax if it parses (numbers, booleans, lists), else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` (or ``eval.N.key=value``) override to a parsed recipe."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected section.key=value, e.g. train.max_steps=0")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    value = parse_value(text.strip())
    section = parts[0]
    if section not in SECTIONS:
        raise ConfigError(f"--set '{item}': unknown section '{section}'.{did_you_mean(section, SECTIONS)}")
    if section == "eval":
        if len(parts) != 3 or not parts[1].isdigit():
            raise ConfigError(f"--set '{item}': evaluator keys are set as eval.N.key=value (N = position in [[eval]])")
        evals = raw.setdefault("eval", [])
        index = int(parts[1])
        if index > len(evals):
            raise ConfigError(f"--set '{item}': the recipe has {len(evals)} [[eval]] entries; use N <= {len(evals)}")
        if index == len(evals):
            evals.append({})
        evals[index][parts[2]] = value
        return
    if len(parts) != 2:
        raise ConfigError(f"--set '{item}': expected section.key=value, e.g. train.max_steps=0")
    raw.setdefault(section, {})[parts[1]] = value


def _check_fixed(values: dict[str, Any], defaults: dict[str, Any], section: str, source: str) -> None:
    for key, value in values.items():
        if key not in defaults:
            raise ConfigError(f"{source}: [{section}] unknown key '{key}'.{did_you_mean(key, defaults)}")
        default = defaults[key]
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float) \
                and value.is_integer():
            values[key] = value = int(value)  # 1e3 written for an integer key
        try:
            check_type(section, key, value, default)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    _check_choice(values, "precision", ("auto", "bf16", "fp32"), section, source)
    _check_choice(values, "eval_precision", ("fp32", "bf16", "train"), section, source)
    _check_choice(values, "nan_policy", ("stop", "skip"), section, source)
    _check_choice(values, "pin_memory", ("auto", "on", "off"), section, source)
    check_values(section, values, source)


def _check_choice(values: dict[str, Any], key: str, choices: tuple[str, ...], section: str, source: str) -> None:
    if key in values and values[key] not in choices:
        raise ConfigError(
            f"{source}: [{section}] {key} = {values[key]!r} is not one of {', '.join(choices)}."
            f"{did_you_mean(str(values[key]), choices)}"
        )


def resolve(recipe: Recipe, registry, need_training: bool = True) -> Recipe:
    """A copy of ``recipe`` with every default filled in and every component key checked.

    Raises :class:`ConfigError` (naming the section and key) before anything is trained.
    With ``need_training=False`` (evaluating a saved encoder) [encoder] and [objective]
    may be absent.
    """
    from ssl4ecg.data.build import resolve_data_section

    out = copy.deepcopy(recipe)
    out.run = {**RUN_DEFAULTS, **recipe.run}
    out.train = {**TRAIN_DEFAULTS, **recipe.train}
    out.data = resolve_data_section(recipe.data, registry)
    if recipe.eval_data:
        merged = {k: v for k, v in recipe.data.items() if k not in ("mixture",)}
        if "source" in recipe.eval_data and recipe.eval_data["source"] != recipe.data.get("source"):
            # a different source: keep only the preprocessing keys of [data]
            from ssl4ecg.data.build import DATA_DEFAULTS

            merged = {k: v for k, v in merged.items() if k in DATA_DEFAULTS and k not in ("source", "path", "cache")}
        merged.update(recipe.eval_data)
        out.eval_data = resolve_data_section(merged, registry)
    for section, kind in COMPONENT_SECTIONS.items():
        values = getattr(recipe, section)
        if not values:
            if section == "masker" or not need_training:
                continue
            raise ConfigError(f"{recipe.source}: [{section}] is missing; it needs at least name = \"...\"")
        if "name" not in values:
            raise ConfigError(f"{recipe.source}: [{section}] needs name = \"...\" (see `ssl4ecg plugins`)")
        options = {k: v for k, v in values.items() if k != "name"}
        registry.check(kind, values["name"], options, section)
        setattr(out, section, {"name": values["name"], **registry.resolved_options(kind, values["name"], options)})
    for i, entry in enumerate(recipe.evals):
        if "name" not in entry:
            raise ConfigError(f"{recipe.source}: [[eval]] entry {i} needs name = \"...\" (e.g. \"linear_probe\")")
        options = {k: v for k, v in entry.items() if k not in ("name", "id")}
        registry.check("evaluator", entry["name"], options, f"eval.{i}")
        resolved = {"name": entry["name"], **registry.resolved_options("evaluator", entry["name"], options)}
        if "id" in entry:
            resolved["id"] = entry["id"]
        out.evals[i] = resolved
    ids = [out.eval_id(i) for i in range(len(out.evals))]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{recipe.source}: two [[eval]] entries share an id ({ids}); give each a distinct id = \"...\"")
    return out
