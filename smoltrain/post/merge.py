"""Model merging: linear averages (model soups) and spherical interpolation, into a model folder.

Linear is mergekit's `linear`: weights are normalised, tensors summed in float32 and cast to the
output dtype at the end. Inputs are read one at a time into one float32 accumulator, so a soup of
K checkpoints holds two models in memory, not K. A tied embedding is one tensor in our state dict,
so it is merged once and the head follows it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from smoltrain.errors import CheckpointError, ConfigError
from smoltrain.files import write_atomic

log = logging.getLogger(__name__)

METHODS = ("linear", "slerp")
# Model fields that change what a weight means: merging across them averages different functions.
ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "resolved_head_dim",
                     "intermediate_size", "tie_embeddings", "position_encoding", "nope_every", "qk_norm")
SLERP_DOT_THRESHOLD = 0.9995  # mergekit's: nearly parallel tensors are interpolated linearly
MERGE_FILE = "merge.json"


@dataclass
class Loaded:
    name: str
    model: torch.nn.Module
    config: object
    tokenizer: str | None
    dtype: torch.dtype


# ----------------------------------------------------------------------------- inputs


def last_checkpoints(run_dir: str | os.PathLike, k: int) -> list[Path]:
    """The newest k complete checkpoints of a run folder, oldest first."""
    from smoltrain.train.checkpoint import CHECKPOINTS, _step_of, verify_checkpoint

    if k < 1:
        raise ConfigError(f"--last must be at least 1, got {k}")
    run = Path(run_dir)
    root = run / CHECKPOINTS if (run / CHECKPOINTS).is_dir() else run
    if not root.is_dir():
        raise CheckpointError(f"{run}: no such run folder")
    steps = sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p) >= 0), key=_step_of)
    complete = [p for p in steps if verify_checkpoint(p) is None]
    if len(complete) < k:
        raise CheckpointError(f"{run}: {len(complete)} complete checkpoint(s), --last asks for {k}")
    return complete[-k:]


def _stored_dtype(folder: Path) -> torch.dtype:
    from smoltrain.train.load_model import WEIGHTS_FILE
    from smoltrain.train.load_model import _stored_dtype as stored

    path = folder / WEIGHTS_FILE
    return (stored(path) if path.is_file() else None) or torch.float32


def _load(path: str | os.PathLike) -> Loaded:
    from smoltrain.train.load_model import load_any

    model, config, tokenizer = load_any(path)
    return Loaded(str(path), model, config, tokenizer, _stored_dtype(Path(path)))


def _vocab(tokenizer: str | None) -> dict[str, int] | None:
    if tokenizer is None:
        return None
    from smoltrain.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer).get_vocab(with_added_tokens=True)


def check_compatible(first: Loaded, other: Loaded, first_vocab: dict | None) -> None:
    """Same architecture, same tensor names and shapes, same tokenizer; else one line naming the
    first difference."""
    for key in ARCHITECTURE_KEYS:
        a, b = getattr(first.config.model, key), getattr(other.config.model, key)
        if a != b:
            raise CheckpointError(f"cannot merge {other.name} with {first.name}: model.{key} is {b}, not {a}")
    a_state, b_state = first.model.state_dict(), other.model.state_dict()
    for name in sorted(set(a_state) | set(b_state)):
        if name not in a_state or name not in b_state:
            raise CheckpointError(f"cannot merge {other.name} with {first.name}: {name} is in only one of them")
        if a_state[name].shape != b_state[name].shape:
            raise CheckpointError(f"cannot merge {other.name} with {first.name}: {name} has shape "
                                  f"{tuple(b_state[name].shape)}, not {tuple(a_state[name].shape)}")
    other_vocab = _vocab(other.tokenizer)
    if first_vocab is None or other_vocab is None:
        if first_vocab is not other_vocab:
            log.warning("merge: %s has no known tokenizer; cannot check that the tokenizers agree",
                        first.name if first_vocab is None else other.name)
        return
    if first_vocab != other_vocab:
        by_id = {i: t for t, i in other_vocab.items()}
        for token, i in sorted(first_vocab.items(), key=lambda kv: kv[1]):
            if other_vocab.get(token) != i:
                theirs = f"token {by_id[i]!r}" if i in by_id else "no token"
                raise CheckpointError(f"cannot merge {other.name} with {first.name}: their tokenizers differ "
                                      f"(id {i} is {token!r} in {first.name}, {theirs} in {other.name})")
        raise CheckpointError(f"cannot merge {other.name} with {first.name}: {other.name}'s tokenizer has "
                              f"{len(other_vocab) - len(first_vocab)} extra tokens")


# ----------------------------------------------------------------------------- the arithmetic


def normalised_weights(weights: list[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ConfigError(f"--weights has {len(weights)} values for {n} models")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ConfigError(f"--weights must be finite and >= 0, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise ConfigError("--weights must not all be 0")
    return [w / total for w in weights]


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's slerp of one tensor (float32): along the great circle between the directions of
    a and b, scaling the unnormalised tensors; linear when they are nearly parallel."""
    a, b = a.float(), b.float()
    a_dir = a / a.norm() if a.norm() > eps else a
    b_dir = b / b.norm() if b.norm() > eps else b
    dot = (a_dir * b_dir).sum().clamp(-1.0, 1.0)
    if dot.abs() > SLERP_DOT_THRESHOLD:
        return (1 - t) * a + t * b
    theta = torch.arccos(dot)
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


