"""How fast a training step runs on this machine in each (precision, compile) choice: the demo's speed
probe, timed with the Trainer's own step (forward_backward + the recipe's optimizer), so the choice it
makes is measured on what training will run, not on a lookalike loop; the choice for a time budget, each
stage's settings from it, and the CPU's matmul peak (what MFU is quoted against on CPU).
"""

from __future__ import annotations

import dataclasses
import math
import time
from types import SimpleNamespace

import torch

from smoltrain.config import Config
from smoltrain.errors import ConfigError
from smoltrain.model.transformer import build_model
from smoltrain.train.distributed import single_process_context
from smoltrain.train.optim import build_optimizer
from smoltrain.train.parallelize import apply_compile
from smoltrain.train.pretrain import next_token_loss
from smoltrain.train.trainer import forward_backward

SPEED_CONFIGS = (("fp32", "off"), ("bf16", "off"), ("bf16", "on"))  # (train.precision, train.compile)


def config_name(precision: str, compile: str) -> str:
    """("bf16", "on") -> "bf16 compile": how the probe, its table and `--speed` name a configuration."""
    return f"{precision} {'compile' if compile == 'on' else 'eager'}"


def probe_speed(config: Config, rounds: int = 2, bf16: bool | None = None) -> dict:
    """Training tokens/s (forward, backward, AdamW on random tokens, one micro-batch a step) of each
    (precision, compile) choice: steps of the configurations interleaved over `rounds` rounds, the
    best of each (a neighbour's burst then slows every configuration alike, not the one it hit).
    A compiled configuration's first step minus its best is its compile time; a second compiled copy
    measures the compile of each later stage (warm: the compiler's caches are filled). bf16 is probed
    only where the CPU has native bf16 (elsewhere it is emulated, slower than fp32)."""
    if bf16 is None:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    shape = (config.train.micro_batch_size, config.data.seq_len)
    ids = torch.randint(0, config.model.vocab_size, shape)
    documents = torch.cumsum((torch.rand(shape) < 1 / 200).int(), dim=1).int()
    configs = [c for c in SPEED_CONFIGS if bf16 or c[0] == "fp32"] + ([] if bf16 else [("fp32", "on")])

    batch = {"input_ids": ids, "labels": ids, "document_ids": documents}
    objective = SimpleNamespace(loss=next_token_loss)

    def build(compile: str):
        model = build_model(config.model, seed=0, device="cpu")
        if compile == "on":
            apply_compile(model)
        return model, build_optimizer(config.optim, model)

    def step(model, optimizer, precision: str) -> float:
        """One step as the Trainer takes it: its forward_backward (autocast, normalisation, clipping),
        then the optimizer."""
        start = time.perf_counter()
        ctx = single_process_context("cpu", dataclasses.replace(config.train, precision=precision))
        forward_backward(model, objective, [batch], ctx, config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    parts, first, best = {}, {}, {}
    for precision, compile in configs:
        name = config_name(precision, compile)
        parts[name] = (*build(compile), precision, compile)
        first[name] = step(*parts[name][:3])  # compiles a compiled configuration
    for _ in range(rounds):
        for name, (model, optimizer, precision, _) in parts.items():
            best[name] = min(best.get(name, math.inf), step(model, optimizer, precision))
    results = {}
    for name, (_, _, precision, compile) in parts.items():
        entry = {"precision": precision, "compile": compile, "tokens_per_s": ids.numel() / best[name]}
        if compile == "on":
            entry["compile_s"] = max(0.0, first[name] - best[name])
            model, optimizer = build(compile)
            entry["recompile_s"] = max(0.0, step(model, optimizer, precision) - best[name])
        results[name] = entry
    return {"configs": results, "native_bf16": bf16}


def fastest_config(probe: dict, training_s: float, compiled_stages: int) -> str:
    """The probed configuration that trains the most tokens in `training_s` seconds when each of
    `compiled_stages` stages pays its compile (warm, from the caches the probe's cold compile filled)."""
    def tokens(entry: dict) -> float:
        return entry["tokens_per_s"] * max(0.0, training_s - compiled_stages * entry.get("recompile_s", 0.0))

    return max(probe["configs"], key=lambda name: tokens(probe["configs"][name]))


def forced_probe(speed: str) -> dict:
    """A probe of one configuration named by the user ("bf16 compile"), not measured."""
    names = {config_name(p, c): (p, c) for p in ("fp32", "bf16") for c in ("off", "on")}
    if speed not in names:
        raise ConfigError(f"speed must be one of {', '.join(names)}, got {speed!r}")
    return {"configs": {speed: {"precision": names[speed][0], "compile": names[speed][1], "tokens_per_s": None}},
            "native_bf16": None, "forced": True}


def stage_settings(probe: dict | None, choice: str | None, fixed_shapes: bool) -> dict:
    """train.precision / train.compile of a stage: the choice, but eager for stages whose batches change length
    every step (preference pairs, rollouts), where compile would recompile (then the fastest eager one)."""
    if probe is None:
        return {"precision": "auto", "compile": "auto"}
    configs = probe["configs"]
    if not fixed_shapes and configs[choice]["compile"] == "on":
        eager = [k for k, v in configs.items() if v["compile"] == "off" and v["tokens_per_s"]]
        if not eager:  # a forced compiled configuration: its precision, eager
            precision = configs[choice]["precision"]
            return {"precision": precision, "compile": "off", "name": config_name(precision, "off"), "tokens_per_s": None}
        choice = max(eager, key=lambda k: configs[k]["tokens_per_s"])
    return {**{k: configs[choice][k] for k in ("precision", "compile", "tokens_per_s")}, "name": choice}


def probe_table(probe: dict, choice: str) -> tuple[list[str], list[list]]:
    """(headers, rows): each probed configuration's tokens/s and compile times, the chosen one marked."""
    return ["configuration", "tokens/s (best step)", "compile s (first / later copies)", "chosen"], [
        [name, round(e["tokens_per_s"]), f"{e['compile_s']:.1f} / {e['recompile_s']:.1f}" if e["compile"] == "on" else "-",
         "yes" if name == choice else ""] for name, e in probe["configs"].items()]


def cpu_peak_tflops(trials: int = 10, seconds: float = 0.1) -> float:
    """This CPU's matmul throughput in fp32 and bf16, whichever is faster, the best of short trials (a
    busy neighbour only lowers some): the peak MFU is quoted against on CPU. (An fp32-only peak put a
    bf16-compiled run at "MFU 165%" on a CPU with native bf16.)"""
    best = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        a @ b
        for _ in range(trials // 2 if dtype == torch.bfloat16 else trials):
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                a @ b
                count += 1
            best = max(best, 2 * 1024**3 * count / (time.perf_counter() - start))
    return best / 1e12


__all__ = ["SPEED_CONFIGS", "config_name", "probe_speed", "fastest_config", "forced_probe", "stage_settings", "probe_table",
           "cpu_peak_tflops"]
