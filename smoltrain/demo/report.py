"""The demo's one report: a report card with a row per stage (base, SFT, APO, GRPO, merged), then the data,
the speed probe's choice, the ablation, each stage's curves, side-by-side chats, long context, the export.

A stage's target metric "moved" when it differs from the model it started from by more than 2 standard errors
of the per-item differences: both rows answered the same held-out prompts, so the comparison is paired (rows
without per-item results, an older run's, fall back to the two rows' combined errors).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from rich.console import Console

from smoltrain.config import Config
from smoltrain.model.flops import parameter_counts
from smoltrain.post.chat.evals import POOLED, VIBE_PROMPTS, mean_of, paired_difference
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
CHAT_METRICS = ["no_think_accuracy", "think_accuracy", "adherence", "think_format", "stop_rate"]
STAGE_CURVES = {"pretrain": {"loss": "pretraining loss"}, "sft": {"loss": "SFT loss (assistant tokens)"},
                "apo": {"loss": "APO-zero loss", "rewards/margins": "reward margin (chosen - rejected)"},
                "grpo": {"reward": "GRPO reward (mean)", "completions/mean_length": "completion length (tokens)"}}


# ----------------------------------------------------------------------------- the card


def metric(row: dict, name: str) -> tuple[float | None, float | None]:
    """(value, standard error) of a card metric of one row."""
    c = row.get("chat") or {}
    if name in POOLED:
        parts = [(c.get(n), c.get(f"{n}_stderr") or 0) for n in POOLED[name]]
        return (None, None) if any(v is None for v, _ in parts) else mean_of(parts)
    if name == "val_loss":
        losses = [v["loss"] for v in (row.get("val") or {}).values() if v.get("loss") is not None]
        return (sum(losses) / len(losses), None) if losses else (None, None)
    return c.get(name), c.get(f"{name}_stderr")


def _pm(value: float | None, stderr: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.0f}% ± {100 * (stderr or 0):.0f}"


def moved(rows: dict, name: str) -> str:
    """'no_think_accuracy +55 pts (moved); ...': a stage's target metrics against the row it started from."""
    start, metrics, _ = TARGETS[name]
    if name not in rows or start not in rows:
        return "-"
    parts = []
    for m in metrics:
        (a, sa), (b, sb) = metric(rows[start], m), metric(rows[name], m)
        if a is None or b is None:
            continue
        paired = paired_difference(rows[start].get("chat") or {}, rows[name].get("chat") or {}, m)
        diff, noise = paired or (b - a, math.hypot(sa or 0, sb or 0))
        unit = f"{diff:+.2f}" if m == "val_loss" else f"{diff:+.1f} tokens" if m.endswith("length") else f"{100 * diff:+.0f} pts"
        # a rate at 0% or 100% on both sides has no noise: any difference is a move; a metric without
        # standard errors (validation loss) gets no verdict; 7.0 -> 6.9 tokens is no story
        small = m.endswith("length") and abs(diff) < MIN_LENGTH_CHANGE
        verdict = ("" if sa is None and sb is None and paired is None else
                   "no clear change" if abs(diff) < SIGNIFICANT * noise or diff == 0 or small else "moved")
        parts.append(f"{m} {unit}" + (f" ({verdict})" if verdict else ""))
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
            table.append([title] + ["-"] * 9 + [record.get("skipped") or ("not run" if not record else "not evaluated")])
            continue
        step = (record.get("summary") or {}).get("step")
        steps = f"{step:,}" + ("*" if record.get("stopped_by_budget") else "") if step else "soup" if name == "merged" else "-"
        c, (val, _) = row["chat"], metric(row, "val_loss")
        table.append([title, steps, *(_pm(*metric(row, m)) for m in CHAT_METRICS), f"{c['no_think_length']:.0f} / {c['think_length']:.0f}",
                      format_value(val), f"{row['suite']['centred']:+.3f}", moved(rows, name) if name in TARGETS else "-"])
    return headers, table


def _chat_table(report: Report, rows: dict, index: int, lead: str = "") -> None:
    """Side-by-side sample `index`: its prompt (and mode), then every stage's reply on one line."""
    if named := [(n, r["samples"][index]) for n, r in rows.items() if len(r.get("samples") or []) > index]:
        kwargs = VIBE_PROMPTS[index].get("chat_template_kwargs") or {}
        mode = "" if "enable_thinking" not in kwargs else " /think" if kwargs["enable_thinking"] else " /no_think"
        prompt = " | ".join(f"{m['role']}: {m['content']}" for m in named[0][1]["messages"]) + mode
        report.text(f"{lead}`{prompt}`" if lead else f"**{prompt}**")
        lines = [(ROW_TITLE[n], " ".join(s["reply"].replace("<|im_end|>", "").split()) or "(blank)") for n, s in named]
        report.table(["stage", "reply"], [(title, f"`{t if len(t) <= 240 else t[:239] + '…'}`") for title, t in lines])


