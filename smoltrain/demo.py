"""`smoltrain demo`: the whole playbook in miniature on the embedded corpus, ending in one report.

STEPS chains the stages the way nanochat's speedrun chains its scripts: each step names its stage,
the stage it starts from, its share of the time box and the report-card row its model is evaluated
into, and one loop runs them. A training step writes its recipe into `<out>/recipes/` and runs it
through its training stage in the registry (smoltrain/stages.py). Budgets adapt
to the machine: a short probe picks the fastest precision/compile, each stage's time box is re-planned
from what is really left, never below half its nominal share (a slowed machine ends late rather than
reporting stages trained for three seconds), and the Trainer's should_stop hook ends a stage after the
step in flight. `--stages` runs a subset; the others are reused from `--from` (default: the output folder).
"""

from __future__ import annotations

import difflib
import functools
import json
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from smoltrain import demo_post as post
from smoltrain.config import Config, DataConfig, config_from_dict, load_config
from smoltrain.demo_post import PostSizes, write_json
from smoltrain.errors import ConfigError
from smoltrain.report.model_card import CHAT_EVALS
from smoltrain.stages import STAGES as TRAINING_STAGES
from smoltrain.train.distributed import resolve_device
from smoltrain.train.speed import probe_speed

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
MARKER = "demo.json"  # marks a folder as the demo's own output, which a re-run may replace


@dataclass(frozen=True)
class Step:
    """One stage of the demo: what it is called, where it starts, its time, its row of the report card."""

    name: str  # what --stages names
    title: str
    kind: str | None  # the training stage (smoltrain/stages.py) that trains it (None: trains nothing, or a grid of runs)
    share: float  # of the training time (what is left after the reserves), before floors; 0: trains nothing
    row: str | None  # the report card's row of its model
    needs: tuple[str, ...]  # stages that must have finished (run now or reused)
    upstream: tuple[str, ...]  # stages whose re-run makes this one stale
    folders: tuple[str, ...]  # what it writes under the output folder


STEPS = (
    Step("ablation", "ablation: document masking on/off x 2 seeds", None, 0.08, None, (), (), ("ablation",)),
    Step("pretrain", "pretrain the demo model", "pretrain", 0.42, "base", (), (), ("pretrain", "eval.json", "rows")),
    Step("sft", "SFT on the embedded chat data", "sft", 0.24, "sft", ("pretrain",), ("pretrain",), ("sft",)),
    Step("apo", "APO-zero on generated instruction-following pairs", "dpo", 0.08, "apo", ("sft",), ("pretrain", "sft"),
         ("preferences", "apo")),
    Step("grpo", "GRPO in no_think mode with the overlong penalty", "grpo", 0.18, "grpo", ("sft",),
         ("pretrain", "sft", "apo"), ("grpo",)),  # from APO's model when it has one, else SFT's
    Step("merge", "merge: soup of the last APO checkpoints, then 0.9 soup + 0.1 base", None, 0.0, "merged",
         ("apo", "pretrain"), ("pretrain", "sft", "apo"), ("merge",)),
    # opt-in (not in the default run): 8x the training length with ABF, YaRN without training beside it
    Step("long-context", "long context: ABF to 8x the training length, YaRN for comparison", "pretrain", 0.3, None,
         ("pretrain",), ("pretrain",), ("long-context",)),
)
STEP = {s.name: s for s in STEPS}
STAGES = tuple(STEP)  # what --stages names
DEFAULT_STAGES = STAGES[:-1]
PRETRAINING_STAGES = ("ablation", "pretrain")
CHAIN = ("pretrain", "sft", "apo", "grpo")  # a post-training stage starts from the newest model of it before itself
TRAIN_SHARES = {s.name: s.share for s in STEPS if s.share}
# The seam to the stage registry: the library run function of each kind of training stage, and its recipe loader.
# A stage never gets less than this share of its nominal time, even when earlier stages overran.
STAGE_FLOOR = 0.5
# Non-training work still to come, in seconds on 2 idle cores; a row's evaluation is re-estimated
# from the first one measured.
RESERVE_S = {"row": 45.0, "preferences": 30.0, "merge": 5.0, "long-context": 60.0, "export": 15.0, "report": 10.0}
# Plan steps at (1 - PLAN_OVERHEAD) of the measured steady tokens/s: evaluations and saves, and a
# machine shared with others (planned at 85%, a quiet-looking run was cut at step 466 of 666, before
# its WSD decay). Planning short costs little: the time a stage leaves goes to the next ones.
PLAN_OVERHEAD = 0.35
VAL_BATCHES = 8  # per source, during training and at the end (the same windows, so one comparable curve)


def run_recipe(kind: str, recipe: Path, seconds: float, console: Console) -> tuple[dict, bool]:
    """Load `recipe` through the training stage `kind` (smoltrain/stages.py) and run it in a time box:
    (summary, stopped by it)."""
    stage = TRAINING_STAGES[kind]
    return post.time_boxed(stage.run, stage.load(recipe), seconds, console)


