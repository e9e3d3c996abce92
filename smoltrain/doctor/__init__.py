"""`smoltrain doctor`: the pre-flight check of a machine (or a whole torchrun job) before a long run:
environment, compute, memory, sustained load, collectives, storage, and with a recipe its loader and
plan, each figure judged OK / WARN / FAIL against a reference with one sentence of advice.

Every rank measures and rank 0 judges and prints: a bad GPU or a slow link only shows when each
rank's figures are compared with its peers'. Arguments are checked before anything is measured.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from smoltrain.doctor import (
    collectives,
    compute,
    environment,
    health,
    loader,
    memory,
    storage,
)
from smoltrain.doctor.report import FAIL, Check, merge_ranks, print_report, verdict
from smoltrain.doctor.timing import Budget, budget_for
from smoltrain.errors import ConfigError, DataError, SmoltrainError
from smoltrain.train.distributed import resolve_device

CHECKPOINT_BYTES_PER_PARAMETER = 12  # fp32 weights + AdamW's two fp32 moments, as train/checkpoint.py saves them
POST_STAGES = ("sft", "dpo", "grpo")


def post_stage(config) -> str | None:
    """The post-training stage a recipe is for (it sets keys of that section), or None for pretraining."""
    given = {key.partition(".")[0] for key in getattr(config, "explicit", ())}
    return next((stage for stage in POST_STAGES if stage in given), None)


def _shard_files(folder: str) -> tuple[list[Path], int]:
    """The .bin files of a token shard folder and its bytes per token; DataError if it is not one."""
    from smoltrain.data.shards import TokenSource

    source = TokenSource(folder)  # validates meta.json and every shard's size
    try:
        return [source.folder / f"{entry['name']}.bin" for entry in source.meta["shards"]], source.dtype.itemsize
    finally:
        source.close()


def resolve_arguments(recipe, overrides, data, checkpoints, json_out):
    """(config or None, {folder: (files, bytes per token)}, checkpoint folder or None), or a one-line error."""
    config = None
    if recipe:
        from smoltrain.config import load_config

        config = load_config(recipe, list(overrides))
    elif overrides:
        raise ConfigError("--set overrides a recipe's values: give --recipe too")
    folders = list(data)
    if config is not None and post_stage(config) is None:  # the recipe's sources first: its loader reads them
        data_cfg = config.data
        if data_cfg.embedded:
            from smoltrain.data.embedded import ensure_embedded_data

            data_cfg = ensure_embedded_data(data_cfg)
        folders = list(data_cfg.sources.values()) + folders
    data_dirs = {str(folder): _shard_files(folder) for folder in dict.fromkeys(map(str, folders))}
    checkpoint_dir = None
    if checkpoints:
        checkpoint_dir = Path(checkpoints)
        if not checkpoint_dir.is_dir():
            raise DataError(f"--checkpoints {checkpoints}: no such folder")
    elif config is not None:  # where train.out_dir will be: its nearest existing folder
        checkpoint_dir = Path(config.train.out_dir).absolute()
        while not checkpoint_dir.is_dir():
            checkpoint_dir = checkpoint_dir.parent
    if json_out and not Path(json_out).absolute().parent.is_dir():
        raise ConfigError(f"--json {json_out}: folder {Path(json_out).parent} does not exist")
    return config, data_dirs, checkpoint_dir


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    everyone = [None] * world
    dist.all_gather_object(everyone, obj)
    return everyone


def run(recipe: str | None = None, overrides=(), data=(), checkpoints: str | None = None, quick: bool = False,
        json_out: str | None = None, budget: Budget | None = None, mounts_text: str | None = None,
        console=None) -> dict:
    """Measure on every rank, judge on rank 0; returns the result (verdict, counts, checks, every
    figure) on every rank. `budget` overrides the sizes and durations (tests); `mounts_text` stands in
    for /proc/self/mounts."""
    started = time.perf_counter()
    config, data_dirs, checkpoint_dir = resolve_arguments(recipe, overrides, data, checkpoints, json_out)

    device = resolve_device("auto", int(os.environ.get("LOCAL_RANK", "0")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    created = False
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        created = True
    try:
        rank = dist.get_rank() if world > 1 else 0
        hosts = _gather(platform.node(), world)
        if console is None:
            from rich.console import Console

            console = Console(width=None if sys.stdout.isatty() else 150)  # logs: wide rows, no wrapping
        result = _run(config, data_dirs, checkpoint_dir, device, rank, world, hosts,
                      budget or budget_for(device, quick), mounts_text, console if rank == 0 else None)
        result["quick"], result["elapsed_s"] = quick, time.perf_counter() - started
        if rank == 0:
            print_report(result, console)
            if json_out:
                from smoltrain.files import write_json

                write_json(json_out, result)
        if world > 1:  # every rank returns the verdict, so `--strict` exits alike everywhere
            box = [result if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
        return result
    finally:
        if created:
            dist.destroy_process_group()


@contextmanager
def _step(console, what: str):
    if console is None:
        yield
        return
    with console.status(f"doctor: {what}"):
        yield


def _run(config, data_dirs, checkpoint_dir, device, rank, world, hosts, budget, mounts_text, console) -> dict:
    cuda = device.type == "cuda"
    local_world = hosts.count(hosts[rank])
    nodes = collectives.node_groups(hosts)
    leader = min(r for r in range(world) if hosts[r] == hosts[rank]) == rank  # one storage probe per node
    precision = compute.trainer_precision(config, device) if config else ("bf16" if cuda else "fp32")
    shapes = (compute.recipe_shapes(config.model, config.train.micro_batch_size * config.data.seq_len)
              if config else None)

    mine = {"rank": rank, "host": hosts[rank]}
    with _step(console, "environment"):
        mine["environment"] = environment.measure(device, local_world)
    with _step(console, "compute (matmul per precision)"):
        mine["compute"] = compute.measure(device, budget, shapes)
    with _step(console, "memory bandwidth"):
        mine["memory"] = memory.measure(device, budget)
    with _step(console, f"sustained load ({budget.sustained_s:g} s)"):
        mine["health"] = health.measure(device, budget, precision)
    if world > 1:
        with _step(console, "collectives"):
            mine["collectives"] = collectives.measure(device, budget, hosts)
    if leader and (data_dirs or checkpoint_dir):
        with _step(console, "storage (page cache dropped)"):
            seq_len = config.data.seq_len if config else 2048
            mine["storage"] = storage.measure(data_dirs, checkpoint_dir, budget, seq_len, mounts_text)
    if config is not None and post_stage(config) is None:
        with _step(console, "the recipe's loader"):
            try:
                mine["loader"] = loader.measure(config, rank, world, budget)
            except SmoltrainError as e:  # the recipe's mistake: said in the report, the measurements kept
                mine["loader"] = {"error": str(e)}
    everyone = _gather(mine, world)
    if rank != 0:
        return {}
    with _step(console, "judging"):
        return _judge(config, everyone, hosts, nodes, precision, cuda, budget)


def _judge(config, everyone: list[dict], hosts: list[str], nodes: list[list[int]], precision: str, cuda: bool,
           budget: Budget) -> dict:
    from smoltrain.train.metrics import device_spec

    labels = [f"rank {r} ({h})" for r, h in enumerate(hosts)]
    device_name = everyone[0]["environment"]["device_name"]
    spec = device_spec(device_name) if cuda else None
    checks: list[Check] = []
    checks += merge_ranks([environment.judge(m["environment"]) for m in everyone], labels)
    checks += merge_ranks([compute.judge(m["compute"], spec, cuda, precision) for m in everyone], labels)
    checks += merge_ranks([memory.judge(m["memory"], spec, cuda) for m in everyone], labels)
    checks += merge_ranks([health.judge(m["health"], cuda) for m in everyone], labels)
    if len(everyone) > 1:
        rates = [statistics.median(m["health"]["tflops"]) for m in everyone]
        checks.append(health.slow_ranks([1000 * r for r in rates], hosts, "sustained matmul", "GFLOP/s"))
    coll_checks, sweep = collectives.judge([m["collectives"] for m in everyone] if len(everyone) > 1 else None,
                                           hosts, device_name)
    checks += coll_checks

    need = None
    recipe_checks, planned, measured, peak_source = _recipe_checks(config, everyone, spec, precision)
    if planned is not None:
        need = planned["tokens_per_s_per_gpu"] * max(map(len, nodes))
    leaders = [m for m in everyone if "storage" in m]
    if leaders:
        checkpoint_bytes = None
        keep = 0
        if planned is not None:
            checkpoint_bytes = planned["parameters"]["total"] * CHECKPOINT_BYTES_PER_PARAMETER
            keep = config.train.keep_checkpoints
        checks += merge_ranks([storage.judge(m["storage"], need, checkpoint_bytes, keep) for m in leaders],
                              [f"node {m['host']}" for m in leaders])
    checks += recipe_checks
    if planned is not None:
        free = [m["memory"]["device_free_bytes"] if cuda else
                m["memory"]["host_available_bytes"] / hosts.count(m["host"]) for m in everyone]
        checks += loader.judge(config, planned, [m["loader"] for m in everyone], nodes, min(free), measured,
                               peak_source)
    result = verdict(checks)
    result.update(world_size=len(everyone), hosts=hosts, device=device_name, budget=asdict(budget),
                  checks=[c.to_dict() for c in checks], collective_sweep=sweep, measurements=everyone)
    return result


def _recipe_checks(config, everyone: list[dict], spec, precision: str):
    """(checks, plan, measured rate, peak source) of a pretraining recipe; a note for a post-training one,
    and a FAIL naming the recipe's mistake (the machine's figures are still judged and written)."""
    if config is None:
        return [], None, None, None
    stage = post_stage(config)
    if stage is not None:
        note = (f"a {stage} recipe: the machine checks ran; its data and steps are checked by `smoltrain {stage}` "
                f"before step 1 (the loader and plan checks are for pretraining recipes)")
        return [Check("loader", "recipe", note)], None, None, None
    errors = [m["loader"]["error"] for m in everyone if "error" in m["loader"]]
    if errors:
        return [Check("loader", "recipe", "the recipe's loader could not start", status=FAIL, advice=errors[0])], None, None, None
    try:
        square = everyone[0]["compute"]["square"].get(precision, {})
        measured = compute.recipe_rate(everyone[0]["compute"], precision) or square.get("tflops", 0) * 1e12
        if spec:
            peak, peak_source = spec["bf16"], f"spec {spec['bf16']:g} TFLOP/s"
        else:
            peak, peak_source = measured / 1e12, f"the measured {precision} matmul rate"
        planned = loader.sizing(config, len(everyone), peak)
    except SmoltrainError as e:
        return [Check("loader", "plan", "the recipe's plan could not be made", status=FAIL, advice=str(e))], None, None, None
    return [], planned, measured, peak_source


def exit_code(result: dict, strict: bool) -> int:
    """1 under --strict when any check FAILed, else 0 (2 is kept for user mistakes)."""
    return 1 if strict and result["verdict"] == FAIL else 0