# ----------------------------------------------------------------------------- entry


def merge(
    inputs: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    weights: list[float] | None = None,
    method: str = "linear",
    t: float = 0.5,
    dtype: torch.dtype | None = None,
) -> Path:
    """Merge models (model, Hugging Face, run or checkpoint folders) into a model folder at out_dir.

    linear: sum_i w_i x model_i with weights normalised to sum 1 (uniform by default: a soup).
    slerp: two models, t in [0, 1] (0 gives the first). dtype: of the saved weights (default: the
    first input's stored dtype). Writes merge.json (method, inputs, weights) beside the weights.
    """
    from smoltrain.model.transformer import Transformer
    from smoltrain.train.load_model import save_model_folder

    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if len(inputs) < 1 or (method == "slerp" and len(inputs) != 2):
        raise ConfigError(f"{method} merges {'exactly 2' if method == 'slerp' else 'at least 1'} models, got {len(inputs)}")
    if method == "slerp" and not 0 <= t <= 1:
        raise ConfigError(f"--t must lie in [0, 1], got {t}")
    out = Path(out_dir)
    for path in inputs:
        if Path(path).exists() and out.exists() and Path(path).resolve() == out.resolve():
            raise CheckpointError(f"{out}: the output folder must differ from the inputs")
    w = normalised_weights(weights, len(inputs)) if method == "linear" else [1 - t, t]

    first = _load(inputs[0])
    first_vocab = _vocab(first.tokenizer)
    first_state = {k: v.detach() for k, v in first.model.state_dict().items()}
    if method == "linear":
        merged = {k: w[0] * v.float() for k, v in first_state.items()}
        for path, weight in zip(inputs[1:], w[1:]):
            other = _load(path)
            check_compatible(first, other, first_vocab)
            for k, v in other.model.state_dict().items():
                merged[k] += weight * v.float()
            del other
    else:
        other = _load(inputs[1])
        check_compatible(first, other, first_vocab)
        other_state = other.model.state_dict()
        merged = {k: slerp(t, v, other_state[k]) for k, v in first_state.items()}
        del other, other_state

    dtype = dtype or first.dtype
    with torch.device("meta"):
        model = Transformer(first.config.model)
    model.to_empty(device="cpu")
    model.load_state_dict({k: v.to(dtype) for k, v in merged.items()})
    model.set_rope(theta=first.model.rope_theta, max_seq_len=first.model.rope_cos.shape[0])
    model.to(dtype)
    folder = save_model_folder(model, first.config, out, tokenizer=first.tokenizer)
    record = {"method": method, "inputs": [str(p) for p in inputs], "weights": w, "dtype": str(dtype).removeprefix("torch.")}
    if method == "slerp":
        record["t"] = t
    write_atomic(folder / MERGE_FILE, json.dumps(record, indent=2) + "\n")
    return folder


# ----------------------------------------------------------------------------- side-by-side eval


def evaluate_side_by_side(models: list[str], tasks: list[str] | None = None, limit: int | None = None,
                          device: str = "auto", seed: int | None = None) -> dict:
    """Score every model on the same tasks -> {"models": [...], "reports": {name: evaluate() report}}."""
    from smoltrain.eval.run import evaluate

    reports = {}
    for name in models:
        reports[name] = evaluate(name, tasks or None, limit=limit, device=device, seed=seed, val_batches=0, progress=False)
    return {"models": list(models), "reports": reports}


def side_by_side_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per task (its main metric, score +- stderr per model), then the
    centred aggregate."""
    names = result["models"]
    reports = [result["reports"][n] for n in names]
    header = ["task", "metric"] + [Path(n).name or n for n in names]
    rows = []
    for task in reports[0]["tasks"]:
        metric = reports[0]["main_metric"].get(task, "score")
        cells = []
        for r in reports:
            entry = r["tasks"][task]
            stderr = entry.get(f"{metric}_stderr")
            cells.append(f"{entry['score']:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
        rows.append([task, metric] + cells)
    if reports[0].get("aggregate"):
        rows.append(["aggregate", "centred"] + [f"{r['aggregate']['centred']:+.4f}" for r in reports])
    return header, rows


def write_side_by_side(result: dict, out_dir: str | os.PathLike) -> Path:
    header, rows = side_by_side_rows(result)
    folder = Path(out_dir)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    for name, text in (("merge_eval.json", json.dumps(result, indent=2) + "\n"),
                       ("merge_eval.md", "# Merge: inputs and result\n\n" + "\n".join(lines) + "\n")):
        write_atomic(folder / name, text)
    return folder / "merge_eval.json"


__all__ = ["merge", "slerp", "normalised_weights", "last_checkpoints", "check_compatible", "evaluate_side_by_side",
           "side_by_side_rows", "write_side_by_side", "METHODS"]
