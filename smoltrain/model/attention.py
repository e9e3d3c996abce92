"""Positions and attention kernels: rotary tables, document masks, sdpa or flex_attention.

Positions restart at every document boundary, so RoPE layers see document-relative offsets and
a packed sequence gives each document exactly the logits it would get alone. On CPU the
document mask is a dense boolean block-diagonal matrix for sdpa (flex_attention has no CPU
backward in torch 2.13); on CUDA it is a flex_attention BlockMask (about 2x faster than causal
flash attention at 4096 tokens with 512-token documents). Rows that share a prompt (GRPO's
groups) attend to one copy of it, in training (SharedPromptMask) and in decoding (attend_shared_prompt).
RoPE scaling (linear, YaRN) follows transformers' `modeling_rope_utils` step for step.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smoltrain.config import RopeScaling

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- rotary


def rotary_inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    # Same float32 recipe as transformers' default RoPE, so exported models match bit for bit.
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _yarn_attention_factor(scaling: RopeScaling) -> float:
    """YaRN's softmax temperature on cos/sin: 0.1 ln(factor) + 1 (1 at factor <= 1), or DeepSeek's ratio."""
    if scaling.attention_factor is not None:
        return scaling.attention_factor

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return get_mscale(scaling.factor, scaling.mscale) / get_mscale(scaling.factor, scaling.mscale_all_dim)
    return get_mscale(scaling.factor)


def _yarn_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """transformers' `_compute_yarn_parameters`, step for step (python floats for the ramp's ends,
    float32 tensors for the rest), so exported YaRN models match it bit for bit."""
    original = scaling.original_max_seq_len

    def correction_dim(rotations: float) -> float:  # the pair index that turns `rotations` times in the window
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (fast pairs keep their frequency), 0: interpolate (divide by factor)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return (1.0 / (scaling.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def scaled_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, factor on cos and sin) for default RoPE or one of its scalings."""
    if scaling is None or scaling.rope_type == "default":
        return rotary_inverse_frequencies(head_dim, theta), 1.0
    if scaling.rope_type == "linear":
        return rotary_inverse_frequencies(head_dim, theta) / scaling.factor, 1.0
    return _yarn_inverse_frequencies(head_dim, theta, scaling), _yarn_attention_factor(scaling)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float, device=None,
                  scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [max_seq_len, head_dim] in the rotate-half layout (first half, second half).
    YaRN multiplies both by its attention factor, so q.k scores grow by its square (the paper's temperature)."""
    inv_freq, attention_factor = scaled_inverse_frequencies(head_dim, theta, scaling)
    positions = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq.to(device))
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [batch, 1, seq, head_dim]."""
    return x * cos + _rotate_half(x) * sin


def left_pad(sequences: list[list[int]], width: int, pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [rows, width], real [rows, width]: False on the padding) of sequences right-aligned in `width`."""
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    real = torch.zeros(len(sequences), width, dtype=torch.bool, device=device)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long, device=device)
            real[row, width - len(sequence) :] = True
    return ids, real


