"""`smoltrain demo`: the whole playbook in miniature on the embedded corpus, ending in one report.

data -> baselines, speed probe and budget -> ablation (document masking on/off, 2 seeds) -> pretrain
-> SFT -> APO-zero on generated pairs -> GRPO with the overlong penalty -> merge (APO soup, then 0.9
soup + 0.1 base) -> export to Hugging Face and load back with transformers -> report, whose report
card has a row per stage (base, SFT, APO, GRPO, merged) with the chat and pretraining evals.

Budgets adapt to the machine. A short probe measures training tokens/s of fp32 eager, bf16 autocast
and bf16 autocast + compile (its compile time counted), and every training stage runs in the
fastest. Each training stage gets a share of the time left after the evaluation and export
reserves, re-planned before it starts from what is really left, and never less than half its
nominal share: on a machine slowed down by other work the demo ends late rather than reporting
stages trained for three seconds. Within its time box a stage stops through the Trainer's
should_stop hook after the step in flight. `--stages` runs a subset; the others are reused from
`--from RUN` (an earlier demo folder, by default the output folder itself).
"""

from __future__ import annotations

import functools
import json
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from smoltrain.config import Config, DataConfig, config_from_dict, load_config
from smoltrain.demo_post import (
    POST_STAGES,
    PostSizes,
    apo_recipe,
    build_pairs,
    chat_tokenizer,
    evaluate_row,
    grpo_recipe,
    run_apo,
    run_grpo,
    run_merge,
    run_sft,
    sft_recipe,
    stage_available,
    time_boxed,
    write_json,
    write_recipe,
)
from smoltrain.errors import ConfigError
from smoltrain.report.model_card import CHAT_EVALS
from smoltrain.train.distributed import resolve_device
from smoltrain.train.speed import probe_speed

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
MARKER = "demo.json"  # marks a folder as the demo's own output, which a re-run may replace
STAGES = ("ablation", "pretrain", *POST_STAGES)  # what --stages names
PRETRAINING_STAGES = ("ablation", "pretrain")
# Where each stage starts from: the newest earlier stage of this chain that has a model.
CHAIN = ("pretrain", "sft", "apo", "grpo")
MERGE_FROM = ("pretrain", "sft", "apo")  # the soup is of APO checkpoints, mixed with the base
ROW_OF = {"pretrain": "base", "merge": "merged"}  # the report card's row of a stage (else its own name)
# Shares of the training time (what is left after the reserves below), before floors.
TRAIN_SHARES = {"ablation": 0.08, "pretrain": 0.42, "sft": 0.24, "apo": 0.08, "grpo": 0.18}
# A stage never gets less than this share of its nominal time, even when earlier stages overran: the
# demo then runs late instead of reporting a model trained for 3 seconds.
STAGE_FLOOR = 0.5
# Non-training work still to come, in seconds on 2 idle cores; a row's evaluation is re-estimated
# from the first one measured.
RESERVE_S = {"row": 45.0, "preferences": 30.0, "merge": 5.0, "export": 15.0, "report": 10.0}
# Plan steps at (1 - PLAN_OVERHEAD) of the measured steady tokens/s: evaluations and saves, and a
# machine shared with others (planned at 85%, a quiet-looking run was cut at step 466 of 666, before
# its WSD decay). Planning short costs little: the time a stage leaves goes to the next ones.
PLAN_OVERHEAD = 0.35
VAL_BATCHES = 8  # per source, during training and at the end (the same windows, so one comparable curve)


# ----------------------------------------------------------------------------- helpers


class Stages:
    """Prints a numbered header per stage and records its wall time."""

    def __init__(self, console: Console, total: int, before_s: float = 0.0):
        """before_s: seconds the user's command ran before the demo (`make demo`: the install, cold caches);
        the budget and the total count them."""
        self.console, self.total, self.index = console, total, 0
        self.wall: dict[str, float] = {}
        self.before_s = before_s
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

    losses = {}
    for source, val_folder in data.validation.items():
        counts = np.zeros(vocab_size, dtype=np.int64)
        train = TokenSource(data.sources[source])
        chunk = np.empty(1 << 20, dtype=np.int64)
        for start in range(0, train.num_tokens, len(chunk)):
            part = chunk[: min(len(chunk), train.num_tokens - start)]
            train.read(start, part)
            counts += np.bincount(part, minlength=vocab_size)[:vocab_size]
        train.close()
        log_probs = np.log((counts + 0.5) / (counts.sum() + 0.5 * vocab_size))
        val = TokenSource(val_folder)
        tokens = np.empty(val.num_tokens, dtype=np.int64)
        val.read(0, tokens)
        val.close()
        losses[source] = float(-log_probs[tokens].mean())
    return losses


