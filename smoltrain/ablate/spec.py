"""The ablation file: a baseline, named variants (each a set of config overrides), seeds and a budget.

```yaml
name: document-masking            # default: the file name
baseline: ../demo.yaml            # a recipe (relative to this file) or an inline config mapping
set: [train.log_every=10]         # optional overrides applied to every run, baseline included
variants:
  no-document-masking: [model.document_masking=false]     # `--set` strings ...
  mqa: {model.num_kv_heads: 1, model.num_layers: 7}       # ... or a key: value mapping
seeds: [0, 1]
budget: {steps: 200}              # or {tokens: 2_000_000}: steps = ceil(tokens / global batch)
stage: pretrain                   # or sft, dpo, grpo (smoltrain/stages.py): which training each run is (its own eval rides along)
eval: {tasks: [arithmetic], val_batches: 8}   # the one suite every run is scored on
noise_sigma: 2.0                  # verdict threshold, in standard errors of the difference
param_tolerance: 0.05             # warn when a variant's parameters differ more than this
out_dir: runs/ablations/document-masking
```

Variants may not touch what must stay equal across runs (seed, budget, output folder, the
evaluation suite); the grid sets those itself, so a comparison is fair by construction.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smoltrain.config import Config, apply_overrides
from smoltrain.errors import ConfigError
from smoltrain.files import load_yaml, parse_yaml
from smoltrain.stages import STAGES

BASELINE = "baseline"
_TOP_KEYS = ("name", "baseline", "set", "variants", "seeds", "budget", "eval", "noise_sigma", "param_tolerance", "out_dir",
             "stage")
# Keys the grid owns: a variant changing them would not be a like-for-like comparison.
_FIXED_PREFIXES = ("train.seed", "train.out_dir", "train.max_steps", "eval.")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class AblationSpec:
    name: str
    baseline: dict  # raw config mapping, `set` already applied
    variants: dict[str, list[str]]  # name -> `section.key=value` overrides (baseline included, empty)
    seeds: list[int]
    budget_steps: int | None = None
    budget_tokens: int | None = None
    eval: dict = field(default_factory=dict)
    noise_sigma: float = 2.0
    param_tolerance: float = 0.05
    out_dir: str = ""
    source: str = "<inline>"  # the file it came from, for error messages
    stage: str = "pretrain"  # the training each run is: a stage of smoltrain/stages.py (its recipe defaults, its run)

    def run_dir(self, variant: str, seed: int) -> Path:
        return Path(self.out_dir) / "runs" / variant / f"seed{seed}"

    def runs(self) -> list[tuple[str, int]]:
        """Every (variant, seed), seed-major so a partial grid already holds one seed of each variant."""
        return [(v, s) for s in self.seeds for v in self.variants]

    def config_for(self, variant: str, seed: int) -> Config:
        """The validated config of one run: baseline + variant overrides + the grid's own keys."""
        where = f"{self.source}: variants.{variant}" if variant != BASELINE else f"{self.source}: baseline"
        raw = copy.deepcopy(self.baseline)
        try:
            apply_overrides(raw, self.variants[variant])
            if self.eval:
                raw["eval"] = {**(raw.get("eval") or {}), **copy.deepcopy(self.eval)}
            apply_overrides(raw, [f"train.seed={seed}", f"train.out_dir={json.dumps(str(self.run_dir(variant, seed)))}"])
            steps = self.budget_steps
            if steps is None:
                steps = math.ceil(self.budget_tokens / STAGES[self.stage].load(raw).train.global_batch_tokens)
            # the budget as a recipe key: a stage that derives its steps (sft.epochs) lets a given one win
            return STAGES[self.stage].load(apply_overrides(raw, [f"train.max_steps={steps}"]))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def _fail(source: str, message: str) -> None:
    raise ConfigError(f"{source}: {message}")


def _overrides(source: str, key: str, value: Any) -> list[str]:
    """A variant as `--set` strings; mappings become `key=<json>` (JSON is YAML, so types survive)."""
    if value is None:
        return []
    if isinstance(value, dict):
        items = [f"{k}={json.dumps(v)}" for k, v in value.items()]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        _fail(source, f"{key}: expected a list of 'section.key=value' strings or a mapping of key: value")
    for item in items:
        path = item.split("=", 1)[0].strip()
        if "=" not in item or "." not in path:
            _fail(source, f"{key}: {item!r} is not 'section.key=value'")
        if any(path == p or (p.endswith(".") and path.startswith(p)) for p in _FIXED_PREFIXES):
            _fail(source, f"{key}: '{path}' is set by the ablation itself (seeds, budget, out_dir, eval) and must be equal across runs")
    return items


def _mark(source: str, text: str, key: str) -> str:
    """`file:line` of a top-level key, so errors point at the right place."""
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(rf"^{re.escape(key)}\s*:", line):
            return f"{source}:{number}"
    return source


