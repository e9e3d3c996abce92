"""`smoltrain ablate` runs a grid of any stage in smoltrain/stages.py: an SFT grid of two arms x one seed
through the command, each run exactly the SFT stage's own (its optimizer defaults, its report), and a
report that compares the arms by the runs' own losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from chat_helpers import VOCAB, chat_tokenizers, conversations

from smoltrain import cli
from smoltrain.config import Config, DataConfig, ModelConfig
from smoltrain.model.transformer import build_model
from smoltrain.post.chat.data import write_conversations
from smoltrain.post.sft.stage import load_sft_config, sft
from smoltrain.report.run import final_loss, read_metrics
from smoltrain.train.load_model import save_model_folder

SEQ = 64
MODEL = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 64, "max_seq_len": SEQ}
STEPS = 3


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    root = chat_tokenizers(tmp_path_factory.mktemp("ablate_sft"))
    config = Config(model=ModelConfig(**MODEL), data=DataConfig(seq_len=SEQ))
    save_model_folder(build_model(config.model, seed=3), config, root / "init", tokenizer=root / "base")
    write_conversations(root / "chat.jsonl", conversations(16))
    # no optim section: the SFT stage's defaults (SmolLM3's lr 2e-5, cosine) apply in the grid as in `smoltrain sft`
    return {
        "data": {"seq_len": SEQ},
        "sft": {"data": [str(root / "chat.jsonl")], "chat_eval_items": 0},
        "train": {"init": str(root / "init"), "log_every": 1, "save_every": 1000, "eval_every": 1000,
                  "global_batch_tokens": 2 * SEQ, "micro_batch_size": 2, "tensorboard": False, "device": "cpu",
                  "compile": "off"},
    }


def test_an_sft_grid_runs_through_smoltrain_ablate_and_its_report_compares_the_arms(baseline, tmp_path):
    path = tmp_path / "sft-lr.yaml"
    path.write_text(yaml.safe_dump({"name": "sft-lr", "stage": "sft", "baseline": baseline,
                                    "variants": {"lr-high": ["optim.lr=3e-2"]}, "seeds": [0],
                                    "budget": {"steps": STEPS}, "eval": {"tasks": [], "val_batches": 0}}))
    assert cli.main(["ablate", str(path), "--out", str(tmp_path / "grid")]) == 0

    # The baseline arm is the SFT stage's own run: `smoltrain sft` of the same recipe gives the same curve.
    alone = {**baseline, "train": {**baseline["train"], "out_dir": str(tmp_path / "alone"), "max_steps": STEPS}}
    sft(load_sft_config(alone))
    runs = {arm: tmp_path / "grid" / "runs" / arm / "seed0" for arm in ("baseline", "lr-high")}
    losses = {arm: [r["loss"] for r in read_metrics(run)[0]] for arm, run in runs.items()}
    assert losses["baseline"] == [r["loss"] for r in read_metrics(tmp_path / "alone")[0]]
    assert len(losses["baseline"]) == STEPS  # the budget, not sft.epochs, set the steps
    assert all((run / "sft_report.md").is_file() for run in runs.values())
    assert losses["lr-high"] != losses["baseline"]

    results = json.loads((tmp_path / "grid" / "results.json").read_text())
    verdict = next(v for v in results["verdicts"] if v["variant"] == "lr-high" and v["metric"] == "train/final_loss")
    expected = final_loss(read_metrics(runs["lr-high"])[0]) - final_loss(read_metrics(runs["baseline"])[0])
    assert verdict["difference"] == pytest.approx(expected)
    assert "lr-high" in Path(results["report_md"]).read_text()

