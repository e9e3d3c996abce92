"""The gated delta rule against transformers' torch fallbacks (chunked and recurrent, with an entry
state and lengths that are not a multiple of the chunk), a packed row against its documents alone,
and the document-resetting convolution against F.conv1d per document."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_next.modeling_qwen3_next import (
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

from smoltrain.model.delta_rule import (
    causal_conv,
    chunk_gated_delta_rule,
    fla_gated_delta_rule,
    fla_installed,
    recurrent_gated_delta_rule,
    segments_from_documents,
)


def _inputs(batch: int, seq: int, heads: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, seq, heads, dim, generator=g) for _ in range(3))
    decay = -2 * torch.rand(batch, seq, heads, generator=g)  # log decay <= 0
    beta = torch.rand(batch, seq, heads, generator=g)
    state = 0.1 * torch.randn(batch, heads, dim, dim, generator=g)
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("seq,chunk", [(150, 64), (40, 16), (7, 64)])
def test_chunked_and_recurrent_forms_equal_transformers(seq, chunk):
    q, k, v, decay, beta, state = _inputs(2, seq, 3, 16)
    ref, ref_state = torch_chunk_gated_delta_rule(q, k, v, decay, beta, chunk_size=chunk, initial_state=state,
                                                  output_final_state=True, use_qk_l2norm_in_kernel=True)
    out, final = chunk_gated_delta_rule(q, k, v, decay, beta, state, chunk_size=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, ref_state, rtol=1e-5, atol=1e-5)
    ref, ref_state = torch_recurrent_gated_delta_rule(q, k, v, decay, beta, initial_state=state, output_final_state=True,
                                                      use_qk_l2norm_in_kernel=True)
    out, final = recurrent_gated_delta_rule(q, k, v, decay, beta, state)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, ref_state, rtol=1e-5, atol=1e-5)


def test_packed_row_gives_each_document_its_alone_outputs_and_gradients():
    q, k, v, decay, beta, _ = _inputs(2, 150, 2, 8, seed=1)
    # Boundaries inside chunks and on a chunk edge (32), a one-token document, and an id reused in a row.
    document_ids = torch.tensor([[0] * 32 + [1] * 70 + [2] * 1 + [0] * 47, [5] * 100 + [3] * 50])
    segments = segments_from_documents(document_ids)
    v.requires_grad_(True)
    packed, _ = chunk_gated_delta_rule(q, k, v, decay, beta, segments=segments, chunk_size=32)
    grad_packed = torch.autograd.grad(packed.square().sum(), v)[0]
    for row in range(2):
        for segment in segments[row].unique():
            idx = (segments[row] == segment).nonzero().flatten()
            parts = [x[row : row + 1, idx] for x in (q, k, v, decay, beta)]
            alone, _ = torch_chunk_gated_delta_rule(*parts, use_qk_l2norm_in_kernel=True)
            torch.testing.assert_close(packed[row : row + 1, idx], alone, rtol=1e-5, atol=1e-5)
            grad_alone = torch.autograd.grad(alone.square().sum(), parts[2])[0]
            torch.testing.assert_close(grad_packed[row : row + 1, idx], grad_alone, rtol=1e-4, atol=1e-5)


def test_causal_conv_resets_at_documents_and_carries_its_state_when_decoding():
    g = torch.Generator().manual_seed(2)
    x, weight = torch.randn(2, 6, 30, generator=g), torch.randn(6, 4, generator=g)
    document_ids = torch.tensor([[0] * 10 + [1] * 2 + [2] * 18, [0] * 30])
    out, _ = causal_conv(x, weight, segments_from_documents(document_ids))
    for row, spans in ((0, [(0, 10), (10, 12), (12, 30)]), (1, [(0, 30)])):
        for a, b in spans:
            alone = F.silu(F.conv1d(x[row : row + 1, :, a:b], weight[:, None], padding=3, groups=6)[..., : b - a])
            torch.testing.assert_close(out[row : row + 1, :, a:b], alone, rtol=1e-5, atol=1e-6)
    # Prefill 20 tokens, then one at a time from the carried state: the whole row's outputs.
    whole, _ = causal_conv(x, weight)
    pieces, state = causal_conv(x[..., :20], weight)
    for t in range(20, 30):
        step, state = causal_conv(x[..., t : t + 1], weight, state=state)
        pieces = torch.cat([pieces, step], dim=-1)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-6)


def test_chunked_gradients_equal_the_recurrent_form_of_transformers():
    # The scan over chunks has a hand-written backward: every input's gradient, the entry state's included,
    # against autograd through transformers' token-by-token form (3 chunks of 16, the last one padded).
    inputs = [x.requires_grad_(True) for x in _inputs(2, 40, 3, 16, seed=3)]
    q, k, v, decay, beta, state = inputs
    out, final = chunk_gated_delta_rule(q, k, v, decay, beta, state, chunk_size=16)
    ref, ref_final = torch_recurrent_gated_delta_rule(q, k, v, decay, beta, initial_state=state, output_final_state=True,
                                                      use_qk_l2norm_in_kernel=True)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad((out * weights).sum() + final.square().sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weights).sum() + ref_final.square().sum(), inputs)
    for name, grad, ref_grad in zip("q k v decay beta state".split(), grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(not (torch.cuda.is_available() and fla_installed()), reason="flash-linear-attention's kernels need CUDA and fla")
def test_fla_kernel_equals_the_plain_chunked_form_on_packed_documents():
    """The GPU path (GatedDeltaNet uses it for training and prefill when fla is installed) against the plain
    form: outputs, every input's gradient and each row's exit state, with documents packed in rows."""
    q, k, v, decay, beta, _ = (x.cuda() for x in _inputs(2, 150, 2, 64, seed=2))
    segments = segments_from_documents(torch.tensor([[0] * 32 + [1] * 70 + [2] * 48, [5] * 100 + [3] * 50])).cuda()
    inputs = [x.clone().requires_grad_(True) for x in (q, k, v, decay, beta)]
    plain, plain_state = chunk_gated_delta_rule(*inputs, segments=segments)
    plain_grads = torch.autograd.grad(plain.square().sum(), inputs)
    fla_inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    fast, fast_state = fla_gated_delta_rule(*fla_inputs, segments=segments)
    fast_grads = torch.autograd.grad(fast.square().sum(), fla_inputs)
    torch.testing.assert_close(fast, plain, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(fast_state, plain_state, rtol=2e-3, atol=2e-3)
    for name, a, b in zip("q k v decay beta".split(), fast_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=5e-3, atol=5e-3, msg=f"gradient of {name}")


def test_fla_wrapper_packs_documents_and_returns_each_rows_exit_state(monkeypatch):
    """The CPU half of the fla path: fla_gated_delta_rule's cu_seqlens packing and exit-state pick, with
    fla's kernel stood in for by the plain form run per variable-length sequence (what cu_seqlens means)."""
    def kernel(q, k, v, g, beta, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens):
        assert q.shape[0] == 1 and output_final_state and use_qk_l2norm_in_kernel
        parts = [chunk_gated_delta_rule(*(x[:, a:b] for x in (q, k, v, g, beta))) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
        return torch.cat([o for o, _ in parts], dim=1), torch.cat([s for _, s in parts])

    module = types.ModuleType("fla.ops.gated_delta_rule")
    module.chunk_gated_delta_rule = kernel
    for name, value in {"fla": types.ModuleType("fla"), "fla.ops": types.ModuleType("fla.ops"), module.__name__: module}.items():
        monkeypatch.setitem(sys.modules, name, value)
    q, k, v, decay, beta, _ = _inputs(2, 150, 2, 8, seed=3)
    segments = segments_from_documents(torch.tensor([[0] * 32 + [1] * 70 + [2] * 1 + [0] * 47, [5] * 100 + [3] * 50]))
    fast, fast_state = fla_gated_delta_rule(q, k, v, decay, beta, segments=segments)
    plain, plain_state = chunk_gated_delta_rule(q, k, v, decay, beta, segments=segments)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_state, plain_state, rtol=1e-5, atol=1e-5)
