"""Parallelism applied from outside the model: torchrun setup, the device mesh, and one ordered recipe
(tensor parallel -> activation checkpointing -> per-block compile -> FSDP2, or plain DDP).

The model is built on the meta device, parallelised, then materialised and initialised by
`init_weights(seed)`, which computes every full tensor from (seed, name) and keeps this rank's shard:
the starting weights cannot depend on the layout (SmolLM3 lost 1T tokens to TP ranks sharing a seed).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from smoltrain.config import Config, ModelConfig, ParallelConfig
from smoltrain.errors import CheckpointError, ConfigError
from smoltrain.model.transformer import Transformer, canonical_name
from smoltrain.train.optim import clip_grad_norm_  # noqa: F401  (moved beside the optimizer)

log = logging.getLogger(__name__)

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")


# ----------------------------------------------------------------------------- layout and setup


def resolve_layout(parallel: ParallelConfig, model: ModelConfig, world_size: int) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard, tp) for this world size, or a one-line ConfigError. Pure: no process
    group, no allocation, so a wrong launch fails in the first second rather than after the build."""
    replicate, shard, tp = parallel.dp_replicate, parallel.dp_shard, parallel.tp
    if replicate < 1 or tp < 1 or not (shard == -1 or shard >= 1):
        raise ConfigError(
            f"parallel: dp_replicate ({replicate}) and tp ({tp}) must be >= 1, dp_shard ({shard}) >= 1 or -1 (auto)"
        )
    if shard == -1:
        if world_size % (replicate * tp) != 0:
            raise ConfigError(
                f"parallel: world size {world_size} is not divisible by parallel.dp_replicate x parallel.tp "
                f"({replicate} x {tp}), so parallel.dp_shard=-1 cannot fill it"
            )
        shard = world_size // (replicate * tp)
    if replicate * shard * tp != world_size:
        raise ConfigError(
            f"parallel: dp_replicate x dp_shard x tp = {replicate} x {shard} x {tp} = {replicate * shard * tp} "
            f"but the world size is {world_size} (torchrun --nnodes x --nproc_per_node)"
        )
    if model.num_kv_heads % tp != 0:
        raise ConfigError(f"parallel.tp ({tp}) must divide model.num_kv_heads ({model.num_kv_heads})")
    if model.intermediate_size % tp != 0:
        raise ConfigError(f"parallel.tp ({tp}) must divide model.intermediate_size ({model.intermediate_size})")
    if parallel.ddp and tp > 1:
        raise ConfigError("parallel.ddp replicates whole models and cannot combine with parallel.tp > 1; use FSDP (ddp: false)")
    return replicate, shard, tp


