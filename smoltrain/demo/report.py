"""The demo's one report: a report card with a row per stage (base, SFT, APO, GRPO, merged), then the data,
the speed probe's choice, the ablation, each stage's curves, side-by-side chats, long context, the export.

A stage's target metric "moved" when it differs from the model it started from by more than 2 standard errors
of the per-item differences: both rows answered the same held-out prompts, so the comparison is paired (rows
without per-item results, an older run's, fall back to the two rows' combined errors).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.console import Console

from smoltrain.ablate.report import add_verdicts
from smoltrain.config import Config
from smoltrain.eval.longctx import extension_rows
from smoltrain.model.flops import parameter_counts
from smoltrain.post.chat.evals import SIGNIFICANT, VIBE_PROMPTS, change, rate
from smoltrain.report import plots
from smoltrain.report.document import Report, format_value
from smoltrain.report.run import add_run_sections, median_of, read_metrics
from smoltrain.train import speed as speeds

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
CHAT_METRICS = ["no_think_accuracy", "think_accuracy", "adherence", "think_format", "stop_rate"]
STAGE_CURVES = {"pretrain": {"loss": "pretraining loss"}, "sft": {"loss": "SFT loss (assistant tokens)"},
                "apo": {"loss": "APO-zero loss", "rewards/margins": "reward margin (chosen - rejected)"},
                "grpo": {"reward": "GRPO reward (mean)", "completions/mean_length": "completion length (tokens)"}}


def metric(row: dict, name: str) -> tuple[float | None, float | None]:
    """(value, standard error) of a card metric of one row: a chat eval's, or the mean validation loss (no error)."""
    if name != "val_loss":
        return rate(row.get("chat") or {}, name)
    losses = [v["loss"] for v in (row.get("val") or {}).values() if v.get("loss") is not None]
    return (sum(losses) / len(losses), None) if losses else (None, None)


def _pm(value: float | None, stderr: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.0f}% ± {100 * (stderr or 0):.0f}"


def moved(rows: dict, name: str) -> str:
    """'no_think_accuracy +55 pts (moved); ...': a stage's target metrics against the row it started from (item by item:
    post/chat/evals.change); the validation loss has no standard error, so no verdict."""
    start, metrics, _ = TARGETS[name]
    if name not in rows or start not in rows:
        return "-"
    parts = []
    for m in metrics:
        if m == "val_loss" and None not in (a := metric(rows[start], m)[0], b := metric(rows[name], m)[0]):
            parts.append(f"val_loss {b - a:+.2f}")
        elif m != "val_loss" and (found := change(rows[start].get("chat") or {}, rows[name].get("chat") or {}, m)):
            parts.append(f"{m} " + (f"{found[0]:+.1f} tokens" if m.endswith("length") else f"{100 * found[0]:+.0f} pts") + f" ({found[1]})")
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
        c, val, verdict = row["chat"], metric(row, "val_loss")[0], moved(rows, name) if name in TARGETS else "-"
        table.append([title, steps, *(_pm(*metric(row, m)) for m in CHAT_METRICS), f"{c['no_think_length']:.0f} / {c['think_length']:.0f}",
                      "-" if val is None else f"{val:.3f}", f"{row['suite']['centred']:+.3f}", verdict])
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


def build_demo_report(out: Path, facts: dict, config: Config, total_s: float) -> Report:
    """Every section but the wall times (the report's own stage is still running); figures are written now."""
    rows = facts.get("rows") or {}
    report = Report("smoltrain demo").text(
        f"A {parameter_counts(config.model)['total'] / 1e6:.2f}M-parameter SmolLM3-style decoder taken through the playbook on the "
        f"embedded corpus (Python's documentation and code, arithmetic word problems) and chat data, on {facts['device']}, in "
        f"{total_s / 60:.1f} minutes: {' -> '.join(ROW_TITLE[n] for n in ROW_TITLE if n in rows) or 'no stage'}."
        + (f" Stages reused from `{facts['reused_from']}`." if facts.get("reused_from") else ""))
    for section in (_card, _data, _speed, _ablation, _pretraining, _post_training, _long_context, _samples, _export):
        section(report, facts, config, out / "figures")
    return report


