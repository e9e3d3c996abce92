"""Expert parallelism applied from outside the model: each rank holds num_experts / ep experts (DTensor
Shard(0) on the ep mesh), and the tokens the router sent to another rank's experts travel there and back by all_to_all.

The MoE block reads as on one device: it sorts its tokens by (global) expert and calls `experts(x, counts)`;
the hooks installed here turn that call into dispatch -> local experts -> combine (torchtitan's AllToAllTokenDispatcher).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

from smoltrain.model.moe import Experts


def apply_expert_parallel(model: nn.Module, ep_mesh) -> None:
    """Shard every MoE layer's stacked experts over `ep_mesh` (dim 0, on the meta device before FSDP
    / DDP, which must leave them alone) and route their calls through all_to_all."""
    from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

    def shard_experts(name, module, mesh):
        for key, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(key, nn.Parameter(distribute_tensor(param, mesh, [Shard(0)], src_data_rank=None)))

    for module in expert_modules(model):
        distribute_module(module, ep_mesh, shard_experts, input_fn=_dispatch, output_fn=_combine)


def divide_expert_gradients(model: nn.Module, dp_world: int) -> None:
    """After materialisation: an expert's gradient already sums the tokens of every ep rank (the
    exchange's backward brings them home), so it is divided by dp_world, the average FSDP / DDP take
    over the other parameters, and never averaged again over the ep ranks (megablocks#86: ep x too large)."""
    for module in expert_modules(model):
        for param in module.parameters(recurse=False):
            param.register_hook(lambda grad: grad / dp_world)


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """The expert-parallel modules, which FSDP2 and DDP must leave alone (their gradients are complete)."""
    return [module for module in model.modules() if isinstance(module, Experts)]


class _Route:
    """One call's exchange plan: rows sent to / received from each rank, and the rank-major ->
    expert-major order of the received rows."""

    def __init__(self, send: list[int], receive: list[int], order: torch.Tensor):
        self.send, self.receive, self.order = send, receive, order


def _dispatch(module: Experts, inputs: tuple, mesh) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens sorted by global expert, counts [E]) -> (the tokens of this rank's experts sorted by
    local expert, their counts [E / ep]). Counts go first (one small all_to_all) so that every rank
    knows its split sizes; the tokens follow with autograd."""
    x, counts = inputs
    group, ranks = mesh.get_group(), mesh.size()
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


def _combine(module: Experts, output: torch.Tensor, mesh) -> torch.Tensor:
    """The inverse of _dispatch: unsort to rank-major and send every row back to the rank it came from."""
    route: _Route = module._route
    module._route = None
    rank_major = torch.empty_like(output).index_copy_(0, route.order, output)
    return funcol.all_to_all_single_autograd(rank_major, route.send, route.receive, mesh.get_group())


__all__ = ["apply_expert_parallel", "divide_expert_gradients", "expert_modules"]
