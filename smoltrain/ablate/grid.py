"""`smoltrain ablate ABLATION.yaml`: train every (variant, seed) run, evaluate each on the same
suite, compare against the baseline and write results.json + report.md/.html + PNGs.

Re-running the same command resumes: a run is finished when its record (`ablation_run.json`)
says so, or when its metrics.jsonl reached the budget (then only the evaluation is redone); an
unfinished run is handed back to the trainer, which resumes from its latest checkpoint. A run
folder made with a different config is an error, never silently reused.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from rich.console import Console

from smoltrain.ablate.spec import AblationSpec, load_ablation
from smoltrain.config import Config
from smoltrain.errors import ConfigError, StoppedBySignal
from smoltrain.files import write_atomic
from smoltrain.model.flops import parameter_counts
from smoltrain.report.run import final_loss, flatten_eval, median_of, read_metrics
from smoltrain.stages import STAGES

RECORD = "ablation_run.json"

TrainFn = Callable[[Config], object]
EvaluateFn = Callable[[Config, Path], dict]


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False))


def _plain(config: Config) -> dict:
    return json.loads(json.dumps(config.to_dict()))


def _first_difference(a, b, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
            if found:
                return found
        return None
    return None if a == b else f"{prefix} ({a!r} then, {b!r} now)"


def train_with_trainer(config: Config, stage: str = "pretrain") -> object:
    return STAGES[stage].run(config)


def evaluate_checkpoint(config: Config, run_dir: Path) -> dict:
    """The suite of `config.eval` on the run's latest checkpoint (when the trainer logged no final evaluation)."""
    import torch

    from smoltrain.eval.during_training import evaluate_during_training
    from smoltrain.train.checkpoint import load_model_from_checkpoint
    from smoltrain.train.distributed import resolve_device

    device = resolve_device(config.train.device).type
    model, _ = load_model_from_checkpoint(str(run_dir), device)
    model.eval()
    with torch.no_grad():
        return evaluate_during_training(model, config, torch.device(device))


def evaluate_positions(config: Config, run_dir: Path) -> dict:
    """Validation loss by position in the document on the run's latest checkpoint (early vs late tokens)."""
    import torch

    from smoltrain.eval.validation import loss_by_position
    from smoltrain.train.checkpoint import load_model_from_checkpoint
    from smoltrain.train.distributed import resolve_device

    device = resolve_device(config.train.device).type
    model, _ = load_model_from_checkpoint(str(run_dir), device)
    model.eval()
    with torch.no_grad():
        return loss_by_position(model, config, config.eval.val_batches, config.eval.batch_size, device=device)


def run_one(spec: AblationSpec, variant: str, seed: int, train_fn: TrainFn, evaluate_fn: EvaluateFn,
            console: Console) -> dict:
    """Train (or resume) and evaluate one run; returns its record."""
    config = spec.config_for(variant, seed)
    run_dir = spec.run_dir(variant, seed)
    record_path = run_dir / RECORD
    plain = _plain(config)
    record = None
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        difference = _first_difference(record.get("config"), plain)
        if difference:
            raise ConfigError(
                f"{run_dir} was trained with a different config: {difference}; "
                f"delete that folder or choose another out_dir"
            )
        if record.get("finished"):
            console.print(f"  [dim]{variant} seed {seed}: finished earlier, reusing {run_dir}[/dim]")
            return record
    record = record or {"variant": variant, "seed": seed, "config": plain, "finished": False, "wall_s": 0.0}

    max_steps = config.train.max_steps
    train_rows, eval_rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else ([], [])
    done = bool(train_rows) and train_rows[-1]["step"] >= max_steps
    start = time.perf_counter()
    if not done:
        _write_json(record_path, record)
        summary = train_fn(config) if train_fn is not train_with_trainer else train_fn(config, spec.stage)
        if isinstance(summary, dict) and summary.get("stopped_by") and not summary.get("finished"):
            # Stopped by a signal after a clean checkpoint: the same command resumes from it.
            raise StoppedBySignal(summary["stopped_by"], f"{run_dir} stopped by {summary['stopped_by']} at step "
                                  f"{summary.get('step')}; the same command resumes")
        train_rows, eval_rows = read_metrics(run_dir)
        if not train_rows or train_rows[-1]["step"] < max_steps:
            raise RuntimeError(f"{run_dir}: the trainer returned before step {max_steps} (last logged "
                               f"step {train_rows[-1]['step'] if train_rows else None})")
    final_eval = next((e["eval"] for e in reversed(eval_rows) if e["step"] >= max_steps), None)
    if final_eval is None:
        final_eval = evaluate_fn(config, run_dir)
    # Only for the trainer's runs (a test's stand-in train_fn leaves no checkpoint to score).
    positions = evaluate_positions(config, run_dir) if train_fn is train_with_trainer and config.eval.val_batches else {}
    memory = [r["peak_memory_gb"] for r in train_rows if r.get("peak_memory_gb") is not None]  # CUDA runs log it
    record.update(
        finished=True,
        wall_s=record["wall_s"] + time.perf_counter() - start,
        max_steps=max_steps,
        tokens=train_rows[-1].get("tokens"),
        final_loss=final_loss(train_rows),
        tokens_per_s=median_of(train_rows, "tokens_per_s"),
        mfu=median_of(train_rows, "mfu"),
        train_elapsed_s=train_rows[-1].get("elapsed_s"),
        parameters=parameter_counts(config.model)["total"],
        curve={"step": [r["step"] for r in train_rows], "loss": [r["loss"] for r in train_rows],
               "tokens": [r.get("tokens") for r in train_rows], "elapsed_s": [r.get("elapsed_s") for r in train_rows]},
        eval=final_eval,
        metrics={"train/final_loss": final_loss(train_rows), **flatten_eval(final_eval or {}), **positions,
                 **({"train/peak_memory_gb": max(memory)} if memory else {})},
    )
    _write_json(record_path, record)
    return record


def run_grid(spec: AblationSpec, train_fn: TrainFn | None = None, evaluate_fn: EvaluateFn | None = None,
             console: Console | None = None) -> list[dict]:
    """Every (variant, seed) of the spec, in seed-major order; returns their records."""
    train_fn = train_fn or train_with_trainer
    evaluate_fn = evaluate_fn or evaluate_checkpoint
    console = console or Console(stderr=True)
    runs = spec.runs()
    records = []
    for index, (variant, seed) in enumerate(runs, 1):
        console.print(f"[bold]ablation {spec.name}[/bold] run {index}/{len(runs)}: {variant} seed {seed}")
        record = run_one(spec, variant, seed, train_fn, evaluate_fn, console)
        console.print(f"  {variant} seed {seed}: final loss {record['final_loss']:.4f}, "
                      f"{record['wall_s']:.1f} s")
        records.append(record)
    return records


def ablate(path: str | os.PathLike | None = None, *, spec: AblationSpec | None = None, out_dir: str | None = None,
           train_fn: TrainFn | None = None, evaluate_fn: EvaluateFn | None = None,
           console: Console | None = None) -> dict:
    """Load (or take) an ablation, run its grid, compare, write results.json and the report.
    Returns the results (as in results.json) with `report_md` / `report_html` paths added."""
    from smoltrain.ablate.report import write_results

    if spec is None:
        spec = load_ablation(path, out_dir=out_dir)
    records = run_grid(spec, train_fn, evaluate_fn, console)
    return write_results(spec, records)