def _card(report: Report, facts: dict, config: Config, figures: Path) -> None:
    """The report card, its caption and verdicts, its figure, the stage curves, the persona chat."""
    rows, s, records = facts.get("rows") or {}, facts["sizes"], facts.get("records") or {}
    report.heading("Report card").table(*card_rows(facts))
    report.text(f"Chat evals: {s.chat_items} held-out items in the no_think and persona sets, {s.think_items} in the think set, "
                f"greedy, through the smollm3 template (replies up to {s.chat_new_tokens} tokens, think {s.think_new_tokens}); ± is the "
                f"standard error. Pretraining evals: mean validation loss over the sources (nats/token) and the embedded suite's "
                f"centred score ({s.suite_items} items per task; 0 = chance). Think format: think-mode replies with one closed think "
                f"block and an answer; adherence counts replies that ended their turn. `*`: stopped by its time box. \"target vs "
                f"start\" compares a stage with the model it started from (the merge with APO) on the same prompts, item by item: "
                f"inside {SIGNIFICANT:g} standard errors of the per-item differences is no clear change.")
    if verdicts := [f"**{ROW_TITLE[name]}** {why}: {moved(rows, name)} against {ROW_TITLE[start]}."
                    for name, (start, _, why) in TARGETS.items() if name in rows]:
        report.bullets(verdicts)
    if names := [n for n in ROW_TITLE if n in rows]:
        values = {m: [metric(rows[n], m) for n in names] for m in CHAT_METRICS}
        report.image(plots.bar_panels(figures / "report_card.png", {m.replace("_", " "): (
            [ROW_TITLE[n] for n in names], [v or 0 for v, _ in vs], [e or 0 for _, e in vs]) for m, vs in values.items()},
            title="chat evals per stage (error bars: standard error)", ncols=5, zoom=False), "chat evals per stage with standard errors")
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
    built = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in manifest["timings"].items())
    report.text(f"Byte-level BPE tokenizer with {manifest['vocab_size']:,} tokens, built in {built}"
                f"{' by an earlier run' if facts['data'].get('cached') else ''}. Unigram loss: a model that ignores context.")


def _speed(report: Report, facts: dict, config: Config, figures: Path) -> None:
    report.heading("2. Speed: the fastest configuration on this machine")
    probe, choice, speed = facts.get("probe"), facts.get("speed_choice"), facts.get("speed") or {}
    if not probe or probe.get("forced"):
        report.text(f"Not probed: the training stages ran **{choice or 'the recipe precision and compile settings'}**.")
    else:
        report.table(*speeds.probe_table(probe, choice)).text(
            f"A few steps of each on the recipe's micro-batch; the choice trains the most tokens in the fixed-shape stages' planned "
            f"time after their compiles: pretraining, the ablation and SFT ran **{speed['fixed'].get('name')}**, APO and GRPO (a new "
            f"length every step: compile would recompile) **{speed['variable'].get('name')}**.")


def _ablation(report: Report, facts: dict, config: Config, figures: Path) -> None:
    if not (path := ((facts.get("records") or {}).get("ablation") or {}).get("results")) or not Path(path).is_file():
        return
    a = json.loads(Path(path).read_text())
    report.heading("3. Ablation: intra-document masking on/off").text(
        f"{len(a['seeds'])} seeds per arm, {format_value(a['budget']['tokens_per_run'])} tokens each; a difference counts beyond "
        f"{a['noise_sigma']:g} standard errors of the seed-to-seed spread (the playbook expects none at short context; the "
        f"ablation's own report: `{Path(a['out_dir']) / 'report.md'}`).")
    add_verdicts(report, a)
    if (curves := Path(a["out_dir"]) / "figures" / "loss_curves.png").is_file():
        figures.mkdir(parents=True, exist_ok=True)
        report.image(shutil.copyfile(curves, figures / "ablation_loss_curves.png"), "ablation loss: mean over seeds, band between seeds")


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
        report.heading("6. Post-training data and merge").text(f"APO pairs: chosen = the embedded reply that keeps the system prompt's "
                                                               f"rule, rejected = `{pairs['rejected_model']}`'s reply that breaks it.")
        report.bullets([f"{mode}: {p['kept']} of {p['prompts']} prompts kept (the rejected model kept the rule on "
                        f"{p['rejected_adherence']:.0%}; {p['rejected_rewritten']} wrong answers rewritten; dropped "
                        f"{p['dropped'] or 'none'})" if p.get("kept") else f"{mode}: {p['error']}"
                        for mode, p in pairs["summaries"].items()])
    if (merge := records.get("merge") or {}).get("soup_of"):
        report.text(f"Merge: a linear soup of the APO checkpoints {', '.join(Path(p).name for p in merge['soup_of'])}, then "
                    f"{merge['weights'][0]:g} x soup + {merge['weights'][1]:g} x base.")