def matmul_peak_tflops(trials: int = 10, seconds: float = 0.1) -> float:
    """This CPU's matmul throughput in fp32 and bf16, whichever is faster, the best of short trials (a
    busy neighbour only lowers some of them): the peak MFU is quoted against on CPU, where the
    trainer's table of accelerators has no entry. (An fp32-only peak put a bf16-compiled run at
    "MFU 165%" on a CPU with native bf16.)"""
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


# ----------------------------------------------------------------------------- speed


def choose_speed(probe: dict, training_s: float, compiled_stages: int) -> str:
    """The configuration that trains the most tokens in `training_s` seconds when each of
    `compiled_stages` stages pays its compile. The probe paid the cold compile already (it is in the
    budget either way); a stage compiles warm, from the compiler's caches."""
    def tokens(entry: dict) -> float:
        return entry["tokens_per_s"] * max(0.0, training_s - compiled_stages * entry.get("recompile_s", 0.0))

    return max(probe["configs"], key=lambda name: tokens(probe["configs"][name]))


def stage_settings(probe: dict | None, choice: str | None, fixed_shapes: bool) -> dict:
    """train.precision / train.compile of a stage: the choice, but eager for stages whose batches change
    length every step (preference pairs, rollouts), where compile would recompile (then the faster
    eager precision)."""
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


# ----------------------------------------------------------------------------- budget


def reserve_seconds(pending: list[str], rows_left: int, row_s: float) -> float:
    """Non-training work still to come: each row's evaluation, pairs, merge, export and report."""
    reserve = rows_left * row_s + RESERVE_S["export"] + RESERVE_S["report"]
    if "apo" in pending:
        reserve += RESERVE_S["preferences"]
    if "merge" in pending:
        reserve += RESERVE_S["merge"]
    return reserve


def nominal_seconds(training_s: float, stages: list[str]) -> dict[str, float]:
    """Each training stage's share of `training_s` (shares renormalised over the stages that run)."""
    trained = [s for s in stages if s in TRAIN_SHARES]
    total = sum(TRAIN_SHARES[s] for s in trained)
    return {s: training_s * TRAIN_SHARES[s] / total for s in trained}


def pretraining_left(left_s: float, pending: list[str], nominal: dict[str, float]) -> tuple[float, list[str]]:
    """What the pretraining stages (ablation, pretrain) may share of `left_s`, and which of them are
    pending: the post-training stages still to come keep their nominal time, so time lost before them
    (an install, a cold compile, a slow machine) comes out of pretraining. A fresh clone's SFT got 666
    steps instead of 999 when every stage shrank alike (issue 24), and a shorter pretraining costs the
    report card least: its loss curve is still falling either way."""
    held = sum(nominal[s] for s in pending if s in nominal and s not in PRETRAINING_STAGES)
    return left_s - held, [s for s in pending if s in PRETRAINING_STAGES]


def stage_seconds(stage: str, left_s: float, pending: list[str], nominal_s: float) -> float:
    """`stage`'s share of the training time that is really left (`left_s`, reserves taken off) among
    the training stages still pending, never less than STAGE_FLOOR of its nominal time."""
    trained = [s for s in pending if s in TRAIN_SHARES]
    share = TRAIN_SHARES[stage] / sum(TRAIN_SHARES[s] for s in trained)
    return max(left_s * share, STAGE_FLOOR * nominal_s)


