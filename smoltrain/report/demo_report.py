"""The demo's one report: what was trained, how fast, how well (against the unigram and random
baselines), what the ablation found, that the export loads in transformers, what the model writes,
and where the time went."""

from __future__ import annotations

import shutil
from pathlib import Path

from smoltrain.config import Config
from smoltrain.model.flops import parameter_counts
from smoltrain.report import plots
from smoltrain.report.document import Report, format_value
from smoltrain.report.run import add_run_sections, median_of, read_metrics


def build_demo_report(out: Path, facts: dict, config: Config, total_s: float) -> Report:
    """Every section but the wall times (the report's own stage is still running); figures are written now."""
    figures = out / "figures"
    train, evals = read_metrics(config.train.out_dir)
    result, unigram = facts["eval"], facts["unigram"]
    val, aggregate = result["val"], result["aggregate"]
    m = config.model
    counts = parameter_counts(m)
    last = train[-1]
    tps, mfu = median_of(train, "tokens_per_s"), median_of(train, "mfu")

    report = Report("smoltrain demo")
    report.text(
        f"A {counts['total'] / 1e6:.2f}M-parameter SmolLM3-style decoder trained on {last['tokens']:,} tokens of the "
        f"embedded corpus (Python standard library code, its documentation, arithmetic word problems) on "
        f"{facts['device']}, in {total_s / 60:.1f} minutes from raw text to this page."
    )
    headline = [
        ("parameters", f"{counts['total']:,} ({counts['non_embedding']:,} non-embedding)"),
        ("tokens", f"{last['tokens']:,} in {last['step']:,} steps of {config.train.global_batch_tokens:,}"
                   + ("" if facts["pretrain"]["summary"]["finished"] else
                      f" (stopped by the time budget; {facts['pretrain']['steps']:,} were planned)")),
        ("tokens/s", f"{tps:,.0f} median over log intervals, {facts['pretrain']['summary']['tokens_per_s'] or 0:,.0f} "
                     f"on average over the run"),
        ("MFU (median)", f"{100 * mfu:.1f}% of {1e3 * facts['peak_tflops']:.1f} GFLOP/s measured fp32 matmul peak"
         if mfu and facts.get("peak_tflops") else "-"),
    ]
    headline += [(f"validation loss, {s}", f"{v['loss']:.3f} nats/token (unigram {unigram[s]:.3f}), {v['bpb']:.3f} bits/byte")
                 for s, v in val.items()]
    headline += [
        ("embedded suite", f"mean score {aggregate['score']:.3f} vs random {aggregate['random_baseline']:.3f}; "
                           f"centred {aggregate['centred']:+.3f} (0 = chance)"),
        ("Hugging Face export", f"{facts['export']['architecture']}, max |logit diff| {facts['export']['max_logit_diff']:.1e}"),
        ("wall time", f"{total_s / 60:.1f} min"),
    ]
    report.table(["", ""], headline)
    report.image(overview_figure(figures / "overview.png", train, evals, result, unigram),
                 "left: training loss and validation loss per source (dashed: unigram baselines); "
                 "right: embedded suite scores against their random baselines")

    # Data
    report.heading("1. Data")
    manifest = facts["data"]["manifest"]
    mixture = config.data.mixture
    rows = []
    for source in unigram:
        rows.append((source, manifest["tokens"].get(f"{source}.train"), manifest["tokens"].get(f"{source}.validation"),
                     mixture.get(source, 1 / len(unigram)) if mixture else f"{1 / len(unigram):.2f}", unigram[source]))
    report.table(["source", "train tokens", "validation tokens", "mixture weight", "unigram loss"], rows)
    t = manifest["timings"]
    cached = " (cached: built by an earlier run)" if facts["data"].get("cached") else ""
    report.text(f"Byte-level BPE tokenizer with {manifest['vocab_size']:,} tokens. Build times{cached}: corpus "
                f"{t['corpus_s']:.1f} s, tokenizer {t['tokenizer_s']:.1f} s, tokenization {t['tokenize_s']:.1f} s. "
                f"The unigram loss is what a model that ignores context would score on each validation set.")

    # Ablation
    report.heading("2. Ablation: intra-document masking on/off")
    ablation = facts["ablation_results"]
    report.text(f"{len(ablation['seeds'])} seeds per arm, {format_value(ablation['budget']['steps'])} steps each "
                f"({format_value(ablation['budget']['tokens_per_run'])} tokens); a difference counts when it exceeds "
                f"{ablation['noise_sigma']:g} standard errors of the seed-to-seed spread. The playbook expects no change "
                f"at short context. Full ablation report: `{Path(ablation['report_md']).relative_to(out)}`.")
    report.table(["metric", "masking on", "masking off", "difference", "noise threshold", "verdict"], [
        (v["metric"], v["baseline_mean"], v["variant_mean"], f"{v['difference']:+.4g}", v["threshold"],
         f"**{v['verdict']}**" if v["verdict"] in ("better", "worse") else v["verdict"])
        for v in ablation["verdicts"]])
    curves = Path(ablation["out_dir"]) / "figures" / "loss_curves.png"
    if curves.is_file():
        figures.mkdir(parents=True, exist_ok=True)
        report.image(shutil.copyfile(curves, figures / "ablation_loss_curves.png"),
                     "ablation training loss: mean over seeds, band between seeds")

    # Pretraining
    report.heading("3. Pretraining")
    add_run_sections(report, config, train, evals, figures, prefix="pretrain_")

    # Evaluation
    report.heading("4. Evaluation")
    sources = list(val)
    report.image(plots.bar_panels(
        figures / "val_vs_unigram.png",
        {s: (["unigram", "model"], [unigram[s], val[s]["loss"]], None) for s in sources},
        title="validation loss per source (nats/token)", ncols=len(sources), colors=["#7f7f7f", "#1f77b4"]),
        "validation loss of the model against the unigram baseline, per source")
    tasks = result["tasks"]
    main_metric = result.get("main_metric", {})
    report.table(["task", "metric", "score", "stderr", "random baseline", "centred", "n"], [
        (name, main_metric.get(name, "score"), r["score"], r.get(f"{main_metric.get(name)}_stderr"), r["random_baseline"],
         r["centred"], r["n"]) for name, r in tasks.items()])
    names = list(tasks)
    report.image(plots.bar_panels(
        figures / "suite.png",
        {n: (["random", "model"], [tasks[n]["random_baseline"], tasks[n]["score"]],
             [0.0, tasks[n].get(f"{main_metric.get(n)}_stderr") or 0.0]) for n in names},
        title="embedded suite: score vs random baseline", ncols=len(names), colors=["#7f7f7f", "#2ca02c"], zoom=False),
        "embedded suite, main metric per task (error bar: standard error) against its random baseline")
    report.text(f"Aggregate: mean score {aggregate['score']:.3f} against a random baseline of "
                f"{aggregate['random_baseline']:.3f}; centred score **{aggregate['centred']:+.3f}**.")

    # Export
    report.heading("5. Hugging Face export")
    e = facts["export"]
    report.text(f"`{e['path']}` holds {', '.join(f'`{f}`' for f in e['files'])}. "
                f"`transformers.AutoModelForCausalLM` loads it as **{e['architecture']}**; on validation text its "
                f"logits differ from ours by at most {e['max_logit_diff']:.1e}, and greedy continuations "
                f"{'are identical' if e['greedy_match'] else 'DIFFER'}.")

    # Vibe test
    report.heading("6. Vibe test")
    report.text("Sampled continuations (temperature 0.8, top-k 40) of the openings of validation documents, generated "
                "by the exported model in transformers; the model's text is between ⟪ and ⟫. Reading outputs is how "
                "SmolLM3's team caught a bug their evals missed.")
    for s in facts["samples"]:
        report.text(f"**{s['source']}**")
        report.code(f"{s['prompt']}⟪{s['completion']}⟫")

    return report


