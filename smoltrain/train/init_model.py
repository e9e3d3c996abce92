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


def init_model_section(raw: dict) -> dict | None:
    """train.init's model section, for config_from_dict to put under the recipe's model keys (a partial
    section such as `max_seq_len: 512` then reads as the model that will train). None without train.init,
    or while it names nothing yet (a recipe read before its init run exists: the Trainer says so when it starts)."""
    train = raw.get("train")
    init = train.get("init") if isinstance(train, dict) else None
    if not init or not Path(str(init)).exists():
        return None
    from smoltrain.train.load_model import model_config_of

    return dataclasses.asdict(model_config_of(str(init)))


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


__all__ = ["MAY_CHANGE", "init_model_section", "resolve_init_model"]
