"""LoRA through peft (train.lora): only the adapters train and sit in the optimizer and the checkpoints,
the base stays frozen, a stopped run resumes exactly (dropout included), the adapter folder loads in
peft on top of the exported base with our logits, the merged export equals our model in transformers,
DPO's reference is the base with the adapters off (no second model), and FSDP on 2 ranks equals 1."""

from __future__ import annotations

import gc
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from chat_helpers import VOCAB, chat_tokenizers, conversations
from preference_helpers import preference_rows, save_init_model, write_rows
from spawn_helpers import leaves_without_teardown

from smoltrain import cli
from smoltrain.config import Config, DataConfig, ModelConfig, config_from_dict
from smoltrain.errors import CheckpointError, ConfigError
from smoltrain.model.transformer import Transformer, build_model, token_logprobs
from smoltrain.post.chat.data import write_conversations
from smoltrain.post.preference import stage as dpo
from smoltrain.post.sft.stage import load_sft_config, sft
from smoltrain.report.hf_export import export_hf
from smoltrain.train.checkpoint import check_compatible, find_checkpoint, read_config
from smoltrain.train.load_model import load_any, save_model_folder
from smoltrain.train.lora import is_adapter_name, load_lora_model
from smoltrain.train.optim import build_optimizer
from smoltrain.train.trainer import build_training_model

SEQ = 128
MODEL = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 64, "max_seq_len": SEQ, "nope_every": 2}
LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = chat_tokenizers(tmp_path_factory.mktemp("lora"))
    config = Config(model=ModelConfig(**MODEL), data=DataConfig(seq_len=SEQ))
    save_model_folder(build_model(config.model, seed=3), config, root / "init", tokenizer=root / "base")
    write_conversations(root / "chat.jsonl", conversations(40))
    return root


def recipe(root: Path, out: Path, **lora) -> Path:
    raw = {
        "data": {"seq_len": SEQ},
        "sft": {"data": [str(root / "chat.jsonl")], "epochs": None, "warmup_fraction": None, "chat_eval_items": 0},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "schedule": "constant"},
        "train": {"init": str(root / "init"), "out_dir": str(out), "max_steps": 6, "log_every": 1, "save_every": 3,
                  "eval_every": 1000, "global_batch_tokens": 4 * SEQ, "micro_batch_size": 2, "tensorboard": False,
                  "device": "cpu", "compile": "off", "keep_checkpoints": 3, "lora": {**LORA, **lora}},
        "eval": {"val_batches": 0},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def per_step(out: Path) -> list[tuple[int, float, float]]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"], m["grad_norm"]) for m in lines if "loss" in m and "event" not in m]


@pytest.fixture(scope="module")
def run(root) -> Path:
    out = root / "run"
    sft(load_sft_config(recipe(root, out)))
    return out


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def test_lora_keys_are_checked_in_one_line():
    with pytest.raises(ConfigError, match=r"train.lora.target_modules: no module 'q_prj' \(did you mean 'q_proj'\?\)"):
        config_from_dict({"train": {"lora": {"target_modules": ["q_prj"]}}})
    with pytest.raises(ConfigError, match="unknown key 'train.lora.rank'"):
        config_from_dict({"train": {"lora": {"rank": 8}}})
    with pytest.raises(ConfigError, match="train.lora needs parallel.tp 1"):
        config_from_dict({"train": {"lora": {}}, "parallel": {"tp": 2}})
    with pytest.raises(ConfigError, match="train.lora.dropout > 0 needs train.activation_checkpointing false"):
        config_from_dict({"train": {"lora": {"dropout": 0.1}, "activation_checkpointing": True}})
    assert config_from_dict({}, ["train.lora.r=8"]).train.lora.r == 8


def test_only_the_adapters_train_sit_in_the_optimizer_and_the_checkpoint(root, run):
    config = read_config(find_checkpoint(run))
    model = build_training_model(config, torch.device("cpu"), init_from=config.train.init)
    adapters = {name for name, _ in model.named_parameters() if is_adapter_name(name)}
    # 2 layers x 4 targets x (A, B), and nothing else trainable
    assert len(adapters) == 16 and {n for n, p in model.named_parameters() if p.requires_grad} == adapters
    optimizer = build_optimizer(config.optim, model)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if n in adapters}
    # the checkpoint: adapter tensors and their Adam moments, no base weight
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(find_checkpoint(run)).read_metadata().state_dict_metadata
    weights = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    assert weights == adapters
    assert all(is_adapter_name(k) for k in keys if k.startswith("optimizer.state."))
    # the base stayed frozen: the trained run's base layers are the init model's weights, bit for bit
    trained = load_lora_model(find_checkpoint(run), config, merge=False)
    init = dict(load_any(root / "init")[0].named_parameters())
    for name, param in trained.named_parameters():
        if not is_adapter_name(name):
            assert torch.equal(param, init[name.replace(".base_layer.", ".")]), name
    assert any(p.abs().max() > 0 for n, p in trained.named_parameters() if ".lora_B." in n)  # the adapters moved


