"""`smoltrain demo`: the whole playbook in miniature on the embedded corpus, ending in one report.

STEPS chains the stages as nanochat's speedrun chains its scripts: each step names its training stage in the registry
(smoltrain/stages.py), the steps it starts from, its share of the time and its report card row; steps.py says what
each does. A training step runs in a time box re-planned from what is really left, never below half its nominal share
(a slowed machine ends late rather than reporting stages trained for three seconds). `--stages` runs a subset and
reuses the others from `--from` (default: the output folder).
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

import torch
import yaml
from rich.console import Console

from smoltrain.config import Config, apply_overrides, config_from_dict, load_config
from smoltrain.demo import steps as demo_steps
from smoltrain.demo.report import CHAT_METRICS, add_wall_times, build_demo_report, print_summary
from smoltrain.demo.steps import PLAN_OVERHEAD, RECIPES, DemoSizes
from smoltrain.errors import ConfigError
from smoltrain.files import write_atomic, write_json
from smoltrain.report.model_card import CHAT_EVALS
from smoltrain.stages import STAGES as TRAINING_STAGES
from smoltrain.train import speed as speeds
from smoltrain.train.distributed import resolve_device

MARKER = "demo.json"  # marks a folder as the demo's own output, which a re-run may replace


@dataclass(frozen=True)
class Step:
    """A step of the chain: what it is called, its training stage, its time, its row, what it needs and writes."""

    name: str  # what --stages names
    title: str
    kind: str | None  # its training stage in smoltrain/stages.py (None: trains nothing, or a grid of runs)
    share: float  # of the training time (what is left after the reserves), before floors; 0: trains nothing
    row: str | None = None  # its model's row of the report card
    needs: tuple[str, ...] = ()  # steps that must have finished (run now or reused)
    upstream: tuple[str, ...] = ()  # steps whose re-run makes it stale
    folders: tuple[str, ...] = ()  # what it writes under the output folder
    reserve_s: float = 0.0  # its work besides training and its row (pairs, merge, evals): seconds on 2 idle cores


STEPS = (
    Step("ablation", "ablation: document masking on/off x 2 seeds", None, 0.08, folders=("ablation",)),
    Step("pretrain", "pretrain the demo model", "pretrain", 0.42, "base", folders=("pretrain", "eval.json", "rows")),
    Step("sft", "SFT on the embedded chat data", "sft", 0.24, "sft", ("pretrain",), ("pretrain",), ("sft",)),
    Step("apo", "APO-zero on generated instruction-following pairs", "dpo", 0.08, "apo", ("sft",), ("pretrain", "sft"),
         ("preferences", "apo"), 30.0),
    Step("grpo", "GRPO in no_think mode with the overlong penalty", "grpo", 0.18, "grpo", ("sft",), ("pretrain", "sft", "apo"),
         ("grpo",)),  # from APO's model when it has one, else SFT's
    Step("merge", "merge: soup of the last APO checkpoints, then 0.9 soup + 0.1 base", None, 0.0, "merged", ("apo", "pretrain"),
         ("pretrain", "sft", "apo"), ("merge",), 5.0),
    # opt-in (not in the default run): 8x the training length with ABF, YaRN without training beside it
    Step("long-context", "long context: ABF to 8x the training length, YaRN for comparison", "pretrain", 0.3, None,
         ("pretrain",), ("pretrain",), ("long-context",), 60.0),
)
STEP = {s.name: s for s in STEPS}
STAGES, DEFAULT_STAGES = tuple(STEP), tuple(STEP)[:-1]  # what --stages names; what runs without it
TRAIN_SHARES = {s.name: s.share for s in STEPS if s.share}
PRETRAINING = ("ablation", "pretrain")
CHAIN = ("pretrain", "sft", "apo", "grpo")  # a post-training stage starts from the newest model of it before itself
FIXED_SHAPES = ("ablation", "pretrain", "sft", "long-context")  # the speed choice applies; the others run eager
STAGE_FLOOR = 0.5  # a stage never gets less than this share of its nominal time, even when earlier ones overran
ROW_S, FINAL_S = 45.0, 25.0  # a row's evaluation (re-estimated from each one measured); the export and report


def nominal_seconds(training_s: float, stages: list[str]) -> dict[str, float]:
    """Each training stage's share of `training_s` (shares renormalised over the stages that run)."""
    trained = [s for s in stages if s in TRAIN_SHARES]
    return {s: training_s * TRAIN_SHARES[s] / sum(TRAIN_SHARES[t] for t in trained) for s in trained}


