"""The gated delta rule (Qwen3-Next's linear attention) in plain PyTorch: a chunked form for training and
prefill, a recurrent form for decoding, and the short causal convolution before it; both reset at
document boundaries, so a packed row gives each document the outputs it gets alone.

Per token: S <- exp(g) S + beta k (v - exp(g) S^T k)^T, out = S^T q / sqrt(d_k), with q and k
L2-normalised (as transformers' torch fallback and the FLA kernels). The chunked form follows
transformers' (UT transform per chunk, a scan over chunks) laid out chunk-major once, with the scan,
the pair decays and l2norm as autograd nodes with hand backwards, and no cat/split/stack copies.
Chunks of 32 by default, not 64: with a strong decay (log decay ~ -1 a token) a chunk of 64 spans
exp(-64) and its products fall into subnormal floats, which this x86 CPU handles ~100x slower. On the
shared 2-core CPU, 1 thread, 1 x 1024 tokens, 8 heads x 64 (bench/linear_attention.py, docs/LOG-speed.md):
forward + backward ~2.3-2.4x transformers' fallback at its chunk of 64, forward ~1.3-1.4x (eager).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor, eps: float = 1e-6, scale: float = 1.0) -> torch.Tensor:
    """scale * x / sqrt(sum x^2 + eps), as the FLA library and transformers compute it (scale 1)."""
    return _L2Norm.apply(x, eps, scale)


class _L2Norm(torch.autograd.Function):
    """l2norm with a hand backward, dx = r (g - y sum(g y) / scale^2) with r = scale / |x|: 4 passes over
    [batch, seq, heads, dim] instead of autograd's ~8 through mul/sum/add/rsqrt (q and k each, every step)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float, scale: float) -> torch.Tensor:
        r = torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps).mul_(scale)
        y = torch.mul(x, r, out=x.new_empty(x.shape))  # contiguous even for a permuted view of x
        ctx.save_for_backward(y, r)
        ctx.inv_scale2 = scale**-2
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, r = ctx.saved_tensors
        along = (grad * y).sum(dim=-1, keepdim=True).mul_(ctx.inv_scale2)
        return grad.addcmul(y, along, value=-1).mul_(r), None, None


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
    q, k = l2norm(q, scale=q.shape[-1] ** -0.5), l2norm(k)
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
                           chunk_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The same computation a chunk at a time (training, prefill); shapes as recurrent_gated_delta_rule,
    segments [batch, seq] as causal_conv's (the state restarts at every document)."""
    dtype = v.dtype
    batch, seq, heads, d_k = k.shape
    d_v = v.shape[-1]
    pad = (chunk_size - seq % chunk_size) % chunk_size
    n = (seq + pad) // chunk_size
    # q and k normalised from chunk-major views: l2norm's output is the one contiguous copy (not a second one).
    q, k = l2norm(_chunk_major(q, pad, n, chunk_size, copy=False), scale=d_k**-0.5), l2norm(_chunk_major(k, pad, n, chunk_size, copy=False))
    v, g, beta = (_chunk_major(x, pad, n, chunk_size) for x in (v, g, beta))  # [n, batch, heads, chunk, ...]

    cum = g.cumsum(dim=-1)  # log decay from the chunk's start to each position
    lower = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    pair_mask = lower if segments is None else lower & _same_segment_in_chunk(segments, pad, n, chunk_size)
    decay = _PairDecay.apply(cum, ~pair_mask)  # exp(cum_i - cum_j) where j may reach i, else 0
    entry, exit_, carry = _boundary_masks(segments, pad, n, chunk_size)
    # UT transform: (I + strictly-lower(beta k k^T * decay)) [u | w] = [beta v | -beta k exp(cum)]. w is solved
    # negated (the sign folded into a [.., chunk] factor) so the scan adds K^T w S with one baddbmm a chunk and
    # its backward negates no full-size gradient. Two solves and twice the matmuls of half width rather than
    # one of [u | w]: the cat and the two splits' backward cats (4-8 MB each, ~2 ms) cost more.
    # beta (a row scale) goes into the [chunk, chunk] factor, not into k: half the elements of k [chunk, d_k].
    system = (k @ k.transpose(-1, -2)) * (decay * beta[..., None])
    u = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k * (beta * cum.exp() * -entry)[..., None], upper=False, unitriangular=True)
    # Chunk i maps its entry state S to a(i) S + K^T (u + w S), then a scan over chunks with one matmul
    # each (_StateScan, hand backward, no autograd graph per chunk).
    k_exit = (k * ((cum[..., -1:] - cum).exp() * exit_)[..., None]).transpose(-1, -2)
    s0 = state.float() if state is not None else q.new_zeros(batch, heads, d_k, d_v)
    entries, final = _StateScan.apply(cum[..., -1].exp() * carry, k_exit @ w, k_exit @ u, s0)  # [n, batch, heads, d_k, d_v]
    # out_i = (q_i exp(cum_i) + attn_i w) S + attn_i u, every chunk reading the state it starts with.
    attn = (q @ k.transpose(-1, -2)) * decay
    reads = torch.addcmul(attn @ w, q, (cum.exp() * entry)[..., None])
    # attn u, then += reads S in place (baddbmm out of place would copy attn u first; bmm keeps no output for backward).
    out = torch.bmm(attn.flatten(0, 2), u.flatten(0, 2)).baddbmm_(reads.flatten(0, 2), entries.flatten(0, 2)).view_as(u)
    out = out.permute(1, 0, 3, 2, 4).reshape(batch, n * chunk_size, heads, d_v)[:, :seq]
    return out.to(dtype), final


