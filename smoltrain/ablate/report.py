"""The ablation's results: `results.json` for programs, `report.md` / `report.html` + PNGs for people
(loss curves with seed spread, eval scores with error bars, parameters, throughput, verdicts)."""

from __future__ import annotations

import json
from pathlib import Path

from smoltrain.ablate.compare import BETTER, WORSE, compare, mean, parameter_warnings, sample_std
from smoltrain.ablate.spec import BASELINE, AblationSpec
from smoltrain.files import write_atomic
from smoltrain.report import plots
from smoltrain.report.document import Report, format_value


def summarize(spec: AblationSpec, records: list[dict]) -> dict:
    """Per-arm statistics, parameter warnings and verdicts from the run records."""
    arms: dict[str, dict] = {}
    for variant in spec.variants:
        runs = sorted((r for r in records if r["variant"] == variant), key=lambda r: r["seed"])
        if not runs:
            continue
        metrics: dict[str, list[float]] = {}
        for r in runs:
            for key, value in (r.get("metrics") or {}).items():
                if value is not None:
                    metrics.setdefault(key, []).append(value)
        throughput = [r["tokens_per_s"] for r in runs if r.get("tokens_per_s") is not None]
        mfu = [r["mfu"] for r in runs if r.get("mfu") is not None]
        arms[variant] = {
            "overrides": spec.variants[variant],
            "parameters": runs[0]["parameters"],
            "seeds": [r["seed"] for r in runs],
            "metrics": {k: {"mean": mean(v), "std": sample_std(v), "values": v} for k, v in metrics.items()},
            "tokens_per_s": {"mean": mean(throughput), "std": sample_std(throughput)} if throughput else None,
            "mfu": {"mean": mean(mfu), "std": sample_std(mfu)} if mfu else None,
            "runs": [{k: r.get(k) for k in ("seed", "final_loss", "tokens", "tokens_per_s", "mfu", "wall_s", "max_steps")}
                     | {"run_dir": str(spec.run_dir(variant, r["seed"]))} for r in runs],
        }
    base_params = arms[BASELINE]["parameters"]
    warnings = parameter_warnings({a: v["parameters"] for a, v in arms.items()}, BASELINE, spec.param_tolerance)
    for arm, data in arms.items():
        data["parameter_delta"] = (data["parameters"] - base_params) / base_params
        data["parameter_warning"] = warnings.get(arm)
    verdicts = compare({a: {k: v["values"] for k, v in d["metrics"].items()} for a, d in arms.items()},
                       BASELINE, spec.noise_sigma)
    first = records[0] if records else {}
    return {
        "name": spec.name,
        "source": spec.source,
        "out_dir": spec.out_dir,
        "budget": {"steps": first.get("max_steps"), "tokens_per_run": first.get("tokens"),
                   "requested_steps": spec.budget_steps, "requested_tokens": spec.budget_tokens},
        "seeds": spec.seeds,
        "noise_sigma": spec.noise_sigma,
        "param_tolerance": spec.param_tolerance,
        "arms": arms,
        "parameter_warnings": warnings,
        "verdicts": [v.to_dict() for v in verdicts],
    }


def _headline_metrics(results: dict) -> list[str]:
    """Metrics worth a plot: final training loss, validation losses, task scores, the centred
    aggregate (bits per byte stay in the tables)."""
    keys = list(results["arms"][BASELINE]["metrics"])
    chosen = [k for k in keys if k == "train/final_loss" or (k.startswith("val/") and k.endswith("/loss"))
              or k.startswith("tasks/") or k == "aggregate/centred"]
    return chosen or keys


def _loss_against(report: Report, fig_dir: Path, series: dict, axes: dict[str, dict[str, list[dict[int, float]]]],
                  colors: dict[str, str]) -> None:
    """The mean loss curves against tokens seen and against training seconds (mean over seeds at each
    step): arms that cost different time per token (an MoE, a wider model) compare at equal compute."""
    for key, name, label in (("tokens", "loss_vs_tokens.png", "tokens"), ("elapsed_s", "loss_vs_seconds.png", "training seconds")):
        against = {}
        for arm, (steps, losses) in series.items():
            per_seed = axes.get(arm, {}).get(key, [])
            if per_seed and all(all(s in c and c[s] is not None for s in steps) for c in per_seed):
                against[arm] = ([mean([c[s] for c in per_seed]) for s in steps], losses)
        if against:
            report.image(plots.line_plot(fig_dir / name, against, colors=colors, xlabel=label, ylabel="loss",
                                         title=f"training loss against {label} (mean over seeds)"),
                         f"training loss per arm against {label}")


def add_verdicts(report: Report, results: dict) -> Report:
    """The verdict table: each variant's metric against the baseline's, the difference and the noise threshold."""
    return report.table(["variant", "metric", "baseline", "variant", "difference", "noise threshold", "verdict"], [
        (v["variant"], v["metric"], v["baseline_mean"], v["variant_mean"], f"{v['difference']:+.4g}", v["threshold"],
         f"**{v['verdict']}**" if v["verdict"] in (BETTER, WORSE) else v["verdict"]) for v in results["verdicts"]])


