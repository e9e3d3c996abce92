"""Expert parallelism applied from outside the model: each rank holds num_experts / ep experts (DTensors
Shard(0) over "ep", replicated over "edp"); tokens routed to another rank's experts travel there and back by all_to_all.

The MoE block reads as on one device: it sorts its tokens by (global) expert and calls `experts(x, counts)`;
the hooks installed here turn that call into dispatch -> local experts -> combine (torchtitan's AllToAllTokenDispatcher).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

from smoltrain.model.moe import Experts


def expert_mesh(device_type: str, dp_world: int, ep: int):
    """The experts' mesh over the data-parallel ranks (tp is 1 under EP): ("edp", "ep"), where the ep
    ranks of one row split the experts and the dp_world / ep rows hold the same experts."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (dp_world // ep, ep), mesh_dim_names=("edp", "ep"))


def apply_expert_parallel(model: nn.Module, mesh) -> None:
    """Shard every MoE layer's stacked experts over the mesh's "ep" dimension (dim 0) and replicate
    them over "edp", on the meta device before FSDP / DDP (which must leave them alone), and route
    their calls through all_to_all within an ep row."""
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor

    def shard_experts(name, module, mesh):
        for key, param in list(module.named_parameters(recurse=False)):
            sharded = distribute_tensor(param, mesh, [Replicate(), Shard(0)], src_data_rank=None)
            module.register_parameter(key, nn.Parameter(sharded))

    for module in expert_modules(model):
        distribute_module(module, mesh, shard_experts, input_fn=_dispatch, output_fn=_combine)


def divide_expert_gradients(model: nn.Module, mesh, dp_world: int) -> None:
    """After materialisation: an expert's gradient already sums the tokens of its ep row (the
    exchange's backward brings them home); it is summed over the edp rows holding the same experts
    and divided by dp_world, the average FSDP / DDP take over the other parameters, and never
    averaged again over the ep ranks (megablocks#86: ep x too large). The edp sum runs on every
    micro-batch (no accumulation-aware sync: one all-reduce of the local experts per backward)."""
    edp = mesh.get_group("edp") if mesh.size(0) > 1 else None

    def reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad / dp_world
        if edp is not None:
            dist.all_reduce(grad.to_local(), group=edp)
        return grad

    for module in expert_modules(model):
        for param in module.parameters(recurse=False):
            param.register_hook(reduce)


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """The expert-parallel modules, which FSDP2 and DDP must leave alone (their gradients are complete)."""
    return [module for module in model.modules() if isinstance(module, Experts)]


class _Route:
    """One call's exchange plan: rows sent to / received from each rank, and the rank-major ->
    expert-major order of the received rows."""

    def __init__(self, send: list[int], receive: list[int], order: torch.Tensor):
        self.send, self.receive, self.order = send, receive, order


@torch.compiler.disable  # data-dependent split sizes (a host sync): run eagerly between compiled parts of the block
def _dispatch(module: Experts, inputs: tuple, mesh) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens sorted by global expert, counts [E]) -> (the tokens of this rank's experts sorted by
    local expert, their counts [E / ep]). Counts go first (one small all_to_all) so that every rank
    knows its split sizes; the tokens follow with autograd."""
    x, counts = inputs
    group, ranks = mesh.get_group("ep"), mesh.size(1)
    per_rank = counts.view(ranks, -1)  # row r: tokens for rank r's experts, which are contiguous
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    received = received.view(ranks, -1)  # row r: tokens rank r sends to each of my experts
    send, receive = per_rank.sum(dim=1).tolist(), received.sum(dim=1).tolist()
    tokens = funcol.all_to_all_single_autograd(x, receive, send, group)
    # Received rows are grouped by source rank, then expert; the experts want them grouped by expert.
    local = torch.arange(received.shape[1], device=x.device).repeat(ranks)
    order = local.repeat_interleave(received.reshape(-1)).argsort(stable=True)
    module._route = _Route(send, receive, order)
    return tokens[order], received.sum(dim=0)


@torch.compiler.disable
def _combine(module: Experts, output: torch.Tensor, mesh) -> torch.Tensor:
    """The inverse of _dispatch: unsort to rank-major and send every row back to the rank it came from."""
    route: _Route = module._route
    module._route = None
    rank_major = torch.empty_like(output).index_copy_(0, route.order, output)
    return funcol.all_to_all_single_autograd(rank_major, route.send, route.receive, mesh.get_group("ep"))


__all__ = ["apply_expert_parallel", "divide_expert_gradients", "expert_mesh", "expert_modules"]