def reserve_seconds(pending: list[str], rows_left: int, row_s: float) -> float:
    """Work still to come besides training: each row's evaluation, each step's own, the export and report."""
    return rows_left * row_s + FINAL_S + sum(STEP[s].reserve_s for s in pending)


def pretraining_left(left_s: float, pending: list[str], nominal: dict[str, float]) -> tuple[float, list[str]]:
    """What the pretraining stages may share of `left_s`, and which are pending: the later stages keep their nominal
    time, so time lost before (an install, a cold compile) comes out of pretraining, which it costs least (its loss
    is still falling either way; a fresh clone's SFT got 666 steps instead of 999 when every stage shrank alike)."""
    held = sum(nominal[s] for s in pending if s in nominal and s not in PRETRAINING)
    return left_s - held, [s for s in pending if s in PRETRAINING]


def stage_seconds(stage: str, left_s: float, pending: list[str], nominal_s: float) -> float:
    """`stage`'s share of the training time really left among the pending training stages, never less than
    STAGE_FLOOR of its nominal time."""
    share = TRAIN_SHARES[stage] / sum(TRAIN_SHARES[s] for s in pending if s in TRAIN_SHARES)
    return max(left_s * share, STAGE_FLOOR * nominal_s)


def parse_stages(text: str | None) -> list[str]:
    """`--stages sft,apo` -> the named stages in playbook order; one-line error with a hint otherwise."""
    names = list(DEFAULT_STAGES) if text is None else [n.strip() for n in text.split(",") if n.strip()]
    if bad := [n for n in names if n not in STAGES] or ([] if names else [""]):
        close = difflib.get_close_matches(bad[0], STAGES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (expected some of: {', '.join(STAGES)})"
        raise ConfigError(f"--stages: unknown stage '{bad[0]}'{hint}" if bad[0] else f"--stages names no stage{hint}")
    return [s for s in STAGES if s in names]


def reused_records(source: Path, run: list[str]) -> dict[str, dict]:
    """The finished stages of an earlier demo folder that this run keeps: those not re-run and with no re-run
    stage upstream of them (a re-run SFT makes the old APO stale)."""
    records = json.loads((source / MARKER).read_text()).get("stages", {}) if (source / MARKER).is_file() else {}
    return {s: records[s] for s in STAGES if s not in run and (records.get(s) or {}).get("done")
            and not any(u in run for u in STEP[s].upstream)}


def reuse(out: Path, run: list[str], from_run: str | None) -> tuple[Path | None, dict[str, dict]]:
    """(the demo folder stages are reused from, their records): every stage that runs must find the ones it starts
    from, run now or reused. Empties `out` but for the reused stages' folders; refuses a folder the demo did not make."""
    # by default a subset reuses the output folder's earlier stages, when it has any
    source = Path(from_run) if from_run else (out if set(DEFAULT_STAGES) - set(run) and (out / MARKER).is_file() else None)
    if source is not None and not (source / MARKER).is_file():
        raise ConfigError(f"--from {source}: not a demo folder (no {MARKER})")
    keep = reused_records(source, run) if source is not None else {}
    for stage in run:
        if missing := [n for n in STEP[stage].needs if n not in run and n not in keep]:
            raise ConfigError(f"--stages {stage} needs a finished {missing[0]} stage: add it to --stages, or name a "
                              f"demo folder that has one with --from")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"{out} exists and is not a demo folder: choose another --out")
    same = source is not None and source.resolve() == out.resolve()
    kept = {name for record in keep.values() for name in record.get("folders", [])} if same else set()
    kept |= {"recipes", MARKER} if kept else {MARKER}  # a re-run stage rewrites its own recipe only
    for child in (out.iterdir() if out.exists() else []):
        if child.name not in kept and not child.name.startswith("."):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return source, keep


