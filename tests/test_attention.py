"""Attention building blocks against brute-force references."""

import warnings

import torch

from smoltrain.model.attention import (
    attend,
    document_block_mask,
    document_mask_dense,
    positions_from_documents,
    resolve_kernel,
)


def _random_documents(batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    ids = torch.zeros(batch, seq, dtype=torch.int32)
    for b in range(batch):
        starts = torch.randint(1, seq, (4,), generator=generator).tolist()
        for s in starts:
            ids[b, s:] += 1
    return ids


def test_positions_restart_at_every_document_start():
    generator = torch.Generator().manual_seed(0)
    ids = _random_documents(3, 40, generator)
    positions = positions_from_documents(ids)
    for b in range(3):
        expected, run = [], 0
        for t in range(40):
            run = 0 if t == 0 or ids[b, t] != ids[b, t - 1] else run + 1
            expected.append(run)
        assert positions[b].tolist() == expected


def test_dense_document_mask_is_causal_and_within_documents():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask = document_mask_dense(ids)[0, 0]
    for q in range(6):
        for k in range(6):
            assert bool(mask[q, k]) == (k <= q and ids[0, q] == ids[0, k])


def test_flex_block_mask_matches_dense_mask():
    # flex_attention runs eagerly on CPU in forward (unfused); enough to prove the mask_mod is right.
    from torch.nn.attention.flex_attention import flex_attention

    generator = torch.Generator().manual_seed(1)
    ids = _random_documents(2, 128, generator)
    q = torch.randn(2, 4, 128, 16, generator=generator)
    k = torch.randn(2, 2, 128, 16, generator=generator)
    v = torch.randn(2, 2, 128, 16, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = flex_attention(q, k, v, block_mask=document_block_mask(ids), enable_gqa=True)
    dense = attend(q, k, v, document_mask_dense(ids))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_cpu_never_selects_flex_attention():
    cpu = torch.device("cpu")
    assert resolve_kernel("auto", cpu) == "sdpa"
    assert resolve_kernel("flex", cpu) == "sdpa"
    assert resolve_kernel("auto", torch.device("cuda")) == "flex"