# ----------------------------------------------------------------------------- the report


def build_demo_report(out: Path, facts: dict, config: Config, total_s: float) -> Report:
    """Every section but the wall times (the report's own stage is still running); figures are written now."""
    rows = facts.get("rows") or {}
    report = Report("smoltrain demo").text(
        f"A {parameter_counts(config.model)['total'] / 1e6:.2f}M-parameter SmolLM3-style decoder taken through the playbook on "
        f"the embedded corpus (Python's documentation and code, arithmetic word problems) and the embedded chat data, on "
        f"{facts['device']}, in {total_s / 60:.1f} minutes: {' -> '.join(ROW_TITLE[n] for n in ROW_TITLE if n in rows) or 'no stage'}."
        + (f" Stages reused from `{facts['reused_from']}`." if facts.get("reused_from") else ""))
    for section in (_card, _data, _speed, _ablation, _pretraining, _post_training, _long_context, _samples, _export):
        section(report, facts, config, out / "figures")
    return report


def _card(report: Report, facts: dict, config: Config, figures: Path) -> None:
    """The report card, its caption and verdicts, its figure, the stage curves, the persona chat."""
    rows, s, records = facts.get("rows") or {}, facts["sizes"], facts.get("records") or {}
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
    if verdicts := [f"**{ROW_TITLE[name]}** {why}: {moved(rows, name)} against {ROW_TITLE[start]}."
                    for name, (start, _, why) in TARGETS.items() if name in rows]:
        report.bullets(verdicts)
    if names := [n for n in ROW_TITLE if n in rows]:
        values = {m: [metric(rows[n], m) for n in names] for m in CHAT_METRICS}
        report.image(plots.bar_panels(figures / "report_card.png", {m.replace("_", " "): (
            [ROW_TITLE[n] for n in names], [v or 0 for v, _ in vs], [e or 0 for _, e in vs]) for m, vs in values.items()},
            title="chat evals per stage (error bars: standard error)", ncols=5, zoom=False), "chat evals of each stage with standard errors")
    panels = {}
    for stage, curves in STAGE_CURVES.items():
        folder = (records.get(stage) or {}).get("model")
        train = read_metrics(folder)[0] if folder and (Path(folder) / "metrics.jsonl").is_file() else []
        panels.update({title: p for key, title in curves.items()
                       if (p := [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float))])})
    if panels:
        report.image(plots.line_panels(figures / "stage_curves.png", panels), "the curves of each training stage")
    _chat_table(report, rows, len(VIBE_PROMPTS) - 2, "The vibe test, one prompt with a persona system prompt, every stage: ")


def _data(report: Report, facts: dict, config: Config, figures: Path) -> None:
    manifest, unigram, mixture = facts["data"]["manifest"], facts.get("unigram") or {}, config.data.mixture or {}
    report.heading("1. Data").table(["source", "train tokens", "validation tokens", "mixture weight", "unigram loss"], [
        (s, manifest["tokens"].get(f"{s}.train"), manifest["tokens"].get(f"{s}.validation"), mixture.get(s, 1 / len(unigram)),
         unigram[s]) for s in unigram])
    t = manifest["timings"]
    report.text(f"Byte-level BPE tokenizer with {manifest['vocab_size']:,} tokens. Build times"
                f"{' (cached: built by an earlier run)' if facts['data'].get('cached') else ''}: corpus {t['corpus_s']:.1f} s, "
                f"tokenizer {t['tokenizer_s']:.1f} s, tokenization {t['tokenize_s']:.1f} s. The unigram loss is what a "
                f"model that ignores context would score on each validation set.")