def _long_context(report: Report, facts: dict, config: Config, figures: Path) -> None:
    if not (evals := facts.get("long_context")):
        return
    report.heading("Long context: ABF and YaRN to 8x the training length").table(*extension_rows(evals["models"], evals["trained_length"]))
    report.text(f"Trained at {evals['trained_length']:,} tokens, extended to {evals['length']:,}: ABF trains at the longer length "
                f"with the RoPE base raised as much; YaRN stretches the base's RoPE untrained. Needle: RULER's niah_single_1 "
                f"(± standard error); loss: nats/token by position in the document.")
    source = "prose" if "prose" in (first := next(iter(evals["models"].values()))["loss_by_position"]) else next(iter(first))
    report.image(plots.line_plot(figures / "loss_by_position.png", {
        name: ([c["end"] for c in m["loss_by_position"][source]], [c["loss"] for c in m["loss_by_position"][source]])
        for name, m in evals["models"].items()}, title=f"validation loss by position ({source})",
        xlabel="position (bucket end)", ylabel="nats/token"), "loss by position before and after the extension")


def _samples(report: Report, facts: dict, config: Config, figures: Path) -> None:
    if facts.get("rows"):
        report.heading("7. Sample chats: the same prompts, every stage").text("Greedy replies through the chat template. Reading "
                                                                              "outputs is how SmolLM3 caught dropped system prompts.")
        for index in range(len(VIBE_PROMPTS)):
            _chat_table(report, facts["rows"], index)


def _export(report: Report, facts: dict, config: Config, figures: Path) -> None:
    if e := facts.get("export"):
        report.heading("8. Hugging Face export and model card").text(
            f"`{e['path']}` (from `{e['model']}`) holds {', '.join(f'`{f}`' for f in e['files'])}. `transformers.AutoModelForCausalLM` "
            f"loads it as **{e['architecture']}**; on validation text its logits differ from ours by at most {e['max_logit_diff']:.1e}, "
            f"and greedy continuations {'are identical' if e['greedy_match'] else 'DIFFER'}. Its model card lists {e['card_stages']}.")


def add_wall_times(report: Report, figures: Path, wall: dict[str, float], total_s: float, records: dict) -> None:
    """9. Every stage's wall time; a training stage's time box, steps and recipe (it re-runs by hand with its verb)."""
    report.heading("9. Wall time per stage").table(["stage", "seconds", "share", "time box s", "steps", "recipe"], [
        [k, round(v, 1), f"{v / total_s:.0%}", (r := records.get(k) or {}).get("planned_s") and round(r["planned_s"]),
         r.get("summary") and f"{r['summary']['step']:,} of {r['summary']['max_steps']:,}", r.get("recipe") and f"`{r['recipe']}`"]
        for k, v in wall.items()] + [["total", round(total_s, 1), "100%", None, None, None]])
    report.image(plots.bar_plot(figures / "wall_time.png", list(wall), list(wall.values()), title="wall time per stage",
                                ylabel="seconds", value_format="{:.0f}"), "wall time per stage (seconds)")


def print_summary(console: Console, facts: dict, total_s: float) -> None:
    """The report card (and the long-context table) in the terminal."""
    console.rule(f"[bold]smoltrain demo: done in {total_s / 60:.1f} min")
    lc = facts.get("long_context")
    for headers, rows in [card_rows(facts)] + ([extension_rows(lc["models"], lc["trained_length"])] if lc else []):
        widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
        for r in [headers, *rows]:
            console.print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)), markup=False, soft_wrap=True)
    if e := facts.get("export"):
        console.print(f"speed: {facts['speed_choice']}; export: {e['architecture']}, max |logit diff| vs transformers "
                      f"{e['max_logit_diff']:.1e}, model card stages {e['card_stages']}", soft_wrap=True)