def _chunk_major(x: torch.Tensor, pad: int, n: int, chunk_size: int, copy: bool = True) -> torch.Tensor:
    """[batch, seq, heads(, dim)] -> [chunks, batch, heads, chunk_size(, dim)], zero-padded and, with copy,
    contiguous: each chunk's slice is one block, as the scan over chunks reads it."""
    x = F.pad(x.float(), (0, 0) * (x.dim() - 2) + (0, pad)) if pad else x.float()
    x = x.reshape(x.shape[0], n, chunk_size, *x.shape[2:]).transpose(0, 1).transpose(2, 3)
    return x.contiguous() if copy else x


class _StateScan(torch.autograd.Function):
    """states[i + 1] = carry[i] states[i] + written[i] @ states[i] + offset[i] over the chunk axis (0),
    states[0] = s0; returns (the states each chunk starts with [n, ...], the last state). The backward runs
    the same recurrence in reverse with transposed matrices, so autograd records one node for the whole
    scan instead of several per chunk (whose select backwards each zero-filled a full-size gradient: 40%
    of a forward + backward step at 1 x 1024 tokens, 16 chunks). Two outputs, not one stack that the
    caller slices: slicing's backward zero-fills and copies a gradient of all n + 1 states (~2 ms there)."""

    @staticmethod
    def forward(ctx, carry: torch.Tensor, written: torch.Tensor, offset: torch.Tensor, s0: torch.Tensor):
        # Each step writes into its slot of one buffer (out=) rather than a list that torch.stack copies (4 MB).
        states = offset.new_empty((offset.shape[0] + 1, *s0.shape))
        states[0].copy_(s0)
        for i in range(offset.shape[0]):
            # offset + carry S first, then += written @ S in place: baddbmm with out= would copy its input first.
            torch.addcmul(offset[i], carry[i, ..., None, None], states[i], out=states[i + 1])
            states[i + 1].flatten(0, -3).baddbmm_(written[i].flatten(0, -3), states[i].flatten(0, -3))
        entries = states[:-1]
        ctx.save_for_backward(carry, written, entries)
        return entries, states[-1].clone()

    @staticmethod
    def backward(ctx, grad_entries: torch.Tensor, grad_final: torch.Tensor):
        carry, written, entries = ctx.saved_tensors
        grads = grad_final.new_empty((entries.shape[0] + 1, *grad_final.shape))
        grads[-1].copy_(grad_final)  # the whole gradient of each state, from the last one back
        for i in range(written.shape[0] - 1, -1, -1):
            torch.addcmul(grad_entries[i], carry[i, ..., None, None], grads[i + 1], out=grads[i])
            grads[i].flatten(0, -3).baddbmm_(written[i].flatten(0, -3).transpose(-1, -2), grads[i + 1].flatten(0, -3))
        grad_s0, grads = grads[0], grads[1:]  # states 1..n's gradient is offset's
        grad_carry = (grads * entries).sum(dim=(-1, -2))
        grad_written = grads @ entries.transpose(-1, -2)
        return grad_carry, grad_written, grads, grad_s0