def runtime_seed(seed: int, dp_rank: int) -> int:
    """Seed for runtime randomness (dropout, sampling): differs per data-parallel rank, agrees across
    tensor-parallel peers, which must draw the same numbers for the activations they share."""
    digest = hashlib.sha256(f"{seed}/runtime/dp{dp_rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class ParallelContext:
    """Where this process sits: global rank, device, mesh and its data/tensor-parallel coordinates."""

    rank: int
    local_rank: int
    world_size: int
    dp_replicate: int
    dp_shard: int
    tp: int
    ddp: bool
    device: torch.device
    mesh: object | None  # DeviceMesh with MESH_DIMS; None in a single process
    seed: int  # runtime seed (see runtime_seed); torch's global RNG is seeded with it
    flat_dp_mesh: object | None = None  # 1-D view of (dp_replicate, dp_shard): DDP and dp reductions

    @property
    def dp_world(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp  # mesh order is (dp_replicate, dp_shard, tp), tp fastest

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def tp_mesh(self):
        return self.mesh["tp"] if self.mesh is not None else None

    @property
    def dp_mesh(self):
        """The mesh FSDP shards over: 1-D (dp_shard), or 2-D (dp_replicate, dp_shard) for HSDP."""
        if self.mesh is None:
            return None
        return self.mesh["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else self.mesh["dp_shard"]

    def all_reduce_dp(self, value: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """Sum or mean of a tensor over data-parallel ranks (loss and token counts for logging)."""
        if self.dp_world == 1:
            return value
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.flat_dp_mesh.get_group())  # gloo has no AVG
        return out / self.dp_world if op == "mean" else out

    def close(self) -> None:
        if dist.is_initialized():
            # Leave together: a rank tearing down its groups while a peer still talks to it aborts
            # (seen with gloo: "terminate called without an active exception" ~1 run in 10).
            dist.barrier()
            dist.destroy_process_group()


def _resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is visible")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
    return torch.device("cuda", local_rank)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def setup_distributed(
    parallel_cfg: ParallelConfig, model_cfg: ModelConfig, seed: int = 0, device: str = "auto"
) -> ParallelContext:
    """Read the torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK; absent means one process),
    validate the layout, start the process group (NCCL on CUDA, gloo on CPU) and build the mesh."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    replicate, shard, tp = resolve_layout(parallel_cfg, model_cfg, world_size)
    dev = _resolve_device(device, local_rank)
    mesh = flat_dp_mesh = None
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        mesh = init_device_mesh(dev.type, (replicate, shard, tp), mesh_dim_names=MESH_DIMS)
        # Flattened views: "dp" is the data-parallel group (DDP, loss averaging); "dp_shard_tp" lets
        # DTensor reduce a norm that is partial over FSDP x TP in one collective instead of two.
        flat_dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        mesh["dp_shard", "tp"]._flatten("dp_shard_tp")
    ctx = ParallelContext(rank, local_rank, world_size, replicate, shard, tp, parallel_cfg.ddp, dev, mesh, 0, flat_dp_mesh)
    ctx.seed = runtime_seed(seed, ctx.dp_rank)
    torch.manual_seed(ctx.seed)  # CPU and every CUDA device
    if ctx.is_main and world_size > 1:
        log.info(
            f"distributed: world {world_size} = dp_replicate {replicate} x dp_shard {shard} x tp {tp} "
            f"({data_parallel_kind(replicate, shard, parallel_cfg.ddp)}, {'nccl' if dev.type == 'cuda' else 'gloo'})"
        )
    return ctx


def data_parallel_kind(dp_replicate: int, dp_shard: int, ddp: bool) -> str:
    """What wraps the model over the data-parallel ranks: DDP, HSDP, FSDP2, or nothing (TP only)."""
    if dp_replicate * dp_shard == 1:
        return "no data parallel"
    return "DDP" if ddp else ("HSDP" if dp_replicate > 1 else "FSDP2")


# ----------------------------------------------------------------------------- the recipe, one function each


def apply_tensor_parallel(model: Transformer, tp_mesh, sequence_parallel: bool, loss_parallel: bool = False) -> None:
    """Megatron layout: q/k/v/gate/up column-wise and o/down row-wise, so each block needs one
    all-reduce (or all-gather + reduce-scatter with sequence parallel) per attention and per MLP.

    Local head counts fall out of the sharding (the model views with -1). With sequence parallel the
    norms and residual stream hold a slice of the sequence; the final norm gathers it back, because
    the model's loss (chunked, with z-loss) needs full, replicated hidden states. An untied embedding
    and head are split row-wise and column-wise as in torchtitan. A tied one is replicated over TP
    unless `loss_parallel`: then it is split by vocabulary, for the embedding and the head alike, and
    the logits stay vocabulary-sharded into the loss (each TP rank computes 1/tp of the head, the
    largest single matmul of a small model, and holds 1/tp of the float32 logits).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    residual = Shard(1) if sequence_parallel else Replicate()
    plan = {}
    row_wise_embedding = model.lm_head is not None or loss_parallel
    if row_wise_embedding:
        plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if model.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                          use_local_output=not loss_parallel)
    elif sequence_parallel and not loss_parallel:
        plan["embed_tokens"] = PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Shard(1), use_local_output=True
        )
    if sequence_parallel:
        plan["norm"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True)
    parallelize_module(model, tp_mesh, plan)
    if row_wise_embedding:
        # The row-wise embedding returns a view of a DTensor's local shard; a compiled block fed
        # that view sends its input gradient around the DTensor's backward (torch 2.13). A copy.
        model.embed_tokens.register_forward_hook(lambda module, args, output: output.clone())
    model.loss_parallel = loss_parallel

    for block in model.layers:
        # Attention.forward(x, cos, sin, mask, cache): only x is distributed.
        layer_plan = {
            "self_attn": PrepareModuleInput(
                input_layouts=(residual, None, None, None, None), desired_input_layouts=(Replicate(), None, None, None, None)
            ),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=residual),
            "mlp": PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=residual),
        }
        if sequence_parallel:
            layer_plan["input_layernorm"] = SequenceParallel()
            layer_plan["post_attention_layernorm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, layer_plan)


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


def apply_fsdp(model: Transformer, dp_mesh, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2 per block, then the root (embedding, final norm, head). A 2-D mesh gives HSDP.
    With param_dtype bf16, gradients are still reduced in float32 (precision of the average)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    last = len(model.layers) - 1
    for index, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=index < last)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy)