def _speed(report: Report, facts: dict, config: Config, figures: Path) -> None:
    report.heading("2. Speed: the fastest configuration on this machine")
    probe, choice, speed = facts.get("probe"), facts.get("speed_choice"), facts.get("speed") or {}
    if not probe or probe.get("forced"):
        report.text(f"Not probed: every training stage ran **{choice}** as asked." if probe else
                    "No speed probe (on CUDA the recipe's precision and compile settings apply).")
        return
    report.table(["configuration", "tokens/s (best step)", "compile s (first / later copies)", "chosen"], [
        (name, round(e["tokens_per_s"]), f"{e['compile_s']:.1f} / {e['recompile_s']:.1f}" if e["compile"] == "on" else "-",
         "yes" if name == choice else "") for name, e in probe["configs"].items()])
    report.text(f"A few training steps of each configuration on the recipe's micro-batch; the choice maximises the tokens "
                f"trained in the planned time of the fixed-shape stages after paying their compiles. Pretraining, the "
                f"ablation and SFT (packed rows of one length) ran **{speed['fixed'].get('name')}**; APO and GRPO (batches "
                f"whose length changes every step, where compile would recompile) ran **{speed['variable'].get('name')}**."
                + ("" if probe["native_bf16"] else " This CPU has no native bf16: fp32 only."))


def _ablation(report: Report, facts: dict, config: Config, figures: Path) -> None:
    if not (path := ((facts.get("records") or {}).get("ablation") or {}).get("results")) or not Path(path).is_file():
        return
    a = json.loads(Path(path).read_text())
    report.heading("3. Ablation: intra-document masking on/off").text(
        f"{len(a['seeds'])} seeds per arm, {format_value(a['budget']['steps'])} steps each ({format_value(a['budget']['tokens_per_run'])} "
        f"tokens); a difference counts when it exceeds {a['noise_sigma']:g} standard errors of the seed-to-seed spread. The "
        f"playbook expects no change at short context. The ablation's own report: `{Path(a['out_dir']) / 'report.md'}`.")
    report.table(["metric", "masking on", "masking off", "difference", "noise threshold", "verdict"], [
        (v["metric"], v["baseline_mean"], v["variant_mean"], f"{v['difference']:+.4g}", v["threshold"],
         f"**{v['verdict']}**" if v["verdict"] in ("better", "worse") else v["verdict"]) for v in a["verdicts"]])
    if (curves := Path(a["out_dir"]) / "figures" / "loss_curves.png").is_file():
        figures.mkdir(parents=True, exist_ok=True)
        report.image(shutil.copyfile(curves, figures / "ablation_loss_curves.png"), "ablation training loss: mean over seeds, band between seeds")


def _pretraining(report: Report, facts: dict, config: Config, figures: Path) -> None:
    rows, pre, unigram = facts.get("rows") or {}, (facts.get("records") or {}).get("pretrain") or {}, facts.get("unigram") or {}
    if pre.get("model") and (Path(pre["model"]) / "metrics.jsonl").is_file():
        train, evals = read_metrics(pre["model"])
        tps = median_of(train, "tokens_per_s")
        report.heading("4. Pretraining").text(f"{train[-1]['tokens']:,} tokens in {train[-1]['step']:,} steps"
                                              + (" (stopped by its time box)" if pre.get("stopped_by_budget") else "")
                                              + (f", {tps:,.0f} tokens/s median" if tps else "") + ".")
        add_run_sections(report, config, train, evals, figures, prefix="pretrain_")
    if "base" in rows:
        sources = list(rows["base"]["val"])
        report.heading("5. Pretraining evals of every stage").table(
            ["stage", *(f"val loss {s}" for s in sources), "suite score", "suite centred"],
            [[ROW_TITLE[n], *(rows[n]["val"].get(s, {}).get("loss") for s in sources), rows[n]["suite"]["score"],
              f"{rows[n]['suite']['centred']:+.3f}"] for n in ROW_TITLE if n in rows])
        report.text("Validation loss (nats/token) per source (unigram: " + ", ".join(f"{s} {v:.3f}" for s, v in unigram.items())
                    + "); post-training on chat data is expected to raise it a little (forgetting), the merge with the base "
                      "to bring some of it back.")


def _post_training(report: Report, facts: dict, config: Config, figures: Path) -> None:
    records = facts.get("records") or {}
    if pairs := (records.get("apo") or {}).get("pairs"):
        report.heading("6. Post-training data and merge").bullets([
            f"APO pairs, {mode}: {p['kept']} of {p['prompts']} prompts kept (chosen: the embedded reply that keeps the system "
            f"prompt's rule; rejected: `{pairs['rejected_model']}`'s reply, verified to break it; that model kept the rule on "
            f"{p.get('rejected_adherence', 0):.0%}; {p.get('rejected_rewritten', 0)} wrong answers replaced by the right one "
            f"under another rule; dropped {p['dropped'] or 'none'})" if p.get("kept") else
            f"APO pairs, {mode}: {p.get('error', 'no pair kept')}" for mode, p in pairs["summaries"].items()])
    if (merge := records.get("merge") or {}).get("soup_of"):
        report.text(f"Merge: a linear soup of {len(merge['soup_of'])} APO checkpoints ({', '.join(Path(p).name for p in merge['soup_of'])}), "
                    f"then {merge['weights'][0]:g} x soup + {merge['weights'][1]:g} x base.")


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
                      loss(m["loss_by_position"], True), loss(m["loss_by_position"], False)] for name, m in evals["models"].items()]


