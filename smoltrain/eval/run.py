"""`smoltrain eval`: score a model (model folder, checkpoint, run or Hugging Face folder) on tasks
and validation data, print a table, write results.json and results.md.

One entry function walks the stage: load the model, resolve the task specs, score each task
(log-likelihood or generation), add validation loss / bits per byte, centre and aggregate, write.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from smoltrain import __version__
from smoltrain.errors import ConfigError
from smoltrain.eval.adapters import adapter_for, load_adapter_task
from smoltrain.eval.generative import count_generations, score_generative
from smoltrain.eval.longctx import long_context_markdown, long_context_task, parse_long_context_spec, score_long_context
from smoltrain.eval.scoring import count_requests, end_of_text_id, load_tokenizer, score_multiple_choice
from smoltrain.eval.suite import BUILDERS, DEFAULT_ITEMS, SUITE, aggregate, centred, embedded_task
from smoltrain.eval.tasks import Task, read_task_file
from smoltrain.files import write_atomic
from smoltrain.model.modes import evaluating
from smoltrain.train.distributed import resolve_device, resolve_precision

# Names that stand for several embedded tasks.
GROUPS = {
    "embedded": SUITE,
    "suite": SUITE,
    "arithmetic": ("arithmetic_choice", "arithmetic_answer"),
    "code": ("code_tokens",),
    "prose": ("prose_cloze",),
}
TASK_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
LONG_CONTEXT_ITEMS = 20  # items per long-context task and length without a limit: +-10 points at 50%


# ----------------------------------------------------------------------------- task specs


def resolve_tasks(specs: Sequence[str], limit: int | None = None, num_fewshot: int | None = None, seed: int = 0,
                  num_samples: int | None = None, temperature: float | None = None,
                  haystack_files: Sequence[str] = ()) -> list[Task]:
    """Task objects for specs: an embedded task or group (`embedded`, `arithmetic`, `code_tokens`, ...),
    a task file (`F.jsonl`), or a published dataset (`ADAPTER=PATH`, e.g. `arc_easy=data/ARC-Easy`);
    any of them may end in `@mcf` (lettered choices) or `@cloze`; or a long-context task at a length in tokens
    (`passkey@8192`, `niah_single_1@8k`, ...) whose essay haystacks come from `haystack_files` or the embedded prose."""
    tasks: list[Task] = []
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        if parse_long_context_spec(spec) is not None:
            tasks.append(long_context_task(spec, limit or LONG_CONTEXT_ITEMS, seed, haystack_files))
            continue
        formulation = None
        for suffix in ("@mcf", "@cloze"):
            if spec.endswith(suffix):
                spec, formulation = spec[: -len(suffix)], suffix[1:]
        shots = num_fewshot or 0
        if spec in GROUPS or spec in BUILDERS:
            names = GROUPS.get(spec, (spec,))
            found = [embedded_task(name, seed, max(limit or DEFAULT_ITEMS, 1)) for name in names]
        elif "=" in spec:
            name, path = spec.split("=", 1)
            found = [load_adapter_task(name.strip(), path.strip(), num_fewshot=shots)]
        elif spec.endswith(TASK_FILE_SUFFIXES) or Path(spec).is_file():
            found = [read_task_file(spec)]
        else:
            known = sorted([*GROUPS, *BUILDERS])
            close = difflib.get_close_matches(spec, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            hint += "; published datasets are ADAPTER=PATH" if adapter_for(spec) else ""
            raise ConfigError(f"unknown task '{spec}'{hint} (embedded: {', '.join(known)}; or a .jsonl task file)")
        for task in found:
            if formulation:
                if task.kind != "multiple_choice":
                    raise ConfigError(f"task '{task.name}': @{formulation} applies to multiple-choice tasks only")
                task.formulation = formulation
                task.name = f"{task.name}_{formulation}" if formulation == "mcf" else task.name
            if num_fewshot is not None:
                task.num_fewshot = num_fewshot
            if task.kind == "generative":  # k samples per item: avg@k and pass@k instead of greedy
                task.num_samples = num_samples or task.num_samples
                task.temperature = temperature if temperature is not None else task.temperature
            tasks.append(task.limited(limit))
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"task names must be unique, got {', '.join(duplicates)} twice")
    return tasks


# ----------------------------------------------------------------------------- scoring


def score_tasks(model, tokenizer, tasks: Sequence[Task], batch_size: int = 16, seed: int = 0, device=None,
                progress: bool = True, details: list | None = None,
                data_parallel: tuple[int, int, object] | None = None, pad_multiple: int = 1,
                precision: str | None = None) -> dict[str, dict]:
    """{task: {metric: value, ..., "n", "score", "random_baseline", "centred"}} for each task.

    data_parallel = (dp_rank, dp_world, group) splits multiple-choice scoring over the ranks;
    generative tasks run whole on every rank (items stop at different lengths, and FSDP needs
    every rank to decode in step). pad_multiple: scoring batches are padded to a width that is a
    multiple of it (the TP degree under sequence parallel). precision: the run's resolved one during
    training, else resolve_precision's "auto" for the device (bf16 autocast on CUDA)."""
    device = resolve_device(device, what="--device") if device is not None else next(model.parameters()).device
    autocast_dtype = torch.bfloat16 if (precision or resolve_precision("auto", device)) == "bf16" else None
    eot = end_of_text_id(tokenizer)
    empty_context = [eot] if eot is not None else []
    results: dict[str, dict] = {}
    bar = _progress(progress)
    with bar:
        for task in tasks:
            total = {"multiple_choice": count_requests, "long_context": lambda t: len(t.items)}.get(task.kind, count_generations)(task)
            handle = bar.add_task(task.name, total=total)
            advance = lambda n, h=handle: bar.advance(h, n)  # noqa: E731
            if task.kind == "long_context":
                metrics = score_long_context(model, tokenizer, task, stop_token_ids=empty_context, on_batch=advance,
                                             details=details)
            elif task.kind == "multiple_choice":
                metrics = score_multiple_choice(model, tokenizer, task, batch_size, seed, empty_context_ids=empty_context,
                                                autocast_dtype=autocast_dtype, on_batch=advance, details=details,
                                                data_parallel=data_parallel, pad_multiple=pad_multiple)
            else:
                metrics = score_generative(model, tokenizer, task, batch_size, seed, prefix_ids=(),
                                           stop_token_ids=empty_context, on_batch=advance, details=details)
            metrics["score"] = metrics[task.metric]
            metrics["random_baseline"] = task.baseline
            metrics["centred"] = centred(metrics["score"], task.baseline)
            results[task.name] = metrics
    return results


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("eval {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True, disable=not enabled)


# ----------------------------------------------------------------------------- the stage


def _load_for_eval(path_or_model, config, tokenizer, device: torch.device, validation: dict[str, str]):
    """(model on `device`, config, tokenizer path) of a model object or a path `load_any` reads;
    with `validation` folders the config's validation data is replaced by them (at most the model's
    context length, bits per byte counted with the tokenizer)."""
    if isinstance(path_or_model, torch.nn.Module):
        from smoltrain.config import Config

        model = path_or_model
        config = config or Config(model=model.config)
        tokenizer_path = tokenizer or config.data.tokenizer
    else:
        from smoltrain.train.load_model import load_any

        model, loaded_config, known_tokenizer = load_any(path_or_model, device=device)
        config = config or loaded_config
        tokenizer_path = tokenizer or known_tokenizer
    model.to(device)
    if validation:
        if tokenizer_path is None:
            raise ConfigError("--validation needs a tokenizer to count bytes for bits per byte: pass --tokenizer PATH")
        seq_len = min(config.data.seq_len, model.config.max_seq_len)
        config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, validation=validation, embedded=False, tokenizer=str(tokenizer_path), seq_len=seq_len))
    return model, config, tokenizer_path