def test_resuming_with_other_adapters_is_a_one_line_error(run):
    checkpoint = find_checkpoint(run)
    config = read_config(checkpoint)
    config.train.lora.r = 8
    with pytest.raises(CheckpointError, match=r"train.lora r 4 on down_proj, o_proj, q_proj, v_proj, now r 8 on"):
        check_compatible(checkpoint, config)
    config.train.lora = None
    with pytest.raises(CheckpointError, match=r"train.lora r 4 on .*, now off"):
        check_compatible(checkpoint, config)


def test_adapters_on_a_changed_base_are_a_one_line_error(root, tmp_path, one_thread):
    import shutil

    shutil.copytree(root / "init", tmp_path / "init")
    sft(load_sft_config(recipe(root, tmp_path / "run"), ["train.max_steps=2", f"train.init={tmp_path / 'init'}"]))
    assert load_any(tmp_path / "run")[0] is not None  # the base it was trained on
    config = Config(model=ModelConfig(**MODEL), data=DataConfig(seq_len=SEQ))
    save_model_folder(build_model(config.model, seed=4), config, tmp_path / "init", tokenizer=root / "base")
    with pytest.raises(CheckpointError, match=r"its adapters were trained on another base model .* changed since"):
        load_any(tmp_path / "run")


def test_a_stopped_lora_run_resumes_with_the_same_losses_dropout_included(root, run, one_thread):
    out = root / "stopped"
    calls = iter(range(100))
    sft(load_sft_config(recipe(root, out)), should_stop=lambda: next(calls) >= 3)  # stops after step 4 (saved)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    sft(load_sft_config(recipe(root, out)))
    want = per_step(run)
    got = {s: (loss, norm) for s, loss, norm in per_step(out)}
    assert [s for s, *_ in want] == list(range(1, 7)) and sorted(got) == list(range(1, 7))
    assert [got[s] for s, *_ in want] == [(loss, norm) for _, loss, norm in want]
    assert want[-1][1] < want[0][1]


