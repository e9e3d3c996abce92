"""Losses over the model's final hidden states: chunked cross-entropy (+ z-loss) and per-token
log-probabilities, plain or vocabulary-parallel (tensor parallel with the logits split by vocabulary).

Chunks bound the float32 logits alive at once and are recomputed in backward instead of stored; the
vocabulary-parallel form all-reduces three [tokens] vectors per chunk and never gathers the logits.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


class LossOutput(NamedTuple):
    loss: torch.Tensor  # what to backpropagate: cross-entropy + z_loss x mean(logsumexp^2)
    ce_loss: torch.Tensor  # cross-entropy alone, for logging
    num_tokens: torch.Tensor  # tokens that carried a label


# Float32 logits alive at once in the loss: 2^31 elements = 8 GiB (16 x 4096 tokens at SmolLM3's
# 128k vocabulary). Chunks are recomputed in backward, which cost 14% of a SmolLM2-135M step on an
# H100 at 2^28 (215k -> 245k tokens/s with one chunk), so only really large batches chunk.
LOSS_CHUNK_ELEMENTS = 2**31


def over_chunks(fn: Callable, hidden: torch.Tensor, labels: torch.Tensor, vocab_size: int, *args) -> list:
    """fn(hidden chunk, labels chunk, *args) for chunks of at most LOSS_CHUNK_ELEMENTS // vocab_size
    tokens; recomputed in backward when there are several."""
    chunk = max(1, LOSS_CHUNK_ELEMENTS // vocab_size)
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        part = (hidden[start : start + chunk], labels[start : start + chunk], *args)
        if hidden.shape[0] > chunk and torch.is_grad_enabled():
            parts.append(torch.utils.checkpoint.checkpoint(fn, *part, use_reentrant=False))
        else:
            parts.append(fn(*part))
    return parts


def chunked_loss(loss_chunk: Callable, hidden: torch.Tensor, labels: torch.Tensor, vocab_size: int, z_loss: float,
                 reduction: str) -> LossOutput:
    """Cross-entropy (+ z-loss) of hidden states [..., hidden] against labels [...], "mean" over the
    labelled tokens or "sum"; `loss_chunk(hidden, labels) -> (ce sum, z sum)` computes one chunk."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    ce_sum = hidden.new_zeros((), dtype=torch.float32)
    z_sum = hidden.new_zeros((), dtype=torch.float32)
    for ce, z in over_chunks(loss_chunk, hidden, labels, vocab_size):
        ce_sum = ce_sum + ce
        z_sum = z_sum + z
    num_tokens = (labels != -100).sum()
    if reduction == "sum":
        return LossOutput(ce_sum + z_loss * z_sum, ce_sum.detach(), num_tokens)
    denominator = num_tokens.clamp(min=1)
    ce_mean = ce_sum / denominator
    return LossOutput(ce_mean + z_loss * z_sum / denominator, ce_mean.detach(), num_tokens)


def chunked_logprobs(logprob_chunk: Callable, hidden: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                     temperature: float) -> torch.Tensor:
    """Per-token log-probabilities, shaped like labels: [batch, seq], or [batch, seq, k] for k
    candidate labels per position (multiple-choice answers sharing a context)."""
    shape = labels.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(hidden.shape[0], -1) if labels.dim() > 2 else labels.reshape(-1)
    # Only positions with a label go through the head: a GRPO row's chat prompt (~150 tokens before
    # 64 sampled ones) would otherwise pay for [tokens, vocab] logits nobody reads.
    scored = labels != -100 if labels.dim() == 1 else (labels != -100).any(-1)
    rows = None if bool(scored.all()) else scored.nonzero().squeeze(-1)
    if rows is not None:
        hidden, labels = hidden[rows], labels[rows]
    empty = hidden.new_zeros(labels.shape, dtype=torch.float32)[:0]  # no labelled position at all
    values = torch.cat([empty, *over_chunks(logprob_chunk, hidden, labels, vocab_size, temperature)])
    if rows is not None:  # back in place, 0 where there is no label (out of place: differentiable)
        values = values.new_zeros((scored.shape[0],) + values.shape[1:]).index_copy(0, rows, values)
    return values.view(shape)