def task_provenance(task) -> dict:
    """The settings a task's score depends on, as results.json records them."""
    sampling = {"num_samples": task.num_samples, "temperature": task.temperature} if task.kind == "generative" else {}
    return {"kind": task.kind, "items": len(task.items), "num_fewshot": task.num_fewshot,
            "formulation": task.formulation, "metric": task.metric, **sampling}


def evaluate(
    path_or_model,
    tasks: Sequence[str] | None = None,
    *,
    task_files: Sequence[str] = (),
    limit: int | None = None,
    num_fewshot: int | None = None,
    num_samples: int | None = None,
    temperature: float | None = None,
    batch_size: int | None = None,
    val_batches: int | None = None,
    device: str | torch.device | None = "auto",
    tokenizer: str | os.PathLike | None = None,
    config=None,
    seed: int | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    validation: Sequence[str] | dict[str, str] = (),
    log_samples: bool = False,
    haystack_files: Sequence[str] = (),
    position_buckets: int | None = None,
    yarn_factor: float | None = None,
) -> dict:
    """Evaluate a model (or a path `load_any` reads) -> {"tasks", "aggregate", "val"}; writes `out`
    (JSON, plus a markdown table beside it) when given.

    tasks: specs as `resolve_tasks` takes them; default the config's `eval.tasks`, else the
    embedded suite. num_samples > 1: that many sampled answers per generative item (temperature,
    default 0.8) scored as avg@k and pass@k. val_batches: validation batches per source (default `eval.val_batches` when
    the config names validation data, 0 otherwise). validation: shard folders (`DIR` or `SOURCE=DIR`) to use
    instead of the config's, e.g. for a Hugging Face folder. log_samples: every item's prompt, answers,
    log-likelihoods or generations and metrics go to `<out>.samples.jsonl` (as lighteval's details).
    haystack_files: text for long-context tasks' essay haystacks. position_buckets > 0: validation loss by
    position in that many log-spaced buckets (`loss_by_position`, the long-context perplexity curve).
    yarn_factor: score with YaRN stretching the model's trained length by this factor (no training; SmolLM3's 128k).

    The report records where its numbers come from (`provenance`): the model path, its step and
    tokens when a checkpoint tells them, the task settings, the validation folders, smoltrain's version.
    """
    device = resolve_device(device, what="--device")
    model, config, tokenizer_path = _load_for_eval(path_or_model, config, tokenizer, device,
                                                   parse_validation(validation))
    if yarn_factor:
        _stretch_with_yarn(model, yarn_factor)
    e = config.eval
    limit = limit if limit is not None else e.limit
    seed = e.seed if seed is None else seed
    batch_size = batch_size or e.batch_size
    specs = list(tasks) if tasks else ([] if task_files else list(e.tasks) or ["embedded"])
    specs += list(task_files)
    task_list = resolve_tasks(specs, limit, num_fewshot if num_fewshot is not None else (e.num_fewshot or None), seed,
                              num_samples, temperature, list(haystack_files) or e.haystack_files)
    if task_list and tokenizer_path is None and config.data.embedded:
        from smoltrain.eval.validation import resolve_data_config

        tokenizer_path = resolve_data_config(config).data.tokenizer  # built once, then cached
    if task_list and tokenizer_path is None:
        raise ConfigError("no tokenizer is known for this model: pass --tokenizer PATH (tokenizer.json or a folder)")
    details, num_val = ([] if log_samples else None), (val_batches if val_batches is not None else e.val_batches)
    results, val = _score(model, config, tokenizer_path, task_list, batch_size, seed, num_val, device, progress, details)
    report = {"tasks": results, "aggregate": aggregate(results), "val": val, "main_metric": main_metrics(task_list)}
    buckets = position_buckets if position_buckets is not None else e.position_buckets
    if buckets and val:
        from smoltrain.eval.longctx import loss_by_position_per_source

        report["loss_by_position"] = loss_by_position_per_source(model, config, num_val, batch_size, buckets, device)
    report["provenance"] = {
        "model": model_provenance(path_or_model),
        "tokenizer": str(tokenizer_path) if tokenizer_path is not None else None,
        "tasks": {t.name: task_provenance(t) for t in task_list},
        "limit": limit, "seed": seed, "batch_size": batch_size,
        "validation": dict(config.data.validation) if val else {}, "val_batches": num_val if val else 0,
        "device": str(device), "yarn_factor": yarn_factor,
        "smoltrain_version": __version__, "torch_version": torch.__version__,
    }
    if out is not None:
        if details is not None:
            report["samples"] = str(write_samples(details, Path(out).with_suffix(".samples.jsonl")))
        write_results(report, out)
    return report


