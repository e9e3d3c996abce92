"""The demo's one report: a report card with a row per stage (base, SFT, APO, GRPO, merged), then the
data, the speed probe's choice, the ablation, each stage's curves, side-by-side chats, long context, the export.

A stage's target metric "moved" when it differs from the model it started from by more than 2 standard
errors of the per-item differences: both rows answered the same held-out prompts, so the comparison is
paired (rows without per-item results, an older run's, fall back to the two rows' combined errors).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from rich.console import Console

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
POOLED = {"accuracy": ("no_think_accuracy", "think_accuracy")}  # a card metric that is the mean of per-mode rates
CHAT_METRICS = ["no_think_accuracy", "think_accuracy", "adherence", "think_format", "stop_rate"]
STAGE_CURVES = {  # stage -> (metrics.jsonl key, title)
    "pretrain": [("loss", "pretraining loss")],
    "sft": [("loss", "SFT loss (assistant tokens)")],
    "apo": [("loss", "APO-zero loss"), ("rewards/margins", "reward margin (chosen - rejected)")],
    "grpo": [("reward", "GRPO reward (mean)"), ("completions/mean_length", "completion length (tokens)")],
}


# ----------------------------------------------------------------------------- the card


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
        losses = [v["loss"] for v in (row.get("val") or {}).values() if v.get("loss") is not None]
        return (sum(losses) / len(losses), None) if losses else (None, None)
    return c.get(name), c.get(f"{name}_stderr")


def paired_difference(start: dict, row: dict, metric: str) -> tuple[float, float] | None:
    """(mean per-item difference row - start, its standard error) when both rows scored the same items
    of `metric` (a POOLED one: per part, then pooled like the rates); None otherwise."""
    from smoltrain.eval.scoring import standard_error

    parts = []
    for name in POOLED.get(metric, (metric,)):
        a, b = (((r.get("chat") or {}).get("items") or {}).get(name) for r in (start, row))
        if not a or not b or len(a) != len(b):
            return None
        diffs = [y - x for x, y in zip(a, b)]
        parts.append((sum(diffs) / len(diffs), standard_error(diffs)))
    return _mean_of(parts)


def _pm(value: float | None, stderr: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.0f}% ± {100 * (stderr or 0):.0f}"


def moved(rows: dict, name: str) -> str:
    """'no_think_accuracy +55 pts (moved); ...': a stage's target metrics against the row it started from."""
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
        unit = (f"{diff:+.2f}" if metric == "val_loss" else f"{diff:+.1f} tokens" if metric.endswith("length")
                else f"{100 * diff:+.0f} pts")
        # a rate at 0% or 100% on both sides has no noise: any difference is a move; a metric without
        # standard errors (validation loss) gets no verdict; 7.0 -> 6.9 tokens is no story
        small = metric.endswith("length") and abs(diff) < MIN_LENGTH_CHANGE
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
        record, row = records.get(ROW_STAGE[name]) or {}, rows.get(name)
        if row is None:
            reason = record.get("skipped") or ("not run" if not record else "not evaluated")
            table.append([title, "-"] + ["-"] * (len(headers) - 3) + [reason])
            continue
        step = (record.get("summary") or {}).get("step")
        steps = f"{step:,}" + ("*" if record.get("stopped_by_budget") else "") if step else "soup" if name == "merged" else "-"
        c, (val, _) = row["chat"], _metric(row, "val_loss")
        table.append([title, steps, *(_pm(*_metric(row, m)) for m in CHAT_METRICS),
                      f"{c['no_think_length']:.0f} / {c['think_length']:.0f}", f"{val:.3f}" if val is not None else "-",
                      f"{row['suite']['centred']:+.3f}", moved(rows, name) if name in TARGETS else "-"])
    return headers, table


def sample_chat(rows: dict, index: int) -> tuple[list[dict], dict[str, str]] | None:
    """(the prompt's messages, {row: reply}) of side-by-side sample `index`."""
    named = [(n, r) for n, r in rows.items() if len(r.get("samples") or []) > index]
    if not named:
        return None
    return named[0][1]["samples"][index]["messages"], {n: r["samples"][index]["reply"] for n, r in named}


