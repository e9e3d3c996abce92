"""`smoltrain report RUN_DIR`: markdown + PNG + HTML report of any training run folder, read only
from its `config.yaml` and `metrics.jsonl` (so it works on a run that is still going or crashed).

A truncated last line of metrics.jsonl (a run killed mid-write) is ignored; any other bad line is
a DataError naming the file and line.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from smoltrain.errors import DataError
from smoltrain.model.flops import parameter_counts
from smoltrain.report import plots
from smoltrain.report.document import Report, format_value

LOWER_IS_BETTER = ("loss", "bpb", "perplexity", "ppl", "length", "truncated")  # length: GRPO's penalty aims there
# The curves of an objective's own training metrics (TRL's names), one figure per group, drawn when the run
# logged them: DPO's rewards and accuracy, GRPO's rewards, lengths, clipping and KL.
OBJECTIVE_CURVES = (
    ("dpo_rewards", "rewards of the chosen and rejected answers, and their margin",
     ("rewards/chosen", "rewards/rejected", "rewards/margins")),
    ("dpo_accuracy", "preference accuracy (chosen reward above rejected)", ("rewards/accuracies",)),
    ("grpo_reward", "reward, its spread and answer accuracy", ("reward", "reward_std", "accuracy")),
    ("grpo_lengths", "completion lengths (tokens)", ("completions/mean_length", "completions/median_length",
                                                     "completions/p90_length", "completions/max_length")),
    ("grpo_clipping", "clip ratios (the share of tokens the ratio clip held) and truncated completions",
     ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/clipped_ratio")),
    ("grpo_kl", "KL to the reference model", ("kl",)),
)
EVAL_CURVES = (("preference/accuracy", "held-out preference accuracy"), ("grpo/pass@1", "held-out pass@1 (greedy)"))


# ----------------------------------------------------------------------------- reading


def read_records(run_dir: str | os.PathLike) -> list[dict]:
    """Every line of `RUN_DIR/metrics.jsonl` (training, evaluation and event lines), in file order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no metrics.jsonl (is {run_dir} a training run folder?)")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a run killed while appending its last line
                break
            raise DataError(f"{path}:{number}: not valid JSON") from None
        if not isinstance(row, dict) or "step" not in row:
            raise DataError(f"{path}:{number}: expected an object with a 'step' key")
        records.append(row)
    return records


