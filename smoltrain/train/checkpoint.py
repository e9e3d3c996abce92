"""Crash-proof training checkpoints on torch.distributed.checkpoint (DCP), which can reshard them.

A checkpoint is written under a temporary name, fsync'd, sealed with a COMPLETE manifest (size
and CRC32 of every file), renamed to `step_<8 digits>`, and only then does `checkpoints/latest`
move: a crash at any instant leaves either the previous checkpoint or a complete new one.
Loading re-checks the manifest, so a truncated or corrupted checkpoint is reported and the
previous one is used instead.

Test hook: SMOLTRAIN_TEST_CRASH="save_20_after_data,..." SIGKILLs the process at that point of
the save of step 20 (after_data, after_marker, after_rename); the trainer adds after_step_<n>.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import signal
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from smoltrain.config import Config, ModelConfig, RopeScaling, load_config, save_config
from smoltrain.errors import CheckpointError, ConfigError
from smoltrain.files import fsync_dir, write_atomic
from smoltrain.train.distributed import all_ranks_agree, barrier, is_distributed, rank_world

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MARKER = "COMPLETE"
TRAIN_STATE = "train_state.json"
PARTS = "parts_{rank}.pt"
CONFIG = "config.yaml"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# Optimizer state keyed by parameter name alone (param_groups.<name>.lr, not param_groups.<index>):
# a layout that groups parameters differently (TP splits DTensor from plain ones) still loads it.
FLAT_OPTIMIZER = StateDictOptions(flatten_optimizer_state_dict=True)
# A LoRA model's checkpoint holds its adapters alone (the frozen base comes from train.init): a
# 135M model with r 16 on all projections saves 4.9M parameters and their Adam moments. Loading is
# not strict, for the frozen parameters only: DCP still fails on any adapter key the files lack.
ADAPTERS_ONLY = StateDictOptions(ignore_frozen_params=True, strict=False)
# Model fields that change parameter shapes: a checkpoint only loads into the same values.
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "intermediate_size", "tie_embeddings", "qk_norm")


def crash_point(name: str) -> None:
    """Test hook: die here, as a power cut or the OOM killer would, if the test asked for it."""
    if name in os.environ.get("SMOLTRAIN_TEST_CRASH", "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every call that it assumes a single process when there is no process group:
    that is exactly what we intend."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ----------------------------------------------------------------------------- files


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_entries(folder: Path, files: list[str]) -> dict:
    return {name: {"size": (folder / name).stat().st_size, "crc32": _crc32(folder / name)} for name in files}


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


# ----------------------------------------------------------------------------- RNG


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def rng_state() -> dict:
    """This process's random states, as JSON (nothing in pretraining draws from them today; dropout
    or sampling would, and must continue exactly where they stopped)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
        "numpy": {"keys": _b64(keys.astype(np.uint32).tobytes()), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state().numpy().tobytes())
    return state