def _stretch_with_yarn(model, factor: float) -> None:
    """Score past the trained length with YaRN and no training (SmolLM3's 128k from 64k)."""
    from smoltrain.config import RopeScaling, validate_rope_scaling

    scaling = RopeScaling(factor=factor, original_max_seq_len=model.config.max_seq_len)
    validate_rope_scaling(scaling, "--yarn")
    model.set_rope(scaling=scaling)


def _score(model, config, tokenizer_path, task_list: list, batch_size: int, seed: int, num_val: int,
           device: torch.device, progress: bool, details: list | None) -> tuple[dict, dict]:
    """The tasks' results and the validation loss per source (when the config names validation data),
    scored with the model in eval mode; it is put back in the mode it was in."""
    with evaluating(model):
        results = score_tasks(model, load_tokenizer(tokenizer_path), task_list, batch_size, seed, device, progress,
                              details=details) if task_list else {}
        val = {}
        if num_val > 0 and (config.data.validation or config.data.embedded):
            from smoltrain.eval.validation import validation_per_source

            bf16 = resolve_precision("auto", device) == "bf16"
            val = validation_per_source(model, config, num_val, batch_size, device, torch.bfloat16 if bf16 else None)
    return results, val


def parse_validation(specs: Sequence[str] | dict[str, str]) -> dict[str, str]:
    """`DIR` or `SOURCE=DIR` -> {source: folder}; a bare folder is named after itself."""
    if isinstance(specs, dict):
        return dict(specs)
    folders: dict[str, str] = {}
    for spec in specs:
        name, folder = spec.split("=", 1) if "=" in spec else (Path(spec).name, spec)
        if not Path(folder).is_dir():
            raise ConfigError(f"--validation {spec}: no such folder (expected token shards: .bin/.idx + meta.json)")
        if name in folders:
            raise ConfigError(f"--validation: two folders named {name!r}; name them SOURCE=DIR")
        folders[name] = folder
    return folders