def read_metrics(run_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(training lines, evaluation lines) of `RUN_DIR/metrics.jsonl`, in file order."""
    records = read_records(run_dir)
    evals = [row for row in records if isinstance(row.get("eval"), dict)]
    train = [row for row in records if not isinstance(row.get("eval"), dict) and "loss" in row]
    return _last_per_step(train), _last_per_step(evals)


def _last_per_step(rows: list[dict]) -> list[dict]:
    """A resumed run re-logs the steps after its checkpoint: keep the newest line of each step."""
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def flatten_eval(result: dict) -> dict[str, float]:
    """`{"val": {src: {loss, bpb}}, "tasks": {name: {...}}, "aggregate": {...}}` -> flat metric names:
    `val/src/loss`, `val/src/bpb`, `tasks/name/score` (the task's main metric, as the eval suite
    names it; every metric when a task gives no score) and `aggregate/centred`, `aggregate/score`."""
    flat: dict[str, float] = {}
    for source, values in (result.get("val") or {}).items():
        for key in ("loss", "bpb"):
            if _is_number((values or {}).get(key)):
                flat[f"val/{source}/{key}"] = float(values[key])
    for task, values in (result.get("tasks") or {}).items():
        values = values or {}
        if _is_number(values.get("score")):
            flat[f"tasks/{task}/score"] = float(values["score"])
            continue
        for key, value in values.items():
            if key != "n" and not key.endswith("_stderr") and "baseline" not in key and _is_number(value):
                flat[f"tasks/{task}/{key}"] = float(value)
    for key in ("centred", "score"):
        if _is_number((result.get("aggregate") or {}).get(key)):
            flat[f"aggregate/{key}"] = float(result["aggregate"][key])
    for group, values in result.items():  # an objective's own evaluation, e.g. grpo: {pass@1, ...}
        if group not in ("val", "tasks", "aggregate") and isinstance(values, dict):
            for key, value in values.items():
                if key not in ("n", "sampled_at_temperature") and not key.endswith("_stderr") and _is_number(value):
                    flat[f"{group}/{key}"] = float(value)
    return flat


def lower_is_better(metric: str) -> bool:
    leaf = metric.rsplit("/", 1)[-1]
    # val/position/0-63 ...: validation loss by position bucket, named by its token range
    return any(word in leaf for word in LOWER_IS_BETTER) or metric.startswith("val/position/")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def median_of(rows: list[dict], key: str, skip_first: int = 1) -> float | None:
    """Median of a logged quantity, leaving out the first lines (compile and warm-up)."""
    values = [r[key] for r in rows[skip_first:] if _is_number(r.get(key))]
    if not values:
        values = [r[key] for r in rows if _is_number(r.get(key))]
    return statistics.median(values) if values else None


def final_loss(rows: list[dict], fraction: float = 0.1) -> float | None:
    """Mean training loss over the last `fraction` of logged steps (one step alone is too noisy)."""
    values = [r["loss"] for r in rows if _is_number(r.get("loss"))]
    if not values:
        return None
    tail = values[-max(1, int(round(len(values) * fraction))):]
    return sum(tail) / len(tail)


# ----------------------------------------------------------------------------- report


def add_run_sections(report: Report, config, train: list[dict], evals: list[dict],
                     figures_dir: Path, prefix: str = "") -> None:
    """Append the summary table, curves and final evaluation of one run to `report`."""
    m = config.model
    counts = parameter_counts(m)
    stages = stage_rows(config)
    last = train[-1] if train else {}
    positions = "none" if m.position_encoding == "none" else (
        f"RoPE (theta {m.rope_theta:g})" + (f", NoPE every {m.nope_every}" if m.nope_every else "")
        + (f", {m.rope_scaling.rope_type} x{m.rope_scaling.factor:g}" if m.rope_scaling else ""))
    rows = [
        ("shape", f"{m.num_layers} layers x {m.hidden_size} hidden, {m.num_heads} heads / {m.num_kv_heads} KV heads, "
                  f"SwiGLU {m.intermediate_size}, vocab {m.vocab_size}"),
        ("embeddings", "tied" if m.tie_embeddings else "untied"),
        ("positions", positions),
        ("document masking", m.document_masking),
        ("parameters", f"{counts['total']:,} ({counts['non_embedding']:,} non-embedding"
                       + (f", {counts['active']:,} active per token)" if counts["active"] != counts["total"] else ")")),
        ("steps", f"{last.get('step', 0):,} of {config.train.max_steps:,}"),
        ("tokens", last.get("tokens")),
        ("sequence length", " -> ".join(map(str, dict.fromkeys(r[3] for r in stages))) if stages else config.data.seq_len),
        ("final training loss (last 10% of logs)", final_loss(train)),
        ("tokens/s (median, first log interval skipped: compile, warm-up)", median_of(train, "tokens_per_s")),
        ("MFU (median, first log interval skipped)", _percent(median_of(train, "mfu"))),
        ("elapsed", _duration(last.get("elapsed_s"))),
    ]
    report.table(["", ""], [(k, v) for k, v in rows])
    if stages:
        report.heading("Stages", 3)
        report.table(["stage", "steps", "sequence length", "RoPE base", "mixture"],
                     [(name, f"{start:,}-{end:,}", seq_len, f"{theta:g}", mixture) for name, start, end, seq_len, theta, mixture in stages])

    if train:
        steps = [r["step"] for r in train]
        curves = {"train": (steps, [r["loss"] for r in train])}
        val_sources = sorted({s for e in evals for s in (e["eval"].get("val") or {})})
        for source in val_sources:
            points = [(e["step"], e["eval"]["val"][source].get("loss")) for e in evals
                      if _is_number((e["eval"].get("val") or {}).get(source, {}).get("loss"))]
            if points:
                curves[f"val {source}"] = ([p[0] for p in points], [p[1] for p in points])
        report.image(plots.line_plot(figures_dir / f"{prefix}loss.png", curves, title="loss", ylabel="cross-entropy (nats/token)"),
                     "training loss and validation loss per source")
        extra = [(k, label) for k, label in (("lr", "learning rate"), ("grad_norm", "gradient norm"),
                                              ("tokens_per_s", "tokens/s")) if any(_is_number(r.get(k)) for r in train)]
        for key, label in extra:
            points = [(r["step"], r[key]) for r in train if _is_number(r.get(key))]
            report.image(plots.line_plot(figures_dir / f"{prefix}{key}.png", {label: ([p[0] for p in points], [p[1] for p in points])},
                                         title=label, ylabel=label, logy=key == "grad_norm"), label)
        add_time_breakdown(report, train, figures_dir / f"{prefix}time.png")
        add_objective_curves(report, train, evals, figures_dir, prefix)

    add_router_section(report, train, figures_dir, prefix)
    if evals:
        final = evals[-1]
        report.heading(f"Evaluation at step {final['step']:,}", 3)
        add_eval_tables(report, final["eval"])
        add_long_context_section(report, final["eval"], figures_dir, prefix)


def add_long_context_section(report: Report, result: dict, figures_dir: Path, prefix: str = "") -> None:
    """RULER-style accuracy by task and length (a heat map) and the validation loss by position curve."""
    from smoltrain.eval.longctx import long_context_grid

    tasks, lengths, grid = long_context_grid(result.get("tasks") or {})
    if tasks:
        report.image(plots.score_grid(figures_dir / f"{prefix}long_context.png", grid, row_labels=tasks,
                                      column_labels=[f"{n:,}" for n in lengths], title="long-context retrieval",
                                      xlabel="length (tokens)", colorbar="string match"),
                     "RULER string match (%) by task and length in tokens")
    curves = {source: ([(c["start"] + c["end"] - 1) / 2 for c in curve], [c["loss"] for c in curve])
              for source, curve in (result.get("loss_by_position") or {}).items() if curve}
    if curves:
        report.image(plots.line_plot(figures_dir / f"{prefix}loss_by_position.png", curves, title="validation loss by position",
                                     xlabel="position in the document (bucket middle)", ylabel="cross-entropy (nats/token)"),
                     "validation loss by position: falling with position means the model uses its context")


def add_router_section(report: Report, train: list[dict], figures_dir: Path, prefix: str = "") -> None:
    """A mixture of experts' router: the load of every (layer, expert) over steps as a heat map (1 is a
    fair share; a collapsed router shows as a few dark rows) and the balancing terms as curves."""
    rows = [r for r in train if isinstance(r.get("moe_load"), list)]
    if not rows:
        return
    report.heading("Router", 3)
    layers, experts = len(rows[0]["moe_load"]), len(rows[0]["moe_load"][0])
    # [layer x expert][step]: share of the layer's picks x E (1 = balanced).
    grid = [[r["moe_load"][layer][e] * experts for r in rows] for layer in range(layers) for e in range(experts)]
    labels = [f"L{layer} E{e}" for layer in range(layers) for e in range(experts)]
    report.image(plots.heat_map(figures_dir / f"{prefix}expert_load.png", grid, x=[r["step"] for r in rows],
                                row_labels=labels, title="expert load (x fair share)", colorbar="load / fair share"),
                 "tokens routed to each expert of each MoE layer over steps, relative to an even split")
    for key, label in (("moe_aux", "load-balancing loss (balanced = top-k)"), ("moe_max_load", "busiest expert / mean"),
                       ("moe_entropy", "router entropy (nats)")):
        points = [(r["step"], r[key]) for r in rows if _is_number(r.get(key))]
        if points:
            report.image(plots.line_plot(figures_dir / f"{prefix}{key}.png", {label: ([p[0] for p in points], [p[1] for p in points])},
                                         title=label, ylabel=label), label)


TIME_LAYERS = (("time/data_s", "waiting for data"), ("time/rollouts_s", "generating rollouts"),
               ("time/forward_backward_s", "forward + backward"), ("time/optimizer_s", "optimizer step"),
               ("time/other_s", "the rest (collectives, syncs, guard)"))


def add_time_breakdown(report: Report, train: list[dict], path: Path) -> None:
    """Where a step's time went, stacked per logged step (the trainer's `time/` fields), and a table of
    each part's median share; nothing for runs logged before those fields existed."""
    present = [(key, label) for key, label in TIME_LAYERS if any(_is_number(r.get(key)) for r in train)]
    rows = [r for r in train if present and all(_is_number(r.get(key)) for key, _ in present)]
    if not rows:
        return
    layers = {label: [1000 * r[key] for r in rows] for key, label in present}
    report.image(plots.stacked_plot(path, [r["step"] for r in rows], layers, title="where a step's time goes",
                                    ylabel="ms per step (mean over each log interval)"), "where a step's time goes")
    totals = [sum(r[key] for key, _ in present) for r in rows]
    table = [(label, 1000 * statistics.median(r[key] for r in rows),
              _percent(statistics.median(r[key] / t for r, t in zip(rows, totals) if t > 0)))
             for key, label in present]
    for key, label in (("time/checkpoint_s", "checkpoints (logged total)"), ("time/eval_s", "evaluation (logged total)")):
        spent = sum(r.get(key) or 0.0 for r in train)
        if spent:
            table.append((label, 1000 * spent, None))
    report.table(["part of a step", "ms (median per step)", "median share"], table)