def left_padded_positions(real: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded rows (`real` False on the padding): the real tokens count from 0."""
    return (real.long().cumsum(dim=-1) - 1).clamp(min=0)


def left_padded_mask(real: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """[rows, end - start, end] boolean mask of the queries start..end-1 of left-padded rows: causal over
    the real keys, and always the query itself (a padding query must attend to something)."""
    queries = torch.arange(start, end, device=real.device)[:, None]
    keys = torch.arange(end, device=real.device)[None, :]
    return ((keys <= queries) & real[:, None, :end]) | (keys == queries)


def positions_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document: 0 at every document start. [batch, seq] -> [batch, seq]."""
    seq = document_ids.shape[-1]
    index = torch.arange(seq, device=document_ids.device).expand_as(document_ids)
    is_start = torch.ones_like(document_ids, dtype=torch.bool)
    is_start[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    start_index = torch.where(is_start, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - start_index


# ----------------------------------------------------------------------------- masks


def resolve_kernel(requested: str, device: torch.device) -> str:
    """Choose the attention kernel explicitly and say so once (no silent fallback)."""
    if requested == "auto":
        kernel = "flex" if device.type == "cuda" else "sdpa"
    else:
        kernel = requested
    if kernel == "flex" and device.type != "cuda":
        _note_once("flex_attention has no backward on CPU; using sdpa with a dense document mask")
        kernel = "sdpa"
    return kernel


@functools.lru_cache(maxsize=None)
def _note_once(message: str) -> None:
    log.info(message)


def document_mask_dense(document_ids: torch.Tensor, window: int = 0) -> torch.Tensor:
    """Boolean [batch, 1, seq, seq]: causal and same document (and within the window, if one)."""
    seq = document_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    if window > 0:
        causal = causal.triu(-(window - 1))
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    return (causal & same_document)[:, None]


def document_block_mask(document_ids: torch.Tensor, window: int = 0):
    """flex_attention BlockMask for causal attention within documents (and within the window, if one)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def causal_document(b, h, q, kv):
        return (q >= kv) & (document_ids[b, q] == document_ids[b, kv])

    def causal_document_window(b, h, q, kv):
        return causal_document(b, h, q, kv) & (q - kv < window)

    batch, seq = document_ids.shape
    mask_mod = causal_document_window if window > 0 else causal_document
    return create_block_mask(mask_mod, batch, None, seq, seq, device=document_ids.device)


def build_mask(document_ids: torch.Tensor | None, kernel: str, window: int = 0):
    """The mask argument for `attend`: None means plain causal. window > 0: a sliding-window layer's
    mask (each query sees itself and the window - 1 tokens before it, as HF's sliding_window_overlay)."""
    if document_ids is None:
        return None
    if kernel == "flex":
        return document_block_mask(document_ids, window)
    return document_mask_dense(document_ids, window)


def window_band(mask: torch.Tensor | None, window: int, seq_q: int, seq_kv: int, device) -> torch.Tensor:
    """A boolean mask over cache columns (queries are the last seq_q of seq_kv columns) limited to the
    last `window` keys of each query; a None mask is causal. Left-padded rows keep their real tokens
    contiguous, so a column distance is a position distance."""
    queries = torch.arange(seq_kv - seq_q, seq_kv, device=device)[:, None]
    keys = torch.arange(seq_kv, device=device)[None, :]
    band = keys > queries - window
    if mask is None:
        return (band & (keys <= queries))[None, None]
    return mask & band


# ----------------------------------------------------------------------------- kernels


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # flex_attention is only fast when compiled; eager it materialises the scores.
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """q: [batch, heads, seq_q, dim]; k, v: [batch, kv_heads, seq_kv, dim] (GQA when fewer heads).

    mask: None (causal, seq_q == seq_kv), a boolean tensor broadcastable to [batch, 1, seq_q, seq_kv]
    (True = attend), a flex_attention BlockMask, or an object with its own `attend(q, k, v)` (SharedPromptMask).
    """
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if hasattr(mask, "attend"):  # a mask that attends itself: SharedPromptMask, or context parallelism's (train/)
        return mask.attend(q, k, v)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return _compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=gqa)


def attend_shared_prompt(q: torch.Tensor, prompt_k: torch.Tensor, prompt_v: torch.Tensor, prompt_bias: torch.Tensor,
                         k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A decoding step (one query per row) whose rows come in groups sharing a prompt, prompt-major:
    scores against the group's prompt keys in one matmul per prompt (its keys read once, not once per
    row: a 150-token prompt sampled 8 times reads 150 x 8 keys per layer and token otherwise), then
    against the row's own tokens, one softmax over both.
    q [rows, heads, 1, dim]; prompt_k, prompt_v [prompts, kv_heads, prompt_len, dim]; prompt_bias
    [prompts, 1, 1, prompt_len] additive (-inf on padding); k, v [rows, kv_heads, new, dim], all visible.
    The query heads of a key head are rows of one matmul (GQA without repeating keys): sdpa's CPU
    flash kernel, tiled for long queries, is 1.9x slower for one query (64 rows x 100 keys, one core)."""
    rows, heads, _, dim = q.shape
    prompts, kv_heads, prompt_len, _ = prompt_k.shape
    group, per_key = rows // prompts, heads // kv_heads
    q = q.reshape(rows, kv_heads, per_key, dim) * dim**-0.5

    def by_prompt(x: torch.Tensor) -> torch.Tensor:  # [rows, kv, per_key, n] -> [prompts, kv, group * per_key, n]
        return x.unflatten(0, (prompts, group)).transpose(1, 2).flatten(2, 3)

    def by_row(x: torch.Tensor) -> torch.Tensor:  # the inverse
        return x.unflatten(2, (group, per_key)).transpose(1, 2).flatten(0, 1)

    shared = by_row(torch.matmul(by_prompt(q), prompt_k.transpose(-1, -2)) + prompt_bias)
    probs = torch.cat([shared, torch.matmul(q, k.transpose(-1, -2))], dim=-1).float().softmax(dim=-1).to(v.dtype)
    y = by_row(torch.matmul(by_prompt(probs[..., :prompt_len]), prompt_v)) + torch.matmul(probs[..., prompt_len:], v)
    return y.reshape(rows, heads, 1, dim)


@dataclass
class SharedPromptMask:
    """Training on several continuations of one prompt without running the prompt once per row. The
    batch is one packed sequence: `prompts` distinct prompts of `prompt_len` columns (left-padded),
    then `len(rows)` tails of `tail_len` columns (right-padded), tail i continuing prompt rows[i].
    Prompts attend causally within themselves (`prompt_mask` [prompts, 1, P, P]); a tail attends to
    its prompt's keys, then causally to itself (`tail_mask` [tails, 1, T, P + T]). One forward, so
    gradients reach every block through its output (FSDP2 unshards there), and a prompt's gradient is
    the sum over its tails."""

    prompts: int
    prompt_len: int
    rows: torch.Tensor
    tail_len: int
    prompt_mask: torch.Tensor
    tail_mask: torch.Tensor

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[1, heads, tokens, dim] in, [1, heads, tokens, dim] out."""
        split = self.prompts * self.prompt_len

        def grid(x: torch.Tensor, start: int, end: int, count: int, length: int) -> torch.Tensor:
            return x[0, :, start:end].unflatten(1, (count, length)).transpose(0, 1)  # [count, heads, length, dim]

        end = split + len(self.rows) * self.tail_len
        q_p, k_p, v_p = (grid(x, 0, split, self.prompts, self.prompt_len) for x in (q, k, v))
        q_t, k_t, v_t = (grid(x, split, end, len(self.rows), self.tail_len) for x in (q, k, v))
        y_p = attend(q_p, k_p, v_p, self.prompt_mask)
        y_t = attend(q_t, torch.cat([k_p.index_select(0, self.rows), k_t], dim=2),
                     torch.cat([v_p.index_select(0, self.rows), v_t], dim=2), self.tail_mask)
        return torch.cat([y_p.transpose(0, 1).flatten(1, 2), y_t.transpose(0, 1).flatten(1, 2)], dim=1)[None]