def model_provenance(path_or_model) -> dict:
    """{"path", "checkpoint", "step", "tokens"} of what was evaluated; step and tokens are null
    when the folder does not tell (a model folder or Hugging Face export)."""
    if isinstance(path_or_model, torch.nn.Module):
        return {"path": None, "checkpoint": None, "step": None, "tokens": None}
    from smoltrain.errors import CheckpointError
    from smoltrain.train.checkpoint import find_checkpoint, read_train_state

    path = Path(path_or_model).resolve()
    try:
        checkpoint = find_checkpoint(path)
    except CheckpointError:
        checkpoint = None
    state = read_train_state(checkpoint) if checkpoint is not None else {}
    return {"path": str(path), "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "step": state.get("step"), "tokens": state.get("tokens")}


# ----------------------------------------------------------------------------- output


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)


def main_metrics(tasks: Sequence[Task]) -> dict[str, str]:
    return {t.name: t.metric for t in tasks}


def results_table(report: dict) -> list[list[str]]:
    """Rows (task, metric, score, +-stderr, baseline, centred, n) and the validation rows."""
    metrics = report.get("main_metric") or {}
    rows = []
    for name, r in report["tasks"].items():
        metric = metrics.get(name, "score")
        stderr = r.get(f"{metric}_stderr")
        rows.append([name, metric, f"{r['score']:.4f}", f"{stderr:.4f}" if stderr is not None else "",
                     f"{r['random_baseline']:.4f}", f"{r['centred']:+.4f}", str(r["n"])])
    if report.get("aggregate"):
        a = report["aggregate"]
        rows.append(["aggregate", "centred mean", f"{a['score']:.4f}", "", f"{a['random_baseline']:.4f}",
                     f"{a['centred']:+.4f}", str(a["tasks"])])
    for source, v in (report.get("val") or {}).items():
        rows.append([f"val/{source}", "loss / bpb", f"{v['loss']:.4f}", "", "", f"bpb {v['bpb']:.4f}", str(v["tokens"])])
    return rows


HEADER = ["task", "metric", "score", "stderr", "baseline", "centred", "n"]


def markdown_table(report: dict) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in results_table(report)]
    return "\n".join(lines) + "\n"


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for i, name in enumerate(HEADER):
        table.add_column(name, no_wrap=i == 0, justify="left" if i < 2 else "right")
    for row in results_table(report):
        table.add_row(*row)
    Console().print(table)


def provenance_line(report: dict) -> str:
    """What was evaluated, under which settings, as one markdown paragraph (empty without provenance)."""
    p = report.get("provenance")
    if not p:
        return ""
    model = p["model"]
    where = f"`{model['path']}`" if model["path"] else "a model in memory"
    if model["step"] is not None:
        where += f" at step {model['step']:,}" + (f" ({model['tokens']:,} tokens)" if model["tokens"] is not None else "")
    return (f"Model {where}; limit {p['limit']}, seed {p['seed']}, batch size {p['batch_size']}; "
            f"smoltrain {p['smoltrain_version']}, torch {p['torch_version']}, {p['device']}.\n\n")


def write_samples(details: list[dict], path: Path) -> Path:
    """One JSON line per scored item (prompt, choices or answer, log-likelihoods or generations, metrics)."""
    _atomic_write(path, "".join(json.dumps(d) + "\n" for d in details))
    return path


def write_results(report: dict, out: str | os.PathLike) -> Path:
    path = Path(out)
    _atomic_write(path, json.dumps(report, indent=2) + "\n")
    _atomic_write(path.with_suffix(".md"), "# Evaluation\n\n" + provenance_line(report) + markdown_table(report)
                  + long_context_markdown(report["tasks"]))
    return path