def _chat_table(report: Report, rows: dict, index: int, kwargs: dict | None, lead: str = "") -> None:
    """One side-by-side sample: its prompt (and mode), then every stage's reply on one line."""
    sample = sample_chat(rows, index)
    if sample:
        messages, replies = sample
        mode = "" if "enable_thinking" not in (kwargs or {}) else " /think" if kwargs["enable_thinking"] else " /no_think"
        prompt = " | ".join(f"{m['role']}: {m['content']}" for m in messages) + mode
        report.text(f"{lead}`{prompt}`" if lead else f"**{prompt}**")
        report.table(["stage", "reply"], [(ROW_TITLE[n], f"`{_one_line(r)}`") for n, r in replies.items()])


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(text.replace("<|im_end|>", "").split()) or "(blank)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def stage_curves_figure(path: Path, records: dict) -> Path | None:
    """A panel per curve of each training stage that logged one."""
    from matplotlib.figure import Figure

    panels = []
    for stage, curves in STAGE_CURVES.items():
        folder = (records.get(stage) or {}).get("model")
        train = read_metrics(folder)[0] if folder and (Path(folder) / "metrics.jsonl").is_file() else []
        panels += [(title, p) for key, title in curves
                   if (p := [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float))])]
    if not panels:
        return None
    ncols = min(3, len(panels))
    fig = Figure(figsize=(3.6 * ncols, 2.8 * -(-len(panels) // ncols)))
    axes = fig.subplots(-(-len(panels) // ncols), ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for i, (ax, (title, points)) in enumerate(zip(axes, panels)):
        ax.plot(*zip(*points), color=plots.color_of(i), linewidth=1.4, marker="o" if len(points) < 12 else None, markersize=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return plots.save_figure(fig, path)


# ----------------------------------------------------------------------------- the report


def build_demo_report(out: Path, facts: dict, config: Config, total_s: float) -> Report:
    """Every section but the wall times (the report's own stage is still running); figures are written now."""
    rows = facts.get("rows") or {}
    report = Report("smoltrain demo").text(
        f"A {parameter_counts(config.model)['total'] / 1e6:.2f}M-parameter SmolLM3-style decoder taken through the "
        f"playbook on the embedded corpus (Python's documentation and code, arithmetic word problems) and the embedded "
        f"chat data, on {facts['device']}, in {total_s / 60:.1f} minutes: "
        f"{' -> '.join(ROW_TITLE[n] for n in ROW_TITLE if n in rows) or 'no stage evaluated'}."
        + (f" Stages reused from `{facts['reused_from']}`." if facts.get("reused_from") else ""))
    for section in (_card_section, _data_section, _speed_section, _ablation_section, _pretraining_sections,
                    _post_training_section, _long_context_section, _samples_section, _export_section):
        section(report, facts, config, out / "figures")
    return report


def _card_section(report: Report, facts: dict, config: Config, figures: Path) -> None:
    """The report card, its caption and verdicts, its figure, the stage curves, the persona chat."""
    from smoltrain.post.chat.evals import VIBE_PROMPTS

    rows, s = facts.get("rows") or {}, facts["sizes"]
    report.heading("Report card").table(*card_rows(facts))
    report.text(f"Chat evals: {s.chat_items} held-out items in the no_think and persona sets, {s.think_items} in the "
                f"think set, greedy, through the smollm3 template (no_think replies up to {s.chat_new_tokens} tokens, "
                f"think up to {s.think_new_tokens}); ± is the standard error. Pretraining evals: mean validation loss "
                f"over the sources (nats/token) and the embedded suite's centred score ({s.suite_items} items per task; "
                f"0 = chance). Think format is the share of think-mode replies with one closed think block and an "
                f"answer; adherence counts replies that ended their turn. `*`: stopped by its time box. \"target vs "
                f"start\" compares a stage with the model it started from (the merge with APO) on the same prompts, "
                f"item by item: a difference inside {SIGNIFICANT:g} standard errors of the per-item differences is no "
                f"clear change.")
    verdicts = [f"**{ROW_TITLE[name]}** {why}: {moved(rows, name)} against {ROW_TITLE[start]}."
                for name, (start, _, why) in TARGETS.items() if name in rows]
    if verdicts:
        report.bullets(verdicts)
    names = [n for n in ROW_TITLE if n in rows]
    if names:
        values = {m: [_metric(rows[n], m) for n in names] for m in CHAT_METRICS}
        report.image(plots.bar_panels(figures / "report_card.png", {m.replace("_", " "): (
            [ROW_TITLE[n] for n in names], [v or 0 for v, _ in vs], [e or 0 for _, e in vs]) for m, vs in values.items()},
            title="chat evals per stage (error bars: standard error)", ncols=5, zoom=False),
            "chat evals of each stage with standard errors")
    curves = stage_curves_figure(figures / "stage_curves.png", facts.get("records") or {})
    if curves:
        report.image(curves, "the curves of each training stage")
    _chat_table(report, rows, len(VIBE_PROMPTS) - 2, None, "The vibe test, one prompt with a persona system prompt, every stage: ")


def _data_section(report: Report, facts: dict, config: Config, figures: Path) -> None:
    """1. Data: tokens per source and split, the tokenizer, build times."""
    manifest, unigram, mixture = facts["data"]["manifest"], facts.get("unigram") or {}, config.data.mixture
    report.heading("1. Data").table(["source", "train tokens", "validation tokens", "mixture weight", "unigram loss"], [
        (source, manifest["tokens"].get(f"{source}.train"), manifest["tokens"].get(f"{source}.validation"),
         mixture.get(source, 1 / len(unigram)) if mixture else f"{1 / len(unigram):.2f}", unigram[source])
        for source in unigram])
    t = manifest["timings"]
    report.text(f"Byte-level BPE tokenizer with {manifest['vocab_size']:,} tokens. Build times"
                f"{' (cached: built by an earlier run)' if facts['data'].get('cached') else ''}: corpus "
                f"{t['corpus_s']:.1f} s, tokenizer {t['tokenizer_s']:.1f} s, tokenization {t['tokenize_s']:.1f} s. "
                f"The unigram loss is what a model that ignores context would score on each validation set.")


def _speed_section(report: Report, facts: dict, config: Config, figures: Path) -> None:
    """2. Speed: the probe's table and the configuration each stage ran."""
    report.heading("2. Speed: the fastest configuration on this machine")
    probe = facts.get("probe")
    if not probe:
        report.text("No speed probe (on CUDA the recipe's precision and compile settings apply).")
    elif probe.get("forced"):
        report.text(f"Not probed: every training stage ran **{facts.get('speed_choice')}** as asked.")
    else:
        report.table(["configuration", "tokens/s (best step)", "compile s (first / later copies)", "chosen"], [
            (name, round(e["tokens_per_s"]), f"{e['compile_s']:.1f} / {e['recompile_s']:.1f}" if e["compile"] == "on" else "-",
             "yes" if name == facts.get("speed_choice") else "") for name, e in probe["configs"].items()])
        report.text(f"A few training steps of each configuration on the recipe's micro-batch; the choice maximises "
                    f"the tokens trained in the planned time of the fixed-shape stages after paying their compiles. "
                    f"Pretraining, the ablation and SFT (packed rows of one length) ran **{facts['speed']['fixed'].get('name')}**; "
                    f"APO and GRPO (batches whose length changes every step, where compile would recompile) ran "
                    f"**{facts['speed']['variable'].get('name')}**."
                    + ("" if probe["native_bf16"] else " This CPU has no native bf16: fp32 only."))


def _ablation_section(report: Report, facts: dict, config: Config, figures: Path) -> None:
    """3. Ablation: intra-document masking on/off, judged against the seed noise."""
    path = ((facts.get("records") or {}).get("ablation") or {}).get("results")
    if not path or not Path(path).is_file():
        return
    a = json.loads(Path(path).read_text())
    report.heading("3. Ablation: intra-document masking on/off")
    report.text(f"{len(a['seeds'])} seeds per arm, {format_value(a['budget']['steps'])} steps each "
                f"({format_value(a['budget']['tokens_per_run'])} tokens); a difference counts when it exceeds "
                f"{a['noise_sigma']:g} standard errors of the seed-to-seed spread. The playbook expects no change "
                f"at short context.")
    report.table(["metric", "masking on", "masking off", "difference", "noise threshold", "verdict"], [
        (v["metric"], v["baseline_mean"], v["variant_mean"], f"{v['difference']:+.4g}", v["threshold"],
         f"**{v['verdict']}**" if v["verdict"] in ("better", "worse") else v["verdict"]) for v in a["verdicts"]])
    curves = Path(a["out_dir"]) / "figures" / "loss_curves.png"
    if curves.is_file():
        figures.mkdir(parents=True, exist_ok=True)
        report.image(shutil.copyfile(curves, figures / "ablation_loss_curves.png"),
                     "ablation training loss: mean over seeds, band between seeds")


def _pretraining_sections(report: Report, facts: dict, config: Config, figures: Path) -> None:
    """4. Pretraining (its curves) and 5. the pretraining evals of every stage."""
    rows, pre, unigram = facts.get("rows") or {}, (facts.get("records") or {}).get("pretrain") or {}, facts.get("unigram") or {}
    if pre.get("model") and (Path(pre["model"]) / "metrics.jsonl").is_file():
        train, evals = read_metrics(pre["model"])
        tps = median_of(train, "tokens_per_s")
        report.heading("4. Pretraining").text(
            f"{train[-1]['tokens']:,} tokens in {train[-1]['step']:,} steps"
            + (" (stopped by its time box)" if pre.get("summary", {}).get("stopped_by") else "")
            + (f", {tps:,.0f} tokens/s median" if tps else "") + ".")
        add_run_sections(report, config, train, evals, figures, prefix="pretrain_")
    if "base" in rows:
        sources = list(rows["base"]["val"])
        report.heading("5. Pretraining evals of every stage").table(
            ["stage"] + [f"val loss {s}" for s in sources] + ["suite score", "suite centred"],
            [[ROW_TITLE[n]] + [rows[n]["val"].get(s, {}).get("loss") for s in sources]
             + [rows[n]["suite"]["score"], f"{rows[n]['suite']['centred']:+.3f}"] for n in ROW_TITLE if n in rows])
        report.text("Validation loss (nats/token) per source"
                    + (" against the unigram baselines " + ", ".join(f"{s} {unigram[s]:.3f}" for s in sources if s in unigram)
                       if unigram else "")
                    + "; post-training on chat data is expected to raise it a little (forgetting), the merge with the "
                      "base to bring some of it back.")


def _post_training_section(report: Report, facts: dict, config: Config, figures: Path) -> None:
    """6. Post-training stages: steps, time boxes, recipes, the preference pairs and the merge."""
    records = facts.get("records") or {}
    post = [(n, records[ROW_STAGE[n]]) for n in ("sft", "apo", "grpo", "merged") if ROW_STAGE[n] in records]
    if not post:
        return
    report.heading("6. Post-training stages").table(
        ["stage", "status", "steps", "time box s", "wall s", "stopped by time box", "recipe"],
        [(ROW_TITLE[name], r.get("skipped") or "ran",
          f"{r['summary'].get('step', '-')} of {r['summary'].get('max_steps', '-')}" if r.get("summary") else "-",
          f"{r['planned_s']:.0f}" if r.get("planned_s") else "-", round(r["wall_s"], 1) if r.get("wall_s") else "-",
          "yes" if r.get("stopped_by_budget") else "", f"`{r['recipe']}`" if r.get("recipe") else "-") for name, r in post])
    pairs = (records.get("apo") or {}).get("pairs")
    if pairs:
        report.text(f"Preference pairs: training questions under a system-prompt rule; chosen = the embedded reply "
                    f"that keeps the rule, rejected = `{pairs['rejected_model']}`'s reply (verified to break it).")
        report.bullets([f"{mode}: {p['kept']} of {p['prompts']} prompts kept as pairs; the rejected model kept the rule "
                        f"on {p.get('rejected_adherence', 0):.0%} (those pairs are dropped); {p.get('rejected_rewritten', 0)} "
                        f"rejected replies that also got the arithmetic wrong were replaced by the right answer under "
                        f"another rule; dropped {p['dropped'] or 'none'}" if p.get("kept") else
                        f"{mode}: {p.get('error', 'no pair kept')}" for mode, p in pairs["summaries"].items()])
    merge = records.get("merge") or {}
    if merge.get("soup_of"):
        report.text(f"Merge: a linear soup of {len(merge['soup_of'])} APO checkpoints "
                    f"({', '.join(Path(p).name for p in merge['soup_of'])}), then {merge['weights'][0]:g} x soup + "
                    f"{merge['weights'][1]:g} x base.")
    report.text("Every stage can be re-run by hand from its recipe (`smoltrain sft|dpo|grpo RECIPE`), or the demo "
                "restarted from any finished stage: `smoltrain demo --stages grpo,merge` reuses the earlier ones.")


def long_context_rows(evals: dict) -> tuple[list[str], list[list[str]]]:
    """Needle accuracy per length, and validation loss at positions inside and beyond the trained length
    (token-weighted over sources; a bucket across the boundary counts in neither), of each model."""
    trained = evals["trained_length"]

    def loss(curves: dict, within: bool) -> str:
        buckets = [b for c in curves.values() for b in c if (b["end"] <= trained if within else b["start"] >= trained)]
        tokens = sum(b["tokens"] for b in buckets)
        return f"{sum(b['loss'] * b['tokens'] for b in buckets) / tokens:.3f}" if tokens else "-"

    headers = ["model", *(f"needle @{n:,}" for n in evals["lengths"]), f"loss @<{trained}", f"loss @>={trained}"]
    return headers, [[name, *(_pm(m["needle"][str(n)], m["needle_stderr"][str(n)]) for n in evals["lengths"]),
                      loss(m["loss_by_position"], True), loss(m["loss_by_position"], False)]
                     for name, m in evals["models"].items()]


def _long_context_section(report: Report, facts: dict, config: Config, figures: Path) -> None:
    """Long context: the base model, the base with YaRN (no training) and the ABF-extended model."""
    evals = facts.get("long_context")
    if not evals:
        return
    report.heading("Long context: ABF and YaRN to 8x the training length").table(*long_context_rows(evals))
    report.text(f"Trained at {evals['trained_length']:,} tokens, extended to {evals['length']:,}: ABF continues "
                f"pretraining at the longer length with the RoPE base raised as much (recipes/long-context.yaml); "
                f"YaRN stretches the base model's RoPE with no training. Needle: RULER's niah_single_1 (string match, "
                f"± standard error); loss: validation nats/token by position inside the document, mean over sources.")
    first = next(iter(evals["models"].values()))["loss_by_position"]
    source = "prose" if "prose" in first else next(iter(first))
    report.image(plots.line_plot(figures / "loss_by_position.png", {
        name: ([c["end"] for c in m["loss_by_position"][source]], [c["loss"] for c in m["loss_by_position"][source]])
        for name, m in evals["models"].items()}, title=f"validation loss by position ({source})",
        xlabel="position (bucket end)", ylabel="nats/token"), "loss by position before and after the extension")


def _samples_section(report: Report, facts: dict, config: Config, figures: Path) -> None:
    """7. Sample chats: the same prompts answered by every stage."""
    from smoltrain.post.chat.evals import VIBE_PROMPTS

    if facts.get("rows"):
        report.heading("7. Sample chats: the same prompts, every stage")
        report.text("Greedy replies through the chat template. Reading outputs is how SmolLM3's team caught system "
                    "prompts their data processing had dropped, which no eval noticed.")
        for index, prompt in enumerate(VIBE_PROMPTS):
            _chat_table(report, facts["rows"], index, prompt.get("chat_template_kwargs"))


def _export_section(report: Report, facts: dict, config: Config, figures: Path) -> None:
    """8. The Hugging Face export, loaded back with transformers, and its model card."""
    e = facts.get("export")
    if e:
        report.heading("8. Hugging Face export and model card")
        report.text(f"`{e['path']}` (from `{e['model']}`) holds {', '.join(f'`{f}`' for f in e['files'])}. "
                    f"`transformers.AutoModelForCausalLM` loads it as **{e['architecture']}**; on validation text its "
                    f"logits differ from ours by at most {e['max_logit_diff']:.1e}, and greedy continuations "
                    f"{'are identical' if e['greedy_match'] else 'DIFFER'}. Its model card (`README.md`) lists the "
                    f"stages {e['card_stages']}.")


def add_wall_times(report: Report, figures: Path, wall: dict[str, float], total_s: float) -> None:
    report.heading("9. Wall time per stage")
    report.table(["stage", "seconds", "share"], [(k, round(v, 1), f"{v / total_s:.0%}") for k, v in wall.items()]
                 + [("total", round(total_s, 1), "100%")])
    report.image(plots.bar_plot(figures / "wall_time.png", list(wall), list(wall.values()), title="wall time per stage",
                                ylabel="seconds", value_format="{:.0f}"), "wall time per stage (seconds)")


def _print_table(console: Console, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    for r in [headers, *rows]:
        console.print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)), markup=False, soft_wrap=True)


def print_summary(console: Console, facts: dict, total_s: float) -> None:
    """The report card (and the long-context table) in the terminal."""
    console.rule(f"[bold]smoltrain demo: done in {total_s / 60:.1f} min")
    _print_table(console, *card_rows(facts))
    if facts.get("long_context"):
        _print_table(console, *long_context_rows(facts["long_context"]))
    if facts.get("speed_choice"):
        console.print(f"speed: {facts['speed_choice']} chosen by the probe", soft_wrap=True)
    if e := facts.get("export"):
        console.print(f"export: {e['architecture']}, max |logit diff| vs transformers {e['max_logit_diff']:.1e}, "
                      f"model card stages {e['card_stages']}", soft_wrap=True)