def set_rng_state(state: dict) -> None:
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
    n = state["numpy"]
    keys = np.frombuffer(base64.b64decode(n["keys"]), dtype=np.uint32).copy()
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        raw = np.frombuffer(base64.b64decode(state["cuda"]), dtype=np.uint8).copy()
        torch.cuda.set_rng_state(torch.from_numpy(raw))


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict,
    config: Config,
    keep: int,
    parts: dict | None = None,
) -> Path:
    """Write `run_dir/checkpoints/step_<step>` atomically, move `latest` to it, keep the newest `keep`.

    Collective: every rank calls it. `train_state` (step, tokens, loader state, ...) must be
    JSON-serialisable; rank 0's copy is written, with every rank's RNG state beside it. `parts`
    ({name: state_dict}: an objective's stateful extras, tensors allowed) are this rank's own and
    go to `parts_<rank>.pt`.
    """
    rank, world = rank_world()
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a crash mid-save
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()

    adapters_only = _has_adapters(model)
    if adapters_only:  # which base the adapters belong to (collective under FSDP: every rank computes it)
        from smoltrain.train.lora import base_norm

        train_state = dict(train_state, lora_base_norm=base_norm(model))
    options = StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=adapters_only)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    with _single_process_quiet():
        dcp.save(
            {"model": model_state, "optimizer": optim_state},
            storage_writer=dcp.FileSystemWriter(tmp, sync_files=True),
            no_dist=not is_distributed(),
        )
    if parts:
        torch.save(parts, tmp / PARTS.format(rank=rank))
    rngs = [rng_state()]
    if is_distributed():
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state())
    if rank == 0:
        state = dict(train_state, rng=rngs)
        write_atomic(tmp / TRAIN_STATE, json.dumps(state), durable=True)
        save_config(config, tmp / CONFIG)
    barrier()
    crash_point(f"save_{step}_after_data")

    # Each rank checksums a slice of the files (a 3B checkpoint is ~36 GB), rank 0 seals.
    files = sorted(p.name for p in tmp.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
    entries = _file_entries(tmp, files[rank::world])
    if is_distributed():
        gathered = [None] * world
        dist.all_gather_object(gathered, entries)
        entries = {k: v for part in gathered for k, v in part.items()}
    if rank == 0:
        for name in files:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        write_atomic(tmp / MARKER, json.dumps({"step": step, "files": entries}, indent=1), durable=True)
        crash_point(f"save_{step}_after_marker")
        if final.exists():  # a complete save that `latest` never reached (crash, or a rewind)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        crash_point(f"save_{step}_after_rename")
        write_atomic(root / LATEST, final.name + "\n", durable=True)
        _prune(root, keep)
    barrier()
    return final


def _has_adapters(model: torch.nn.Module) -> bool:
    from smoltrain.train.lora import has_adapters

    return has_adapters(model)


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and leftovers of interrupted saves."""
    steps = sorted((p for p in root.iterdir() if _step_of(p) >= 0), key=_step_of)
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".step_*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


# ----------------------------------------------------------------------------- find and verify


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not.
    Distributed: each rank re-reads a slice of the files and all ranks agree."""
    rank, world = rank_world()
    reason = None
    try:
        manifest = json.loads((path / MARKER).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        reason = "incomplete (no COMPLETE marker: the save was interrupted)"
    except (ValueError, KeyError, TypeError):
        reason = "its COMPLETE manifest is unreadable"
    else:
        for i, (name, expected) in enumerate(sorted(files.items())):
            f = path / name
            if not f.is_file():
                reason = f"{name} is missing"
            elif f.stat().st_size != expected["size"]:
                reason = f"{name} is truncated ({f.stat().st_size} of {expected['size']} bytes)"
            elif i % world == rank and _crc32(f) != expected["crc32"]:
                reason = f"{name} is corrupt (checksum mismatch)"
            if reason:
                break
    if not all_ranks_agree(reason is None):
        reason = reason or "corrupt on another rank"
    return reason


def _candidates(path: Path) -> list[Path]:
    """Checkpoints to try, best first: the one asked for (or `latest`), then older ones."""
    if (path / MARKER).exists() or (path / ".metadata").exists() or _STEP_DIR.match(path.name):
        root, first = path.parent, path
    else:
        root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
        first = None
        if (root / LATEST).is_file():
            first = root / (root / LATEST).read_text().strip()
    steps = sorted((p for p in root.iterdir() if _step_of(p) >= 0), key=_step_of, reverse=True) if root.is_dir() else []
    if first is None:
        return steps
    return [first] + [p for p in steps if _step_of(p) < _step_of(first)]


def find_checkpoint(path: str | os.PathLike, required: bool = False) -> Path | None:
    """The newest usable checkpoint for a run folder, its checkpoints/ folder or one checkpoint
    folder (falling back to older ones when it is incomplete or corrupt, and saying so).
    None when there is none at all (a fresh run); CheckpointError when some exist but none is usable."""
    path = Path(path)
    if not path.exists():
        if required:
            raise CheckpointError(f"{path}: no such checkpoint or run folder")
        return None
    problems = []
    for candidate in _candidates(path):
        reason = verify_checkpoint(candidate) if candidate.is_dir() else "does not exist"
        if reason is None:
            if problems:
                log.warning("using %s instead", candidate)
            return candidate
        log.warning("checkpoint %s is unusable: %s", candidate, reason)
        problems.append(f"{candidate.name}: {reason}")
    if problems:
        raise CheckpointError(f"{path}: no usable checkpoint ({'; '.join(problems)})")
    if required:
        raise CheckpointError(f"{path}: no checkpoint found (expected a run folder or a checkpoints/step_* folder)")
    return None


# ----------------------------------------------------------------------------- load


def read_train_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / TRAIN_STATE).read_text())


def rope_scaling_dict(scaling: RopeScaling | None) -> dict | None:
    """The RoPE scaling in force, as the train state and metrics store it."""
    return None if scaling is None else dataclasses.asdict(scaling)


def with_saved_rope(model: ModelConfig, train_state: dict) -> ModelConfig:
    """The model section with the RoPE base and scaling of the stage a checkpoint was saved in
    (long-context stages change both; checkpoints older than RoPE scaling keep the config's)."""
    scaling = train_state.get("rope_scaling", rope_scaling_dict(model.rope_scaling))
    return dataclasses.replace(model, rope_theta=train_state.get("rope_theta", model.rope_theta),
                               rope_scaling=None if scaling is None else RopeScaling(**scaling))


def finished_at(path: str | os.PathLike, max_steps: int) -> int | None:
    """The step of the newest usable checkpoint of a run (or checkpoint) folder when it already
    reached `max_steps`, else None: re-running a finished run has nothing to train."""
    checkpoint = find_checkpoint(path)
    if checkpoint is None:
        return None
    step = read_train_state(checkpoint)["step"]
    return step if step >= max_steps else None