class DemoRun:
    """One demo run's shared state (the output folder, the stage records, the report card's rows, the time budget,
    the speed settings); `demo()` runs each step's function (steps.py) with it, in STEPS order."""

    def __init__(self, out: Path, run: list[str], keep: dict[str, dict], base: Config, minutes: float, sizes: DemoSizes,
                 steps: dict[str, int], overrides: dict[str, list[str]], console: Console, before_s: float, facts: dict):
        self.out, self.run, self.keep, self.base, self.sizes = out, run, keep, base, sizes
        self.fixed_steps, self.overrides, self.console, self.budget_s, self.row_s = steps, overrides, console, minutes * 60, ROW_S
        self.records: dict[str, dict] = dict(keep)
        self.marker = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": self.records}
        write_json(out / MARKER, self.marker)
        # the clock counts from the user's command (`make demo`'s install, cold caches); one numbered header per stage
        self.started, self.before_s, self.wall, self.index = time.perf_counter() - before_s, before_s, {}, 0
        self.total = 4 + sum({"ablation": 1, "apo": 3, "long-context": 2}.get(s, 2) for s in run)
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
            f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
        self.facts = {**facts, "minutes": minutes, "device": device, "run": run, "sizes": sizes, "records": self.records}
        self.rows = {STEP[s].row: json.loads(Path(r["row"]).read_text()) for s, r in keep.items() if r.get("row")}

    @contextmanager
    def bar(self, name: str, title: str):
        """A numbered header for a stage; its wall time recorded."""
        self.index += 1
        self.console.rule(f"[bold][{self.index}/{self.total}] {title}")
        start = time.perf_counter()
        yield
        self.wall[name] = time.perf_counter() - start
        self.console.print(f"[dim]{name}: {self.wall[name]:.1f} s (total {self.elapsed() / 60:.1f} min)[/dim]")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def run_step(self, step: Step) -> None:
        """One step (steps.py's function of its name): skipped with the reason when a stage it starts from did not run
        (APO kept no pair), else run, recorded and evaluated into its row of the report card."""
        if absent := [n for n in step.needs if not self.records.get(n, {}).get("model")]:
            self.records[step.name] = {"done": False, "skipped": f"not run: it starts from {absent[0]}, which did not run"}
            self.console.print(f"[yellow]{step.name}: {self.records[step.name]['skipped']}[/yellow]")
        elif (record := getattr(demo_steps, step.name.replace("-", "_"))(self, step)) is not None:
            self.records[step.name] = {**record, "done": True, "folders": list(step.folders), "wall_s": self.wall.get(step.name)}
            write_json(self.out / MARKER, self.marker)
            if step.row:
                self.evaluate(step.name, step.row, record["model"])

    def seconds_for(self, stage: str) -> float:
        """The stage's time box, planned from what is really left now (inf for fixed steps)."""
        if stage in self.fixed_steps:
            return float("inf")
        pending = [s for s in self.run if s not in self.records or s == stage]
        pending = pending[pending.index(stage):]
        left = self.budget_s - self.elapsed() - reserve_seconds(pending, len([s for s in pending if STEP[s].row]), self.row_s)
        if stage in PRETRAINING:
            left, pending = pretraining_left(left, pending, self.nominal)
        seconds = stage_seconds(stage, left, pending, self.nominal[stage])
        late = seconds > left * TRAIN_SHARES[stage] / sum(TRAIN_SHARES[s] for s in pending if s in TRAIN_SHARES) + 1e-9
        self.console.print(f"  time box: {seconds:.0f} s" + (" (the floor: earlier stages overran, so the demo ends late)" if late else ""))
        return seconds

    def train(self, step: Step, raw: dict, seconds: float) -> dict:
        """Write a training step's recipe (with its `--set` overrides) and run it through its stage in the registry
        in its time box (at least 10 s); its record."""
        raw = apply_overrides(raw, self.overrides.get(step.name, []))
        path = write_atomic(self.out / "recipes" / f"{step.name}.yaml", yaml.safe_dump(raw, sort_keys=False))
        self.console.print(f"  from {raw['train'].get('init') or 'scratch'}; recipe {path}; up to {raw['train']['max_steps']} "
                           f"steps, {raw['train'].get('precision')} precision")
        stage = TRAINING_STAGES[step.kind]
        summary, stopped = stage.run_for(stage.load(path), max(seconds, 10.0), on_deadline=lambda: self.console.print(
            "  time budget reached: the trainer stops after this step"))
        return {"summary": summary, "stopped_by_budget": stopped, "model": raw["train"]["out_dir"], "recipe": str(path),
                "planned_s": seconds if seconds != float("inf") else None, "init": raw["train"].get("init")}

    def evaluate(self, stage: str, name: str, model_path: str) -> None:
        """The report card's row `name` for the model of `stage`."""
        path = self.out / "rows" / f"{name}.json"
        with self.bar(f"{name} evals", f"evaluate {name}: chat evals, pretraining evals, sample chats"):
            row = self.rows[name] = demo_steps.evaluate_row(model_path, self.chat_tok, self.data.tokenizer, self.base_config,
                                                            self.sizes, path, self.out / "eval.json" if name == "base" else None)
            self.console.print(f"  {name}: " + ", ".join(f"{k} {row['chat'][k]:.0%}" for k in CHAT_METRICS)
                               + f"; suite centred {row['suite']['centred']:+.3f}")
        self.row_s = self.wall[f"{name} evals"]
        if Path(model_path).resolve().is_relative_to(self.out.resolve()):  # never into a reused folder elsewhere
            # the stage's final chat evals beside its model, where sft and dpo keep theirs: the model card reads them
            write_json(Path(model_path) / CHAT_EVALS, {"chat": row["chat"], "vibe": row["samples"]})
        self.records[stage]["row"] = str(path)
        write_json(self.out / MARKER, self.marker)

    @functools.cached_property
    def pretrain_config(self) -> Config:
        """The base model's config, read once when the first stage after pretraining needs it."""
        return load_config(self.records["pretrain"]["config"]) if "pretrain" in self.records else self.base_config

    def start_model(self, stage: str) -> str:
        """The newest model of the chain before `stage`."""
        return next(self.records[s]["model"] for s in reversed(CHAIN[: CHAIN.index(stage)]) if self.records.get(s, {}).get("model"))

    def prepare(self, speed: str | None) -> None:
        """Data (corpus -> tokenizer -> shards, cached after the first run), reference points, this machine's speed
        in each precision, and the plan."""
        from smoltrain.data.embedded import ensure_embedded_data
        from smoltrain.eval.validation import unigram_losses
        from smoltrain.post.chat.template import load_chat_tokenizer, write_chat_tokenizer

        base, console = self.base, self.console
        with self.bar("data", "data: embedded corpus, tokenizer, shards"):
            self.data = ensure_embedded_data(base.data)
            manifest = json.loads((Path(self.data.tokenizer).parent / "manifest.json").read_text())
            for key, value in manifest["tokens"].items():
                console.print(f"  {key:<18} {value:>12,} tokens")
            # the data tokenizer with the smollm3 chat template (what SFT writes into its run)
            self.chat_tok = load_chat_tokenizer(write_chat_tokenizer(self.data.tokenizer, self.out / "chat-tokenizer", "smollm3"))
        self.facts["data"] = {"manifest": manifest, "cached": self.wall["data"] < 0.5 * sum(manifest["timings"].values())}
        with self.bar("baselines", "baselines, speed probe and budget"):
            unigram = unigram_losses(self.data, base.model.vocab_size)
            console.print("  unigram loss (nats/token): " + ", ".join(f"{s} {v:.3f}" for s, v in unigram.items()))
            on_cpu = resolve_device(base.train.device).type == "cpu"
            peak = speeds.cpu_peak_tflops() if on_cpu else None  # on CUDA the trainer knows the accelerator's peak
            rows = len([s for s in self.run if STEP[s].row]) + ("pretrain" in self.keep and "base" not in self.rows)
            # the demo's own time so far, not the command's: the nominal plan is a fresh machine's, and pretraining's
            # box gives back what the install and cold caches took (pretraining_left)
            left = self.budget_s - (self.elapsed() - self.before_s) - reserve_seconds(self.run, rows, ROW_S)
            self.nominal = nominal_seconds(max(left, 0.0), self.run)
            self.probe, self.choice = (speeds.forced_probe(speed), speed) if speed else self.probe_speed(on_cpu)
            self.settings = {"fixed": speeds.stage_settings(self.probe, self.choice, True),
                             "variable": speeds.stage_settings(self.probe, self.choice, False)}
            plan = ", ".join(f"{s} {v:.0f} s" for s, v in self.nominal.items())
            console.print(f"  {f'matmul peak {peak * 1e3:.1f} GFLOP/s; ' if peak else ''}plan: {plan}"
                          + (f" (the command ran {self.before_s:.0f} s before the demo: the budget counts them)" if self.before_s else ""))
            self.facts.update(unigram=unigram, probe=self.probe, speed_choice=self.choice, speed=self.settings)
        fixed = self.settings["fixed"]
        self.base_config = config_from_dict(base.to_dict(), [
            f"train.peak_tflops={json.dumps(peak)}", f"train.precision={fixed['precision']}", f"train.compile={fixed['compile']}",
            "eval.tasks=[]", f"eval.val_batches={self.sizes.val_batches}"])
        self.gbt, self.rate = base.train.global_batch_tokens, fixed.get("tokens_per_s") and (1 - PLAN_OVERHEAD) * fixed["tokens_per_s"]

    def probe_speed(self, on_cpu: bool) -> tuple[dict | None, str | None]:
        """(the speed probe, the configuration that trains the most tokens in the fixed-shape stages' time)."""
        if not on_cpu or not self.nominal:
            return None, None
        probe = speeds.probe_speed(self.base)
        # each fixed-shape stage pays a warm compile, the ablation's four runs too (long-context alone trained
        # nothing here once, and an empty sum picked fp32 eager at 0.6x bf16 + compile)
        compiled = len([s for s in self.nominal if s in FIXED_SHAPES]) + 3 * ("ablation" in self.nominal)
        choice = speeds.fastest_config(probe, sum(self.nominal.get(s, 0.0) for s in FIXED_SHAPES), compiled)
        for name, tokens_per_s, compiles, chosen in speeds.probe_table(probe, choice)[1]:
            compiled = f", compile {compiles} s (first / later)" if compiles != "-" else ""
            self.console.print(f"  {name:<13} {tokens_per_s:>9,} tokens/s{compiled}" + ("   <- chosen" if chosen else ""))
        return probe, choice

    def export(self) -> None:
        """Export the final model to Hugging Face (with its model card) and load it back with transformers."""
        from smoltrain.data.loader import validation_batches
        from smoltrain.report.hf_export import export_checked

        if final := next((self.records[s]["model"] for s in reversed(CHAIN + ("merge",)) if self.records.get(s, {}).get("model")), None):
            with self.bar("export", "export to Hugging Face and load with transformers"):
                batch = next(iter(validation_batches(self.pretrain_config, next(iter(self.data.validation)), 1, 2)))
                e = self.facts["export"] = export_checked(final, self.out / "hf", batch["input_ids"], self.data.tokenizer)
                self.console.print(f"  {e['architecture']} in {e['path']}: max |logit diff| {e['max_logit_diff']:.2e}, greedy "
                                   f"continuation identical: {e['greedy_match']}; model card: {e['card_stages']}")

    def report(self) -> Path:
        """One report (its own stage's time is known once the figures are drawn; writing is instant)."""
        with self.bar("report", "report"):
            self.facts["rows"] = self.rows
            report = build_demo_report(self.out, self.facts, self.pretrain_config, self.elapsed())
        add_wall_times(report, self.out / "figures", self.wall, self.elapsed(), self.records)
        md_path, html_path = report.write(self.out)
        self.marker.update(wall_s=self.wall, total_s=self.elapsed(), speed_choice=self.choice, device=self.facts["device"])
        write_json(self.out / MARKER, self.marker)
        print_summary(self.console, self.facts, self.elapsed())
        self.console.print(f"report: {html_path} (markdown: {md_path})", soft_wrap=True)
        return html_path


