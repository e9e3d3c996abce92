"""How fast a training step runs on this machine in each (precision, compile) choice: the demo's speed
probe, timed with the Trainer's own step (forward_backward + the recipe's optimizer), so the choice it
makes is measured on what training will run, not on a lookalike loop.
"""

from __future__ import annotations

import dataclasses
import math
import time
from types import SimpleNamespace

import torch

from smoltrain.config import Config
from smoltrain.model.transformer import build_model
from smoltrain.train.distributed import single_process_context
from smoltrain.train.optim import build_optimizer
from smoltrain.train.parallelize import apply_compile
from smoltrain.train.pretrain import next_token_loss
from smoltrain.train.trainer import forward_backward

SPEED_CONFIGS = (("fp32", "off"), ("bf16", "off"), ("bf16", "on"))  # (train.precision, train.compile)


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
        name = f"{precision} {'compile' if compile == 'on' else 'eager'}"
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


__all__ = ["SPEED_CONFIGS", "probe_speed"]