# ----------------------------------------------------------------------------- reference points


class Stages:
    """Prints a numbered header per stage and records its wall time; before_s: seconds the user's
    command ran before the demo (`make demo`: the install, cold caches), which the budget counts."""

    def __init__(self, console: Console, total: int, before_s: float = 0.0):
        self.console, self.total, self.index, self.before_s = console, total, 0, before_s
        self.wall: dict[str, float] = {}
        self.started = time.perf_counter() - before_s

    @contextmanager
    def __call__(self, name: str, title: str):
        self.index += 1
        self.console.rule(f"[bold][{self.index}/{self.total}] {title}")
        start = time.perf_counter()
        yield
        self.wall[name] = time.perf_counter() - start
        self.console.print(f"[dim]{name}: {self.wall[name]:.1f} s (total {self.elapsed() / 60:.1f} min)[/dim]")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def with_overrides(config: Config, overrides: list[str]) -> Config:
    """A copy of `config` with `--set`-style overrides, validated like any recipe."""
    return config_from_dict(config.to_dict(), overrides)


def unigram_losses(data: DataConfig, vocab_size: int) -> dict[str, float]:
    """Cross-entropy (nats/token) of each source's validation tokens under the unigram distribution
    of its training tokens (add-1/2 smoothing): the loss of a model that ignores context."""
    from smoltrain.data.shards import TokenSource

    def tokens(folder: str, start: int = 0, size: int | None = None) -> np.ndarray:
        source = TokenSource(folder)
        out = np.empty(min(size or source.num_tokens, source.num_tokens - start), dtype=np.int64)
        source.read(start, out)
        source.close()
        return out

    losses = {}
    for source, val_folder in data.validation.items():
        counts, start = np.zeros(vocab_size, dtype=np.int64), 0
        while len(chunk := tokens(data.sources[source], start, 1 << 20)):  # 1M tokens at a time
            counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
            start += len(chunk)
        log_probs = np.log((counts + 0.5) / (counts.sum() + 0.5 * vocab_size))
        losses[source] = float(-log_probs[tokens(val_folder)].mean())
    return losses


