"""The Hugging Face model card (`README.md`) that `smoltrain export` writes beside the weights.

Everything in it is read from what the run folders already hold: the stages are found by walking
`train.init` back from the exported model (SFT -> its pretrained model -> ...), so a card can never
list a stage that did not happen or claim evals that were not run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from smoltrain.model.flops import parameter_counts
from smoltrain.report.run import flatten_eval, read_metrics
from smoltrain.stages import STAGES

MAX_STAGES = 12  # a lineage longer than this is a loop in train.init (or not worth a card)
CHAT_EVALS = "chat_after.json"  # {"chat": chat_evals(...), "vibe": [...]} of a stage's final model
ORIGIN = "origin.json"  # what `smoltrain import` read: file, format, architecture, name, source, licence


@dataclass
class Stage:
    path: str
    objective: str  # pretrain, sft, dpo, grpo, merge, import
    steps: int | None = None
    tokens: int | None = None
    recipe: dict = field(default_factory=dict)  # the few settings a reader wants: lr, seq_len, loss ...
    evals: dict[str, float] = field(default_factory=dict)


def _run_folder(path: Path) -> Path | None:
    """The run folder a path belongs to (a run folder itself, its checkpoints/ or one checkpoint)."""
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "metrics.jsonl").is_file() or (candidate / "summary.json").is_file():
            return candidate
    return None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _gguf_origin(file: Path) -> dict:
    import gguf

    fields = gguf.GGUFReader(file).fields

    def value(key: str):
        field = fields.get(key)
        return field.contents() if field is not None else None

    name = " / ".join(str(v) for v in (value("general.organization"), value("general.name")) if v)
    source = value("general.source.url") or value("general.source.huggingface.repository")
    return {"format": "gguf", "architecture": value("general.architecture"), "name": name or None, "source": source,
            "license": value("general.license")}


def _hf_origin(folder: Path) -> dict:
    config = _read_json(folder / "config.json")
    readme = folder / "README.md"  # a Hugging Face card's YAML front matter names the licence
    text = readme.read_text(errors="replace") if readme.is_file() else ""
    try:
        meta = yaml.safe_load(text.split("---")[1]) if text.startswith("---") else {}
    except yaml.YAMLError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    return {"format": "Hugging Face folder", "architecture": (config.get("architectures") or [None])[0],
            "name": config.get("_name_or_path") or None, "source": meta.get("base_model"), "license": meta.get("license")}


def import_origin(source: str | Path) -> dict:
    """What an imported model's card says of where it came from: the file or folder, its format,
    architecture, name and source where the file names them, and its licence field (None when the
    file has none: the card then says the licence is unknown, never a guess)."""
    path = Path(source)
    origin = _gguf_origin(path) if path.is_file() else _hf_origin(path)
    return {"file": str(path.resolve()), **origin}


def _objective(raw: dict, summary: dict) -> str:
    if summary.get("objective"):
        return str(summary["objective"])
    owning = [stage for stage in STAGES.values() if stage.section]
    for stage in reversed(owning):  # the latest first: a config saved before each stage owned its section carries all
        if isinstance(raw.get(stage.section), dict) and raw.get(stage.section):
            return stage.name
    return "pretrain"


def _recipe(raw: dict, objective: str) -> dict:
    optim, data, train = raw.get("optim") or {}, raw.get("data") or {}, raw.get("train") or {}
    recipe = {"lr": optim.get("lr"), "schedule": optim.get("schedule"), "seq_len": data.get("seq_len"),
              "global_batch_tokens": train.get("global_batch_tokens")}
    stage = STAGES.get(objective)
    section = raw.get(stage.section) if stage is not None and stage.section else None
    for key in stage.card_keys if isinstance(section, dict) else ():
        if key in section:
            recipe[key] = section[key]
    return {k: v for k, v in recipe.items() if v is not None}


def _chat_evals(folder: Path) -> dict[str, float]:
    """The chat evals of a stage's final model (CHAT_EVALS, written by sft, dpo and the demo), as chat/<name>."""
    chat = _read_json(folder / CHAT_EVALS).get("chat") or {}
    return {f"chat/{k}": v for k, v in chat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("_stderr")}


def _stage(path: Path) -> tuple[Stage, str | None]:
    """This path's stage and the path it was initialised from (None at the start of the lineage)."""
    merge = _read_json(path / "merge.json")
    if merge:
        inputs = [str(i) for i in merge.get("inputs", [])]
        recipe = {"method": merge.get("method", "linear"), "weights": merge.get("weights"), "inputs": inputs}
        return Stage(str(path), "merge", recipe=recipe, evals=_chat_evals(path)), (inputs[0] if inputs else None)
    run = _run_folder(path)
    if run is None:
        config = _read_yaml(path / "config.yaml")
        init = (config.get("train") or {}).get("init")
        kind = "import" if (path / "config.json").is_file() or (path / ORIGIN).is_file() or not init else "model folder"
        origin = {k: v for k, v in _read_json(path / ORIGIN).items() if v is not None}
        return Stage(str(path), kind, recipe=origin), init
    raw = _read_yaml(run / "config.yaml")
    summary = _read_json(run / "summary.json")
    train, evals = read_metrics(run) if (run / "metrics.jsonl").is_file() else ([], [])
    last_eval = flatten_eval(evals[-1]["eval"]) if evals else {}
    objective = _objective(raw, summary)
    stage = Stage(str(run), objective, steps=summary.get("step") or (train[-1]["step"] if train else None),
                  tokens=summary.get("tokens") or (train[-1].get("tokens") if train else None),
                  recipe=_recipe(raw, objective), evals={**last_eval, **_chat_evals(run)})
    return stage, (raw.get("train") or {}).get("init")