def add_diagnosis(report: Report, records: list[dict]) -> None:
    """The findings of `smoltrain doctor --run` (report/diagnosis.py) without low_mfu, which needs the
    device's measured matmul rate (the doctor measures it)."""
    from smoltrain.report.diagnosis import diagnose

    findings = diagnose(records)
    report.heading("Diagnosis", 3)
    if not findings:
        report.text("No findings: throughput, data wait, loss noise and spikes, grad norm, ranks and memory look "
                    "as a healthy run's (low MFU is judged by `smoltrain doctor --run`, which measures the matmul rate).")
        return
    report.table(["kind", "steps", "evidence", "likely cause", "check"],
                 [(f.kind, f"{f.steps[0]}-{f.steps[1]}", f.summary, f.cause, f.check) for f in findings])


def _series(rows: list[dict], keys, value) -> dict[str, tuple[list, list]]:
    out = {}
    for key in keys:
        points = [(r["step"], value(r, key)) for r in rows if _is_number(value(r, key))]
        if points:
            out[key] = ([p[0] for p in points], [p[1] for p in points])
    return out


def add_objective_curves(report: Report, train: list[dict], evals: list[dict], figures_dir: Path, prefix: str = "") -> None:
    """DPO's and GRPO's own curves (OBJECTIVE_CURVES, each reward function's mean, the held-out
    evaluations), for the metrics the run logged."""
    functions = sorted({k for r in train for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    groups = [*OBJECTIVE_CURVES, ("grpo_reward_functions", "each reward function's mean", tuple(functions))]
    for name, caption, keys in groups:
        series = _series(train, keys, lambda r, k: r.get(k))
        if series:
            report.image(plots.line_plot(figures_dir / f"{prefix}{name}.png", series, title=caption), caption)
    flat = [{"step": e["step"], **flatten_eval(e["eval"])} for e in evals]
    for key, caption in EVAL_CURVES:
        series = _series(flat, (key,), lambda r, k: r.get(k))
        if series:
            name = key.replace("/", "_").replace("@", "_at_")
            report.image(plots.line_plot(figures_dir / f"{prefix}{name}.png", series, title=caption), caption)


def stage_rows(config) -> list[tuple[str, int, int, int, float, str]]:
    """(name, first step, last step, sequence length, RoPE base, mixture) of each curriculum stage that
    runs before train.max_steps; a stage keeps what it does not set. Empty without data.stages."""
    d = config.data
    if not d.stages:
        return []
    seq_len, theta, mixture = d.seq_len, config.model.rope_theta, dict(d.mixture)
    starts = [("base", 0, None)] if d.stages[0].start_step > 0 else []
    starts += [(stage.name, stage.start_step, stage) for stage in d.stages]
    rows = []
    for index, (name, start, stage) in enumerate(starts):
        if stage is not None:
            seq_len, theta = stage.seq_len or seq_len, stage.rope_theta or theta
            mixture = dict(stage.mixture) or mixture
        end = min(starts[index + 1][1] if index + 1 < len(starts) else config.train.max_steps, config.train.max_steps)
        if end > start:
            total = sum(mixture.values())
            shares = ", ".join(f"{n} {w / total:.0%}" for n, w in mixture.items() if w > 0) if total else "equal"
            rows.append((name, start + 1, end, seq_len, theta, shares))
    return rows


def add_eval_tables(report: Report, result: dict) -> None:
    """Validation loss/bpb per source and task scores (with their random baseline when the suite gives one)."""
    val = result.get("val") or {}
    if val:
        report.table(["source", "loss", "bpb", "tokens"],
                     [(s, v.get("loss"), v.get("bpb"), v.get("tokens")) for s, v in sorted(val.items())])
    tasks = result.get("tasks") or {}
    if tasks:
        rows = []
        for name, values in sorted(tasks.items()):
            # The suite reports a standard error for its main metric only: that names the metric.
            metric = next((k[: -len("_stderr")] for k in values if k.endswith("_stderr")), "score")
            main = values.get("score", values.get(metric))
            stderr = values.get(f"{metric}_stderr")
            rows.append((name, metric, main, stderr, values.get("random_baseline"), values.get("centred"), values.get("n")))
        report.table(["task", "metric", "score", "stderr", "random baseline", "centred", "n"], rows)
    aggregate = result.get("aggregate") or {}
    if _is_number(aggregate.get("centred")):
        report.text(f"Aggregate over {aggregate.get('tasks', len(tasks))} tasks: mean score {format_value(aggregate.get('score'))} "
                    f"against a random baseline of {format_value(aggregate.get('random_baseline'))}; centred score "
                    f"(score - baseline) / (1 - baseline), averaged: **{aggregate['centred']:+.4f}** (0 = chance).")


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.2f}%"


def _duration(seconds: float | None) -> str | None:
    if not _is_number(seconds):
        return None
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


def report_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write `report.md`, `report.html` and PNGs for a run folder (default: RUN_DIR/report); returns (md, html)."""
    from smoltrain.config import load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run folder")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise DataError(f"{config_path}: missing (is {run_dir} a training run folder?)")
    config = load_config(config_path)
    train, evals = read_metrics(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    report = Report(f"Run report: {run_dir.resolve().name}")
    report.text(f"Run folder `{run_dir}`; {len(train)} training log lines, {len(evals)} evaluations.")
    add_run_sections(report, config, train, evals, out_dir)
    add_diagnosis(report, read_records(run_dir))
    return report.write(out_dir)


__all__ = ["read_metrics", "read_records", "add_time_breakdown", "add_diagnosis", "flatten_eval", "lower_is_better", "report_run",
           "add_run_sections", "add_eval_tables", "add_long_context_section", "final_loss", "median_of", "format_value"]