def write_report(results: dict, curves: dict[str, list[dict[int, float]]], out_dir: Path,
                 axes: dict[str, dict[str, list[dict[int, float]]]] | None = None) -> tuple[Path, Path]:
    """curves[arm] = one {step: loss} per seed; axes[arm][tokens | elapsed_s] = one {step: value} per seed."""
    arms = results["arms"]
    names = list(arms)
    colors = {n: plots.color_of(i) for i, n in enumerate(names)}
    fig_dir = out_dir / "figures"
    report = Report(f"Ablation: {results['name']}")
    budget = results["budget"]
    report.text(
        f"Baseline from `{results['source']}`; {len(names) - 1} variant(s) x {len(results['seeds'])} seed(s) "
        f"({', '.join(map(str, results['seeds']))}); {format_value(budget['steps'])} steps and "
        f"{format_value(budget['tokens_per_run'])} tokens per run. A difference counts when it exceeds "
        f"{results['noise_sigma']:g} standard errors of the difference, computed from the seed-to-seed "
        f"spread pooled over all arms."
    )

    add_verdicts(report.heading("Verdicts"), results)

    report.heading("Parameters")
    report.table(["arm", "overrides", "parameters", "vs baseline"],
                 [(a, ", ".join(d["overrides"]) or "-", d["parameters"], f"{d['parameter_delta']:+.1%}") for a, d in arms.items()])
    if results["parameter_warnings"]:
        report.bullets([f"WARNING: {w}" for w in results["parameter_warnings"].values()])
    else:
        report.text(f"Every variant is within {results['param_tolerance']:.0%} of the baseline's parameter count.")

    report.heading("Loss curves")
    series, bands = _seed_mean_curves(curves, names)
    if series:
        report.image(plots.line_plot(fig_dir / "loss_curves.png", series, bands=bands, colors=colors,
                                     title="training loss (mean over seeds, band: min-max)", ylabel="loss"),
                     "training loss per arm: mean over seeds, shaded between the lowest and highest seed")
        _loss_against(report, fig_dir, series, axes or {}, colors)

    report.heading("Evaluation")
    panels = {}
    for metric in _headline_metrics(results):
        present = [a for a in names if metric in arms[a]["metrics"]]
        panels[metric] = (present, [arms[a]["metrics"][metric]["mean"] for a in present],
                          [arms[a]["metrics"][metric]["std"] for a in present])
    if panels:
        report.image(plots.bar_panels(fig_dir / "eval.png", panels, colors=[colors[a] for a in names]),
                     "final metrics per arm: mean over seeds, error bars one seed-to-seed standard deviation")
    all_metrics = list(arms[BASELINE]["metrics"])
    report.table(["metric"] + names, [
        [m] + [_mean_std(arms[a]["metrics"].get(m)) for a in names] for m in all_metrics
    ])

    report.heading("Throughput")
    tput = [a for a in names if arms[a]["tokens_per_s"]]
    if tput:
        report.image(plots.bar_plot(fig_dir / "throughput.png", tput, [arms[a]["tokens_per_s"]["mean"] for a in tput],
                                    errors=[arms[a]["tokens_per_s"]["std"] for a in tput], colors=[colors[a] for a in tput],
                                    title="training throughput", ylabel="tokens/s", value_format="{:,.0f}"),
                     "median training tokens/s per run, mean over seeds")
    report.image(plots.bar_plot(fig_dir / "parameters.png", names, [arms[a]["parameters"] for a in names],
                                colors=[colors[a] for a in names], title="parameters", ylabel="parameters",
                                value_format="{:,.0f}"), "parameter count per arm")

    report.heading("Runs")
    report.table(["arm", "seed", "final loss", "tokens", "tokens/s", "MFU", "wall (s)", "folder"],
                 [(a, r["seed"], r["final_loss"], r["tokens"], r["tokens_per_s"], r["mfu"], r["wall_s"], f"`{r['run_dir']}`")
                  for a in names for r in arms[a]["runs"]])
    return report.write(out_dir)


def _seed_mean_curves(curves: dict[str, list[dict[int, float]]], names: list[str]) -> tuple[dict, dict]:
    """Per arm, the mean loss over seeds at the steps every seed logged, and the min-max band."""
    series, bands = {}, {}
    for arm in names:
        per_seed = curves.get(arm, [])
        steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
        if not steps:
            continue
        values = [[c[s] for c in per_seed] for s in steps]
        series[arm] = (steps, [mean(v) for v in values])
        bands[arm] = (steps, [min(v) for v in values], [max(v) for v in values])
    return series, bands


def _mean_std(stat: dict | None) -> str:
    if not stat:
        return "-"
    if len(stat["values"]) < 2:
        return format_value(stat["mean"])
    return f"{format_value(stat['mean'])} ± {format_value(stat['std'], 2)}"


def write_results(spec: AblationSpec, records: list[dict]) -> dict:
    """results.json, report.md, report.html and figures/ under spec.out_dir; returns the results."""
    out_dir = Path(spec.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = summarize(spec, records)
    curves: dict[str, list[dict[int, float]]] = {}
    axes: dict[str, dict[str, list[dict[int, float]]]] = {}
    for r in records:
        curve = r.get("curve") or {}
        curves.setdefault(r["variant"], []).append(dict(zip(curve.get("step", []), curve.get("loss", []))))
        for key in ("tokens", "elapsed_s"):
            if key in curve:
                axes.setdefault(r["variant"], {}).setdefault(key, []).append(dict(zip(curve["step"], curve[key])))
    md_path, html_path = write_report(results, curves, out_dir, axes)
    results["report_md"], results["report_html"] = str(md_path), str(html_path)
    write_atomic(out_dir / "results.json", json.dumps(results, indent=2))
    return results
