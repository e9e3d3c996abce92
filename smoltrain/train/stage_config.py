"""One loader for every stage's config (pretrain, sft, dpo, grpo): the recipe, `--set`, `--init`, the
init model's model section under the recipe's keys, and the tokenizer, by one precedence for all.

The tokenizer a stage uses is, first to last: `data.tokenizer` when the recipe or `--set` names one (a
deliberate choice: a chat tokenizer an earlier stage wrote, or one for a folder that has none); else
the init model's own (beside its weights, or the one its run's config names: its embedding rows index
that vocabulary); else the embedded corpus's (`data.embedded`, built on first use); else a one-line error.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Callable, Sequence

from smoltrain.config import Config, apply_overrides, config_from_dict, replace_sections
from smoltrain.errors import ConfigError
from smoltrain.files import load_yaml
from smoltrain.train.init_model import init_model_section
from smoltrain.train.load_model import tokenizer_of


def read_recipe(path: str | os.PathLike | dict | None) -> dict:
    """The recipe's sections as a mapping ({} without one, a copy of one given as a mapping: an ablation
    grid's run); a missing file or bad YAML names the file."""
    if path is None:
        return {}
    if isinstance(path, dict):
        return copy.deepcopy(path)
    if not Path(path).is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, optim, train, ...)")
    return raw


def recipe_section(raw: dict, name: str) -> dict:
    """raw[name], made a mapping when the recipe leaves it out; one that is not a mapping is an error."""
    if raw.get(name) is None:
        raw[name] = {}
    if not isinstance(raw[name], dict):
        raise ConfigError(f"{name}: expected a mapping, got {raw[name]!r}")
    return raw[name]


def load_stage_config(recipe: str | os.PathLike | dict | None, overrides: Sequence[str] = (), init: str | None = None, *,
                      cls: type[Config] = Config, optim_defaults: dict | None = None, min_lr_share: float | None = None,
                      prepare: Callable[[dict, dict | None], None] | None = None) -> Config:
    """A `cls` (a stage's Config with its section) from the recipe, then `--set` overrides, then
    `--init` as train.init (the same for every verb), then the stage's optimizer defaults for the keys
    left out (min_lr: min_lr_share x lr), then the stage's own rule on the raw mapping
    (`prepare(raw, init model section or None)`), then the init model's section under the model keys given."""
    raw = apply_overrides(read_recipe(recipe), list(overrides))
    if init:
        recipe_section(raw, "train")["init"] = init
    if optim_defaults:
        optim = recipe_section(raw, "optim")
        for key, value in optim_defaults.items():
            optim.setdefault(key, value)
        if min_lr_share is not None:
            optim.setdefault("min_lr", min_lr_share * float(optim["lr"]))
    base_model = init_model_section(raw)
    if prepare is not None:
        prepare(raw, base_model)
    try:
        config = config_from_dict(raw, base_model=base_model, cls=cls)
    except ConfigError as e:
        raise ConfigError(f"{recipe}: {e}" if isinstance(recipe, (str, os.PathLike)) else str(e)) from None
    init_path = config.train.init
    if not config.data.tokenizer and init_path and Path(init_path).exists() and tokenizer_of(init_path):
        # the run folder's config.yaml (and `smoltrain export` after it) names the tokenizer it used
        data = dataclasses.replace(config.data, tokenizer=str(Path(tokenizer_of(init_path)).resolve()))
        config = replace_sections(config, data=data)
    return config


def resolve_tokenizer(config: Config, model: str | None = None) -> str:
    """The stage's tokenizer by the precedence above (the loader has already put the init model's in
    data.tokenizer); `model`: the starting model without train.init (DPO's dpo.reference)."""
    if config.data.tokenizer:
        return config.data.tokenizer
    start = config.train.init or model
    if start:
        if not Path(start).exists():
            raise ConfigError(f"train.init: {start}: no such model, run or checkpoint folder")
        found = tokenizer_of(start)
        if found:
            return found
    if config.data.embedded:
        from smoltrain.data.embedded import ensure_embedded_data

        return ensure_embedded_data(config.data).tokenizer
    raise ConfigError("no tokenizer is known: set data.tokenizer, or train.init to a model folder with one")


__all__ = ["load_stage_config", "read_recipe", "recipe_section", "resolve_tokenizer"]
