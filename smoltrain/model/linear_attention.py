"""Qwen3-Next's gated DeltaNet layer (transformers' Qwen3NextGatedDeltaNet, same weight names): input
projections, the short causal convolution, the gated delta rule, a gated RMSNorm and the output projection.

Training and prefill run the chunked form (flash-linear-attention's kernel on CUDA where it is
installed); a decoding step (one token, a state in the cache) the recurrent form. Document masking
reaches the layer as segments: state and convolution restart per document.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from smoltrain.config import ModelConfig
from smoltrain.model.attention import SharedPromptMask
from smoltrain.model.delta_rule import (
    causal_conv,
    chunk_gated_delta_rule,
    fla_gated_delta_rule,
    fla_installed,
    recurrent_gated_delta_rule,
)


class GatedRMSNorm(nn.Module):
    """RMSNorm(x) * w * silu(gate), per value head (transformers' Qwen3NextRMSNormGated)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return (x * F.silu(gate.float())).to(dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_k_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_dim, self.value_dim = self.num_k_heads * self.head_k_dim, self.num_v_heads * self.head_v_dim
        conv_dim = 2 * self.key_dim + self.value_dim
        hidden = config.hidden_size
        # q, k, v and the output gate z in one matrix, grouped per key head (transformers' layout).
        self.in_proj_qkvz = nn.Linear(hidden, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(hidden, 2 * self.num_v_heads, bias=False)  # beta and the decay's input
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, config.linear_conv_kernel, groups=conv_dim, bias=False,
                                padding=config.linear_conv_kernel - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, config.norm_eps)
        self.out_proj = nn.Linear(self.value_dim, hidden, bias=False)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Projections -> q, k [b, s, key_dim]; v, z [b, s, v_heads, d_v]; b, a [b, s, v_heads]."""
        batch, seq, _ = x.shape
        per_key = self.num_v_heads // self.num_k_heads
        qkvz = self.in_proj_qkvz(x).view(batch, seq, self.num_k_heads, -1)
        q, k, v, z = torch.split(qkvz, [self.head_k_dim, self.head_k_dim, per_key * self.head_v_dim,
                                        per_key * self.head_v_dim], dim=3)
        b, a = torch.split(self.in_proj_ba(x).view(batch, seq, self.num_k_heads, -1), [per_key, per_key], dim=3)
        v, z = (t.reshape(batch, seq, self.num_v_heads, self.head_v_dim) for t in (v, z))
        b, a = (t.reshape(batch, seq, self.num_v_heads) for t in (b, a))
        return q.reshape(batch, seq, -1), k.reshape(batch, seq, -1), v, z, b, a

    def forward(self, x: torch.Tensor, segments: torch.Tensor | SharedPromptMask | None = None, cache=None) -> torch.Tensor:
        """x [batch, seq, hidden]; segments [batch, seq] (document index per token), None, or GRPO's
        SharedPromptMask; cache: a KVCache whose `linear_state(layer)` holds (conv state, recurrent state)
        and is replaced here."""
        if isinstance(segments, SharedPromptMask):
            return self._shared_prompt(x, segments)
        conv_state, state = cache.linear_state(self.layer) if cache is not None else (None, None)
        out, new_conv_state, new_state = self._mix(x, segments, conv_state, state)
        if cache is not None:
            cache.set_linear_state(self.layer, new_conv_state, new_state)
        return out

    def _mix(self, x: torch.Tensor, segments: torch.Tensor | None, conv_state: torch.Tensor | None,
             state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's output from an entry (conv, recurrent) state (zeros if None), and the exit states."""
        batch, seq, _ = x.shape
        q, k, v, z, b, a = self._split(x)
        mixed = torch.cat([q, k, v.flatten(2)], dim=-1).transpose(1, 2)
        mixed, new_conv_state = causal_conv(mixed, self.conv1d.weight[:, 0], segments, conv_state)
        q, k, v = torch.split(mixed.transpose(1, 2), [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q, k = (t.reshape(batch, seq, self.num_k_heads, self.head_k_dim) for t in (q, k))
        v = v.reshape(batch, seq, self.num_v_heads, self.head_v_dim)
        if self.num_v_heads != self.num_k_heads:  # each key head serves consecutive value heads
            q, k = (t.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=2) for t in (q, k))
        beta = b.sigmoid()
        decay = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # log decay per token and head
        if state is not None and seq == 1:
            out, new_state = recurrent_gated_delta_rule(q, k, v, decay, beta, state)
        elif state is None and q.is_cuda and fla_installed():  # Triton kernels (tests/test_delta_rule.py compares)
            out, new_state = fla_gated_delta_rule(q, k, v, decay, beta, segments)
        else:
            out, new_state = chunk_gated_delta_rule(q, k, v, decay, beta, state, segments)
        out = self.norm(out, z)
        return self.out_proj(out.reshape(batch, seq, -1)), new_conv_state, new_state

    def _shared_prompt(self, x: torch.Tensor, mask: SharedPromptMask) -> torch.Tensor:
        """GRPO's packed sequence [1, prompts x P + tails x T, hidden]: each left-padded prompt runs once
        (padding and prompt as two documents), then each tail continues from a copy of its prompt's exit
        (conv, recurrent) state, so a prompt's gradient is the sum over its tails, as in attention."""
        split = mask.prompts * mask.prompt_len
        prompts = x[0, :split].view(mask.prompts, mask.prompt_len, -1)
        tails = x[0, split:].view(len(mask.rows), mask.tail_len, -1)
        rows = mask.rows.to(x.device)
        # A tail's first query sees exactly its prompt's real columns (the prompt mask cannot tell: a padding
        # query sees itself, so an all-padding row looks like a 1-token one).
        real = torch.zeros(mask.prompts, mask.prompt_len, dtype=torch.bool, device=x.device)
        real[rows] = mask.tail_mask[:, 0, 0, : mask.prompt_len]
        prompt_out, conv_state, state = self._mix(prompts, real.long(), None, None)
        # An empty prompt (a 1-token prompt's last token is its tail's first) hands on zeros, not its padding's.
        keep = real[:, -1]
        conv_state, state = conv_state * keep[:, None, None], state * keep[:, None, None, None]
        tail_out, _, _ = self._mix(tails, None, conv_state[rows], state[rows])
        return torch.cat([prompt_out.flatten(0, 1), tail_out.flatten(0, 1)])[None]


__all__ = ["GatedDeltaNet", "GatedRMSNorm"]
