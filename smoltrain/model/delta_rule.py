"""The gated delta rule (Qwen3-Next's linear attention) in plain PyTorch: a chunked form for training and
prefill, a recurrent form for decoding, and the short causal convolution before it; both reset at
document boundaries, so a packed row gives each document the outputs it gets alone.

Per token: S <- exp(g) S + beta k (v - exp(g) S^T k)^T, out = S^T q / sqrt(d_k), with q and k
L2-normalised (as transformers' torch fallback and the FLA kernels). The chunked form follows
transformers' (UT transform per chunk, a scan over chunks) with one triangular solve for both
right-hand sides and the chunk's reads of its entry state folded into one matrix, so the scan does 2
small matmuls per chunk instead of 4; on the shared 2-core CPU that measured 1.0x its speed forward
and 1.0-1.5x forward + backward (bench/linear_attention.py), not the 2x hoped for: small elementwise
passes, not the matmuls, dominate at these sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps), as the FLA library and transformers compute it."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def segments_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq] -> index of each token's document within its row (0, 0, 1, 1, 1, 2, ...): monotone,
    so 'same document' is equality even when a row reuses an id."""
    starts = torch.ones_like(document_ids, dtype=torch.long)
    starts[:, 0] = 0
    starts[:, 1:] = (document_ids[:, 1:] != document_ids[:, :-1]).long()
    return starts.cumsum(dim=1)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, segments: torch.Tensor | None = None,
                state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution then SiLU. x [batch, channels, seq]; weight [channels, kernel];
    state [batch, channels, kernel - 1]: the inputs before x (zeros if None), of the first token's
    document. A token sees only inputs of its own document (segments [batch, seq]). Returns (output,
    the new state: the last kernel - 1 inputs, zero where another document than the last token's)."""
    kernel = weight.shape[1]
    batch, channels, seq = x.shape
    past = state.to(x.dtype) if state is not None else x.new_zeros(batch, channels, kernel - 1)
    full = torch.cat([past, x], dim=-1)
    if segments is None:
        out = F.conv1d(full, weight[:, None], groups=channels)
    else:  # tap by tap, each zeroed where it reaches into another document
        full_segments = torch.cat([segments[:, :1].expand(-1, kernel - 1), segments], dim=1)
        out = x * weight[:, -1:]
        for shift in range(1, kernel):
            start = kernel - 1 - shift
            same = full_segments[:, start : start + seq] == segments
            out = out + full[:, :, start : start + seq] * weight[:, start, None] * same[:, None]
        # The state carries the last token's document only: a left-padded prompt shorter than the kernel
        # would otherwise hand its padding's inputs to the first decoded token.
        last = full_segments[:, -(kernel - 1):] == segments[:, -1:]
        return F.silu(out), full[:, :, -(kernel - 1):] * last[:, None]
    return F.silu(out), full[:, :, -(kernel - 1):]


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                               state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token (decoding). q, k [batch, seq, heads, d_k]; v [batch, seq, heads, d_v]; g, beta
    [batch, seq, heads]; state [batch, heads, d_k, d_v]. Returns (out [batch, seq, heads, d_v], state)."""
    dtype = v.dtype
    q, k, v, g, beta = (x.transpose(1, 2).float() for x in (q, k, v, g, beta))
    q, k = l2norm(q) * q.shape[-1] ** -0.5, l2norm(k)
    batch, heads, seq, d_k = k.shape
    s = state.float() if state is not None else q.new_zeros(batch, heads, d_k, v.shape[-1])
    outs = []
    for t in range(seq):
        s = s * g[:, :, t, None, None].exp()
        delta = (v[:, :, t] - torch.einsum("bhkv,bhk->bhv", s, k[:, :, t])) * beta[:, :, t, None]
        s = s + k[:, :, t, :, None] * delta[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", s, q[:, :, t]))
    return torch.stack(outs, dim=1).to(dtype), s


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           state: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                           chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The same computation a chunk at a time (training, prefill); shapes as recurrent_gated_delta_rule,
    segments [batch, seq] as causal_conv's (the state restarts at every document)."""
    dtype = v.dtype
    batch, seq, heads, d_k = k.shape
    d_v = v.shape[-1]
    q, k, v, g, beta = (x.transpose(1, 2).float() for x in (q, k, v, g, beta))
    q, k = l2norm(q) * d_k**-0.5, l2norm(k)
    pad = (chunk_size - seq % chunk_size) % chunk_size
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (seq + pad) // chunk_size
    q, k, v = (x.reshape(batch, heads, n, chunk_size, -1) for x in (q, k, v))
    g, beta = g.reshape(batch, heads, n, chunk_size), beta.reshape(batch, heads, n, chunk_size)

    cum = g.cumsum(dim=-1)  # log decay from the chunk's start to each position
    lower = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    pair_mask = lower if segments is None else lower & _same_segment_in_chunk(segments, pad, n, chunk_size)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~pair_mask, float("-inf")).exp()
    entry, exit_, carry = _boundary_masks(segments, pad, n, chunk_size, batch)
    k_beta = k * beta[..., None]
    # UT transform: (I + strictly-lower(beta k k^T * decay)) [u | w] = [beta v | beta k exp(cum)], one solve.
    system = (k_beta @ k.transpose(-1, -2)) * decay
    rhs = torch.cat([v * beta[..., None], k_beta * (cum.exp() * entry)[..., None]], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u, w = solved[..., :d_v], solved[..., d_v:]
    attn = (q @ k.transpose(-1, -2)) * decay
    # out_i = (q_i exp(cum_i) - attn_i w) S + attn_i u: the chunk's reads of S in one matrix, with w's.
    reads = torch.cat([q * (cum.exp() * entry)[..., None] - attn @ w, w], dim=-2)
    local = attn @ u
    k_exit = k * ((cum[..., -1:] - cum).exp() * exit_)[..., None]
    chunk_decay = (cum[..., -1].exp() * carry)[..., None, None]

    s = state.float() if state is not None else q.new_zeros(batch, heads, d_k, d_v)
    outs = []
    for i in range(n):
        read = reads[:, :, i] @ s  # [q_eff; w] S
        outs.append(read[..., :chunk_size, :] + local[:, :, i])
        s = s * chunk_decay[:, :, i] + k_exit[:, :, i].transpose(-1, -2) @ (u[:, :, i] - read[..., chunk_size:, :])
    out = torch.stack(outs, dim=2).reshape(batch, heads, -1, d_v)[:, :, :seq]
    return out.transpose(1, 2).to(dtype), s


def _chunked_segments(segments: torch.Tensor, pad: int, n: int, chunk_size: int) -> torch.Tensor:
    """[batch, seq] -> [batch, 1, chunks, chunk_size]; the padding continues the last document."""
    if pad:
        segments = torch.cat([segments, segments[:, -1:].expand(-1, pad)], dim=1)
    return segments.reshape(segments.shape[0], 1, n, chunk_size)


def _same_segment_in_chunk(segments: torch.Tensor, pad: int, n: int, chunk_size: int) -> torch.Tensor:
    chunked = _chunked_segments(segments, pad, n, chunk_size)
    return chunked[..., :, None] == chunked[..., None, :]


def _boundary_masks(segments: torch.Tensor | None, pad: int, n: int, chunk_size: int, batch: int):
    """(entry [.., chunk]: the position sees the state the chunk starts with; exit [.., chunk]: the position
    writes into the state the chunk ends with; carry [..]: that state survives the chunk), all 1.0 without
    documents."""
    if segments is None:
        return 1.0, 1.0, 1.0
    chunked = _chunked_segments(segments, pad, n, chunk_size).float()
    before = torch.cat([chunked[:, :, :1, :1], chunked[:, :, :-1, -1:]], dim=2)  # the token before each chunk
    entry = (chunked == before).float()
    exit_ = (chunked == chunked[..., -1:]).float()
    carry = (chunked[..., -1] == before[..., 0]).float()
    return entry, exit_, carry


__all__ = ["chunk_gated_delta_rule", "recurrent_gated_delta_rule", "causal_conv", "segments_from_documents", "l2norm"]