def overview_figure(path: Path, train: list[dict], evals: list[dict], result: dict, unigram: dict[str, float]) -> Path:
    """The picture for a README: how far below the unigram baselines the losses went, and the suite
    against chance."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1]})
    left.plot([r["step"] for r in train], [r["loss"] for r in train], color="#444444", linewidth=1.2, label="train")
    for i, source in enumerate(unigram):
        color = plots.color_of(i)
        points = [(e["step"], e["eval"]["val"][source]["loss"]) for e in evals if source in (e["eval"].get("val") or {})]
        if result["val"].get(source):
            points.append((train[-1]["step"], result["val"][source]["loss"]))
        if points:
            left.plot(*zip(*sorted(dict(points).items())), marker="o", color=color, label=f"val {source}")
        left.axhline(unigram[source], linestyle="--", color=color, linewidth=1, alpha=0.7)
    left.set_xlabel("step")
    left.set_ylabel("loss (nats/token)")
    left.set_title("loss vs unigram baseline (dashed)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    tasks = result["tasks"]
    names = list(tasks)
    x = range(len(names))
    right.bar([i - 0.2 for i in x], [tasks[n]["random_baseline"] for n in names], width=0.4, color="#aaaaaa", label="random")
    right.bar([i + 0.2 for i in x], [tasks[n]["score"] for n in names], width=0.4, color="#2ca02c", label="model")
    right.set_xticks(list(x), [n.replace("_", "\n") for n in names], fontsize=8)
    right.set_ylim(0, max(0.5, max(tasks[n]["score"] for n in names) * 1.2))
    right.set_title(f"embedded suite (centred {result['aggregate']['centred']:+.3f})")
    right.legend(fontsize=8)
    right.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return plots.save_figure(fig, path)


def add_wall_times(report: Report, figures: Path, wall: dict[str, float], total_s: float) -> None:
    report.heading("7. Wall time per stage")
    report.table(["stage", "seconds", "share"], [(k, round(v, 1), f"{v / total_s:.0%}") for k, v in wall.items()]
                 + [("total", round(total_s, 1), "100%")])
    report.image(plots.bar_plot(figures / "wall_time.png", list(wall), list(wall.values()), title="wall time per stage",
                                ylabel="seconds", value_format="{:.0f}"), "wall time per stage (seconds)")