def _warmup(config: Config, steps: int) -> int:
    """The recipe's warmup, shortened to a tenth of a budget too small for it."""
    return max(1, min(config.optim.warmup_steps, steps // 10))


# ----------------------------------------------------------------------------- stages and folders


def parse_stages(text: str | None) -> list[str]:
    """`--stages sft,apo` -> the named stages in playbook order; one-line error with a hint otherwise."""
    import difflib

    if text is None:
        return list(STAGES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in STAGES:
            close = difflib.get_close_matches(name, STAGES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (expected some of: {', '.join(STAGES)})"
            raise ConfigError(f"--stages: unknown stage '{name}'{hint}")
    if not names:
        raise ConfigError(f"--stages names no stage (expected some of: {', '.join(STAGES)})")
    return [s for s in STAGES if s in names]


def _read_marker(folder: Path) -> dict:
    path = folder / MARKER
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def reused_records(source: Path, run: list[str]) -> dict[str, dict]:
    """The finished stages of an earlier demo folder that this run keeps: those not re-run and with no
    re-run stage before them in the chain (a re-run SFT makes the old APO stale)."""
    records = _read_marker(source).get("stages", {})
    kept = {}
    for stage in STAGES:
        record = records.get(stage)
        if stage in run or not record or not record.get("done"):
            continue
        upstream = CHAIN[: CHAIN.index(stage)] if stage in CHAIN else (MERGE_FROM if stage == "merge" else ())
        if any(s in run for s in upstream):
            continue
        kept[stage] = record
    return kept


def _prepare_out_dir(out: Path, run: list[str], keep: dict[str, dict], same_folder: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"{out} exists and is not a demo folder: choose another --out")
    kept_folders = {name for stage, record in keep.items() for name in record.get("folders", [])} if same_folder else set()
    if kept_folders:
        kept_folders.add("recipes")  # a re-run stage rewrites its own recipe only
    for child in (out.iterdir() if out.exists() else []):
        if child.name in kept_folders or child.name == MARKER or child.name.startswith("."):
            continue
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


STAGE_FOLDERS = {"ablation": ["ablation"], "pretrain": ["pretrain", "eval.json", "rows"], "sft": ["sft"],
                 "apo": ["preferences", "apo"], "grpo": ["grpo"], "merge": ["merge"]}


# ----------------------------------------------------------------------------- the demo


def _fixed_steps(steps: dict[str, int] | None, ablation_steps: int | None, pretrain_steps: int | None) -> dict[str, int]:
    """Stages with fixed steps (no time box), from `steps` and the two CLI flags, each at least 1."""
    steps = dict(steps or {})
    if ablation_steps is not None:
        steps["ablation"] = ablation_steps
    if pretrain_steps is not None:
        steps["pretrain"] = pretrain_steps
    for name, value in steps.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name}-steps must be at least 1, got {value}")
    return steps


def _reused_stages(out: Path, run: list[str], from_run: str | None) -> tuple[Path | None, dict[str, dict], bool]:
    """(the demo folder stages are reused from, their records, whether it is `out` itself); every stage
    that runs must find the one it starts from, run now or reused."""
    source = Path(from_run) if from_run else (out if len(run) < len(STAGES) else None)
    if source is not None and not (source / MARKER).is_file():
        raise ConfigError(f"--from {source}: not a demo folder (no {MARKER})")
    same_folder = source is not None and source.resolve() == out.resolve()
    keep = reused_records(source, run) if source is not None else {}
    for stage in run:
        needs = {"sft": ["pretrain"], "apo": ["sft"], "grpo": ["sft"], "merge": ["apo", "pretrain"]}.get(stage, [])
        missing = [n for n in needs if n not in run and n not in keep]
        if missing:
            raise ConfigError(f"--stages {stage} needs a finished {missing[0]} stage: add it to --stages, or name a "
                              f"demo folder that has one with --from")
    return source, keep, same_folder


def _probe_and_choose(base: Config, trained: list[str], nominal: dict[str, float], speed: str | None, on_cpu: bool,
                      console: Console) -> tuple[dict | None, str | None]:
    """(the speed probe, the chosen configuration): `speed` when given, else measured on a CPU."""
    if speed is not None:
        precision, compile = _named_speed(speed)
        return {"configs": {speed: {"precision": precision, "compile": compile, "tokens_per_s": None}},
                "native_bf16": None, "forced": True}, speed
    if not (on_cpu and trained):
        return None, None
    probe = probe_speed(base)
    compiled = len([s for s in trained if s in ("ablation", "pretrain", "sft")]) + 3 * ("ablation" in trained)
    choice = choose_speed(probe, sum(nominal.get(s, 0.0) for s in ("ablation", "pretrain", "sft")), compiled)
    for name, entry in probe["configs"].items():
        compile_note = (f", compile {entry['compile_s']:.1f} s (then {entry['recompile_s']:.1f} s)"
                        if entry["compile"] == "on" else "")
        console.print(f"  {name:<13} {entry['tokens_per_s']:>9,.0f} tokens/s{compile_note}"
                      + ("   <- chosen" if name == choice else ""))
    if not probe["native_bf16"]:
        console.print("  no native bf16 on this CPU: fp32 only (bf16 would be emulated)")
    return probe, choice


class DemoRun:
    """One demo run: its shared state (the output folder, the stage records, the report card's rows, the
    time budget, the speed settings) and a method per stage, which `demo()` calls in playbook order."""

    def __init__(self, out: Path, run: list[str], keep: dict[str, dict], source: Path | None, recipe_path: Path,
                 base: Config, minutes: float, sizes: PostSizes, steps: dict[str, int], console: Console,
                 before_s: float = 0.0):
        self.out, self.run, self.keep, self.recipe_path, self.base = out, run, keep, recipe_path, base
        self.minutes, self.budget_s, self.sizes, self.steps, self.console = minutes, minutes * 60, sizes, steps, console
        self.records: dict[str, dict] = dict(keep)
        self.marker = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": self.records}
        write_json(out / MARKER, self.marker)
        self.bar = Stages(console, 4 + sum(1 if s == "ablation" else 2 for s in run) + ("apo" in run), before_s)
        if before_s:
            console.print(f"the command started {before_s:.0f} s before the demo (install, cold caches): "
                          f"the {minutes:g}-minute budget counts them")
        self.facts: dict = {"recipe": str(recipe_path), "minutes": minutes, "device": _device_name(), "run": run,
                            "reused_from": str(source) if keep else None, "records": self.records, "sizes": sizes}
        self.rows: dict[str, dict] = {ROW_OF.get(stage, stage): _read_row(record) for stage, record in keep.items()
                                      if record.get("row")}
        self.row_s = RESERVE_S["row"]  # one row's evaluation, re-estimated from each one measured

    # ------------------------------------------------------------------------- bookkeeping

    def finish_stage(self, stage: str, record: dict) -> None:
        record.update(done=True, folders=STAGE_FOLDERS[stage], wall_s=self.bar.wall.get(stage))
        self.records[stage] = record
        write_json(self.out / MARKER, self.marker)

    def seconds_for(self, stage: str) -> float:
        """The stage's time box, planned from what is really left now (inf for fixed steps)."""
        if stage in self.steps:
            return float("inf")
        pending = [s for s in self.run if s not in self.records or s == stage]
        pending = pending[pending.index(stage):]
        rows_left = len([s for s in pending if s in ("pretrain", *POST_STAGES)])
        left = self.budget_s - self.bar.elapsed() - reserve_seconds(pending, rows_left, self.row_s)
        if stage in PRETRAINING_STAGES:
            left, pending = pretraining_left(left, pending, self.nominal)
        seconds = stage_seconds(stage, left, pending, self.nominal[stage])
        late = seconds > left * TRAIN_SHARES[stage] / sum(TRAIN_SHARES[s] for s in pending if s in TRAIN_SHARES) + 1e-9
        self.console.print(f"  time box: {seconds:.0f} s" + (" (the floor: earlier stages overran, so the demo ends "
                                                            "late)" if late else ""))
        return seconds

    def evaluate(self, stage: str, name: str, model_path: str) -> None:
        """The report card's row `name` for the model of `stage`."""
        out = self.out
        with self.bar(f"{name} evals", f"evaluate {name}: chat evals, pretraining evals, sample chats"):
            pre_out = out / "eval.json" if name == "base" else None
            self.rows[name] = evaluate_row(model_path, self.chat_tok, self.data.tokenizer, self.eval_config, self.sizes,
                                           out / "rows" / f"{name}.json", pre_out)
            _print_row(self.console, name, self.rows[name])
        self.row_s = self.bar.wall[f"{name} evals"]
        if Path(model_path).resolve().is_relative_to(out.resolve()):  # never into a reused folder elsewhere
            # the stage's final chat evals beside its model, where sft and dpo keep theirs: the model card reads them
            write_json(Path(model_path) / CHAT_EVALS, {"chat": self.rows[name]["chat"], "vibe": self.rows[name]["samples"]})
        self.records[stage]["row"] = str(out / "rows" / f"{name}.json")
        write_json(out / MARKER, self.marker)

    # ------------------------------------------------------------------------- stages

    def prepare_data(self) -> None:
        """1. Data: corpus -> tokenizer -> shards (cached after the first run)."""
        with self.bar("data", "data: embedded corpus, tokenizer, shards"):
            from smoltrain.data.embedded import ensure_embedded_data

            self.data = ensure_embedded_data(self.base.data)
            manifest = json.loads((Path(self.data.tokenizer).parent / "manifest.json").read_text())
            for key, value in manifest["tokens"].items():
                self.console.print(f"  {key:<18} {value:>12,} tokens")
            self.chat_tok = chat_tokenizer(self.data.tokenizer, self.out)
        self.facts["data"] = {"manifest": manifest, "cached": self.bar.wall["data"] < 0.5 * sum(manifest["timings"].values())}

    def plan(self, speed: str | None) -> None:
        """2. Reference points, this machine's speed in each precision, and the plan."""
        base, run, console = self.base, self.run, self.console
        with self.bar("baselines", "baselines, speed probe and budget"):
            unigram = unigram_losses(self.data, base.model.vocab_size)
            console.print("  unigram loss (nats/token): " + ", ".join(f"{s} {v:.3f}" for s, v in unigram.items()))
            on_cpu = resolve_device(base.train.device).type == "cpu"
            peak = matmul_peak_tflops() if on_cpu else None  # on CUDA the trainer knows the accelerator's peak
            trained = [s for s in run if s in TRAIN_SHARES]
            pending_rows = (len([s for s in run if s in ("pretrain", *POST_STAGES)])
                            + ("pretrain" in self.keep and "base" not in self.rows))
            # the demo's own time so far, not the command's: the nominal plan is a fresh machine's, and
            # pretraining's box gives back what the install and cold caches took (pretraining_left)
            own = self.bar.elapsed() - self.bar.before_s
            left = self.budget_s - own - reserve_seconds(run, pending_rows, RESERVE_S["row"])
            self.nominal = nominal_seconds(max(left, 0.0), trained)
            self.probe, self.choice = _probe_and_choose(base, trained, self.nominal, speed, on_cpu, console)
            self.settings = {"fixed": stage_settings(self.probe, self.choice, True),
                             "variable": stage_settings(self.probe, self.choice, False)}
            console.print(f"  matmul peak {peak * 1e3:.1f} GFLOP/s (fp32); plan: " if peak else "  plan: ", end="")
            console.print(", ".join(f"{s} {v:.0f} s" for s, v in self.nominal.items()))
            self.facts.update(unigram=unigram, peak_tflops=peak, probe=self.probe, speed_choice=self.choice,
                              speed=self.settings, nominal_s=self.nominal)
        self.unigram = unigram
        self.base_config = with_overrides(base, [f"train.peak_tflops={json.dumps(peak)}",
                                                 *_speed_overrides(self.settings["fixed"])])
        self.eval_config = with_overrides(self.base_config, ["eval.tasks=[]", f"eval.val_batches={self.sizes.val_batches}"])
        self.gbt = base.train.global_batch_tokens
        rate = self.settings["fixed"].get("tokens_per_s")  # None on CUDA (no probe): the recipe's steps
        self.rate = rate and (1 - PLAN_OVERHEAD) * rate

    def ablation(self) -> None:
        """3. Intra-document masking on/off, 2 seeds, judged against the seed-to-seed spread."""
        from smoltrain.ablate.grid import ablate
        from smoltrain.ablate.spec import AblationSpec
        from smoltrain.report.run import median_of, read_metrics

        gbt, rate = self.gbt, self.rate
        with self.bar("ablation", "ablation: document masking on/off x 2 seeds"):
            n = self.steps.get("ablation") or (int(np.clip(self.seconds_for("ablation") * rate / (4 * gbt), 6, 60))
                                               if rate else 60)
            self.console.print(f"  ablation budget: {n} steps x {gbt:,} tokens per run, 4 runs")
            raw = self.base_config.to_dict()
            raw["train"].update(eval_every=n, save_every=n, log_every=max(1, n // 10), tensorboard=False)
            raw["optim"]["warmup_steps"] = _warmup(self.base, n)
            spec = AblationSpec(
                name="document-masking", baseline=raw,
                variants={"baseline": [], "no-document-masking": ["model.document_masking=false"]},
                seeds=[0, 1], budget_steps=n, eval={"tasks": [], "val_batches": VAL_BATCHES},
                out_dir=str(self.out / "ablation"), source=f"{self.recipe_path} (smoltrain demo)",
            )
            ablation = ablate(spec=spec, console=self.console)
            runs = [r for arm in ablation["arms"].values() for r in arm["runs"]]
            # Plan pretraining for the machine undisturbed: the fastest run's steady tokens/s (the median
            # of its logged intervals; a run of a few steps is mostly startup, compile and evaluation,
            # so its tokens per wall second would plan a third of what the time box holds), less
            # PLAN_OVERHEAD, but never below that run's tokens per wall second. The ablation runs the
            # chosen (compiled) configuration on purpose: the probe's few steps under-read a compiled
            # step's steady speed ~3x (3.6k vs 11.5k tokens/s), and its cold compiles warm the caches
            # pretraining then uses. A neighbour slowing the machine down later meets the deadline.
            steady = max(median_of(read_metrics(r["run_dir"])[0], "tokens_per_s") or 0.0 for r in runs)
            self.rate = max(max(r["tokens"] / r["wall_s"] for r in runs), (1 - PLAN_OVERHEAD) * steady)
        self.finish_stage("ablation", {"results": str(self.out / "ablation" / "results.json"), "steps": n,
                                       "planning_tokens_per_s": self.rate})

    def pretrain(self) -> None:
        """4. Pretraining in its time box, then the base row of the report card."""
        from smoltrain.eval.during_training import DuringTraining
        from smoltrain.train.trainer import run

        train = functools.partial(run, evaluation=DuringTraining())

        out, gbt, rate = self.out, self.gbt, self.rate
        with self.bar("pretrain", "pretrain the demo model"):
            seconds = self.seconds_for("pretrain")
            n = self.steps.get("pretrain") or (int(np.clip(0.95 * seconds * rate / gbt, 10, 5000)) if rate
                                               else self.base.train.max_steps)
            self.console.print(f"  {n} steps x {gbt:,} tokens" + (f" at {rate:,.0f} tokens/s" if rate else "")
                               + f", {self.settings['fixed'].get('name', 'the recipe precision')}")
            config = with_overrides(self.base_config, [
                f"train.out_dir={json.dumps(str(out / 'pretrain'))}", f"train.max_steps={n}",
                f"train.eval_every={max(1, n // 4)}", f"train.save_every={n}", f"train.log_every={max(1, n // 50)}",
                "eval.tasks=[]", f"eval.val_batches={VAL_BATCHES}", f"optim.warmup_steps={_warmup(self.base, n)}",
            ])
            summary, stopped = time_boxed(train, config, seconds, self.console)
            if stopped:
                self.console.print(f"  time budget reached: pretraining stopped at step {summary['step']} of {n}")
        self.finish_stage("pretrain", {"model": str(out / "pretrain"), "config": str(out / "pretrain" / "config.yaml"),
                                       "steps": n, "summary": summary,
                                       "planned_s": seconds if seconds != float("inf") else None})
        self.evaluate("pretrain", "base", str(out / "pretrain"))

    def evaluate_reused_base(self) -> None:
        """A reused base model that was never evaluated gets its row."""
        if "pretrain" in self.keep and "base" not in self.rows:
            self.evaluate("pretrain", "base", self.keep["pretrain"]["model"])

    @functools.cached_property
    def pretrain_config(self) -> Config:
        """The base model's config, read once when the first stage after pretraining needs it."""
        records = self.records
        return load_config(records["pretrain"]["config"]) if "pretrain" in records else self.base_config

    def start_model(self, stage: str) -> Path:
        """The newest model of the chain before `stage`."""
        chain = CHAIN[: CHAIN.index(stage)] if stage in CHAIN else CHAIN
        records = self.records
        return Path(next(records[s]["model"] for s in reversed(chain) if s in records and records[s].get("model")))

    def post_training(self) -> None:
        """5-8. Post-training, each stage from the newest model of the chain before it."""
        for stage in [s for s in self.run if s in POST_STAGES]:
            missing = stage_available(stage)
            needs = {"apo": "sft", "grpo": "sft", "merge": "apo"}.get(stage)
            if not missing and needs and not self.records.get(needs, {}).get("model"):
                missing = f"stage not available: it starts from the {needs} stage, which did not run"
            if missing:
                self.console.print(f"[yellow]{stage}: {missing}[/yellow]")
                self.records[stage] = {"done": False, "skipped": missing}
                continue
            record = self.post_stage(stage)
            if record is not None:
                self.finish_stage(stage, record)
                self.evaluate(stage, ROW_OF.get(stage, stage), record["model"])

    def post_stage(self, stage: str) -> dict | None:
        """One post-training stage's record (None when APO kept no pair and was skipped)."""
        records, console = self.records, self.console
        title = {"sft": "SFT on the embedded chat data", "apo": "APO-zero on generated instruction-following pairs",
                 "grpo": "GRPO in no_think mode with the overlong penalty",
                 "merge": "merge: soup of the last APO checkpoints, then 0.9 soup + 0.1 base"}[stage]
        record: dict = {}
        pairs = None
        if stage == "apo":
            with self.bar("preferences", "preference pairs: rule-keeping replies vs the SFT model's own rule-breaking ones"):
                pairs = build_pairs(Path(records["sft"]["model"]), self.out / "preferences", self.sizes, console)
            record["pairs"] = pairs
            if not pairs["kept"]:
                records[stage] = {"done": False, "skipped": "no preference pair was kept", **record}
                console.print("[yellow]apo: no preference pair was kept: stage skipped[/yellow]")
                return None
        with self.bar(stage, title):
            if stage == "merge":
                pretrain_dir = Path(records["pretrain"]["model"]) if "pretrain" in records else None
                record.update(run_merge(Path(records["apo"]["model"]), pretrain_dir, self.out / "merge", self.sizes))
                console.print(f"  soup of {len(record['soup_of'])} checkpoints -> {record['soup']}; "
                              f"0.9 soup + 0.1 base -> {record['model']}")
                return record
            seconds = self.seconds_for(stage)
            init = self.start_model(stage)
            raw, runner = self.post_recipe(stage, seconds, init, pairs)
            path = write_recipe(self.out / "recipes" / f"{stage}.yaml", raw)
            console.print(f"  from {init}; recipe {path}; up to {raw['train']['max_steps']} steps")
            record.update(runner(path, seconds, console))
            record.update(recipe=str(path), planned_s=seconds if seconds != float("inf") else None, init=str(init))
            if stage == "sft":
                record["tokenizer"] = str(Path(record["model"]) / "tokenizer" / "tokenizer.json")
        return record

    def post_recipe(self, stage: str, seconds: float, init: Path, pairs: dict | None):
        """(the recipe, the runner) of the sft, apo or grpo stage, its steps planned for `seconds`."""
        config, sizes, steps, out = self.pretrain_config, self.sizes, self.steps, self.out
        if stage == "sft":
            # SFT trains pretraining's shape at its speed: plan it from pretraining's own steady tokens/s
            measured = pretrain_rate(self.records)
            tokens_per_s = ((1 - PLAN_OVERHEAD) * measured if measured else self.rate) \
                or self.settings["fixed"].get("tokens_per_s") or 1e4
            rows_rate = tokens_per_s / (sizes.sft_rows_per_step * config.data.seq_len)
            n = steps.get("sft") or int(np.clip(0.9 * seconds * rows_rate, 3, 100_000))
            return sft_recipe(config, init, out / "sft", n, self.settings["fixed"], sizes), run_sft
        tokenizer = Path(self.records["sft"]["tokenizer"])
        if stage == "apo":
            raw = apo_recipe(config, init, tokenizer, pairs["files"], out / "apo", pairs["kept"], self.settings["variable"],
                             sizes)
            if "apo" in steps:
                raw["train"]["max_steps"] = steps["apo"]
            return raw, run_apo
        # GRPO: the deadline decides (rollouts' speed is not probed; constant lr): a cap it comes before
        return grpo_recipe(config, init, tokenizer, out / "grpo", steps.get("grpo") or 200, self.settings["variable"],
                           sizes), run_grpo

    def export(self) -> None:
        """9. Export the final model to Hugging Face (with its model card) and load it back with transformers."""
        records = self.records
        final = next((records[s] for s in ("merge", "grpo", "apo", "sft", "pretrain") if records.get(s, {}).get("model")),
                     None)
        if final is None:
            return
        with self.bar("export", "export to Hugging Face and load with transformers"):
            export = export_and_reload(final["model"], self.data, self.pretrain_config, self.out / "hf")
            self.console.print(f"  {export['architecture']} in {export['path']}: max |logit diff| "
                               f"{export['max_logit_diff']:.2e}, greedy continuation identical: {export['greedy_match']}; "
                               f"model card: {export['card_stages']}")
        self.facts["export"] = export

    def report(self) -> Path:
        """10. One report (its own stage's time is known once the figures are drawn; writing is instant)."""
        from smoltrain.report.demo_report import add_wall_times, build_demo_report

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

    stages: a subset of STAGES (a list or "sft,apo"); the others are reused from `from_run` (default:
    the output folder itself when a subset is asked for). ablation_steps / pretrain_steps / steps
    ({"sft": 20, "apo": 4, "grpo": 3}): fixed steps (reproducible across machines) instead of the ones
    derived from `minutes` and the measured throughput. sizes: how much each post-training stage and
    each row's evaluation does. speed: a configuration of SPEED_CONFIGS ("fp32 eager", "bf16 compile",
    ...) to use without probing. started: when the user's command started (seconds since the epoch;
    `make demo` passes its own start), from which the budget counts."""
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
    _prepare_out_dir(out, run, keep, same_folder)
    demo_run = DemoRun(out, run, keep, source, recipe_path, base, minutes, sizes, steps, console, before_s)
    demo_run.prepare_data()
    demo_run.plan(speed)
    if "ablation" in run:
        demo_run.ablation()
    if "pretrain" in run:
        demo_run.pretrain()
    demo_run.evaluate_reused_base()
    demo_run.post_training()
    demo_run.export()
    return demo_run.report()


def pretrain_rate(records: dict) -> float | None:
    """The median logged tokens/s of this demo's pretraining run (None when it did not run here)."""
    from smoltrain.report.run import median_of, read_metrics

    model = records.get("pretrain", {}).get("model")
    if not model or not (Path(model) / "metrics.jsonl").is_file():
        return None
    return median_of(read_metrics(model)[0], "tokens_per_s")


def _named_speed(name: str) -> tuple[str, str]:
    """'bf16 compile' -> ("bf16", "on"); a one-line error for anything else."""
    names = {f"{p} {'compile' if c == 'on' else 'eager'}": (p, c) for p in ("fp32", "bf16") for c in ("off", "on")}
    if name not in names:
        raise ConfigError(f"speed must be one of {', '.join(names)}, got {name!r}")
    return names[name]


def _speed_overrides(setting: dict) -> list[str]:
    return [f"train.precision={setting['precision']}", f"train.compile={setting['compile']}"]


def _read_row(record: dict) -> dict:
    return json.loads(Path(record["row"]).read_text())


def _print_row(console: Console, name: str, row: dict) -> None:
    c = row["chat"]
    console.print(f"  {name}: no_think {c['no_think_accuracy']:.0%}, think {c['think_accuracy']:.0%}, "
                  f"adherence {c['adherence']:.0%}, format {c['think_format']:.0%}, stop {c['stop_rate']:.0%}, "
                  f"length {c['no_think_length']:.0f}/{c['think_length']:.0f} tokens; suite centred "
                  f"{row['suite']['centred']:+.3f}; {row['wall_s']:.0f} s")


# ----------------------------------------------------------------------------- export


def export_and_reload(model_path: str, data: DataConfig, config: Config, hf_dir: Path) -> dict:
    """Export a model folder (its model card walks the stages back from it), load it with
    transformers, compare logits on validation text and greedy continuations with ours."""
    from transformers import AutoModelForCausalLM

    from smoltrain.data.loader import validation_batches
    from smoltrain.model.generate import generate
    from smoltrain.report.hf_export import export_hf
    from smoltrain.train.load_model import load_any

    model, _, known = load_any(model_path)
    model = model.float().eval()
    path = export_hf(model_path, hf_dir, tokenizer=None if known else data.tokenizer, dtype=torch.float32)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    source = next(iter(data.validation))
    batch = next(iter(validation_batches(config, source, 1, 2)))
    with torch.no_grad():
        ours = model(batch["input_ids"])
        theirs = hf_model(input_ids=batch["input_ids"]).logits
        prompt = batch["input_ids"][0, :16].tolist()
        greedy_ours = generate(model, [prompt], 24)[0]
        greedy_hf = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    from smoltrain.report.model_card import lineage

    return {"path": str(path), "model": str(model_path), "architecture": architecture,
            "max_logit_diff": float((ours - theirs).abs().max()), "greedy_match": greedy_ours == greedy_hf,
            "files": sorted(p.name for p in path.iterdir()),
            "card_stages": " -> ".join(s.objective for s in lineage(model_path))}


# ----------------------------------------------------------------------------- summary


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def print_summary(console: Console, facts: dict, total_s: float) -> None:
    from smoltrain.report.demo_report import card_rows

    console.rule(f"[bold]smoltrain demo: done in {total_s / 60:.1f} min")
    headers, rows = card_rows(facts)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    console.print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)), markup=False, soft_wrap=True)
    for r in rows:
        console.print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)), markup=False, soft_wrap=True)
    if facts.get("speed_choice"):
        console.print(f"speed: {facts['speed_choice']} chosen by the probe", soft_wrap=True)
    if facts.get("export"):
        e = facts["export"]
        console.print(f"export: {e['architecture']}, max |logit diff| vs transformers {e['max_logit_diff']:.1e}, "
                      f"model card stages {e['card_stages']}", soft_wrap=True)


__all__ = ["demo", "DemoRun", "unigram_losses", "matmul_peak_tflops", "probe_speed", "choose_speed", "stage_seconds",
           "nominal_seconds", "parse_stages", "export_and_reload", "STAGES"]
