"""A model to start from defines the model: with train.init, the model section comes from the init
model (its config.yaml, checkpoint config or Hugging Face config.json), not from the defaults.

A value the config gives explicitly must agree with the init model, except those a later stage
may legitimately change (RoPE base and sequence length for long context, z-loss, the attention
kernel, document masking, the init std that imported weights ignore): those are kept and reported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from smoltrain.config import Config, ModelConfig, validate
from smoltrain.errors import ConfigError

# Model keys a stage may set differently from the model it starts from (the first two are the
# playbook's long-context recipe: a larger RoPE base at a longer sequence length).
MAY_CHANGE = ("rope_theta", "rope_scaling", "max_seq_len", "z_loss", "attention_kernel", "document_masking", "init_std")


def with_init_model_section(raw: dict) -> dict:
    """A raw config mapping whose model section is the init model's, overridden by the keys the
    section gives: with train.init, a partial model section (`max_seq_len: 512`) is validated as
    the model that will train, not merged into the defaults first (a default of 9 heads would
    refuse `num_kv_heads: 2` that the init model's 4 heads take). Unchanged without train.init,
    with a complete model section, or while train.init names nothing yet (a recipe read before its
    init run exists: the Trainer says so in one line when it starts)."""
    train, given = raw.get("train"), raw.get("model")
    given = {} if given is None else given
    init = train.get("init") if isinstance(train, dict) else None
    if not init or not isinstance(given, dict) or not Path(str(init)).exists():
        return raw  # (a model section that is not a mapping is the config builder's one-line error)
    if all(f.name in given for f in dataclasses.fields(ModelConfig)):
        return raw
    from smoltrain.train.load_model import model_config_of

    return {**raw, "model": {**dataclasses.asdict(model_config_of(str(init))), **given}}


def resolve_init_model(config: Config, say: Callable[[str], None] | None = None) -> Config:
    """`config` with its model section taken from train.init (unchanged without one). A contradicting
    explicit value is a one-line ConfigError naming both; allowed changes are passed to `say`.
    Explicit keys are those the recipe or --set gave (config.explicit); a config built in code
    without that record counts the values that differ from the defaults as explicit."""
    path = config.train.init
    if not path:
        return config
    from smoltrain.train.load_model import model_config_of

    source = model_config_of(path)
    explicit = getattr(config, "explicit", None)
    defaults = ModelConfig()
    resolved, conflicts, changes = {}, [], []
    for f in dataclasses.fields(ModelConfig):
        mine, theirs = getattr(config.model, f.name), getattr(source, f.name)
        given = f"model.{f.name}" in explicit if explicit is not None else mine != getattr(defaults, f.name)
        if not given or mine == theirs:
            resolved[f.name] = theirs
        elif f.name in MAY_CHANGE:
            resolved[f.name] = mine
            changes.append(f"model.{f.name} {mine} (the init model has {theirs})")
        else:
            conflicts.append(f"model.{f.name} is {mine} here but {theirs} in the init model")
    if conflicts:
        raise ConfigError(f"train.init {path}: {'; '.join(conflicts)} (leave them out to take the init model's)")
    out = dataclasses.replace(config, model=ModelConfig(**resolved))
    out.explicit = getattr(config, "explicit", frozenset()) | {f"model.{name}" for name in resolved}
    validate(out)
    if changes and say is not None:
        say(f"model from train.init {path}, changed: {', '.join(changes)}")
    return out


__all__ = ["MAY_CHANGE", "resolve_init_model", "with_init_model_section"]