def cross_entropy_sums(logits, labels: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, summed squared log-normaliser) of float32 logits [tokens, vocab], which
    may be a DTensor sharded over the vocabulary (loss parallel)."""
    if _vocabulary_sharded(logits):
        return _vocab_parallel_loss(logits, labels, z_loss)
    # F.cross_entropy's fused log-softmax: 1.8x cheaper on CPU than logsumexp + gather written
    # out (1024 x 16384 logits, fwd+bwd, one core: 200 -> 113 ms; 11% of a 19M-model step).
    ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    if z_loss == 0:
        return ce, torch.zeros_like(ce)
    log_normaliser = torch.logsumexp(logits, dim=-1)
    z = torch.where(labels != -100, log_normaliser.pow(2), 0.0).sum()
    return ce, z


def label_logprobs(logits, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) for float32 logits [tokens, vocab] and labels [tokens] (or [tokens, k]
    candidates); 0 for ignored labels. Vocabulary-sharded logits are never gathered."""
    if _vocabulary_sharded(logits):
        mesh = logits.device_mesh
        start = mesh.get_local_rank() * -(-logits.shape[-1] // mesh.size())
        local = logits.to_local()

        def logprob(target):
            ce, _ = _VocabParallelCrossEntropy.apply(local, target, start, mesh.get_group())
            return torch.where(target != -100, -ce, 0.0)

        return logprob(labels) if labels.dim() == 1 else torch.stack([logprob(c) for c in labels.unbind(1)], 1)
    if labels.dim() == 1:
        return -F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    # k candidates: one log-softmax, k gathers (cross_entropy would recompute it per candidate).
    picked = logits.log_softmax(-1).gather(1, labels.clamp(min=0))
    return torch.where(labels != -100, picked, 0.0)


def _vocabulary_sharded(logits) -> bool:
    return hasattr(logits, "device_mesh")  # a DTensor: the head's output under loss parallel


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy and log-normaliser from logits split by vocabulary over a process group
    (Megatron's vocabulary-parallel loss): the max, the sum of exponentials and the target logit are
    all-reduced, [tokens] values each; the logits never are. Backward needs no communication.

    (torch's loss_parallel() would need its context around the whole backward, where it breaks the
    backward of compiled tensor-parallel blocks in torch 2.13.)"""

    @staticmethod
    def forward(ctx, logits, labels, vocab_start: int, group):
        import torch.distributed as dist

        max_logit = logits.max(dim=-1).values
        dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - max_logit[:, None]
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        local = labels - vocab_start
        mine = (local >= 0) & (local < logits.shape[-1])  # ignored labels (-100) are nobody's
        local = torch.where(mine, local, 0)
        target = torch.where(mine, shifted.gather(1, local[:, None]).squeeze(1), 0.0)
        dist.all_reduce(target, group=group)
        log_sum_exp = sum_exp.log()
        ctx.save_for_backward(exp.div_(sum_exp[:, None]), local, mine)
        return log_sum_exp - target, log_sum_exp + max_logit

    @staticmethod
    def backward(ctx, grad_ce, grad_log_normaliser):
        softmax, local, mine = ctx.saved_tensors
        # d ce / d logits = softmax - onehot(target); d logsumexp / d logits = softmax.
        grad = softmax * (grad_ce + grad_log_normaliser)[:, None]  # not in place: backward may run twice
        grad.scatter_add_(1, local[:, None], torch.where(mine, -grad_ce, 0.0)[:, None])
        return grad, None, None, None


def _vocab_parallel_loss(logits, labels: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """loss_chunk for float32 logits sharded over the vocabulary (a DTensor on the TP mesh, split as
    torch.chunk splits: ceil(vocab / tp) per rank, the last ones shorter)."""
    mesh = logits.device_mesh
    start = mesh.get_local_rank() * -(-logits.shape[-1] // mesh.size())
    ce, log_normaliser = _VocabParallelCrossEntropy.apply(logits.to_local(), labels, start, mesh.get_group())
    valid = labels != -100
    ce = torch.where(valid, ce, 0.0).sum()
    if z_loss == 0:
        return ce, torch.zeros_like(ce)
    return ce, torch.where(valid, log_normaliser.pow(2), 0.0).sum()


__all__ = ["LOSS_CHUNK_ELEMENTS", "LossOutput", "chunked_logprobs", "chunked_loss", "cross_entropy_sums",
           "label_logprobs", "over_chunks"]