def load_ablation(path: str | os.PathLike | None = None, raw: dict | None = None, out_dir: str | None = None) -> AblationSpec:
    """Read and validate an ablation file (or an already-parsed mapping); every run's config is
    built and validated here, before anything is trained."""
    raw, text, source, base_dir, default_name = _read(path, raw)
    where = functools.partial(_mark, source, text)  # key -> `file:line` for error messages
    _check_keys(raw, source, where)
    baseline = _baseline(raw, base_dir, where)
    variants = _variants(raw["variants"], where)
    seeds = _seeds(raw["seeds"], where)
    unit, amount = _budget(raw["budget"], where)
    eval_section = raw.get("eval") or {}
    if not isinstance(eval_section, dict):
        _fail(where("eval"), "eval: expected a mapping (the eval config section)")
    noise_sigma = raw.get("noise_sigma", 2.0)
    param_tolerance = raw.get("param_tolerance", 0.05)
    for key, value in (("noise_sigma", noise_sigma), ("param_tolerance", param_tolerance)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            _fail(where(key), f"{key}: expected a positive number, got {value!r}")
    stage = raw.get("stage", "pretrain")
    if stage not in STAGES:
        _fail(where("stage"), f"stage: expected one of {', '.join(STAGES)}, got {stage!r}")

    name = str(raw.get("name") or default_name)
    spec = AblationSpec(
        name=name,
        baseline=baseline,
        variants=variants,
        seeds=seeds,
        budget_steps=amount if unit == "steps" else None,
        budget_tokens=amount if unit == "tokens" else None,
        eval=copy.deepcopy(eval_section),
        noise_sigma=float(noise_sigma),
        param_tolerance=float(param_tolerance),
        out_dir=str(out_dir or raw.get("out_dir") or Path("runs") / "ablations" / name),
        source=source,
        stage=stage,
    )
    from smoltrain.eval.during_training import check_eval_config

    for variant in spec.variants:  # every run's config is valid, its eval suite resolved, before the first one starts
        check_eval_config(spec.config_for(variant, spec.seeds[0]))
    return spec


def _read(path: str | os.PathLike | None, raw: dict | None) -> tuple[Any, str, str, Path, str]:
    """The parsed mapping, the file's text (for line numbers), its name, its folder and the default ablation name."""
    if path is None:
        return raw, "", "<ablation>", Path.cwd(), "ablation"
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: ablation file not found")
    text = p.read_text()
    return parse_yaml(text, str(p)), text, str(p), p.parent, p.stem


def _check_keys(raw: Any, source: str, where) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with baseline, variants, seeds and budget")
    for key in raw:
        if key not in _TOP_KEYS:
            close = difflib.get_close_matches(str(key), _TOP_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (expected one of: {', '.join(_TOP_KEYS)})"
            _fail(where(key), f"unknown key '{key}'{hint}")
    for key in ("baseline", "variants", "seeds", "budget"):
        if key not in raw:
            _fail(source, f"missing '{key}'")


def _baseline(raw: dict, base_dir: Path, where) -> dict:
    """The baseline config mapping (a recipe path, relative to the ablation file, or inline), `set` applied."""
    baseline = raw["baseline"]
    if isinstance(baseline, str):
        recipe = (base_dir / baseline) if not Path(baseline).is_absolute() else Path(baseline)
        if not recipe.is_file():
            _fail(where("baseline"), f"baseline: recipe {recipe} not found")
        baseline = load_yaml(recipe) or {}
        if not isinstance(baseline, dict):
            _fail(str(recipe), "expected a mapping of config sections")
    elif not isinstance(baseline, dict):
        _fail(where("baseline"), "baseline: expected a recipe path or a config mapping")
    baseline = copy.deepcopy(baseline)
    apply_overrides(baseline, _overrides(where("set"), "set", raw.get("set")))
    return baseline


def _variants(variants_raw: Any, where) -> dict[str, list[str]]:
    """name -> overrides, the baseline first with none."""
    if not isinstance(variants_raw, dict) or not variants_raw:
        _fail(where("variants"), "variants: expected a non-empty mapping of name -> overrides")
    variants: dict[str, list[str]] = {BASELINE: []}
    for name, value in variants_raw.items():
        name = str(name)
        if name == BASELINE:
            _fail(where("variants"), "variants: 'baseline' is reserved (the baseline always runs)")
        if not _NAME.match(name):
            _fail(where("variants"), f"variants: {name!r} is not a usable name (letters, digits, . _ + -)")
        overrides = _overrides(where("variants"), f"variants.{name}", value)
        if not overrides:
            _fail(where("variants"), f"variants.{name}: no overrides (it would equal the baseline)")
        variants[name] = overrides
    return variants


def _seeds(seeds: Any, where) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))  # `seeds: 3` means seeds 0, 1, 2
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        _fail(where("seeds"), "seeds: expected a list of integers or a count")
    if len(set(seeds)) != len(seeds):
        _fail(where("seeds"), f"seeds: repeated seed in {seeds}")
    return list(seeds)


def _budget(budget: Any, where) -> tuple[str, int]:
    """("steps" or "tokens", a positive integer)."""
    if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in ("steps", "tokens"):
        _fail(where("budget"), "budget: expected {steps: N} or {tokens: N}")
    (unit, amount), = budget.items()
    if isinstance(amount, float) and amount.is_integer():
        amount = int(amount)
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        _fail(where("budget"), f"budget.{unit}: expected a positive integer, got {amount!r}")
    return unit, amount
