"""The stages of training by name (pretrain, sft, dpo, grpo): what the CLI's training verbs, `ablate`,
the demo and the model card dispatch on, instead of branching on a stage's name.

Every stage has one shape: it owns a config section (none for pretraining, which uses the shared ones),
reads its recipe through the one loader (train/stage_config.py), and runs the one Trainer with its
objective. Its layer is post's: it imports the stage modules, and report, ablate, demo and cli import it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from smoltrain.config import Config
from smoltrain.errors import StoppedBySignal
from smoltrain.eval.during_training import DuringTraining
from smoltrain.post.preference import stage as dpo
from smoltrain.post.rl import stage as grpo_train
from smoltrain.post.sft import stage as sft
from smoltrain.train import trainer
from smoltrain.train.stage_config import load_stage_config


@dataclass(frozen=True)
class Stage:
    name: str
    verb: str  # its `smoltrain` verb
    section: str | None  # the config section it owns (None: pretraining, the shared sections only)
    recipe: str  # its default recipe, under recipes/
    load: Callable[..., Config]  # (recipe path or mapping, overrides, init) -> the validated config
    run: Callable[..., dict]  # (config, resume=None, should_stop=None) -> the run's summary
    card_keys: tuple[str, ...] = ()  # the keys of its section the model card shows with the recipe
    steps_from_data: bool = False  # train.max_steps is known once the data is read: the stage says "finished" itself
    plan_note: Callable[[Config], str] | None = None  # what `smoltrain config` adds about the resolved values

    def run_for(self, config: Config, seconds: float, on_deadline: Callable[[], None] = lambda: None) -> tuple[dict, bool]:
        """Run within `seconds`: the Trainer's should_stop hook fires at the deadline (`on_deadline()` once), and the
        Trainer finishes its step, saves and returns; (summary, stopped by the deadline). A stop the deadline
        did not ask for (Ctrl-C, an outside SIGTERM) raises StoppedBySignal: whoever runs the stage stops too."""
        at, fired = time.monotonic() + seconds, []

        def deadline() -> bool:
            if not fired and time.monotonic() >= at:
                fired.append(True)
                on_deadline()
            return bool(fired)

        summary = self.run(config, should_stop=deadline)
        if summary.get("stopped_by") and not fired:
            raise StoppedBySignal(summary["stopped_by"])
        return summary, bool(fired)


def pretrain(config: Config, resume: str | None = None, should_stop=None, allow_data_change: bool = False) -> dict:
    """`smoltrain train`: the Trainer with the pretraining objective and the in-training evaluation."""
    return trainer.run(config, resume=resume, should_stop=should_stop, allow_data_change=allow_data_change,
                       evaluation=DuringTraining())


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("pretrain", "train", None, "recipes/demo.yaml", load_stage_config, pretrain),
    Stage("sft", "sft", "sft", "recipes/sft/demo.yaml", sft.load_sft_config, sft.sft, card_keys=("loss", "packing"),
          steps_from_data=True, plan_note=sft.describe_step_plan),
    Stage("dpo", "dpo", "dpo", "recipes/dpo/demo.yaml", dpo.load_dpo_config, dpo.run, card_keys=("loss", "beta")),
    Stage("grpo", "grpo", "grpo", "recipes/grpo/demo.yaml", grpo_train.load_grpo_config, grpo_train.run,
          card_keys=("beta", "num_generations", "rewards")),
)}


def stage_of_verb(verb: str) -> Stage:
    return next(stage for stage in STAGES.values() if stage.verb == verb)


def stage_of_recipe(raw: dict) -> Stage:
    """The stage a recipe is for: the one whose section it sets; pretraining when it sets none, or
    several (a run folder's config.yaml written before each stage owned its section carries all three)."""
    named = [stage for stage in STAGES.values() if stage.section and isinstance(raw.get(stage.section), dict)]
    return named[0] if len(named) == 1 else STAGES["pretrain"]


__all__ = ["STAGES", "Stage", "stage_of_recipe", "stage_of_verb"]
