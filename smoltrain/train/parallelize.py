"""Parallelism applied from outside the model, as one ordered recipe: tensor parallel -> activation
checkpointing -> per-block compile -> FSDP2, or plain DDP (train/distributed.py decides the layout).

The model is built on the meta device, parallelised, then materialised and initialised by
`init_weights(seed)`, which computes every full tensor from (seed, name) and keeps this rank's shard:
the starting weights cannot depend on the layout (SmolLM3 lost 1T tokens to TP ranks sharing a seed).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from smoltrain.config import Config, ModelConfig
from smoltrain.errors import CheckpointError, ConfigError
from smoltrain.model.families import FAMILIES
from smoltrain.model.tp_plan import outer_plan
from smoltrain.model.transformer import Transformer
from smoltrain.train.distributed import ParallelContext
from smoltrain.train.expert_parallel import apply_expert_parallel, divide_expert_gradients, expert_mesh, expert_modules
from smoltrain.train.lora import apply_lora, base_parameter_name, init_adapter_weights, is_adapter_name

# ----------------------------------------------------------------------------- the recipe, one function each


def apply_tensor_parallel(model: Transformer, tp_mesh, sequence_parallel: bool, loss_parallel: bool = False) -> None:
    """The model family's plan (model/tp_plan.py, model/<family>/tp.py), applied: Megatron's layout
    splits each block's attention and MLP with one all-reduce (or all-gather + reduce-scatter under
    sequence parallel) each; embedding, head and final norm as model/tp_plan.outer_plan says."""
    from torch.distributed.tensor.parallel import parallelize_module

    block_plan = family_tp_plan(model.config)
    untied_head = model.lm_head is not None
    parallelize_module(model, tp_mesh, outer_plan(untied_head, sequence_parallel, loss_parallel))
    if untied_head or loss_parallel:
        # The row-wise embedding returns a view of a DTensor's local shard; a compiled block fed
        # that view sends its input gradient around the DTensor's backward (torch 2.13). A copy.
        model.embed_tokens.register_forward_hook(lambda module, args, output: output.clone())
    model.loss_parallel = loss_parallel
    for layer, block in enumerate(model.layers):
        parallelize_module(block, tp_mesh, block_plan(block, model.config, layer, sequence_parallel))


def family_tp_plan(config: ModelConfig):
    """The block plan of the first family (model/families.py order) whose plan covers every block of this config."""
    for family in FAMILIES:
        if family.tp_covers(config):
            return family.tp_plan
    raise ConfigError("parallel.tp > 1: no model family's tensor-parallel plan covers this mix of layers (e.g. MoE with "
                      "linear attention or sliding windows, or a full-width QK-norm in a dense model); use parallel.tp 1")


def apply_activation_checkpointing(model: Transformer, every: int = 1) -> None:
    """Recompute blocks in backward: activation memory of one block instead of all of them, for
    about a third more compute (the 3B recipe needs it at micro-batch 2, sequence 4096). With
    `every` = N only blocks 0, N, 2N, ... are recomputed (torchtitan's selective per-layer AC)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for index, block in enumerate(model.layers):
        if index % every:
            continue
        # The model draws no random numbers in forward, so the recomputation needs no saved RNG state.
        model.layers.register_module(str(index), checkpoint_wrapper(block, preserve_rng_state=False))


def apply_compile(model: Transformer, **compile_kwargs) -> None:
    """Compile each block in place: names stay unchanged (checkpoints never see `_orig_mod.`), blocks
    of one kind share a graph (4 RoPE blocks: 1 graph; NoPE every 2nd: 2), and FSDP2's hooks are
    dynamo-disabled, so they run eagerly around the compiled block. Then the head + cross-entropy:
    fused, the float32 logits are read once per pass instead of once per op."""
    for block in model.layers:
        block.compile(**compile_kwargs)
    if not model.loss_parallel:  # the vocabulary-parallel loss calls collectives: left eager
        model.loss_chunk = torch.compile(model.loss_chunk, **compile_kwargs)


def apply_fsdp(model: Transformer, dp_mesh, param_dtype: torch.dtype | None = None, ignored: set | None = None) -> None:
    """FSDP2 per block, then the root (embedding, final norm, head). A 2-D mesh gives HSDP.
    With param_dtype bf16, gradients are still reduced in float32 (precision of the average).
    `ignored` parameters (expert-parallel experts) are neither sharded nor reduced."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    last = len(model.layers) - 1
    for index, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=index < last, ignored_params=ignored)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, ignored_params=ignored)


def apply_ddp(model: Transformer, dp_mesh, ignored: list[nn.Module] | None = None) -> None:
    """Plain data parallel (composable DDP: the module keeps its type, names and methods)."""
    from torch.distributed._composable.replicate import replicate

    if not ignored:
        replicate(model, device_mesh=dp_mesh)
        return
    # Given a sliced mesh, replicate() adds torch's DDP x TP hooks, which turn every DTensor parameter,
    # ignored ones included, into a new local Parameter after each forward (torch 2.13): the
    # optimizer would lose the experts. The mesh's process group has no such hooks.
    replicate(model, ignored_modules=ignored, process_group=dp_mesh.get_group())


# ----------------------------------------------------------------------------- build


def build_parallel_model(config: Config, ctx: ParallelContext, device: torch.device | str | None = None) -> nn.Module:
    """The model for this rank, in the recipe's order: TP -> activation checkpointing -> per-block
    compile -> FSDP2 on the meta device, then materialise and `init_weights(train.seed)`; DDP last
    (it wraps materialised weights). Each step must see the one before: FSDP shards TP's DTensors
    (2-D), compile traces the checkpointed block (under TP the checkpoint wraps the compiled block
    instead), and FSDP hooks wrap the compiled block. With train.lora, peft's layers come first: every
    later step sees the model that trains, and FSDP shards the adapters with their block."""
    device = torch.device(device) if device is not None else ctx.device
    lora = config.train.lora
    with torch.device("meta"):
        model = Transformer(config.model)
    if lora is not None:
        apply_lora(model, lora)
    if ctx.tp > 1:
        apply_tensor_parallel(model, ctx.tp_mesh, config.parallel.sequence_parallel, config.parallel.loss_parallel)
    ep_mesh = expert_mesh(device.type, ctx.dp_world, ctx.ep) if ctx.ep > 1 else None
    if ep_mesh is not None:  # over the data-parallel ranks (tp is 1: config.check_expert_parallel), outside FSDP / DDP
        apply_expert_parallel(model, ep_mesh)
    experts = expert_modules(model) if ep_mesh is not None else []
    checkpointing, compiling = config.train.activation_checkpointing, ctx.compile
    # Dynamo cannot trace a checkpointed block holding DTensors (torch 2.13: the checkpoint saves the
    # DeviceMesh as a tensor), so under TP the compiled block is checkpointed instead of the reverse.
    compile_first = ctx.tp > 1
    if compiling and compile_first:
        apply_compile(model)
    if checkpointing:
        apply_activation_checkpointing(model, config.train.activation_checkpointing_every)
    if compiling and not compile_first:
        apply_compile(model)
    if ctx.grad_world > 1 and not ctx.ddp:  # data-parallel and context-parallel ranks (dp_shard x cp)
        apply_fsdp(model, ctx.dp_mesh, torch.bfloat16 if ctx.precision == "bf16" else None,
                   {p for module in experts for p in module.parameters()})
    model.to_empty(device=device)
    model.init_weights(config.train.seed)
    if experts:
        divide_expert_gradients(model, ep_mesh, ctx.dp_world)
    if lora is not None:
        init_adapter_weights(model, lora)
    if ctx.grad_world > 1 and ctx.ddp:
        apply_ddp(model, ctx.grad_mesh, experts)
    return model


# ----------------------------------------------------------------------------- training-loop helpers


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tensors, e.g. imported weights for train.init, into a model of any
    layout: every rank holds the full tensors and keeps its own shard, without communication.

    (torch 2.13's set_model_state_dict(full_state_dict=True) scatters from rank 0 and asserts on
    uneven strided FSDP x TP shards, e.g. a vocabulary of 97 over 2 x 2.)

    A LoRA model takes the weights into its base layers and keeps its adapters.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = {base_parameter_name(name): param for name, param in model.named_parameters() if not is_adapter_name(name)}
    # Persistent buffers too (an MoE's loss-free routing bias); FSDP leaves buffers whole.
    persistent = {base_parameter_name(name) for name in model.state_dict()}
    params.update({base_parameter_name(name): buffer for name, buffer in model.named_buffers()
                   if base_parameter_name(name) in persistent})
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, param in params.items():
        full = state[name]
        if tuple(full.shape) != tuple(param.shape):
            raise CheckpointError(f"weights do not fit the model: {name} is {tuple(full.shape)}, expected {tuple(param.shape)}")
        full = full.to(param.device, param.dtype)
        if isinstance(param, DTensor):
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param = param.to_local()
        param.copy_(full)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Gradient accumulation: skip the data-parallel reduction on all but the last micro-batch."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 and composable DDP
        model.set_requires_gradient_sync(enabled)


__all__ = [
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_ddp",
    "apply_fsdp",
    "apply_tensor_parallel",
    "build_parallel_model",
    "load_full_state_dict",
    "set_gradient_sync",
]
