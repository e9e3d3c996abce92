"""What every family's Hugging Face parity tests share: our model imported from transformers' own
save_pretrained folder, and both trained side by side on the same random batches."""

from __future__ import annotations

from pathlib import Path

import torch

from smoltrain.train.load_model import import_hf, load_any


def imported_pair(hf, root: Path):
    """(transformers' model, ours imported from its save_pretrained folder in eval mode, our config)."""
    hf.save_pretrained(root / "hf")
    ours, config, _ = load_any(import_hf(root / "hf", root / "ours"))
    return hf, ours.eval(), config


def assert_training_matches_transformers(hf, ours, steps: int = 10, seq_len: int = 16, rel: float = 1e-4,
                                         vocab: int = 128, lr: float = 1e-2) -> None:
    """AdamW on both, `steps` batches of 2 x seq_len random tokens; each step's loss within `rel` of
    transformers' (relative above 1). transformers shifts the labels inside, we take them shifted."""
    hf.train()
    ours.train()
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=lr)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        ids = torch.randint(0, vocab, (2, seq_len), generator=g)
        labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
        theirs = hf(ids, labels=ids).loss
        mine = ours(ids, labels=labels).loss
        assert abs(mine.item() - theirs.item()) < rel * max(1.0, theirs.item()), (step, mine.item(), theirs.item())
        for loss, opt in ((theirs, opt_hf), (mine, opt_ours)):
            opt.zero_grad()
            loss.backward()
            opt.step()