def lineage(path: str | Path | None) -> list[Stage]:
    """Stages from the first (pretraining or an imported model) to `path`, oldest first (none for
    a model that came from memory, not from a folder)."""
    stages, seen, current = [], set(), Path(path) if path is not None else None
    while current is not None and len(stages) < MAX_STAGES:
        key = str(current.resolve()) if current.exists() else str(current)
        if key in seen or not current.exists():
            break
        seen.add(key)
        stage, parent = _stage(current)
        stages.append(stage)
        current = Path(parent) if parent else None
    return stages[::-1]


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _template_modes(folder: Path) -> str | None:
    template = folder / "chat_template.jinja"
    text = template.read_text() if template.is_file() else str(_read_json(folder / "tokenizer_config.json").get("chat_template") or "")
    if not text:
        return None
    if "/no_think" in text or "enable_thinking" in text:
        return ("a hybrid reasoning template: `/think` (reasoning in a `<think>` block, then the answer) and "
                "`/no_think` (an empty think block, then the answer), chosen by a flag in the system message "
                "or `enable_thinking` in `apply_chat_template`")
    return "a plain ChatML-style template (no reasoning modes)"


def model_card(source: str | Path | None, out_dir: str | Path, model_config, architecture: str) -> str:
    """Markdown with Hugging Face's YAML front matter, for the exported folder `out_dir`."""
    stages = lineage(source)
    counts = parameter_counts(model_config)
    chat = _template_modes(Path(out_dir))
    tags = ["smoltrain", "text-generation"] + (["conversational"] if chat else [])
    imported = [s for s in stages if s.objective == "import" and s.recipe.get("file")]
    licences = sorted({str(s.recipe["license"]) for s in imported if s.recipe.get("license")})
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    lines += [f"license: {licences[0]}"] if len(licences) == 1 else []  # the weights' terms carry over
    lines += ["tags:"]
    lines += [f"- {tag}" for tag in tags] + ["---", "", f"# {Path(out_dir).name}", ""]
    lines += [f"A {counts['total'] / 1e6:.1f}M-parameter {architecture} decoder trained with smoltrain "
              f"({len(stages)} stage{'s' if len(stages) != 1 else ''}).", "", "## Model", ""]
    m = model_config
    shape = [("parameters", f"{counts['total']:,} ({counts['non_embedding']:,} without embeddings)"),
             ("layers / hidden / intermediate", f"{m.num_layers} / {m.hidden_size} / {m.intermediate_size}"),
             ("attention heads / KV heads", f"{m.num_heads} / {m.num_kv_heads}"),
             ("vocabulary", f"{m.vocab_size:,}"), ("tied embeddings", str(m.tie_embeddings)),
             ("positions", f"RoPE (base {m.rope_theta:g})" + (f", none in every {m.nope_every}th layer" if m.nope_every else "")
              + (f", {m.rope_scaling.rope_type} scaling x{m.rope_scaling.factor:g}" if m.rope_scaling else "")
              if m.position_encoding == "rope" else "none"),
             ("context length", f"{m.max_seq_len:,}")]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in shape]
    for s in imported:
        r = s.recipe
        described = ", ".join(f"{k} {r[k]}" for k in ("format", "architecture", "name", "source") if r.get(k))
        lines += ["", f"Starts from weights imported from `{r['file']}` ({described}); licence: "
                  f"{r.get('license') or 'not stated in the file: check the source before you share this model'}."]
    tokens = sum(s.tokens or 0 for s in stages if s.objective == "pretrain")
    lines += ["", "## Training", ""]
    if tokens:
        lines += [f"Pretraining tokens seen: {tokens:,}.", ""]
    if stages:
        lines += ["| # | stage | steps | tokens | recipe | run |", "|---|---|---|---|---|---|"]
        for i, s in enumerate(stages, 1):
            recipe = ", ".join(f"{k} {_format(v)}" for k, v in s.recipe.items()) or "-"
            lines.append(f"| {i} | {s.objective} | {_format(s.steps) if s.steps else '-'} | "
                         f"{_format(s.tokens) if s.tokens else '-'} | {recipe} | `{s.path}` |")
    else:
        lines.append("No training history was found next to the exported weights.")
    evaluated = [s for s in stages if s.evals]
    lines += ["", "## Evaluation", ""]
    if evaluated:
        names = sorted({k for s in evaluated for k in s.evals})
        lines += ["The last evaluation of each stage (`smoltrain eval`; lower is better for loss and bpb; "
                  "`chat/`: the chat evals through the template, rates and mean reply lengths in tokens).", "",
                  "| metric | " + " | ".join(f"{i}. {s.objective}" for i, s in enumerate(stages, 1) if s.evals) + " |",
                  "|---|" + "---|" * len(evaluated)]
        for name in names:
            lines.append(f"| {name} | " + " | ".join(_format(s.evals[name]) if name in s.evals else "-" for s in evaluated) + " |")
        lines += ["", "Random-guess baselines of the embedded tasks are in each run's metrics.jsonl (`baseline`)."]
    else:
        lines.append("No evaluation results were recorded for this model.")
    lines += ["", "## Chat template", "", f"This model ships {chat}." if chat else "No chat template: a base model."]
    lines += ["", "## Intended use and limitations", "",
              "A small research model for studying training recipes (ablations, post-training stages). It was "
              "trained on little data, knows little, and makes factual and arithmetic mistakes; it is not "
              "suited to any decision that matters, and it has had no safety tuning.", "",
              "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("{Path(out_dir).name}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{Path(out_dir).name}")', "```", ""]
    return "\n".join(lines)


__all__ = ["model_card", "lineage", "Stage"]
