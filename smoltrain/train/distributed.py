"""Where a process sits and what it runs on: the torchrun environment, the device mesh, the layout
checks, and device / precision / compile resolved once onto a `ParallelContext`.

Everything here is decided before a model exists, so a launch that cannot work (a world size the
layout does not fit, a missing GPU, a sequence that sequence parallel cannot split) is a one-line
ConfigError in the first second rather than after the build. `train/parallelize.py` then applies the
layout to the model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from smoltrain.config import Config, ModelConfig, ParallelConfig, TrainConfig, check_expert_parallel, check_tensor_parallel
from smoltrain.errors import ConfigError

log = logging.getLogger(__name__)

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")  # with parallel.cp > 1, "cp" sits between dp_shard and tp


# ----------------------------------------------------------------------------- layout


def resolve_layout(parallel: ParallelConfig, model: ModelConfig, world_size: int) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard, tp) for this world size (the mesh is dp_replicate x dp_shard x cp x tp),
    or a one-line ConfigError. Pure: no process group, no allocation, so a wrong launch fails in the
    first second rather than after the build."""
    replicate, shard, tp, cp = parallel.dp_replicate, parallel.dp_shard, parallel.tp, parallel.cp
    if replicate < 1 or tp < 1 or cp < 1 or not (shard == -1 or shard >= 1):
        raise ConfigError(
            f"parallel: dp_replicate ({replicate}), parallel.cp ({cp}) and tp ({tp}) must be >= 1, dp_shard ({shard}) >= 1 or -1 (auto)"
        )
    if shard == -1:
        if world_size % (replicate * cp * tp) != 0:
            names, sizes = ("dp_replicate", "tp"), (replicate, tp)
            if cp > 1:
                names, sizes = ("dp_replicate", "cp", "tp"), (replicate, cp, tp)
            raise ConfigError(
                f"parallel: world size {world_size} is not divisible by {' x '.join('parallel.' + n for n in names)} "
                f"({' x '.join(map(str, sizes))}), so parallel.dp_shard=-1 cannot fill it"
            )
        shard = world_size // (replicate * cp * tp)
    if replicate * shard * cp * tp != world_size:
        dims = {"dp_replicate": replicate, "dp_shard": shard, **({"cp": cp} if cp > 1 else {}), "tp": tp}
        raise ConfigError(
            f"parallel: {' x '.join(dims)} = {' x '.join(map(str, dims.values()))} = {replicate * shard * cp * tp} "
            f"but the world size is {world_size} (torchrun --nnodes x --nproc_per_node)"
        )
    check_tensor_parallel(model, parallel)
    check_expert_parallel(model, parallel, replicate * shard)
    return replicate, shard, tp