def matmul_peak_tflops(trials: int = 10, seconds: float = 0.1) -> float:
    """This CPU's matmul throughput in fp32 and bf16, whichever is faster, the best of short trials (a
    busy neighbour only lowers some): the peak MFU is quoted against on CPU. (An fp32-only peak put a
    bf16-compiled run at "MFU 165%" on a CPU with native bf16.)"""
    best = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        a @ b
        for _ in range(trials // 2 if dtype == torch.bfloat16 else trials):
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                a @ b
                count += 1
            best = max(best, 2 * 1024**3 * count / (time.perf_counter() - start))
    return best / 1e12


# ----------------------------------------------------------------------------- speed and budget


def choose_speed(probe: dict, training_s: float, compiled_stages: int) -> str:
    """The configuration that trains the most tokens in `training_s` seconds when each of
    `compiled_stages` stages pays its compile (warm, from the caches the probe's cold compile filled)."""
    def tokens(entry: dict) -> float:
        return entry["tokens_per_s"] * max(0.0, training_s - compiled_stages * entry.get("recompile_s", 0.0))

    return max(probe["configs"], key=lambda name: tokens(probe["configs"][name]))


def stage_settings(probe: dict | None, choice: str | None, fixed_shapes: bool) -> dict:
    """train.precision / train.compile of a stage: the choice, but eager for stages whose batches change
    length every step (preference pairs, rollouts), where compile would recompile (then the faster eager)."""
    if probe is None or choice is None:
        return {"precision": "auto", "compile": "auto"}
    configs = probe["configs"]
    if not fixed_shapes and configs[choice]["compile"] == "on":
        eager = {k: v for k, v in configs.items() if v["compile"] == "off" and v["tokens_per_s"]}
        if not eager:  # a forced compiled configuration: its precision, eager
            precision = configs[choice]["precision"]
            return {"precision": precision, "compile": "off", "name": f"{precision} eager", "tokens_per_s": None}
        choice = max(eager, key=lambda k: eager[k]["tokens_per_s"])
    return {"precision": configs[choice]["precision"], "compile": configs[choice]["compile"], "name": choice,
            "tokens_per_s": configs[choice]["tokens_per_s"]}


def reserve_seconds(pending: list[str], rows_left: int, row_s: float) -> float:
    """Non-training work still to come: each row's evaluation, pairs, merge, long-context evals, export, report."""
    extra = {"apo": "preferences", "merge": "merge", "long-context": "long-context"}
    return (rows_left * row_s + RESERVE_S["export"] + RESERVE_S["report"]
            + sum(RESERVE_S[extra[s]] for s in pending if s in extra))


def nominal_seconds(training_s: float, stages: list[str]) -> dict[str, float]:
    """Each training stage's share of `training_s` (shares renormalised over the stages that run)."""
    trained = [s for s in stages if s in TRAIN_SHARES]
    total = sum(TRAIN_SHARES[s] for s in trained)
    return {s: training_s * TRAIN_SHARES[s] / total for s in trained}


def pretraining_left(left_s: float, pending: list[str], nominal: dict[str, float]) -> tuple[float, list[str]]:
    """What the pretraining stages may share of `left_s`, and which of them are pending: the stages
    after them keep their nominal time, so time lost before them (an install, a cold compile) comes out
    of pretraining. A fresh clone's SFT got 666 steps instead of 999 when every stage shrank alike (issue
    24), and a shorter pretraining costs the card least: its loss curve is still falling either way."""
    held = sum(nominal[s] for s in pending if s in nominal and s not in PRETRAINING_STAGES)
    return left_s - held, [s for s in pending if s in PRETRAINING_STAGES]


def stage_seconds(stage: str, left_s: float, pending: list[str], nominal_s: float) -> float:
    """`stage`'s share of the training time really left (`left_s`) among the pending training stages,
    never less than STAGE_FLOOR of its nominal time."""
    share = TRAIN_SHARES[stage] / sum(TRAIN_SHARES[s] for s in pending if s in TRAIN_SHARES)
    return max(left_s * share, STAGE_FLOOR * nominal_s)


def _warmup(config: Config, steps: int) -> int:
    """The recipe's warmup, shortened to a tenth of a budget too small for it."""
    return max(1, min(config.optim.warmup_steps, steps // 10))


def _probe_and_choose(base: Config, trained: list[str], nominal: dict[str, float], speed: str | None, on_cpu: bool,
                      console: Console) -> tuple[dict | None, str | None]:
    """(the speed probe, the chosen configuration): `speed` when given ("bf16 compile"), else measured on a CPU."""
    if speed is not None:
        names = {f"{p} {'compile' if c == 'on' else 'eager'}": (p, c) for p in ("fp32", "bf16") for c in ("off", "on")}
        if speed not in names:
            raise ConfigError(f"speed must be one of {', '.join(names)}, got {speed!r}")
        return {"configs": {speed: {"precision": names[speed][0], "compile": names[speed][1], "tokens_per_s": None}},
                "native_bf16": None, "forced": True}, speed
    if not (on_cpu and trained):
        return None, None
    probe = probe_speed(base)
    # the stages with fixed shapes (the choice applies to them; the others run eager): long-context alone
    # trained nothing here before, and an empty sum picked fp32 eager at 0.6x bf16 + compile
    fixed = ("ablation", "pretrain", "sft", "long-context")
    compiled = len([s for s in trained if s in fixed]) + 3 * ("ablation" in trained)
    choice = choose_speed(probe, sum(nominal.get(s, 0.0) for s in fixed), compiled)
    for name, entry in probe["configs"].items():
        compile_note = (f", compile {entry['compile_s']:.1f} s (then {entry['recompile_s']:.1f} s)"
                        if entry["compile"] == "on" else "")
        console.print(f"  {name:<13} {entry['tokens_per_s']:>9,.0f} tokens/s{compile_note}"
                      + ("   <- chosen" if name == choice else ""))
    if not probe["native_bf16"]:
        console.print("  no native bf16 on this CPU: fp32 only (bf16 would be emulated)")
    return probe, choice


# ----------------------------------------------------------------------------- stages and folders


def parse_stages(text: str | None) -> list[str]:
    """`--stages sft,apo` -> the named stages in playbook order; one-line error with a hint otherwise."""
    if text is None:
        return list(DEFAULT_STAGES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in STAGES:
            close = difflib.get_close_matches(name, STAGES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (expected some of: {', '.join(STAGES)})"
            raise ConfigError(f"--stages: unknown stage '{name}'{hint}")
    if not names:
        raise ConfigError(f"--stages names no stage (expected some of: {', '.join(STAGES)})")
    return [s for s in STAGES if s in names]


def reused_records(source: Path, run: list[str]) -> dict[str, dict]:
    """The finished stages of an earlier demo folder that this run keeps: those not re-run and with no
    re-run stage upstream of them (a re-run SFT makes the old APO stale)."""
    try:
        records = json.loads((source / MARKER).read_text()).get("stages", {}) if (source / MARKER).is_file() else {}
    except json.JSONDecodeError:
        records = {}
    return {s: records[s] for s in STAGES if s not in run and (records.get(s) or {}).get("done")
            and not any(u in run for u in STEP[s].upstream)}


def _reused_stages(out: Path, run: list[str], from_run: str | None) -> tuple[Path | None, dict[str, dict], bool]:
    """(the demo folder stages are reused from, their records, whether it is `out` itself); every stage
    that runs must find the ones it starts from, run now or reused."""
    # by default a subset reuses the output folder's earlier stages, when it has any
    source = Path(from_run) if from_run else (out if set(DEFAULT_STAGES) - set(run) and (out / MARKER).is_file() else None)
    if source is not None and not (source / MARKER).is_file():
        raise ConfigError(f"--from {source}: not a demo folder (no {MARKER})")
    keep = reused_records(source, run) if source is not None else {}
    for stage in run:
        missing = [n for n in STEP[stage].needs if n not in run and n not in keep]
        if missing:
            raise ConfigError(f"--stages {stage} needs a finished {missing[0]} stage: add it to --stages, or name a "
                              f"demo folder that has one with --from")
    return source, keep, source is not None and source.resolve() == out.resolve()


def _prepare_out_dir(out: Path, keep: dict[str, dict], same_folder: bool) -> None:
    """Empties the output folder but for the reused stages' folders; refuses a folder the demo did not make."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"{out} exists and is not a demo folder: choose another --out")
    kept = {name for record in keep.values() for name in record.get("folders", [])} if same_folder else set()
    kept |= {"recipes"} if kept else set()  # a re-run stage rewrites its own recipe only
    for child in (out.iterdir() if out.exists() else []):
        if child.name not in kept and child.name != MARKER and not child.name.startswith("."):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _fixed_steps(steps: dict[str, int] | None, ablation_steps: int | None, pretrain_steps: int | None) -> dict[str, int]:
    """Stages with fixed steps (no time box), from `steps` and the two CLI flags, each at least 1."""
    steps = {**(steps or {}), **{k: v for k, v in (("ablation", ablation_steps), ("pretrain", pretrain_steps))
                                 if v is not None}}
    for name, value in steps.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name}-steps must be at least 1, got {value}")
    return steps


# ----------------------------------------------------------------------------- the demo


class DemoRun:
    """One demo run: its shared state (the output folder, the stage records, the report card's rows, the
    time budget, the speed settings) and a method per stage, which `demo()` calls in STEPS order."""

    def __init__(self, out: Path, run: list[str], keep: dict[str, dict], source: Path | None, recipe_path: Path,
                 base: Config, minutes: float, sizes: PostSizes, steps: dict[str, int], console: Console,
                 before_s: float = 0.0):
        self.out, self.run, self.keep, self.recipe_path, self.base = out, run, keep, recipe_path, base
        self.minutes, self.budget_s, self.sizes, self.steps, self.console = minutes, minutes * 60, sizes, steps, console
        self.records: dict[str, dict] = dict(keep)
        self.marker = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": self.records}
        write_json(out / MARKER, self.marker)
        headers = {"ablation": 1, "apo": 3, "long-context": 2}  # apo: pairs, training, evals
        self.bar = Stages(console, 4 + sum(headers.get(s, 2) for s in run), before_s)
        if before_s:
            console.print(f"the command started {before_s:.0f} s before the demo (install, cold caches): "
                          f"the {minutes:g}-minute budget counts them")
        self.facts: dict = {"recipe": str(recipe_path), "minutes": minutes, "device": _device_name(), "run": run,
                            "reused_from": str(source) if keep else None, "records": self.records, "sizes": sizes}
        self.rows: dict[str, dict] = {STEP[s].row: json.loads(Path(r["row"]).read_text()) for s, r in keep.items()
                                      if r.get("row")}
        self.row_s = RESERVE_S["row"]  # one row's evaluation, re-estimated from each one measured

    def run_step(self, step: Step) -> None:
        """One stage: skipped with the reason when its library or its starting stage is missing, else run,
        recorded and evaluated into its row of the report card."""
        missing = post.stage_available(step.name)
        absent = [n for n in step.needs if not self.records.get(n, {}).get("model")]
        if not missing and absent:
            missing = f"stage not available: it starts from the {absent[0]} stage, which did not run"
        if missing:
            self.console.print(f"[yellow]{step.name}: {missing}[/yellow]")
            self.records[step.name] = {"done": False, "skipped": missing}
            return
        record = getattr(self, step.name.replace("-", "_"))(step)
        if record is None:
            return
        record.update(done=True, folders=list(step.folders), wall_s=self.bar.wall.get(step.name))
        self.records[step.name] = record
        write_json(self.out / MARKER, self.marker)
        if step.row:
            self.evaluate(step.name, step.row, record["model"])

    def seconds_for(self, stage: str) -> float:
        """The stage's time box, planned from what is really left now (inf for fixed steps)."""
        if stage in self.steps:
            return float("inf")
        pending = [s for s in self.run if s not in self.records or s == stage]
        pending = pending[pending.index(stage):]
        rows_left = len([s for s in pending if STEP[s].row])
        left = self.budget_s - self.bar.elapsed() - reserve_seconds(pending, rows_left, self.row_s)
        if stage in PRETRAINING_STAGES:
            left, pending = pretraining_left(left, pending, self.nominal)
        seconds = stage_seconds(stage, left, pending, self.nominal[stage])
        late = seconds > left * TRAIN_SHARES[stage] / sum(TRAIN_SHARES[s] for s in pending if s in TRAIN_SHARES) + 1e-9
        self.console.print(f"  time box: {seconds:.0f} s" + (" (the floor: earlier stages overran, so the demo ends "
                                                            "late)" if late else ""))
        return seconds

    def train(self, step: Step, raw: dict, seconds: float) -> dict:
        """Write a training stage's recipe, run it with its kind's run function in its time box; its record."""
        path = post.write_recipe(self.out / "recipes" / f"{step.name}.yaml", raw)
        self.console.print(f"  from {raw['train'].get('init') or 'scratch'}; recipe {path}; up to "
                           f"{raw['train']['max_steps']} steps, {raw['train'].get('precision')} precision")
        summary, stopped = run_recipe(step.kind, path, seconds, self.console)
        if stopped:
            self.console.print(f"  time budget reached: {step.name} stopped at step {summary['step']}")
        return {"summary": summary, "stopped_by_budget": stopped, "model": raw["train"]["out_dir"], "recipe": str(path),
                "planned_s": seconds if seconds != float("inf") else None, "init": raw["train"].get("init")}

    def evaluate(self, stage: str, name: str, model_path: str) -> None:
        """The report card's row `name` for the model of `stage`."""
        out = self.out
        with self.bar(f"{name} evals", f"evaluate {name}: chat evals, pretraining evals, sample chats"):
            self.rows[name] = post.evaluate_row(model_path, self.chat_tok, self.data.tokenizer, self.eval_config, self.sizes,
                                                out / "rows" / f"{name}.json", out / "eval.json" if name == "base" else None)
            _print_row(self.console, name, self.rows[name])
        self.row_s = self.bar.wall[f"{name} evals"]
        if Path(model_path).resolve().is_relative_to(out.resolve()):  # never into a reused folder elsewhere
            # the stage's final chat evals beside its model, where sft and dpo keep theirs: the model card reads them
            write_json(Path(model_path) / CHAT_EVALS, {"chat": self.rows[name]["chat"], "vibe": self.rows[name]["samples"]})
        self.records[stage]["row"] = str(out / "rows" / f"{name}.json")
        write_json(out / MARKER, self.marker)

    @functools.cached_property
    def pretrain_config(self) -> Config:
        """The base model's config, read once when the first stage after pretraining needs it."""
        return load_config(self.records["pretrain"]["config"]) if "pretrain" in self.records else self.base_config

    def start_model(self, stage: str) -> str:
        """The newest model of the chain before `stage`."""
        chain = CHAIN[: CHAIN.index(stage)] if stage in CHAIN else CHAIN
        return next(self.records[s]["model"] for s in reversed(chain) if self.records.get(s, {}).get("model"))

    # ------------------------------------------------------------------------- before the stages

    def prepare_data(self) -> None:
        """Data: corpus -> tokenizer -> shards (cached after the first run)."""
        from smoltrain.data.embedded import ensure_embedded_data

        with self.bar("data", "data: embedded corpus, tokenizer, shards"):
            self.data = ensure_embedded_data(self.base.data)
            manifest = json.loads((Path(self.data.tokenizer).parent / "manifest.json").read_text())
            for key, value in manifest["tokens"].items():
                self.console.print(f"  {key:<18} {value:>12,} tokens")
            self.chat_tok = post.chat_tokenizer(self.data.tokenizer, self.out)
        self.facts["data"] = {"manifest": manifest, "cached": self.bar.wall["data"] < 0.5 * sum(manifest["timings"].values())}

    def plan(self, speed: str | None) -> None:
        """Reference points, this machine's speed in each precision, and the plan."""
        base, run, console = self.base, self.run, self.console
        with self.bar("baselines", "baselines, speed probe and budget"):
            self.unigram = unigram_losses(self.data, base.model.vocab_size)
            console.print("  unigram loss (nats/token): " + ", ".join(f"{s} {v:.3f}" for s, v in self.unigram.items()))
            on_cpu = resolve_device(base.train.device).type == "cpu"
            peak = matmul_peak_tflops() if on_cpu else None  # on CUDA the trainer knows the accelerator's peak
            trained = [s for s in run if s in TRAIN_SHARES]
            rows = len([s for s in run if STEP[s].row]) + ("pretrain" in self.keep and "base" not in self.rows)
            # the demo's own time so far, not the command's: the nominal plan is a fresh machine's, and
            # pretraining's box gives back what the install and cold caches took (pretraining_left)
            left = self.budget_s - (self.bar.elapsed() - self.bar.before_s) - reserve_seconds(run, rows, RESERVE_S["row"])
            self.nominal = nominal_seconds(max(left, 0.0), trained)
            self.probe, self.choice = _probe_and_choose(base, trained, self.nominal, speed, on_cpu, console)
            self.settings = {"fixed": stage_settings(self.probe, self.choice, True),
                             "variable": stage_settings(self.probe, self.choice, False)}
            console.print(f"  matmul peak {peak * 1e3:.1f} GFLOP/s (fp32); plan: " if peak else "  plan: ", end="")
            console.print(", ".join(f"{s} {v:.0f} s" for s, v in self.nominal.items()))
            self.facts.update(unigram=self.unigram, peak_tflops=peak, probe=self.probe, speed_choice=self.choice,
                              speed=self.settings, nominal_s=self.nominal)
        fixed = self.settings["fixed"]
        self.base_config = with_overrides(base, [f"train.peak_tflops={json.dumps(peak)}", f"train.precision={fixed['precision']}",
                                                 f"train.compile={fixed['compile']}"])
        self.eval_config = with_overrides(self.base_config, ["eval.tasks=[]", f"eval.val_batches={self.sizes.val_batches}"])
        self.gbt = base.train.global_batch_tokens
        self.rate = fixed.get("tokens_per_s") and (1 - PLAN_OVERHEAD) * fixed["tokens_per_s"]  # None: no probe

    # ------------------------------------------------------------------------- the stages, in STEPS order

    def ablation(self, step: Step) -> dict:
        """Intra-document masking on/off, 2 seeds, judged against the seed-to-seed spread."""
        from smoltrain.ablate.grid import ablate
        from smoltrain.ablate.spec import AblationSpec
        from smoltrain.report.run import median_of, read_metrics

        gbt, rate = self.gbt, self.rate
        with self.bar(step.name, step.title):
            n = self.steps.get("ablation") or (int(np.clip(self.seconds_for("ablation") * rate / (4 * gbt), 6, 60))
                                               if rate else 60)
            self.console.print(f"  ablation budget: {n} steps x {gbt:,} tokens per run, 4 runs")
            raw = self.base_config.to_dict()
            raw["train"].update(eval_every=n, save_every=n, log_every=max(1, n // 10), tensorboard=False)
            raw["optim"]["warmup_steps"] = _warmup(self.base, n)
            ablation = ablate(spec=AblationSpec(
                name="document-masking", baseline=raw,
                variants={"baseline": [], "no-document-masking": ["model.document_masking=false"]},
                seeds=[0, 1], budget_steps=n, eval={"tasks": [], "val_batches": VAL_BATCHES},
                out_dir=str(self.out / "ablation"), source=f"{self.recipe_path} (smoltrain demo)"), console=self.console)
            runs = [r for arm in ablation["arms"].values() for r in arm["runs"]]
            # Plan pretraining from the fastest run's steady tokens/s (the median of its logged intervals;
            # a run of a few steps is mostly startup, compile and evaluation) less PLAN_OVERHEAD, never below
            # its tokens per wall second. The ablation runs the chosen (compiled) configuration on purpose:
            # the probe's few steps under-read a compiled step ~3x (3.6k vs 11.5k tokens/s), and its cold
            # compiles warm the caches pretraining then uses.
            steady = max(median_of(read_metrics(r["run_dir"])[0], "tokens_per_s") or 0.0 for r in runs)
            self.rate = max(max(r["tokens"] / r["wall_s"] for r in runs), (1 - PLAN_OVERHEAD) * steady)
        return {"results": str(self.out / "ablation" / "results.json"), "steps": n, "planning_tokens_per_s": self.rate}

    def pretrain(self, step: Step) -> dict:
        """Pretraining in its time box (its row follows)."""
        out, gbt, rate = self.out, self.gbt, self.rate
        with self.bar(step.name, step.title):
            seconds = self.seconds_for("pretrain")
            n = self.steps.get("pretrain") or (int(np.clip(0.95 * seconds * rate / gbt, 10, 5000)) if rate
                                               else self.base.train.max_steps)
            self.console.print(f"  {n} steps x {gbt:,} tokens" + (f" at {rate:,.0f} tokens/s" if rate else "")
                               + f", {self.settings['fixed'].get('name', 'the recipe precision')}")
            raw = with_overrides(self.base_config, [
                f"train.out_dir={json.dumps(str(out / 'pretrain'))}", f"train.max_steps={n}",
                f"train.eval_every={max(1, n // 4)}", f"train.save_every={n}", f"train.log_every={max(1, n // 50)}",
                "eval.tasks=[]", f"eval.val_batches={VAL_BATCHES}", f"optim.warmup_steps={_warmup(self.base, n)}",
            ]).to_dict()
            record = self.train(step, raw, seconds)
        return {**record, "config": str(out / "pretrain" / "config.yaml"), "steps": n}

    def sft(self, step: Step) -> dict:
        """SFT trains pretraining's shape at its speed: steps planned from pretraining's steady tokens/s."""
        config, sizes = self.pretrain_config, self.sizes
        with self.bar(step.name, step.title):
            seconds = self.seconds_for("sft")
            measured = pretrain_rate(self.records)
            tokens_per_s = ((1 - PLAN_OVERHEAD) * measured if measured else self.rate) \
                or self.settings["fixed"].get("tokens_per_s") or 1e4
            rows_rate = tokens_per_s / (sizes.sft_rows_per_step * config.data.seq_len)
            n = self.steps.get("sft") or int(np.clip(0.9 * seconds * rows_rate, 3, 100_000))
            raw = post.sft_recipe(config, self.start_model("sft"), self.out / "sft", n, self.settings["fixed"], sizes)
            record = self.train(step, raw, seconds)
        return {**record, "tokenizer": str(Path(record["model"]) / "tokenizer" / "tokenizer.json")}

    def apo(self, step: Step) -> dict | None:
        """Preference pairs from the SFT model's own rule-breaking replies, then APO-zero (None: no pair kept)."""
        with self.bar("preferences", "preference pairs: rule-keeping replies vs the SFT model's own rule-breaking ones"):
            pairs = post.build_pairs(Path(self.records["sft"]["model"]), self.out / "preferences", self.sizes, self.console)
        if not pairs["kept"]:
            self.records["apo"] = {"done": False, "skipped": "no preference pair was kept", "pairs": pairs}
            self.console.print("[yellow]apo: no preference pair was kept: stage skipped[/yellow]")
            return None
        with self.bar(step.name, step.title):
            raw = post.apo_recipe(self.pretrain_config, self.start_model("apo"), Path(self.records["sft"]["tokenizer"]),
                                  pairs["files"], self.out / "apo", pairs["kept"], self.settings["variable"], self.sizes)
            raw["train"]["max_steps"] = self.steps.get("apo", raw["train"]["max_steps"])
            return {**self.train(step, raw, self.seconds_for("apo")), "pairs": pairs}

    def grpo(self, step: Step) -> dict:
        """GRPO: the deadline decides (rollouts' speed is not probed; constant lr): a cap it comes before."""
        with self.bar(step.name, step.title):
            raw = post.grpo_recipe(self.pretrain_config, self.start_model("grpo"), Path(self.records["sft"]["tokenizer"]),
                                   self.out / "grpo", self.steps.get("grpo") or 200, self.settings["variable"], self.sizes)
            return self.train(step, raw, self.seconds_for("grpo"))

    def merge(self, step: Step) -> dict:
        with self.bar(step.name, step.title):
            record = post.run_merge(Path(self.records["apo"]["model"]), Path(self.records["pretrain"]["model"]),
                                    self.out / "merge", self.sizes)
            self.console.print(f"  soup of {len(record['soup_of'])} checkpoints -> {record['soup']}; "
                               f"0.9 soup + 0.1 base -> {record['model']}")
        return record

    def long_context(self, step: Step) -> dict:
        """ABF at 8x the training length in its time box; needle accuracy and loss by position of the base
        model, the base with YaRN x8 (no training) and the extended model."""
        config, base_model = self.pretrain_config, self.records["pretrain"]["model"]
        with self.bar(step.name, step.title):
            seconds = self.seconds_for("long-context")
            raw = post.long_context_recipe(config, base_model, self.out / "long-context", self.settings["fixed"])
            # attention's share of a step grows with the length: planned at half pretraining's rate
            rate = 0.5 * (pretrain_rate(self.records) or self.rate or 1e4)
            n = self.steps.get("long-context") or int(np.clip(0.9 * seconds * rate / raw["train"]["global_batch_tokens"], 3, 5000))
            raw["train"].update(max_steps=n, eval_every=n, save_every=n, log_every=max(1, n // 20))
            raw["optim"]["warmup_steps"] = max(1, min(raw["optim"]["warmup_steps"], n // 10))
            record = self.train(step, raw, seconds)
        with self.bar("long-context evals", "long context: needle accuracy and loss by position, before and after"):
            record["evals"] = post.long_context_evals(base_model, record["model"], self.data.tokenizer, config,
                                                      raw["data"]["seq_len"], self.sizes, self.console)
        self.facts["long_context"] = record["evals"]
        return record

    # ------------------------------------------------------------------------- after the stages

    def export(self) -> None:
        """Export the final model to Hugging Face (with its model card) and load it back with transformers."""
        final = next((self.records[s] for s in ("merge", "grpo", "apo", "sft", "pretrain")
                      if self.records.get(s, {}).get("model")), None)
        if final is None:
            return
        with self.bar("export", "export to Hugging Face and load with transformers"):
            export = export_and_reload(final["model"], self.data, self.pretrain_config, self.out / "hf")
            self.console.print(f"  {export['architecture']} in {export['path']}: max |logit diff| "
                               f"{export['max_logit_diff']:.2e}, greedy continuation identical: {export['greedy_match']}; "
                               f"model card: {export['card_stages']}")
        self.facts["export"] = export

    def report(self) -> Path:
        """One report (its own stage's time is known once the figures are drawn; writing is instant)."""
        from smoltrain.report.demo_report import add_wall_times, build_demo_report, print_summary

        bar = self.bar
        with bar("report", "report"):
            self.facts["rows"] = self.rows
            report = build_demo_report(self.out, self.facts, self.pretrain_config, bar.elapsed())
        add_wall_times(report, self.out / "figures", bar.wall, bar.elapsed())
        md_path, html_path = report.write(self.out)
        self.marker.update(wall_s=bar.wall, total_s=bar.elapsed(), speed_choice=self.choice, probe=self.probe,
                           minutes=self.minutes, device=self.facts["device"], unigram=self.unigram)
        write_json(self.out / MARKER, self.marker)
        print_summary(self.console, self.facts, bar.elapsed())
        self.console.print(f"report: {html_path} (markdown: {md_path})", soft_wrap=True)
        return html_path


def demo(out_dir: str = "runs/smoltrain-demo", minutes: float = 15.0, recipe: str | None = None,
         console: Console | None = None, suite_items: int | None = None, ablation_steps: int | None = None,
         pretrain_steps: int | None = None, stages: str | list[str] | None = None, from_run: str | None = None,
         steps: dict[str, int] | None = None, sizes: PostSizes | None = None, speed: str | None = None,
         started: float | None = None) -> Path:
    """Run the playbook; returns the path of the HTML report (markdown beside it).

    stages: some of STAGES (a list or "sft,apo"; default all but long-context); the others are reused from
    `from_run` (default: the output folder itself when a subset is asked for). ablation_steps /
    pretrain_steps / steps ({"sft": 20, "apo": 4, "grpo": 3, "long-context": 5}): fixed steps instead of
    ones derived from `minutes` and the measured throughput. sizes: how much each post-training stage and
    evaluation does. speed: "fp32 eager", "bf16 compile", ... without probing. started: when the user's
    command started (seconds since the epoch; `make demo` passes its own), from which the budget counts."""
    console = console or Console(highlight=False)
    sizes = sizes or PostSizes()
    if suite_items is not None:
        sizes.suite_items = suite_items
    steps = _fixed_steps(steps, ablation_steps, pretrain_steps)
    if minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {minutes}")
    before_s = 0.0 if started is None else time.time() - started
    if not 0 <= before_s < 86400:
        raise ConfigError(f"--started must be a time (seconds since the epoch) in the last day, got {started}")
    run = parse_stages(",".join(stages) if isinstance(stages, list) else stages)
    recipe_path = Path(recipe) if recipe else RECIPE
    base = load_config(recipe_path)
    if not base.data.embedded:
        raise ConfigError(f"{recipe_path}: the demo trains on the embedded corpus (data.embedded: true)")
    out = Path(out_dir)
    source, keep, same_folder = _reused_stages(out, run, from_run)
    _prepare_out_dir(out, keep, same_folder)
    demo_run = DemoRun(out, run, keep, source, recipe_path, base, minutes, sizes, steps, console, before_s)
    demo_run.prepare_data()
    demo_run.plan(speed)
    for step in STEPS:
        if step.name in run:
            demo_run.run_step(step)
        elif step.row == "base" and "pretrain" in keep and "base" not in demo_run.rows:  # reused, never evaluated
            demo_run.evaluate("pretrain", "base", keep["pretrain"]["model"])
    demo_run.export()
    return demo_run.report()


def pretrain_rate(records: dict) -> float | None:
    """The median logged tokens/s of this demo's pretraining run (None when it did not run here)."""
    from smoltrain.report.run import median_of, read_metrics

    model = records.get("pretrain", {}).get("model")
    if not model or not (Path(model) / "metrics.jsonl").is_file():
        return None
    return median_of(read_metrics(model)[0], "tokens_per_s")


def _print_row(console: Console, name: str, row: dict) -> None:
    c = row["chat"]
    console.print(f"  {name}: no_think {c['no_think_accuracy']:.0%}, think {c['think_accuracy']:.0%}, "
                  f"adherence {c['adherence']:.0%}, format {c['think_format']:.0%}, stop {c['stop_rate']:.0%}, "
                  f"length {c['no_think_length']:.0f}/{c['think_length']:.0f} tokens; suite centred "
                  f"{row['suite']['centred']:+.3f}; {row['wall_s']:.0f} s")


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def export_and_reload(model_path: str, data: DataConfig, config: Config, hf_dir: Path) -> dict:
    """Export a model folder (its model card walks the stages back from it), load it with
    transformers, compare logits on validation text and greedy continuations with ours."""
    from transformers import AutoModelForCausalLM

    from smoltrain.data.loader import validation_batches
    from smoltrain.model.generate import generate
    from smoltrain.report.hf_export import export_hf
    from smoltrain.report.model_card import lineage
    from smoltrain.train.load_model import load_any

    model, _, known = load_any(model_path)
    model = model.float().eval()
    path = export_hf(model_path, hf_dir, tokenizer=None if known else data.tokenizer, dtype=torch.float32)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = next(iter(validation_batches(config, next(iter(data.validation)), 1, 2)))
    with torch.no_grad():
        ours, theirs = model(batch["input_ids"]), hf_model(input_ids=batch["input_ids"]).logits
        prompt = batch["input_ids"][0, :16].tolist()
        greedy_ours = generate(model, [prompt], 24)[0]
        greedy_hf = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    return {"path": str(path), "model": str(model_path),
            "architecture": json.loads((path / "config.json").read_text())["architectures"][0],
            "max_logit_diff": float((ours - theirs).abs().max()), "greedy_match": greedy_ours == greedy_hf,
            "files": sorted(p.name for p in path.iterdir()),
            "card_stages": " -> ".join(s.objective for s in lineage(model_path))}


__all__ = ["demo", "DemoRun", "STEPS", "STAGES", "unigram_losses", "matmul_peak_tflops", "probe_speed",
           "choose_speed", "stage_seconds", "nominal_seconds", "parse_stages", "export_and_reload"]