def apply_ddp(model: Transformer, dp_mesh) -> None:
    """Plain data parallel (composable DDP: the module keeps its type, names and methods)."""
    from torch.distributed._composable.replicate import replicate

    replicate(model, device_mesh=dp_mesh)


# ----------------------------------------------------------------------------- build


def _resolve_compile(config: Config, device: torch.device) -> bool:
    return config.train.compile == "on" or (config.train.compile == "auto" and device.type == "cuda")


def _resolve_bf16(config: Config, device: torch.device) -> bool:
    return config.train.precision == "bf16" or (config.train.precision == "auto" and device.type == "cuda")


def _check_batch_layout(config: Config, ctx: ParallelContext) -> None:
    """Sequence-parallel slices and data-parallel micro-batches must divide evenly."""
    from smoltrain.train.pretrain import grad_accumulation, stage_seq_lens

    seq_lens = sorted(set(stage_seq_lens(config)))
    if ctx.tp > 1 and config.parallel.sequence_parallel:
        for seq_len in seq_lens:
            if seq_len % ctx.tp:
                raise ConfigError(
                    f"parallel.sequence_parallel: sequence length {seq_len} must be divisible by parallel.tp ({ctx.tp})"
                )
    for seq_len in seq_lens:
        grad_accumulation(config, seq_len, ctx.dp_world)


def build_parallel_model(config: Config, ctx: ParallelContext, device: torch.device | str | None = None) -> nn.Module:
    """The model for this rank, in the recipe's order: TP -> activation checkpointing -> per-block
    compile -> FSDP2 on the meta device, then materialise and `init_weights(train.seed)`; DDP last
    (it wraps materialised weights). Each step must see the one before: FSDP shards TP's DTensors
    (2-D), compile traces the checkpointed block (under TP the checkpoint wraps the compiled block
    instead), and FSDP hooks wrap the compiled block."""
    device = torch.device(device) if device is not None else ctx.device
    _check_batch_layout(config, ctx)
    with torch.device("meta"):
        model = Transformer(config.model)
    if ctx.tp > 1:
        apply_tensor_parallel(model, ctx.tp_mesh, config.parallel.sequence_parallel, config.parallel.loss_parallel)
    checkpointing, compiling = config.train.activation_checkpointing, _resolve_compile(config, device)
    # Dynamo cannot trace a checkpointed block holding DTensors (torch 2.13: the checkpoint saves the
    # DeviceMesh as a tensor), so under TP the compiled block is checkpointed instead of the reverse.
    compile_first = ctx.tp > 1
    if compiling and compile_first:
        apply_compile(model)
    if checkpointing:
        apply_activation_checkpointing(model, config.train.activation_checkpointing_every)
    if compiling and not compile_first:
        apply_compile(model)
    if ctx.dp_world > 1 and not ctx.ddp:
        apply_fsdp(model, ctx.dp_mesh, torch.bfloat16 if _resolve_bf16(config, device) else None)
    model.to_empty(device=device)
    model.init_weights(config.train.seed)
    if ctx.dp_world > 1 and ctx.ddp:
        apply_ddp(model, ctx.flat_dp_mesh)
    return model


# ----------------------------------------------------------------------------- training-loop helpers


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tensors, e.g. imported weights for train.init, into a model of any
    layout: every rank holds the full tensors and keeps its own shard, without communication.

    (torch 2.13's set_model_state_dict(full_state_dict=True) scatters from rank 0 and asserts on
    uneven strided FSDP x TP shards, e.g. a vocabulary of 97 over 2 x 2.)
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = {canonical_name(name): param for name, param in model.named_parameters()}
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
    "MESH_DIMS",
    "ParallelContext",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_ddp",
    "apply_fsdp",
    "apply_tensor_parallel",
    "build_parallel_model",
    "clip_grad_norm_",
    "data_parallel_kind",
    "load_full_state_dict",
    "resolve_layout",
    "runtime_seed",
    "set_gradient_sync",
    "setup_distributed",
]