def demo(out_dir: str = "runs/smoltrain-demo", minutes: float = 15.0, recipe: str | None = None, console: Console | None = None,
         stages: str | list[str] | None = None, from_run: str | None = None, steps: dict[str, int] | None = None,
         sizes: DemoSizes | None = None, speed: str | None = None, started: float | None = None,
         overrides: dict[str, list[str]] | None = None) -> Path:
    """Run the playbook; returns the path of the HTML report (markdown beside it). stages: some of STAGES ("sft,apo";
    default all but long-context), the others reused from `from_run` (default: the output folder). steps ({"sft": 20}):
    fixed steps, not planned from `minutes`. sizes: what the demo's evaluations and pairs do. overrides ({"grpo":
    ["grpo.num_generations=4"]}): `--set`s on a stage's recipe. speed: "bf16 compile", ... without probing. started:
    when the user's command started (seconds since the epoch; `make demo` passes its own): the budget counts from it."""
    if minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {minutes}")
    before_s = 0.0 if started is None else time.time() - started
    if not 0 <= before_s < 86400:
        raise ConfigError(f"--started must be a time (seconds since the epoch) in the last day, got {started}")
    if bad := next((f"--{k}-steps must be at least 1, got {v}" for k, v in (steps or {}).items() if v < 1), None):
        raise ConfigError(bad)
    if unknown := sorted(set(overrides or {}) - set(STAGES)):
        raise ConfigError(f"--set {unknown[0]}:...: no such demo stage (expected one of: {', '.join(STAGES)})")
    run = parse_stages(",".join(stages) if isinstance(stages, list) else stages)
    recipe_path = Path(recipe) if recipe else RECIPES / "demo.yaml"
    if not (base := load_config(recipe_path)).data.embedded:
        raise ConfigError(f"{recipe_path}: the demo trains on the embedded corpus (data.embedded: true)")
    source, keep = reuse(Path(out_dir), run, from_run)
    demo_run = DemoRun(Path(out_dir), run, keep, base, minutes, sizes or DemoSizes(), dict(steps or {}), overrides or {},
                       console or Console(highlight=False), before_s,
                       {"recipe": str(recipe_path), "reused_from": str(source) if keep else None})
    demo_run.prepare(speed)
    for step in STEPS:
        if step.name in run:
            demo_run.run_step(step)
        elif step.row == "base" and "pretrain" in keep and "base" not in demo_run.rows:  # reused, never evaluated
            demo_run.evaluate("pretrain", "base", keep["pretrain"]["model"])
    demo_run.export()
    return demo_run.report()
