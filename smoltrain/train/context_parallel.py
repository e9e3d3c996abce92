"""Context parallelism (`parallel.cp`): one sequence split over ranks, attention across the pieces.

Load-balanced for causal attention: the sequence is cut into 2 x cp chunks and rank r holds chunks r
and 2cp-1-r (an early one with few keys to attend to, a late one with many), so every rank does the
same attention work. Positions and document ids are computed on the whole sequence before the split,
so RoPE layers rotate by document-relative positions and NoPE layers stay unrotated as on one process.
The exchange is the simplest correct one (torchtitan's "allgather" rotation, run eagerly): every layer
all-gathers keys and values over the cp group and masks causally and by document on global positions;
the backward sums every rank's key/value gradients with one all-reduce (gloo has no reduce-scatter).

In the Trainer (`parallel.cp`), the cp ranks of a group read the same rows (they share a data-parallel
rank), each trains on its two chunks (`split_batch`), and FSDP shards over dp_shard x cp flattened, so
gradients and the step's loss and label-token sums run over dp x cp: one process's normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from smoltrain.config import Config
from smoltrain.data.stages import stage_seq_lens
from smoltrain.errors import ConfigError
from smoltrain.model.attention import positions_from_documents


def check_context_parallel(config: Config, splits_sequences: bool) -> None:
    """What parallel.cp > 1 needs, as one-line ConfigErrors before any process group or allocation:
    an objective that trains on packed rows (`splits_sequences`: pretraining), sequence lengths of
    2 x cp equal chunks, and a model whose every layer attends through the gathered keys and values."""
    cp, m, p = config.parallel.cp, config.model, config.parallel
    if cp == 1:
        return
    if not splits_sequences:
        raise ConfigError(f"parallel.cp ({cp}): only pretraining splits sequences over context-parallel ranks "
                          "(SFT, DPO and GRPO rows are padded per batch); set parallel.cp=1")
    refused = {
        "parallel.tp": p.tp > 1,  # TP's sequence parallel shards the same dimension; not combined yet
        "parallel.ep / model.num_experts": p.ep > 1 or m.num_experts > 0,  # routing statistics are per dp rank
        "model.sliding_window": m.sliding_window > 0,  # the gathered-keys mask has no window band
        "model.full_attention_every": m.full_attention_every > 0,  # linear attention's state crosses chunks
    }
    for key, hit in refused.items():
        if hit:
            raise ConfigError(f"parallel.cp ({cp}) with {key}: context parallelism runs dense attention models "
                              "without tensor or expert parallelism; set parallel.cp=1")
    for seq_len in sorted(set(stage_seq_lens(config.data))):
        if seq_len % (2 * cp):
            raise ConfigError(f"parallel.cp ({cp}): sequence length {seq_len} must be a multiple of 2 x cp = {2 * cp} "
                              "(each rank holds an early and a late chunk)")


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


def split_batch(batch: dict, ctx, document_masking: bool) -> dict:
    """This cp rank's part of a loader batch (input_ids, labels, document_ids [batch, seq]): its two
    chunks with whole-sequence positions and the cross-rank attention mask; document_ids is consumed
    (the mask and positions carry it), so the objective's forward needs no other change."""
    part = shard_sequence(batch["input_ids"], batch["labels"], batch.get("document_ids"), document_masking,
                          ctx.cp_group, ctx.cp_rank, ctx.cp)
    return {**batch, **part, "document_ids": None}