def runtime_seed(seed: int, dp_rank: int) -> int:
    """Seed for runtime randomness (dropout, sampling): differs per data-parallel rank, agrees across
    tensor-parallel peers, which must draw the same numbers for the activations they share."""
    digest = hashlib.sha256(f"{seed}/runtime/dp{dp_rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class ParallelContext:
    """Where this process sits (global rank, mesh, data/tensor-parallel coordinates) and what it runs
    on: device, precision and compile, resolved once from train.* for every part that needs them."""

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
    precision: str = "fp32"  # resolved train.precision: "bf16" (autocast over float32 weights) or "fp32"
    compile: bool = False  # resolved train.compile: per-block torch.compile
    ep: int = 1  # expert-parallel degree: divides dp_world (config.check_expert_parallel)
    cp: int = 1  # context-parallel degree: ranks that read the same rows and split their sequence
    flat_dp_cp_mesh: object | None = None  # with cp > 1: 1-D view of (dp_replicate, dp_shard, cp)

    @property
    def grad_world(self) -> int:
        """Ranks that hold a different part of a step's tokens, over which FSDP / DDP average gradients."""
        return self.dp_replicate * self.dp_shard * self.cp

    @property
    def grad_mesh(self):
        """The 1-D mesh of those grad_world ranks: DDP's, and the step's loss sums'."""
        return self.flat_dp_cp_mesh if self.cp > 1 else self.flat_dp_mesh

    def autocast(self):
        """The forward's context for this run's precision (see autocast)."""
        return autocast(self.device, self.precision)

    @property
    def dp_world(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.cp * self.tp)  # mesh order is (dp_replicate, dp_shard, cp, tp), tp fastest

    @property
    def cp_rank(self) -> int:
        return self.rank // self.tp % self.cp

    @property
    def cp_group(self):
        return self.mesh["cp"].get_group() if self.cp > 1 else None

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
        """The mesh FSDP shards over: 1-D (dp_shard), or 2-D (dp_replicate, dp_shard) for HSDP; with
        context parallelism dp_shard x cp flattened (torchtitan's dp_shard_cp): cp ranks train on other
        tokens of the same rows, so their gradients are summed like data-parallel ones."""
        if self.mesh is None:
            return None
        shard = "dp_shard_cp" if self.cp > 1 else "dp_shard"
        return self.mesh["dp_replicate", shard] if self.dp_replicate > 1 else self.mesh[shard]

    def all_reduce_dp(self, value: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """Sum or mean of a tensor over data-parallel ranks (loss and token counts for logging)."""
        if self.dp_world == 1:
            return value
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.flat_dp_mesh.get_group())  # gloo has no AVG
        return out / self.dp_world if op == "mean" else out

    def all_reduce_batch(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over every rank holding other tokens of the step: data-parallel and context-
        parallel ranks (loss sums and label-token counts; equal to all_reduce_dp without cp)."""
        if self.cp == 1:
            return self.all_reduce_dp(value, op="sum")
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.grad_mesh.get_group())
        return out

    def close(self) -> None:
        if dist.is_initialized():
            # Leave together: a rank tearing down its groups while a peer still talks to it aborts
            # (seen with gloo: "terminate called without an active exception" ~1 run in 10).
            dist.barrier()
            dist.destroy_process_group()
        # destroy_process_group forgets the groups, but the device meshes still hold them (their group
        # registry): a group left alive is destroyed at interpreter finalization, where gloo's threads
        # aborted finished runs (exit 134). Dropping the meshes' references frees the groups now.
        for mesh in (self.mesh, self.flat_dp_mesh, self.flat_dp_cp_mesh):
            getattr(mesh, "_pg_registry", {}).clear()
        self.mesh = self.flat_dp_mesh = self.flat_dp_cp_mesh = None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


# ----------------------------------------------------------------------------- device, precision, compile


def resolve_device(requested: str | torch.device | None = "auto", local_rank: int = 0, what: str = "train.device") -> torch.device:
    """train.device, `--device` of eval, chat, serve: auto (or None) is this rank's GPU when there is one,
    else the CPU; cuda is this rank's GPU, cuda:N that GPU. `what` names the setting in errors."""
    if requested is None or str(requested) == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{what} {requested}: not a device (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"{what} {requested}: smoltrain runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise ConfigError(f"{what} {requested}: no CUDA device is visible (use cpu or auto)")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{what} {requested}: device {index} (LOCAL_RANK {local_rank}) but only "
                          f"{torch.cuda.device_count()} CUDA devices are visible")
    return torch.device("cuda", index)


def autocast(device: torch.device, precision: str):
    """A resolved precision as a forward's context: bf16 autocast over float32 weights, or nothing (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: oneDNN runs bf16 matmuls natively (else it emulates them, slowly)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def _warn_emulated_bf16() -> None:
    log.warning("train.precision=bf16 on a CPU without native bf16 (no AVX-512 BF16 or AMX): oneDNN emulates it, "
                "measured 14x slower than fp32 on an AVX2-only CPU (364 vs 5,000-6,400 tokens/s, demo shape); "
                "train.precision=fp32 is the fast choice there")


BF16_WIN = 1.2  # "auto" takes bf16 on a CPU when its matmuls at the model's shape are this much faster
# ... and only for models this wide: below, a step is not matmul-bound (the demo's 128-wide model: bf16
# 1.02x fp32 for the whole step; SmolLM2-135M, 576 wide: 1.8x for SFT, equal losses to 2 decimals).
BF16_MIN_HIDDEN = 512
PROBE_TOKENS = 4096  # rows of the probe's matmul at most: ~0.1 s a precision at SmolLM2-135M's shape


def resolve_precision(requested: str, device: torch.device, model: ModelConfig | None = None,
                      tokens: int = 2048) -> str:
    """train.precision: "auto" is bf16 autocast on CUDA; on a CPU it is what is faster there for this
    model: bf16 pays only with native bf16, and not even there at small shapes (1.02x fp32 at the
    demo shape on an AVX-512 BF16 EPYC, 1.8x for SmolLM2-135M's SFT), so the CPU's bf16 matmuls are
    timed once at the model's MLP shape (`tokens` rows) and cached. Without a model: fp32. An
    explicit bf16 on a CPU that would emulate it is said once, with its cost."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16"
        if model is None or model.hidden_size < BF16_MIN_HIDDEN or not cpu_has_native_bf16():
            return "fp32"
        return _cpu_auto_precision(model.hidden_size, model.intermediate_size, min(tokens, PROBE_TOKENS))
    if requested == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        _warn_emulated_bf16()
    return requested


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        return "cpu"


def _bf16_speedup(rows: int, hidden: int, intermediate: int) -> float:
    """fp32 time / bf16 time of the model's MLP matmul on this CPU (the best of a few, ~0.1 s each)."""
    import time

    a, b = torch.randn(rows, hidden), torch.randn(hidden, intermediate)
    times = {}
    for name, (x, y) in {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}.items():
        x @ y  # warm-up: oneDNN picks its kernel
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < 0.1:
            t = time.perf_counter()
            x @ y
            best = min(best, time.perf_counter() - t)
        times[name] = best
    return times["fp32"] / times["bf16"]


@functools.lru_cache(maxsize=None)
def _cpu_auto_precision(hidden: int, intermediate: int, rows: int) -> str:
    """bf16 when the model's matmuls run BF16_WIN x faster in it on this CPU, else fp32; measured once per
    CPU, torch version, thread count and shape (cached in ~/.cache/smoltrain/precision.json), said once."""
    import json
    from pathlib import Path

    from smoltrain.files import write_json

    path = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "smoltrain" / "precision.json"
    key = f"{_cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {rows}x{hidden}x{intermediate}"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = round(_bf16_speedup(rows, hidden, intermediate), 3)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, cache)
        except OSError:  # a read-only home: measured again next time
            pass
    choice = "bf16" if cache[key] >= BF16_WIN else "fp32"
    log.info(f"train.precision auto: {choice} on this CPU (bf16 matmuls {cache[key]:.2f}x fp32 at this model's shape, "
             f"bf16 from {BF16_WIN}x; measured once, cached in {path}; set train.precision to choose)")
    return choice


def resolve_compile(requested: str, device: torch.device) -> bool:
    """train.compile: "auto" compiles on CUDA only (inductor's CPU compile costs minutes of startup
    on 2 cores for a few percent; "on" is the choice for long CPU runs, fp32 + compile measured
    1.25x transformers on an AVX2-only CPU)."""
    return requested == "on" or (requested == "auto" and device.type == "cuda")


def single_process_context(device: torch.device | str = "cpu", train: TrainConfig | None = None) -> ParallelContext:
    """The layout of a plain (non-torchrun) process, for callers that build parts without
    setup_distributed; precision and compile resolved from `train` (defaults: auto)."""
    device = torch.device(device)
    precision = resolve_precision(train.precision if train else "auto", device)
    compiling = resolve_compile(train.compile if train else "auto", device)
    return ParallelContext(rank=0, local_rank=0, world_size=1, dp_replicate=1, dp_shard=1, tp=1, ddp=False,
                           device=device, mesh=None, seed=0, precision=precision, compile=compiling)


def data_parallel_kind(dp_replicate: int, dp_shard: int, ddp: bool) -> str:
    """What wraps the model over the data-parallel ranks: DDP, HSDP, FSDP2, or nothing (TP only)."""
    if dp_replicate * dp_shard == 1:
        return "no data parallel"
    return "DDP" if ddp else ("HSDP" if dp_replicate > 1 else "FSDP2")


def describe_layout(ctx: ParallelContext) -> str:
    if not ctx.distributed:
        return "1 process"
    parts = [f"dp_replicate {ctx.dp_replicate}"] if ctx.dp_replicate > 1 else []
    parts += [f"dp_shard {ctx.dp_shard}"] if ctx.dp_shard > 1 else []
    parts += [f"cp {ctx.cp}"] if ctx.cp > 1 else []
    parts += [f"tp {ctx.tp}"] if ctx.tp > 1 else []
    kind = data_parallel_kind(ctx.dp_replicate, ctx.dp_shard * ctx.cp, ctx.ddp)
    return f"{ctx.world_size} ranks = {' x '.join(parts)} ({'TP' if kind == 'no data parallel' else kind})"


def check_layout(config: Config, ctx: ParallelContext) -> None:
    """What the layout asks of the data, before anything is built: sequence parallel splits every
    sequence length of the run (each stage's) over the TP ranks."""
    if ctx.tp <= 1 or not config.parallel.sequence_parallel:
        return
    from smoltrain.data.stages import stage_seq_lens

    for seq_len in sorted(set(stage_seq_lens(config.data))):
        if seq_len % ctx.tp:
            raise ConfigError(
                f"parallel.sequence_parallel: sequence length {seq_len} must be divisible by parallel.tp ({ctx.tp})"
            )


# ----------------------------------------------------------------------------- setup


def _build_meshes(device_type: str, replicate: int, shard: int, cp: int, tp: int) -> tuple:
    """The device mesh and its flattened views: "dp" is the data-parallel group (DDP, loss averaging);
    "dp_shard_tp" lets DTensor reduce a norm that is partial over FSDP x TP in one collective instead
    of two; with cp, "dp_shard_cp" is what FSDP shards over and "dp_cp" what DDP and the loss sums
    reduce over (cp refuses tp: context_parallel.check_context_parallel). A cp dimension exists only
    when it splits something (torchtitan's ParallelDims leaves out size-1 dims), so layouts without
    context parallelism keep the mesh, groups and checkpoints they always had."""
    from torch.distributed.device_mesh import init_device_mesh

    if cp == 1:
        mesh = init_device_mesh(device_type, (replicate, shard, tp), mesh_dim_names=MESH_DIMS)
        flat_dp = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        mesh["dp_shard", "tp"]._flatten("dp_shard_tp")
        return mesh, flat_dp, None
    mesh = init_device_mesh(device_type, (replicate, shard, cp, tp), mesh_dim_names=("dp_replicate", "dp_shard", "cp", "tp"))
    flat_dp = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    return mesh, flat_dp, mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")


def setup_distributed(
    parallel_cfg: ParallelConfig, model_cfg: ModelConfig, seed: int = 0, device: str = "auto",
    precision: str = "auto", compile: str = "auto", tokens: int = 2048,
) -> ParallelContext:
    """Read the torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK; absent means one process),
    validate the layout, resolve device / precision / compile, start the process group (NCCL on
    CUDA, gloo on CPU) and build the mesh."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    replicate, shard, tp = resolve_layout(parallel_cfg, model_cfg, world_size)
    cp = parallel_cfg.cp
    dev = resolve_device(device, local_rank)
    mesh = flat_dp_mesh = flat_dp_cp_mesh = None
    if world_size > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        mesh, flat_dp_mesh, flat_dp_cp_mesh = _build_meshes(dev.type, replicate, shard, cp, tp)
    ctx = ParallelContext(rank, local_rank, world_size, replicate, shard, tp, parallel_cfg.ddp, dev, mesh, 0, flat_dp_mesh,
                          precision=resolve_precision(precision, dev, model_cfg, tokens), compile=resolve_compile(compile, dev),
                          ep=parallel_cfg.ep, cp=cp, flat_dp_cp_mesh=flat_dp_cp_mesh)
    ctx.seed = runtime_seed(seed, ctx.dp_rank)
    torch.manual_seed(ctx.seed)  # CPU and every CUDA device
    if ctx.is_main and world_size > 1:
        log.info(
            f"distributed: world {world_size} = dp_replicate {replicate} x dp_shard {shard} x "
            f"{f'cp {cp} x ' if cp > 1 else ''}tp {tp} "
            f"({data_parallel_kind(replicate, shard * cp, parallel_cfg.ddp)}, {'nccl' if dev.type == 'cuda' else 'gloo'})"
        )
    return ctx


# ----------------------------------------------------------------------------- collectives without a context


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_ranks_agree(ok: bool) -> bool:
    """True on every rank when `ok` is True on every rank."""
    if not is_distributed():
        return ok
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, [ok])
    return all(flag[0] for flag in everyone)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


__all__ = [
    "MESH_DIMS", "ParallelContext", "all_ranks_agree", "barrier", "check_layout", "cpu_has_native_bf16",
    "data_parallel_kind", "describe_layout", "is_distributed", "rank_world", "resolve_compile", "resolve_device", "resolve_layout",
    "resolve_precision", "runtime_seed", "setup_distributed", "single_process_context",
]
