"""The exported model card lists exactly the stages and evals the run folders hold."""

import json

import yaml
from transformers import AutoModelForCausalLM

from smoltrain.config import Config, ModelConfig
from smoltrain.model.transformer import build_model
from smoltrain.report.hf_export import export_hf
from smoltrain.train.load_model import save_model_folder

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, max_seq_len=64, num_layers=2, num_heads=4, num_kv_heads=2)


def _run_folder(path, raw: dict, steps: int, tokens: int, eval_result: dict | None, objective: str | None = None):
    """A finished run folder as the trainer leaves it: config.yaml, metrics.jsonl, summary.json."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(raw))
    lines = [{"step": steps, "tokens": tokens, "loss": 2.0, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 1.0,
              "mfu": None, "elapsed_s": 1.0}]
    if eval_result:
        lines.append({"step": steps, "eval": eval_result})
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = {"step": steps, "tokens": tokens, **({"objective": objective} if objective else {})}
    (path / "summary.json").write_text(json.dumps(summary))


def test_model_card_walks_train_init_back_to_pretraining_and_lists_each_stage_evals(tmp_path):
    pretrain = tmp_path / "pretrain"
    _run_folder(pretrain, {"optim": {"lr": 3e-4}, "data": {"seq_len": 256}}, steps=40, tokens=1_310_720,
                eval_result={"val": {"prose": {"loss": 5.1, "bpb": 2.0}}})
    sft = tmp_path / "sft"
    _run_folder(sft, {"train": {"init": str(pretrain)}, "optim": {"lr": 2e-5}}, steps=12, tokens=9000,
                eval_result={"tasks": {"chat_no_think": {"score": 0.42}}}, objective="sft")
    config = Config(model=ModelConfig(**SHAPE))
    config.data.seq_len, config.train.global_batch_tokens, config.train.init = 64, 512, str(sft)
    model = build_model(config.model, seed=0)
    folder = save_model_folder(model, config, tmp_path / "model")
    out = export_hf(folder, tmp_path / "hf")

    card = (out / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["library_name"] == "transformers" and "smoltrain" in front_matter["tags"]
    table = [line for line in card.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |") or line.startswith("| 3 |")]
    assert [row.split("|")[2].strip() for row in table] == ["pretrain", "sft", "model folder"]
    assert "Pretraining tokens seen: 1,310,720." in card
    assert "| val/prose/loss | 5.1 | - |" in card and "| tasks/chat_no_think/score | - | 0.42 |" in card
    assert f"{sum(p.numel() for p in model.parameters()):,}" in card  # the parameter count is the model's
    assert "No chat template: a base model." in card
    AutoModelForCausalLM.from_pretrained(out, local_files_only=True)  # the card does not disturb loading


def test_model_card_of_a_bare_model_says_it_has_no_history(tmp_path):
    model = build_model(ModelConfig(**SHAPE), seed=0)
    out = export_hf(model, tmp_path / "hf")
    card = (out / "README.md").read_text()
    assert "No training history was found" in card and "No evaluation results" in card