def _long_context(report: Report, facts: dict, config: Config, figures: Path) -> None:
    if not (evals := facts.get("long_context")):
        return
    report.heading("Long context: ABF and YaRN to 8x the training length").table(*long_context_rows(evals))
    report.text(f"Trained at {evals['trained_length']:,} tokens, extended to {evals['length']:,}: ABF continues pretraining at "
                f"the longer length with the RoPE base raised as much (recipes/long-context.yaml); YaRN stretches the base "
                f"model's RoPE with no training. Needle: RULER's niah_single_1 (string match, ± standard error); loss: "
                f"validation nats/token by position inside the document.")
    source = "prose" if "prose" in (first := next(iter(evals["models"].values()))["loss_by_position"]) else next(iter(first))
    report.image(plots.line_plot(figures / "loss_by_position.png", {
        name: ([c["end"] for c in m["loss_by_position"][source]], [c["loss"] for c in m["loss_by_position"][source]])
        for name, m in evals["models"].items()}, title=f"validation loss by position ({source})",
        xlabel="position (bucket end)", ylabel="nats/token"), "loss by position before and after the extension")


def _samples(report: Report, facts: dict, config: Config, figures: Path) -> None:
    if facts.get("rows"):
        report.heading("7. Sample chats: the same prompts, every stage").text(
            "Greedy replies through the chat template. Reading outputs is how SmolLM3's team caught system prompts "
            "their data processing had dropped, which no eval noticed.")
        for index in range(len(VIBE_PROMPTS)):
            _chat_table(report, facts["rows"], index)


def _export(report: Report, facts: dict, config: Config, figures: Path) -> None:
    if e := facts.get("export"):
        report.heading("8. Hugging Face export and model card").text(
            f"`{e['path']}` (from `{e['model']}`) holds {', '.join(f'`{f}`' for f in e['files'])}. "
            f"`transformers.AutoModelForCausalLM` loads it as **{e['architecture']}**; on validation text its logits differ "
            f"from ours by at most {e['max_logit_diff']:.1e}, and greedy continuations "
            f"{'are identical' if e['greedy_match'] else 'DIFFER'}. Its model card (`README.md`) lists the stages {e['card_stages']}.")


def add_wall_times(report: Report, figures: Path, wall: dict[str, float], total_s: float, records: dict) -> None:
    """9. Every stage's wall time, and each training stage's time box, steps and recipe (re-runnable by hand)."""
    def cells(name: str) -> list:
        r = records.get(name) or {}
        steps = f"{r['summary']['step']:,} of {r['summary']['max_steps']:,}" if r.get("summary") else None
        return [r.get("planned_s") and round(r["planned_s"]), steps, r.get("recipe") and f"`{r['recipe']}`"]

    report.heading("9. Wall time per stage").table(["stage", "seconds", "share", "time box s", "steps", "recipe"], [
        [k, round(v, 1), f"{v / total_s:.0%}", *cells(k)] for k, v in wall.items()] + [["total", round(total_s, 1), "100%"] + [None] * 3])
    report.text("A stage re-runs by hand from its recipe (`smoltrain train|sft|dpo|grpo RECIPE`), and the demo from any finished "
                "stage: `smoltrain demo --stages grpo,merge` reuses the earlier ones.")
    report.image(plots.bar_plot(figures / "wall_time.png", list(wall), list(wall.values()), title="wall time per stage",
                                ylabel="seconds", value_format="{:.0f}"), "wall time per stage (seconds)")


def print_summary(console: Console, facts: dict, total_s: float) -> None:
    """The report card (and the long-context table) in the terminal."""
    console.rule(f"[bold]smoltrain demo: done in {total_s / 60:.1f} min")
    for headers, rows in [card_rows(facts)] + ([long_context_rows(facts["long_context"])] if facts.get("long_context") else []):
        widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
        for r in [headers, *rows]:
            console.print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)), markup=False, soft_wrap=True)
    if facts.get("speed_choice"):
        console.print(f"speed: {facts['speed_choice']} chosen by the probe", soft_wrap=True)
    if e := facts.get("export"):
        console.print(f"export: {e['architecture']}, max |logit diff| vs transformers {e['max_logit_diff']:.1e}, "
                      f"model card stages {e['card_stages']}", soft_wrap=True)
