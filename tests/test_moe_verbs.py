"""Verbs on an MoE model, each against an independent reference: `sft` (first-step loss = the token
mean cross-entropy over assistant tokens, aux off), `export` of the SFT run (transformers' Qwen3-MoE
logits), cached greedy generation (transformers' generate on the export) and a linear `merge`
(the mean of the two state dicts)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from chat_helpers import VOCAB, chat_tokenizers, conversations
from transformers import AutoModelForCausalLM

from smoltrain.config import Config, DataConfig, ModelConfig, config_from_dict
from smoltrain.model.generate import generate
from smoltrain.model.transformer import build_model
from smoltrain.post.chat.data import read_conversations, write_conversations
from smoltrain.post.chat.template import load_chat_tokenizer
from smoltrain.post.merge import merge
from smoltrain.post.sft.data import PackedChatBatches, pack_best_fit, tokenize_conversations
from smoltrain.post.sft.stage import sft
from smoltrain.report.hf_export import export_hf
from smoltrain.train.load_model import load_any, save_model_folder

SEQ = 128
MODEL = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, max_seq_len=SEQ,
             qk_norm=True, num_experts=4, experts_per_token=2, expert_hidden=24, aux_loss_coef=0.0)


def _sft_config(root, out):
    return config_from_dict({
        "data": {"seq_len": SEQ},
        "sft": {"data": [str(root / "chat.jsonl")], "epochs": None, "warmup_fraction": None, "chat_eval_items": 0},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "constant"},
        "train": {"init": str(root / "init"), "out_dir": str(out), "max_steps": 3, "log_every": 1, "save_every": 3,
                  "eval_every": 1000, "global_batch_tokens": 4 * SEQ, "micro_batch_size": 2, "tensorboard": False,
                  "device": "cpu", "compile": "off"},
        "eval": {"val_batches": 0},
    })


@pytest.mark.slow
def test_sft_export_generate_and_merge_on_an_moe_model(tmp_path):
    root = chat_tokenizers(tmp_path)
    config = Config(model=ModelConfig(**MODEL), data=DataConfig(seq_len=SEQ))
    save_model_folder(build_model(config.model, seed=3), config, root / "init", tokenizer=root / "base")
    write_conversations(root / "chat.jsonl", conversations(40))
    out = tmp_path / "sft"
    assert sft(_sft_config(root, out))["finished"]
    first = next(json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x and "event" not in x)
    # Independent: the init model, the first step's rows, F.cross_entropy over the assistant tokens.
    tok = load_chat_tokenizer(out / "tokenizer")
    examples, _ = tokenize_conversations(read_conversations([str(root / "chat.jsonl")]).conversations, tok, SEQ)
    batches = PackedChatBatches(examples, pack_best_fit([len(e.ids) for e in examples], SEQ), SEQ, 2, tok.pad_token_id, seed=0)
    model, _, _ = load_any(root / "init")
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(2):
            b = batches.next_batch()
            logits = model(b["input_ids"], document_ids=b["document_ids"])
            total += F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100, reduction="sum").item()
            count += int((b["labels"] != -100).sum())
    assert abs(first["loss"] - total / count) <= 1e-5 * total / count
    assert "moe_max_load" in first

    # export: the SFT run loads in transformers as Qwen3-MoE with our logits, and generates as ours does.
    export_hf(out, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, local_files_only=True).eval()
    trained, _, _ = load_any(out)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (trained(ids) - hf(ids).logits).abs().max().item() <= 1e-5
    prompt = ids[0, :7].tolist()
    theirs = hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate(trained.eval(), [prompt], 8) == [theirs[0, len(prompt):].tolist()]

    # merge: a uniform linear merge of the init and SFT models is the mean of their weights (router, experts, bias).
    merged, _, _ = load_any(merge([str(root / "init"), str(out)], tmp_path / "merged"))
    init_state, trained_state = model.state_dict(), trained.state_dict()
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, (init_state[name] + trained_state[name]) / 2, msg=name)