def test_peft_loads_the_adapter_on_the_exported_base_with_our_logits(root, run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    export_hf(root / "init", tmp_path / "base")
    assert cli.main(["export", str(run), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    ours = load_lora_model(find_checkpoint(run), read_config(find_checkpoint(run)), merge=False).eval()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    want = logits_of(ours, ids)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", local_files_only=True)
    assert (logits_of(base, ids) - want).abs().max() > 1e-3  # the adapter changes the model
    theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert (logits_of(theirs, ids) - want).abs().max() <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    assert (logits_of(merged, ids) - want).abs().max() <= 1e-4


def test_exporting_an_adapter_from_a_model_folder_is_a_one_line_error(root, tmp_path, capsys):
    assert cli.main(["export", str(root / "init"), "--adapter", str(tmp_path / "a")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
    assert cli.main(["export", str(root / "init")]) == 2
    assert "name an output with --out" in capsys.readouterr().err


# ----------------------------------------------------------------------------- DPO


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora_dpo")
    save_init_model(root, "init")
    write_rows(root / "train.jsonl", preference_rows(33, 1))  # odd: 2 ranks score unequal shares of the reference pass
    (root / "recipe.yaml").write_text(f"""
optim: {{lr: 0.01, warmup_steps: 1, schedule: constant}}
train: {{max_steps: 4, log_every: 1, save_every: 4, eval_every: 1000, micro_batch_size: 4, init: {root}/init,
        tensorboard: false, device: cpu, lora: {{r: 4, alpha: 8}}}}
eval: {{val_batches: 0}}
dpo: {{train_data: [{root}/train.jsonl], loss: dpo, beta: 0.5, pairs_per_step: 8, max_length: 64}}
""")
    return root


def dpo_steps(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "loss" in m and "event" not in m]


@pytest.fixture(scope="module")
def stored(pairs) -> Path:
    """A LoRA DPO run with the reference pass precomputed (the default)."""
    dpo.run(dpo.load_dpo_config(pairs / "recipe.yaml", [f"train.out_dir={pairs / 'stored'}"]))
    return pairs / "stored"


def test_dpo_with_lora_scores_the_reference_on_the_base_without_a_second_model(pairs, stored, monkeypatch, one_thread):
    from safetensors.torch import load_file

    from smoltrain.post.preference.data import TextTokenizer, load_preferences

    # the stored pass equals the frozen base's log-probs, scored independently

    passed = load_file(stored / dpo.REFERENCE_FILE)
    base, _, tokenizer = load_any(pairs / "init")
    rows = load_preferences([str(pairs / "train.jsonl")], TextTokenizer.load(tokenizer), 64, False, None).pairs
    chosen, rejected = dpo.sequence_logprobs(base, rows, 4, 64, TextTokenizer.load(tokenizer).eos_id, torch.device("cpu"), "fp32")
    assert torch.allclose(passed["train.chosen"], chosen, atol=1e-5) and torch.allclose(passed["train.rejected"], rejected, atol=1e-5)
    del base

    # live reference: every forward runs on the one training model, and it is the only model alive
    seen, alive = set(), []

    def recording(model, *args, **kwargs):
        seen.add(id(model))
        if not alive:
            gc.collect()
            alive.append(sum(type(o) is Transformer for o in gc.get_objects()))
        return token_logprobs(model, *args, **kwargs)

    monkeypatch.setattr(dpo, "token_logprobs", recording)
    monkeypatch.setattr(dpo, "sequence_logprobs", lambda *a, **k: pytest.fail("no reference pass expected"))
    config = dpo.load_dpo_config(pairs / "recipe.yaml", [f"train.out_dir={pairs / 'live'}", "dpo.precompute=false"])
    dpo.run(config)
    assert len(seen) == 1 and alive == [1]
    # the adapters moved, yet the live reference (the base, adapters off) matched the stored pass each step
    for a, b in zip(dpo_steps(stored), dpo_steps(pairs / "live"), strict=True):
        for key in ("loss", "rewards/chosen", "rewards/margins", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert dpo_steps(pairs / "live")[-1]["loss"] < dpo_steps(pairs / "live")[0]["loss"]


# ----------------------------------------------------------------------------- FSDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@leaves_without_teardown
def _worker(rank: int, world: int, recipe_path: str, out: str, port: int, stop_after: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    calls = iter(range(100))
    sft(load_sft_config(recipe_path, [f"train.out_dir={out}"]), should_stop=lambda: next(calls) >= stop_after)


@leaves_without_teardown
def _dpo_worker(rank: int, world: int, recipe_path: str, out: str, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dpo.run(dpo.load_dpo_config(recipe_path, [f"train.out_dir={out}"]))


@pytest.mark.slow
def test_lora_dpo_under_fsdp_scores_the_reference_pass_on_the_sharded_base_like_one_process(pairs, stored, one_thread):
    mp.spawn(_dpo_worker, args=(2, str(pairs / "recipe.yaml"), str(pairs / "fsdp"), _free_port()), nprocs=2, join=True)
    from safetensors.torch import load_file

    one, two = load_file(stored / dpo.REFERENCE_FILE), load_file(pairs / "fsdp" / dpo.REFERENCE_FILE)
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
    for a, b in zip(dpo_steps(stored), dpo_steps(pairs / "fsdp"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_lora_sft_under_fsdp_on_two_gloo_ranks_equals_one_process_and_resumes(root, tmp_path, one_thread):
    # dropout 0: each rank draws its own masks, so only a deterministic adapter can equal one process
    path = recipe(root, tmp_path / "single", dropout=0.0)
    sft(load_sft_config(path))
    for stop_after in (3, 100):  # stopped (and saved) after step 4, then resumed from the sharded adapters
        mp.spawn(_worker, args=(2, str(path), str(tmp_path / "fsdp"), _free_port(), stop_after), nprocs=2, join=True)
    assert (tmp_path / "fsdp" / "config.history" / "step_00000004.yaml").is_file()  # the second session began at step 4
    want = per_step(tmp_path / "single")
    got = sorted({s: (s, loss, norm) for s, loss, norm in per_step(tmp_path / "fsdp")}.values())
    assert [s for s, *_ in got] == [s for s, *_ in want] == list(range(1, 7))
    for (step, loss, norm), (_, ref_loss, ref_norm) in zip(got, want):
        assert loss == pytest.approx(ref_loss, rel=1e-5), step
        assert norm == pytest.approx(ref_norm, rel=1e-4), step
    # the sharded adapters reload in one process (DCP reshards them) into the same model
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    single, fsdp = (load_any(tmp_path / name)[0].eval() for name in ("single", "fsdp"))
    assert (logits_of(single, ids) - logits_of(fsdp, ids)).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- GRPO


def test_grpo_with_lora_takes_its_kl_to_the_base_without_building_a_reference(tmp_path, monkeypatch, one_thread):
    from test_grpo_train import RECIPE

    from smoltrain.post.rl import stage as grpo_train
    from smoltrain.train import trainer

    raw = json.loads(json.dumps(RECIPE))
    raw["data"]["tokenizer"] = str(chat_tokenizers(tmp_path / "tok") / "smollm3")
    raw["train"].update(out_dir=str(tmp_path / "grpo"), max_steps=4, save_every=4, eval_every=1000,
                        lora={"r": 4, "alpha": 8, "dropout": 0.0})
    raw["grpo"].update(beta=0.04, num_iterations=1, eval_count=1, pass_k=1)
    built = []
    monkeypatch.setattr(trainer, "build_training_model", lambda *a, **k: built.append(1) or build_training_model(*a, **k))
    grpo_train.run(config_from_dict(raw))
    assert len(built) == 1  # the policy alone: no frozen copy for the reference
    kl = [json.loads(x)["kl"] for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    # the policy starts as its base (B = 0), then leaves it: the KL is taken to the base, not to itself
    assert kl[0] == pytest.approx(0.0, abs=1e-7) and max(kl) > 0
