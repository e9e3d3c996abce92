"""Context parallelism (`parallel.cp`): one sequence split over ranks, attention across the pieces.

Load-balanced for causal attention: the sequence is cut into 2 x cp chunks and rank r holds chunks r
and 2cp-1-r (an early one with few keys to attend to, a late one with many), so every rank does the
same attention work. Positions and document ids are computed on the whole sequence before the split,
so RoPE layers rotate by document-relative positions and NoPE layers stay unrotated as on one process.
The exchange is the simplest correct one (torchtitan's "allgather" rotation, run eagerly): every layer
all-gathers keys and values over the cp group and masks causally and by document on global positions;
the backward sums every rank's key/value gradients with one all-reduce (gloo has no reduce-scatter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from smoltrain.errors import ConfigError
from smoltrain.model.attention import positions_from_documents


def chunk_indices(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """Global positions of rank `rank`'s tokens: chunks rank and 2cp-1-rank of 2cp equal chunks."""
    if seq_len % (2 * cp):
        raise ConfigError(f"parallel.cp ({cp}): the sequence length {seq_len} must be a multiple of 2 x cp = {2 * cp}")
    size = seq_len // (2 * cp)
    early, late = rank * size, (2 * cp - 1 - rank) * size
    return torch.cat([torch.arange(early, early + size), torch.arange(late, late + size)])


class _GatherSequence(torch.autograd.Function):
    """all_gather along the sequence (dim 2) in forward; in backward each rank's gradient for its own
    piece is the sum over ranks of the gradient of the gathered tensor (all-reduce, then its slice)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.size = group, rank, local.shape[2]
        pieces = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(pieces, local.contiguous(), group=group)
        return torch.cat(pieces, dim=2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[:, :, ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size], None, None, None


@dataclass
class ContextParallelAttention:
    """What `attend` receives as its mask on a cp rank: this rank's queries attend to the keys and
    values of the whole sequence, gathered per layer, under a causal (and document) mask on global positions."""

    group: object
    rank: int
    world: int
    order: torch.Tensor  # [seq]: where each global position sits in the gathered (rank-major) keys
    mask: torch.Tensor  # [batch, 1, local, seq] True = attend

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_all, v_all = (_GatherSequence.apply(x, self.group, self.rank, self.world).index_select(2, self.order) for x in (k, v))
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=self.mask, enable_gqa=q.shape[1] != k.shape[1])


def shard_sequence(input_ids: torch.Tensor, labels: torch.Tensor, document_ids: torch.Tensor | None, document_masking: bool,
                   group, rank: int, world: int) -> dict:
    """This rank's part of a batch: model(**part) computes its tokens' logits/loss exactly as one process
    computes them for the whole sequence."""
    batch, seq = input_ids.shape
    pieces = [chunk_indices(seq, world, r) for r in range(world)]
    mine = pieces[rank].to(input_ids.device)
    order = torch.argsort(torch.cat(pieces)).to(input_ids.device)  # global position -> index in the gathered keys
    use_documents = document_masking and document_ids is not None
    positions = positions_from_documents(document_ids) if use_documents else torch.arange(seq, device=input_ids.device).expand(batch, seq)
    mask = (torch.arange(seq, device=input_ids.device)[None, :] <= mine[:, None])[None, None].expand(batch, 1, -1, -1)
    if use_documents:
        mask = mask & (document_ids[:, mine][:, :, None] == document_ids[:, None, :])[:, None]
    return {"input_ids": input_ids[:, mine], "labels": labels[:, mine], "position_ids": positions[:, mine],
            "attention_mask": ContextParallelAttention(group, rank, world, order, mask)}
