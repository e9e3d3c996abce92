"""`smoltrain sft` in the one Trainer loop: the loss is TRL's token mean over assistant tokens, the run
resumes exactly after SIGKILL, FSDP over 2 gloo ranks equals one process, the data check stops the
playbook's bug before training, and the run folder exports with its chat template."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from chat_helpers import VOCAB, chat_tokenizers, conversations
from spawn_helpers import leaves_without_teardown
from transformers import AutoTokenizer

from smoltrain import cli
from smoltrain.config import Config, DataConfig, ModelConfig
from smoltrain.model.transformer import build_model
from smoltrain.post.chat.data import write_conversations
from smoltrain.post.chat.template import load_chat_tokenizer, render
from smoltrain.post.sft.data import (
    PackedChatBatches,
    pack_best_fit,
    tokenize_conversations,
)
from smoltrain.post.sft.stage import load_sft_config, sft
from smoltrain.report.hf_export import export_hf
from smoltrain.train.load_model import load_any, save_model_folder

SEQ = 128
MODEL = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 64, "max_seq_len": SEQ, "nope_every": 2}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = chat_tokenizers(tmp_path_factory.mktemp("sft"))
    config = Config(model=ModelConfig(**MODEL), data=DataConfig(seq_len=SEQ))
    save_model_folder(build_model(config.model, seed=3), config, root / "init", tokenizer=root / "base")
    write_conversations(root / "chat.jsonl", conversations(40))
    return root


def recipe(root: Path, out: Path, **sft_keys) -> dict:
    return {
        "data": {"seq_len": SEQ},
        "sft": {"data": [str(root / "chat.jsonl")], "epochs": None, "warmup_fraction": None, "chat_eval_items": 0,
                **sft_keys},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "constant"},
        "train": {"init": str(root / "init"), "out_dir": str(out), "max_steps": 8, "log_every": 1, "save_every": 3,
                  "eval_every": 1000, "global_batch_tokens": 4 * SEQ, "micro_batch_size": 2, "tensorboard": False,
                  "device": "cpu", "compile": "off", "keep_checkpoints": 3},
        "eval": {"val_batches": 0},
    }


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def per_step(out: Path) -> list[tuple[int, float, float]]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"], m["grad_norm"]) for m in lines if "loss" in m and "event" not in m]


def test_sft_defaults_are_smollm3s_and_the_model_comes_from_init(root, tmp_path):
    raw = recipe(root, tmp_path / "run")
    del raw["optim"]
    config = load_sft_config(write_recipe(tmp_path / "r.yaml", raw))
    assert (config.optim.lr, config.optim.schedule, config.optim.grad_clip) == (2e-5, "cosine", 0.2)
    assert config.optim.min_lr == pytest.approx(2e-6)
    assert config.model.hidden_size == 32 and config.model.vocab_size == VOCAB


def test_first_step_loss_is_the_token_mean_over_assistant_tokens(root, tmp_path, one_thread):
    out = tmp_path / "run"
    summary = sft(load_sft_config(write_recipe(tmp_path / "r.yaml", recipe(root, out, chat_eval_items=2))))
    assert summary["finished"] and summary["objective"] == "sft"
    # independent: the init model, the same rows in the same order, F.cross_entropy over all label tokens
    tok = load_chat_tokenizer(out / "tokenizer")
    from smoltrain.post.chat.data import read_conversations

    convs = read_conversations([str(root / "chat.jsonl")]).conversations
    examples, _ = tokenize_conversations(convs, tok, SEQ)
    rows = pack_best_fit([len(e.ids) for e in examples], SEQ)
    batches = PackedChatBatches(examples, rows, SEQ, 2, tok.pad_token_id, seed=0)
    model, _, _ = load_any(root / "init")
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(2):  # accumulation 2 x micro-batch 2 = the first step's 4 rows
            b = batches.next_batch()
            logits = model(b["input_ids"], document_ids=b["document_ids"])
            total += F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100, reduction="sum").item()
            count += int((b["labels"] != -100).sum())
    assert per_step(out)[0][1] == pytest.approx(total / count, rel=1e-5)
    report = json.loads((out / "data_report.json").read_text())
    assert report["conversations"] == 40 and report["system_prompt_share"] == report["system_prompt_rendered_share"]
    text = (out / "sft_report.md").read_text()
    assert "| chat eval | before | after |" in text and "Vibe test (after)" in text
    # the run exports with its chat template: transformers renders what SFT trained on
    export_hf(out, tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    for conv in convs[:5]:
        assert theirs.apply_chat_template(conv.messages, tokenize=False, **conv.kwargs) == render(tok, conv.messages,
                                                                                                   **conv.kwargs)


def run_cli(recipe_path: Path, out: Path, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("SMOLTRAIN_TEST_CRASH", None)
    if crash:
        env["SMOLTRAIN_TEST_CRASH"] = crash
    return subprocess.run([sys.executable, "-m", "smoltrain", "sft", str(recipe_path), "--set", f"train.out_dir={out}"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_sigkill_mid_sft_and_rerun_gives_the_same_per_step_losses(root, tmp_path, one_thread):
    path = write_recipe(tmp_path / "r.yaml", recipe(root, tmp_path / "reference"))
    sft(load_sft_config(path))  # the uninterrupted run, in this process
    killed = run_cli(path, tmp_path / "run", crash="after_step_5")
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    finished = run_cli(path, tmp_path / "run")
    assert finished.returncode == 0, finished.stderr
    assert "resumed from" in finished.stdout
    want = per_step(tmp_path / "reference")
    got = {s: (loss, norm) for s, loss, norm in per_step(tmp_path / "run")}  # the last line per step wins
    assert [s for s, *_ in want] == list(range(1, 9)) and sorted(got) == list(range(1, 9))
    assert [got[s] for s, *_ in want] == [(loss, norm) for _, loss, norm in want]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@leaves_without_teardown
def _worker(rank: int, world: int, recipe_path: str, out: str, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    sft(load_sft_config(recipe_path, [f"train.out_dir={out}"]))


@pytest.mark.slow
def test_sft_under_fsdp_on_two_gloo_ranks_equals_one_process(root, tmp_path, one_thread):
    # chat_eval_items 1: the chat evals generate under FSDP too (before step 1 and after the last)
    path = write_recipe(tmp_path / "r.yaml", recipe(root, tmp_path / "single", chat_eval_items=1))
    sft(load_sft_config(path))
    mp.spawn(_worker, args=(2, str(path), str(tmp_path / "fsdp"), _free_port()), nprocs=2, join=True)
    want, got = per_step(tmp_path / "single"), per_step(tmp_path / "fsdp")
    assert [s for s, *_ in got] == [s for s, *_ in want] == list(range(1, 9))
    assert want[-1][1] < want[0][1]
    for (step, loss, norm), (_, ref_loss, ref_norm) in zip(got, want):
        assert loss == pytest.approx(ref_loss, rel=1e-5), step
        assert norm == pytest.approx(ref_norm, rel=1e-4), step
    for name in ("chat_before.json", "chat_after.json"):
        chat = json.loads((tmp_path / "fsdp" / name).read_text())["chat"]
        assert chat["n"] == {"no_think": 1, "think": 1, "persona": 1}


def test_a_none_system_prompt_stops_sft_before_anything_is_trained(root, tmp_path, capsys):
    rows = [c.to_row() for c in conversations(10)]
    rows[3]["messages"].insert(0, {"role": "system", "content": None})
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = recipe(root, tmp_path / "run")
    raw["sft"]["data"] = [str(tmp_path / "bad.jsonl")]
    assert cli.main(["sft", str(write_recipe(tmp_path / "r.yaml", raw))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl:4: " in err and "SmolLM3 SFT bug" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_template_that_drops_custom_instructions_stops_sft_naming_the_example(root, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "HELLO"}],
             "chat_template_kwargs": {"custom_instructions": "Answer in capital letters only."}}] * 3
    (tmp_path / "persona.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = recipe(root, tmp_path / "run", chat_template="chatml")
    raw["sft"]["data"] = [str(tmp_path / "persona.jsonl")]
    assert cli.main(["sft", str(write_recipe(tmp_path / "r.yaml", raw))]) == 2
    err = capsys.readouterr().err
    assert "persona.jsonl:1: its system prompt 'Answer in capital letters only.' is not in the rendered chat" in err
    assert err.rstrip().endswith("or set sft.instructions_as_system: true to move custom_instructions into a system message")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_instructions_as_system_moves_custom_instructions_where_a_plain_template_renders_them(root, tmp_path):
    from smoltrain.post.chat.template import write_chat_tokenizer
    from smoltrain.post.sft.stage import prepare_sft_data

    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "HELLO"}],
             "chat_template_kwargs": {"custom_instructions": "Answer in capital letters only."}}] * 3
    (tmp_path / "persona.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = recipe(root, tmp_path / "run", chat_template="chatml", instructions_as_system=True)
    raw["sft"]["data"] = [str(tmp_path / "persona.jsonl")]
    config = load_sft_config(write_recipe(tmp_path / "r.yaml", raw))
    write_chat_tokenizer(root / "base", tmp_path / "tok", "chatml")
    prepared = prepare_sft_data(config, tmp_path / "tok")
    assert prepared.report["system_prompt_share"] == prepared.report["system_prompt_rendered_share"] == 1.0
    assert prepared.report["custom_instructions"] == 0
    assert "<|im_start|>system\nAnswer in capital letters only.<|im_end|>" in prepared.report["rendered_examples"]["system_prompt"]


@pytest.mark.parametrize("name", ["demo.yaml", "smollm2-135m.yaml"])
def test_sft_recipes_validate(name):
    path = Path(__file__).resolve().parents[1] / "recipes" / "sft" / name
    config = load_sft_config(path, ["train.init=null"])  # the init model is built by the commands in the recipe
    assert config.sft.data == ["embedded"] and config.data.seq_len == 512
    assert config.train.global_batch_tokens % (config.train.micro_batch_size * config.data.seq_len) == 0