class _PairDecay(torch.autograd.Function):
    """[.., chunk] log decays -> [.., chunk, chunk] exp(cum_i - cum_j), 0 where `blocked`; written in place and
    differentiated by hand (grad_cum_i = row sum - column sum of grad * decay): 2 passes over the
    [chunks, batch, heads, chunk, chunk] tensor backward and 3 forward, against autograd's 6 and 3 allocations."""

    @staticmethod
    def forward(ctx, cum: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        decay = (cum[..., :, None] - cum[..., None, :]).masked_fill_(blocked, float("-inf")).exp_()
        ctx.save_for_backward(decay)
        return decay

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (decay,) = ctx.saved_tensors
        weighted = grad * decay
        return weighted.sum(dim=-1) - weighted.sum(dim=-2), None


def _chunked_segments(segments: torch.Tensor, pad: int, n: int, chunk_size: int) -> torch.Tensor:
    """[batch, seq] -> [chunks, batch, 1, chunk_size]; the padding continues the last document."""
    if pad:
        segments = torch.cat([segments, segments[:, -1:].expand(-1, pad)], dim=1)
    return segments.reshape(segments.shape[0], n, 1, chunk_size).transpose(0, 1)


def _same_segment_in_chunk(segments: torch.Tensor, pad: int, n: int, chunk_size: int) -> torch.Tensor:
    chunked = _chunked_segments(segments, pad, n, chunk_size)
    return chunked[..., :, None] == chunked[..., None, :]


def _boundary_masks(segments: torch.Tensor | None, pad: int, n: int, chunk_size: int):
    """(entry [.., chunk]: the position sees the state the chunk starts with; exit [.., chunk]: the position
    writes into the state the chunk ends with; carry [..]: that state survives the chunk), all 1.0 without
    documents."""
    if segments is None:
        return 1.0, 1.0, 1.0
    chunked = _chunked_segments(segments, pad, n, chunk_size).float()
    before = torch.cat([chunked[:1, ..., :1], chunked[:-1, ..., -1:]], dim=0)  # the token before each chunk
    entry = (chunked == before).float()
    exit_ = (chunked == chunked[..., -1:]).float()
    carry = (chunked[..., -1] == before[..., 0]).float()
    return entry, exit_, carry


@functools.cache
def fla_installed() -> bool:
    """flash-linear-attention (`fla`, Triton kernels, CUDA only) is importable: training and prefill on a
    GPU use its chunk kernel, as transformers' Qwen3-Next does; the plain form above is the reference."""
    return importlib.util.find_spec("fla") is not None


def fla_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_gated_delta_rule (from a zero state) through fla's kernel: q and k l2-normalised in the kernel,
    q scaled by d_k^-0.5 (fla's default), documents as variable-length sequences: the rows, split where
    their segment changes, packed into one sequence with `cu_seqlens`. Returns the output [batch, seq,
    heads, d_v] and each row's exit state (that of its last document), as the plain form does."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

    batch, seq = q.shape[:2]
    starts = torch.ones(batch, seq, dtype=torch.bool, device=q.device)
    if segments is not None:
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = starts.flatten().nonzero().flatten()
    cu_seqlens = torch.cat([first, first.new_tensor([batch * seq])])

    def packed(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, batch * seq, *x.shape[2:])

    out, final = fla_chunk(packed(q), packed(k.to(q.dtype)), packed(v.to(q.dtype)), packed(g.float()), packed(beta.to(q.dtype)),
                           output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens)
    return out.view(batch, seq, *out.shape[2:]).to(v.dtype), final[starts.sum(1).cumsum(0) - 1]


__all__ = ["chunk_gated_delta_rule", "recurrent_gated_delta_rule", "causal_conv", "segments_from_documents", "l2norm",
           "fla_gated_delta_rule", "fla_installed"]