def finished_note(path: str | os.PathLike, max_steps: int) -> str | None:
    """What a re-run of a finished run (train, sft, dpo, grpo) says instead of training; None when there
    is training to do."""
    step = finished_at(path, max_steps)
    if step is None:
        return None
    return (f"{path} is finished (step {step} of train.max_steps {max_steps}): nothing to train; raise "
            f"train.max_steps to train on, or choose another train.out_dir")


def read_parts(checkpoint: Path, same_layout: bool) -> dict:
    """This rank's stateful extras ({name: state_dict}), {} when none were saved. After a layout
    change rank r's file belonged to another position: every rank then reads rank 0's."""
    rank, _ = rank_world()
    path = Path(checkpoint) / PARTS.format(rank=rank if same_layout else 0)
    if not path.is_file():
        path = Path(checkpoint) / PARTS.format(rank=0)
    return torch.load(path, weights_only=True) if path.is_file() else {}


def read_config(checkpoint: Path) -> Config:
    try:
        return load_config(Path(checkpoint) / CONFIG)
    except ConfigError as e:
        raise CheckpointError(f"{checkpoint}: its config is not valid: {e}") from None


def _adapter_shapes(lora) -> str:
    """What fixes a LoRA checkpoint's tensor shapes (alpha and dropout may change on resume)."""
    return "off" if lora is None else f"r {lora.r} on {', '.join(sorted(lora.target_modules))}"


def check_compatible(checkpoint: Path, config: Config) -> None:
    """One clear line instead of DCP's shape-mismatch traceback when the model changed."""
    saved = read_config(checkpoint).model
    diffs = [f"model.{k}: {getattr(saved, k)} in the checkpoint, {getattr(config.model, k)} now"
             for k in SHAPE_KEYS if getattr(saved, k) != getattr(config.model, k)]
    if diffs:
        raise CheckpointError(f"{checkpoint} was written for another model shape ({'; '.join(diffs)})")
    before, now = _adapter_shapes(read_config(checkpoint).train.lora), _adapter_shapes(config.train.lora)
    if before != now:
        raise CheckpointError(f"{checkpoint} was written with train.lora {before}, now {now} (the adapters' shapes must stay)")


def load_checkpoint(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    restore_rng: bool = True) -> dict:
    """Load weights in place, resharded from whatever layout saved them; with an optimizer (resuming
    training) also its state and, when restore_rng, this rank's RNG states (the caller passes False
    when the layout changed: rank r's stream belonged to another position). Returns the train state."""
    rank, _ = rank_world()
    adapters_only = _has_adapters(model)  # the base parameters are frozen and not in the checkpoint
    train_state = read_train_state(checkpoint)
    if adapters_only:
        from smoltrain.train.lora import check_base

        check_base(model, train_state.get("lora_base_norm"), checkpoint, read_config(checkpoint).train.init)
    if optimizer is None:
        model_options = ADAPTERS_ONLY if adapters_only else None
        state = {"model": get_model_state_dict(model, options=model_options)}
    else:
        reader = dcp.FileSystemReader(checkpoint)
        # Checkpoints written before the flat layout number their param groups: read them as written.
        nested = any(k.startswith("optimizer.param_groups.0.") for k in reader.read_metadata().state_dict_metadata)
        options = StateDictOptions(flatten_optimizer_state_dict=not nested, ignore_frozen_params=adapters_only,
                                   strict=not adapters_only)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        state = {"model": model_state, "optimizer": optim_state}
    with _single_process_quiet():
        dcp.load(state, storage_reader=dcp.FileSystemReader(checkpoint), no_dist=not is_distributed())
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=model_options)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=options)
    rngs = train_state.get("rng") or []
    if optimizer is not None and restore_rng and rank < len(rngs):
        set_rng_state(rngs[rank])
    return train_state


def load_model_from_checkpoint(path: str | os.PathLike, device="cpu"):
    """(model, Config) from a run folder or a checkpoint folder: the newest usable checkpoint's
    weights, with the RoPE theta of the stage it was saved in (long-context stages change it)."""
    from smoltrain.model.transformer import Transformer

    checkpoint = find_checkpoint(path, required=True)
    config = read_config(checkpoint)
    config.model = with_saved_rope(config.model, read_train_state(checkpoint))
    if config.train.lora is not None:  # adapters alone: the base from train.init, merged (train/lora.py)
        from smoltrain.train.lora import load_lora_model

        return load_lora_model(checkpoint, config, device), config
    with torch.device("meta"):
        model = Transformer(config.model)
    model.to_empty(device=device)
    model.set_rope(theta=config.model.rope_theta, scaling=config.model.rope_scaling)  # buffers are not in the checkpoint
    load_checkpoint(checkpoint, model, None)
    return model, config
