"""The demo's one report: a report card with a row per stage (base, SFT, APO, GRPO, merged), then what
was trained, how fast (the speed probe's choice), what the ablation found, the curves of each stage,
the same chats answered by every stage side by side, the export and where the time went.

The report card says for each post-training stage whether its target metric moved, judged item by
item against the model it started from: both rows answered the same held-out prompts, so the noise
is the standard error of the per-item differences (paired), a difference inside 2 of them is "no
clear change", and a stage that did not move is reported as such rather than read into noise. Rows
without per-item results (an older run's) fall back to the two rows' combined standard errors.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from smoltrain.config import Config
from smoltrain.model.flops import parameter_counts
from smoltrain.report import plots
from smoltrain.report.document import Report, format_value
from smoltrain.report.run import add_run_sections, median_of, read_metrics

ROW_STAGE = {"base": "pretrain", "sft": "sft", "apo": "apo", "grpo": "grpo", "merged": "merge"}
ROW_TITLE = {"base": "base (pretrained)", "sft": "SFT", "apo": "APO-zero", "grpo": "GRPO", "merged": "merged"}
# What each stage is for (the playbook), its target metrics and the row it is compared with.
TARGETS = {
    "sft": ("base", ["no_think_accuracy", "adherence", "think_format", "stop_rate"],
            "teaches the chat format, both modes, the system-prompt rules and some arithmetic"),
    "apo": ("sft", ["adherence", "accuracy"], "prefers replies that keep the system prompt's rule over the SFT "
            "model's own that break it (SmolLM3's APO: +15-20 IFEval points)"),
    "grpo": ("apo", ["no_think_accuracy", "no_think_length"], "rewards right no_think answers, penalises long ones"),
    "merged": ("apo", ["adherence", "val_loss"], "keeps APO's behaviour, recovers some of the base's language modelling"),
}
SIGNIFICANT = 2.0  # standard errors of the difference
MIN_LENGTH_CHANGE = 1.0  # tokens: a reply length that moves less is "no clear change" however tight its error


# ----------------------------------------------------------------------------- the card


# A card metric that is the mean of per-mode rates (of sets of any sizes), with its standard error.
POOLED = {"accuracy": ("no_think_accuracy", "think_accuracy")}


def _mean_of(parts: list[tuple[float, float]]) -> tuple[float, float]:
    """(mean of the values, standard error of that mean) of independent (value, standard error) parts."""
    return sum(v for v, _ in parts) / len(parts), math.hypot(*(e for _, e in parts)) / len(parts)


def _metric(row: dict, name: str) -> tuple[float | None, float | None]:
    """(value, standard error) of a card metric of one row."""
    c = row.get("chat") or {}
    if name in POOLED:
        parts = [(c.get(n), c.get(f"{n}_stderr") or 0) for n in POOLED[name]]
        return (None, None) if any(v is None for v, _ in parts) else _mean_of(parts)
    if name == "val_loss":
        val = row.get("val") or {}
        losses = [v["loss"] for v in val.values() if v.get("loss") is not None]
        return (sum(losses) / len(losses), None) if losses else (None, None)
    if name == "suite":
        s = row.get("suite") or {}
        return s.get("centred"), None
    return c.get(name), c.get(f"{name}_stderr")


def paired_difference(start: dict, row: dict, metric: str) -> tuple[float, float] | None:
    """(mean per-item difference row - start, its standard error) when both rows scored the same items
    of `metric` (a POOLED one: per part, then pooled like the rates); None otherwise."""
    from smoltrain.eval.scoring import standard_error

    parts = []
    for name in POOLED.get(metric, (metric,)):
        a = ((start.get("chat") or {}).get("items") or {}).get(name)
        b = ((row.get("chat") or {}).get("items") or {}).get(name)
        if not a or not b or len(a) != len(b):
            return None
        diffs = [y - x for x, y in zip(a, b)]
        parts.append((sum(diffs) / len(diffs), standard_error(diffs)))
    return _mean_of(parts)


def _pm(value: float | None, stderr: float | None, percent: bool = True) -> str:
    if value is None or value != value:
        return "-"
    if percent:
        return f"{100 * value:.0f}% ± {100 * (stderr or 0):.0f}"
    return f"{value:.1f} ± {stderr or 0:.1f}"


def moved(rows: dict, name: str) -> str:
    """'SFT: think_format +55 points (moved)' style verdict of a stage against the row it started from."""
    start, metrics, _ = TARGETS[name]
    if name not in rows or start not in rows:
        return "-"
    parts = []
    for metric in metrics:
        (a, sa), (b, sb) = _metric(rows[start], metric), _metric(rows[name], metric)
        if a is None or b is None:
            continue
        paired = paired_difference(rows[start], rows[name], metric)
        diff, noise = paired if paired else (b - a, math.hypot(sa or 0, sb or 0))
        if metric.endswith("length") or metric == "val_loss":
            unit = f"{diff:+.2f}" if metric == "val_loss" else f"{diff:+.1f} tokens"
        else:
            unit = f"{100 * diff:+.0f} pts"
        # a rate at 0% or 100% on both sides has no noise: any difference is a move; a metric without
        # standard errors (validation loss) gets no verdict
        small = metric.endswith("length") and abs(diff) < MIN_LENGTH_CHANGE  # 7.0 -> 6.9 tokens is no story
        verdict = ("" if sa is None and sb is None and paired is None else
                   "no clear change" if abs(diff) < SIGNIFICANT * noise or diff == 0 or small else "moved")
        parts.append(f"{metric} {unit}" + (f" ({verdict})" if verdict else ""))
    return "; ".join(parts) or "-"


def card_rows(facts: dict) -> tuple[list[str], list[list[str]]]:
    """The report card: a row per stage, chat evals with standard errors, pretraining evals."""
    rows, records = facts.get("rows") or {}, facts.get("records") or {}
    headers = ["stage", "steps", "no_think acc", "think acc", "adherence", "think format", "stop rate",
               "tokens no_think / think", "val loss", "suite (centred)", "target vs start"]
    table = []
    for name, title in ROW_TITLE.items():
        record = records.get(ROW_STAGE[name]) or {}
        row = rows.get(name)
        if row is None:
            reason = record.get("skipped") or ("not run" if not record else "not evaluated")
            table.append([title, "-"] + ["-"] * (len(headers) - 3) + [reason])
            continue
        summary = record.get("summary") or {}
        steps = (f"{summary['step']:,}" + ("*" if record.get("stopped_by_budget") else "")) if summary.get("step") else \
            ("soup" if name == "merged" else "-")
        c = row["chat"]
        lengths = f"{c['no_think_length']:.0f} / {c['think_length']:.0f}"
        val, _ = _metric(row, "val_loss")
        table.append([title, steps, _pm(*_metric(row, "no_think_accuracy")), _pm(*_metric(row, "think_accuracy")),
                      _pm(*_metric(row, "adherence")), _pm(*_metric(row, "think_format")), _pm(*_metric(row, "stop_rate")),
                      lengths, f"{val:.3f}" if val is not None else "-", f"{row['suite']['centred']:+.3f}",
                      moved(rows, name) if name in TARGETS else "-"])
    return headers, table


def sample_chat(rows: dict, index: int) -> tuple[list[dict], dict[str, str]] | None:
    """(the prompt's messages, {row: reply}) of side-by-side sample `index`."""
    named = [(n, r) for n, r in rows.items() if len(r.get("samples") or []) > index]
    if not named:
        return None
    return named[0][1]["samples"][index]["messages"], {n: r["samples"][index]["reply"] for n, r in named}


def _prompt_text(messages: list[dict], kwargs: dict | None = None) -> str:
    mode = "" if not kwargs or "enable_thinking" not in kwargs else (" /think" if kwargs["enable_thinking"] else " /no_think")
    return " | ".join(f"{m['role']}: {m['content']}" for m in messages) + mode


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(text.replace("<|im_end|>", "").split())
    if not text:
        return "(blank)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------- figures


STAGE_CURVES = {  # stage -> (metrics.jsonl keys, titles)
    "pretrain": [("loss", "pretraining loss")],
    "sft": [("loss", "SFT loss (assistant tokens)")],
    "apo": [("loss", "APO-zero loss"), ("rewards/margins", "reward margin (chosen - rejected)")],
    "grpo": [("reward", "GRPO reward (mean)"), ("completions/mean_length", "completion length (tokens)")],
}


def stage_curves_figure(path: Path, records: dict) -> Path | None:
    from matplotlib.figure import Figure

    panels = []
    for stage, curves in STAGE_CURVES.items():
        folder = (records.get(stage) or {}).get("model")
        if not folder or not (Path(folder) / "metrics.jsonl").is_file():
            continue
        train, _ = read_metrics(folder)
        for key, title in curves:
            points = [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
            if points:
                panels.append((title, points))
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(3.6 * ncols, 2.8 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for i, (ax, (title, points)) in enumerate(zip(axes, panels)):
        ax.plot([p[0] for p in points], [p[1] for p in points], color=plots.color_of(i), linewidth=1.4,
                marker="o" if len(points) < 12 else None, markersize=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return plots.save_figure(fig, path)


def card_figure(path: Path, rows: dict) -> Path | None:
    """Each chat eval per stage, with standard-error bars."""
    from matplotlib.figure import Figure

    names = [n for n in ROW_TITLE if n in rows]
    if not names:
        return None
    metrics = ["no_think_accuracy", "think_accuracy", "adherence", "think_format", "stop_rate"]
    fig = Figure(figsize=(11, 3.6))
    ax = fig.subplots()
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [_metric(rows[name], m) for m in metrics]
        ax.bar([j + (i - (len(names) - 1) / 2) * width for j in range(len(metrics))], [v or 0 for v, _ in values],
               width=width, yerr=[s or 0 for _, s in values], color=plots.color_of(i), label=ROW_TITLE[name], capsize=2)
    ax.set_xticks(range(len(metrics)), [m.replace("_", " ") for m in metrics], fontsize=9)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate")
    ax.set_title("chat evals per stage (error bars: standard error)")
    ax.legend(fontsize=8, ncol=len(names))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return plots.save_figure(fig, path)


# ----------------------------------------------------------------------------- the report


def build_demo_report(out: Path, facts: dict, config: Config, total_s: float) -> Report:
    """Every section but the wall times (the report's own stage is still running); figures are written now."""
    figures = out / "figures"
    rows, records = facts.get("rows") or {}, facts.get("records") or {}
    counts = parameter_counts(config.model)
    report = Report("smoltrain demo")
    stages_run = [ROW_TITLE[n] for n in ROW_TITLE if n in rows]
    report.text(
        f"A {counts['total'] / 1e6:.2f}M-parameter SmolLM3-style decoder taken through the playbook on the embedded "
        f"corpus (Python's documentation and code, arithmetic word problems) and the embedded chat data, on "
        f"{facts['device']}, in {total_s / 60:.1f} minutes: {' -> '.join(stages_run) or 'no stage evaluated'}."
        + (f" Stages reused from `{facts['reused_from']}`." if facts.get("reused_from") else "")
    )

    _card_section(report, facts, rows, records, figures)
    _data_section(report, facts, config)
    _speed_section(report, facts)
    _ablation_section(report, records, figures)
    _pretraining_sections(report, facts, rows, records, config, figures)
    _post_training_section(report, records)
    _samples_section(report, rows)
    _export_section(report, facts)
    return report


def _card_section(report: Report, facts: dict, rows: dict, records: dict, figures: Path) -> None:
    """The report card: a row per stage, its caption and verdicts, the card's figure, the stage curves, the persona chat."""
    report.heading("Report card")
    headers, table = card_rows(facts)
    report.table(headers, table)
    s = facts["sizes"]
    report.text(f"Chat evals: {s.chat_items} held-out items in the no_think and persona sets, {s.think_items} in the "
                f"think set, greedy, through the smollm3 template (no_think "
                f"replies up to {s.chat_new_tokens} tokens, think up to {s.think_new_tokens}); ± is the standard error. "
                f"Pretraining evals: mean validation loss over the sources (nats/token) and the embedded suite's centred "
                f"score ({s.suite_items} items per task; 0 = chance). Think format is the share of think-mode replies "
                f"with one closed think block and an answer; adherence counts replies that ended their turn. `*`: stopped by its "
                f"time box. \"target vs start\" "
                f"compares a stage with the model it started from (the merge with APO) on the same prompts, item by "
                f"item: a difference inside {SIGNIFICANT:g} standard errors of the per-item differences is no clear change.")
    verdicts = [f"**{ROW_TITLE[name]}** {why}: {moved(rows, name)} against {ROW_TITLE[start]}."
                for name, (start, _, why) in TARGETS.items() if name in rows]
    if verdicts:
        report.bullets(verdicts)
    image = card_figure(figures / "report_card.png", rows)
    if image:
        report.image(image, "chat evals of each stage with standard errors")
    curves = stage_curves_figure(figures / "stage_curves.png", records)
    if curves:
        report.image(curves, "the curves of each training stage")
    persona = sample_chat(rows, len(_vibe_prompts()) - 2) if rows else None
    if persona:
        messages, replies = persona
        report.text(f"The vibe test, one prompt with a persona system prompt, every stage: `{_prompt_text(messages)}`")
        report.table(["stage", "reply"], [(ROW_TITLE[n], f"`{_one_line(r)}`") for n, r in replies.items()])


def _data_section(report: Report, facts: dict, config: Config) -> None:
    """1. Data: tokens per source and split, the tokenizer, build times."""
    report.heading("1. Data")
    manifest = facts["data"]["manifest"]
    unigram = facts.get("unigram") or {}
    mixture = config.data.mixture
    report.table(["source", "train tokens", "validation tokens", "mixture weight", "unigram loss"], [
        (source, manifest["tokens"].get(f"{source}.train"), manifest["tokens"].get(f"{source}.validation"),
         mixture.get(source, 1 / len(unigram)) if mixture else f"{1 / len(unigram):.2f}", unigram[source])
        for source in unigram])
    t = manifest["timings"]
    cached = " (cached: built by an earlier run)" if facts["data"].get("cached") else ""
    report.text(f"Byte-level BPE tokenizer with {manifest['vocab_size']:,} tokens. Build times{cached}: corpus "
                f"{t['corpus_s']:.1f} s, tokenizer {t['tokenizer_s']:.1f} s, tokenization {t['tokenize_s']:.1f} s. "
                f"The unigram loss is what a model that ignores context would score on each validation set.")


def _speed_section(report: Report, facts: dict) -> None:
    """2. Speed: the probe's table and the configuration each stage ran."""
    report.heading("2. Speed: the fastest configuration on this machine")
    probe = facts.get("probe")
    if probe and probe.get("forced"):
        report.text(f"Not probed: every training stage ran **{facts.get('speed_choice')}** as asked.")
    elif probe:
        report.table(["configuration", "tokens/s (best step)", "compile s (first / later copies)", "chosen"], [
            (name, round(e["tokens_per_s"]), f"{e['compile_s']:.1f} / {e['recompile_s']:.1f}" if e["compile"] == "on" else "-",
             "yes" if name == facts.get("speed_choice") else "")
            for name, e in probe["configs"].items()])
        fixed, variable = facts["speed"]["fixed"], facts["speed"]["variable"]
        report.text(f"A few training steps of each configuration on the recipe's micro-batch; the choice maximises "
                    f"the tokens trained in the planned time of the fixed-shape stages after paying their compiles. "
                    f"Pretraining, the ablation and SFT (packed rows of one length) ran **{fixed.get('name')}**; "
                    f"APO and GRPO (batches whose length changes every step, where compile would recompile) ran "
                    f"**{variable.get('name')}**."
                    + ("" if probe["native_bf16"] else " This CPU has no native bf16: fp32 only."))
    else:
        report.text("No speed probe (on CUDA the recipe's precision and compile settings apply).")


def _ablation_section(report: Report, records: dict, figures: Path) -> None:
    """3. Ablation: intra-document masking on/off, judged against the seed noise."""
    ablation = _ablation(records)
    if ablation:
        report.heading("3. Ablation: intra-document masking on/off")
        report.text(f"{len(ablation['seeds'])} seeds per arm, {format_value(ablation['budget']['steps'])} steps each "
                    f"({format_value(ablation['budget']['tokens_per_run'])} tokens); a difference counts when it exceeds "
                    f"{ablation['noise_sigma']:g} standard errors of the seed-to-seed spread. The playbook expects no change "
                    f"at short context.")
        report.table(["metric", "masking on", "masking off", "difference", "noise threshold", "verdict"], [
            (v["metric"], v["baseline_mean"], v["variant_mean"], f"{v['difference']:+.4g}", v["threshold"],
             f"**{v['verdict']}**" if v["verdict"] in ("better", "worse") else v["verdict"])
            for v in ablation["verdicts"]])
        loss_curves = Path(ablation["out_dir"]) / "figures" / "loss_curves.png"
        if loss_curves.is_file():
            figures.mkdir(parents=True, exist_ok=True)
            report.image(shutil.copyfile(loss_curves, figures / "ablation_loss_curves.png"),
                         "ablation training loss: mean over seeds, band between seeds")


def _pretraining_sections(report: Report, facts: dict, rows: dict, records: dict, config: Config, figures: Path) -> None:
    """4. Pretraining (its curves) and 5. the pretraining evals of every stage."""
    pre = records.get("pretrain") or {}
    if pre.get("model") and (Path(pre["model"]) / "metrics.jsonl").is_file():
        report.heading("4. Pretraining")
        train, evals = read_metrics(pre["model"])
        tps = median_of(train, "tokens_per_s")
        report.text(f"{train[-1]['tokens']:,} tokens in {train[-1]['step']:,} steps"
                    + (" (stopped by its time box)" if pre.get("summary", {}).get("stopped_by") else "")
                    + (f", {tps:,.0f} tokens/s median" if tps else "") + ".")
        add_run_sections(report, config, train, evals, figures, prefix="pretrain_")
    unigram = facts.get("unigram") or {}
    if "base" in rows:
        base = rows["base"]
        report.heading("5. Pretraining evals of every stage")
        sources = list(base["val"])
        report.table(["stage"] + [f"val loss {s}" for s in sources] + ["suite score", "suite centred"], [
            [ROW_TITLE[n]] + [rows[n]["val"].get(s, {}).get("loss") for s in sources]
            + [rows[n]["suite"]["score"], f"{rows[n]['suite']['centred']:+.3f}"]
            for n in ROW_TITLE if n in rows])
        report.text("Validation loss (nats/token) per source"
                    + (" against the unigram baselines " + ", ".join(f"{s} {unigram[s]:.3f}" for s in sources if s in unigram)
                       if unigram else "")
                    + "; post-training on chat data is expected to raise it a little (forgetting), the merge with the "
                      "base to bring some of it back.")


def _post_training_section(report: Report, records: dict) -> None:
    """6. Post-training stages: steps, time boxes, recipes, the preference pairs and the merge."""
    post = [(n, records[ROW_STAGE[n]]) for n in ("sft", "apo", "grpo", "merged") if ROW_STAGE[n] in records]
    if post:
        report.heading("6. Post-training stages")
        table = []
        for name, record in post:
            summary = record.get("summary") or {}
            table.append((ROW_TITLE[name], record.get("skipped") or "ran",
                          f"{summary.get('step', '-')} of {summary.get('max_steps', '-')}" if summary else "-",
                          f"{record['planned_s']:.0f}" if record.get("planned_s") else "-",
                          round(record["wall_s"], 1) if record.get("wall_s") else "-",
                          "yes" if record.get("stopped_by_budget") else "",
                          f"`{record['recipe']}`" if record.get("recipe") else "-"))
        report.table(["stage", "status", "steps", "time box s", "wall s", "stopped by time box", "recipe"], table)
        pairs = (records.get("apo") or {}).get("pairs")
        if pairs:
            lines = []
            for mode, p in pairs["summaries"].items():
                if p.get("kept"):
                    lines.append(f"{mode}: {p['kept']} of {p['prompts']} prompts kept as pairs; the rejected model kept "
                                 f"the rule on {p.get('rejected_adherence', 0):.0%} (those pairs are dropped); "
                                 f"{p.get('rejected_rewritten', 0)} rejected replies that also got the arithmetic wrong "
                                 f"were replaced by the right answer under another rule; dropped {p['dropped'] or 'none'}")
                else:
                    lines.append(f"{mode}: {p.get('error', 'no pair kept')}")
            report.text(f"Preference pairs: training questions under a system-prompt rule; chosen = the embedded reply "
                        f"that keeps the rule, rejected = `{pairs['rejected_model']}`'s reply (verified to break it).")
            report.bullets(lines)
        merge = records.get("merge") or {}
        if merge.get("soup_of"):
            report.text(f"Merge: a linear soup of {len(merge['soup_of'])} APO checkpoints "
                        f"({', '.join(Path(p).name for p in merge['soup_of'])}), then {merge['weights'][0]:g} x soup + "
                        f"{merge['weights'][1]:g} x base.")
        report.text("Every stage can be re-run by hand from its recipe (`smoltrain sft|dpo|grpo RECIPE`), or the demo "
                    "restarted from any finished stage: `smoltrain demo --stages grpo,merge` reuses the earlier ones.")


def _samples_section(report: Report, rows: dict) -> None:
    """7. Sample chats: the same prompts answered by every stage."""
    if rows:
        report.heading("7. Sample chats: the same prompts, every stage")
        report.text("Greedy replies through the chat template. Reading outputs is how SmolLM3's team caught system "
                    "prompts their data processing had dropped, which no eval noticed.")
        for index, prompt in enumerate(_vibe_prompts()):
            sample = sample_chat(rows, index)
            if not sample:
                continue
            messages, replies = sample
            report.text(f"**{_prompt_text(messages, prompt.get('chat_template_kwargs'))}**")
            report.table(["stage", "reply"], [(ROW_TITLE[n], f"`{_one_line(r)}`") for n, r in replies.items()])


def _export_section(report: Report, facts: dict) -> None:
    """8. The Hugging Face export, loaded back with transformers, and its model card."""
    e = facts.get("export")
    if e:
        report.heading("8. Hugging Face export and model card")
        report.text(f"`{e['path']}` (from `{e['model']}`) holds {', '.join(f'`{f}`' for f in e['files'])}. "
                    f"`transformers.AutoModelForCausalLM` loads it as **{e['architecture']}**; on validation text its "
                    f"logits differ from ours by at most {e['max_logit_diff']:.1e}, and greedy continuations "
                    f"{'are identical' if e['greedy_match'] else 'DIFFER'}. Its model card (`README.md`) lists the "
                    f"stages {e['card_stages']}.")


def _vibe_prompts() -> list[dict]:
    from smoltrain.post.chat_eval import VIBE_PROMPTS

    return VIBE_PROMPTS


def _ablation(records: dict) -> dict | None:
    import json

    path = (records.get("ablation") or {}).get("results")
    return json.loads(Path(path).read_text()) if path and Path(path).is_file() else None


def add_wall_times(report: Report, figures: Path, wall: dict[str, float], total_s: float) -> None:
    report.heading("9. Wall time per stage")
    report.table(["stage", "seconds", "share"], [(k, round(v, 1), f"{v / total_s:.0%}") for k, v in wall.items()]
                 + [("total", round(total_s, 1), "100%")])
    report.image(plots.bar_plot(figures / "wall_time.png", list(wall), list(wall.values()), title="wall time per stage",
                                ylabel="seconds", value_format="{:.0f}"), "wall time per stage (seconds)")
