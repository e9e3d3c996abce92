"""Expert parallelism on 2 gloo ranks: each rank holds half the experts and exchanges tokens by
all_to_all, yet takes the same steps as one process (per-step loss and gradient norm, under FSDP2
and DDP for the other parameters); the reference and the worker are test_moe_parallel's."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_moe_parallel import WORLD, _worker, reference


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_expert_parallel_equals_one_process(tmp_path):
    torch.set_num_threads(1)
    cases = {"ep_fsdp": {"ep": 2}, "ep_ddp": {"ep": 2, "ddp": True}}
    mp.spawn(_worker, args=(free_port(), str(tmp_path), cases), nprocs=WORLD, join=True)
    want = reference(WORLD)
    assert want[-1][0] < want[0][0], "the reference must learn"
    for name in cases:
        got = torch.load(tmp_path / f"{name}.pt")
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, want)):
            assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), f"{name} step {step}: loss {loss} vs {ref_loss}"
            assert abs(norm - ref_norm) <= 1e-4 * abs(ref_norm), f"{name} step {step}: grad norm {norm} vs {ref_norm}"
