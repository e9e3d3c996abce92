"""A new user's trial (issue 18): mistakes caught before step 1, CLI conventions (exit codes, one
error line per job, --version), and small things users trip on. Each test failed before its fix."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from synthetic_shards import write_random_documents

from smoltrain import __version__
from smoltrain.cli import main as cli_main
from smoltrain.config import config_from_dict
from smoltrain.errors import ConfigError

TINY = {
    "model": {"vocab_size": 256, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 64, "max_seq_len": 32},
    "data": {"seq_len": 16},
    "optim": {"warmup_steps": 1},
    "train": {"global_batch_tokens": 64, "micro_batch_size": 4, "log_every": 1, "save_every": 2, "eval_every": 100,
              "max_steps": 2, "device": "cpu", "compile": "off", "tensorboard": False},
    "eval": {"val_batches": 1, "batch_size": 2},
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_random_documents(root / "web", "web", 1, 200, 3000, seed=1)
    write_random_documents(root / "val", "val", 1, 200, 500, seed=2)
    return root


def recipe(tmp_path: Path, shards: Path, **sections) -> Path:
    raw = json.loads(json.dumps(TINY))
    raw["data"].update(sources={"web": str(shards / "web")}, validation={"web": str(shards / "val")})
    raw["train"]["out_dir"] = str(tmp_path / "run")
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- checks before step 1


def test_embedded_mixture_names_are_checked_with_did_you_mean():
    with pytest.raises(ConfigError, match=r"data.mixture.prose_x: no such source \(did you mean 'prose'\?\)"):
        config_from_dict({"data": {"embedded": True, "mixture": {"prose_x": 1.0}}})
    with pytest.raises(ConfigError, match=r"data.stages\[0\].mixture.bogus: no such source"):
        config_from_dict({"data": {"embedded": True, "stages": [{"mixture": {"prose": 1, "bogus": 1}}]}})
    # The embedded corpus's own names pass.
    config_from_dict({"data": {"embedded": True, "mixture": {"prose": 0.5, "code": 0.3, "math": 0.2}}})


def test_a_mixture_without_positive_weight_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"data.mixture: no positive weight \(prose: 0, code: 0\)"):
        config_from_dict({"data": {"embedded": True, "mixture": {"prose": 0, "code": 0}}})


def test_an_unknown_embedded_mixture_name_in_an_ablation_grid_is_refused_before_any_run(tmp_path):
    from smoltrain.ablate.spec import load_ablation

    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump({"baseline": {**TINY, "data": {"embedded": True, "seq_len": 16}},
                                    "variants": {"odd": ["data.mixture.bogus=1"]}, "seeds": [0],
                                    "budget": {"steps": 2}}))
    with pytest.raises(ConfigError, match=r"variants.odd: data.mixture.bogus: no such source"):
        load_ablation(path)


def test_unknown_eval_task_fails_smoltrain_config_and_train_before_anything_is_written(tmp_path, shards, capsys):
    path = recipe(tmp_path, shards)
    assert cli_main(["config", str(path), "--set", "eval.tasks=[arithmetc]"]) == 2
    assert "unknown task 'arithmetc' (did you mean 'arithmetic'?)" in one_line_error(capsys)
    assert cli_main(["train", str(path), "--set", "eval.tasks=[arithmetc]"]) == 2
    assert "unknown task 'arithmetc'" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_eval_tasks_need_a_tokenizer_and_validation_folders_must_exist(tmp_path, shards, capsys):
    path = recipe(tmp_path, shards)
    assert cli_main(["config", str(path), "--set", "eval.tasks=[arithmetic_choice]"]) == 2
    assert "eval.tasks needs data.tokenizer" in one_line_error(capsys)
    assert cli_main(["train", str(path)]) == 2
    assert "data.tokenizer is needed to count bytes for bits per byte" in one_line_error(capsys)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert cli_main(["train", str(path), "--set", f"data.tokenizer={tmp_path / 'tokenizer.json'}",
                     "--set", f"data.validation.web={tmp_path / 'nowhere'}"]) == 2
    assert "data.validation.web: folder" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_an_empty_out_dir_is_refused(tmp_path, shards, capsys):
    assert cli_main(["train", str(recipe(tmp_path, shards)), "--set", "train.out_dir="]) == 2
    assert "train.out_dir must name a folder" in one_line_error(capsys)
    with pytest.raises(ConfigError, match="train.out_dir: expected a string"):
        config_from_dict({"train": {"out_dir": None}})


# ----------------------------------------------------------------------------- CLI conventions


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"smoltrain {__version__}"


def test_only_rank_zero_prints_a_user_error_under_torchrun(tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "missing.yaml")
    monkeypatch.setenv("RANK", "1")
    assert cli_main(["config", missing]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert cli_main(["config", missing]) == 2
    assert "config file not found" in one_line_error(capsys)


def test_rerunning_a_finished_run_says_it_is_finished(tmp_path, shards, capsys, one_thread):
    path = recipe(tmp_path, shards, eval={"val_batches": 0})
    assert cli_main(["train", str(path)]) == 0
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli_main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'run'} is finished (step 2 of train.max_steps 2)" in out
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_ablate_exits_143_on_sigterm_as_train_does(tmp_path, monkeypatch, capsys):
    from smoltrain.ablate import grid

    def preempted(config, stage="train"):
        Path(config.train.out_dir).mkdir(parents=True, exist_ok=True)
        return {"stopped_by": "SIGTERM", "finished": False, "step": 1}

    monkeypatch.setattr(grid, "train_with_trainer", preempted)
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump({"baseline": TINY, "variants": {"mqa": ["model.num_kv_heads=1"]}, "seeds": [0],
                                    "budget": {"steps": 2}, "out_dir": str(tmp_path / "out")}))
    assert cli_main(["ablate", str(path)]) == 143
    assert "stopped by SIGTERM at step 1; the same command resumes" in capsys.readouterr().err


def test_corpus_fraction_outside_zero_one_is_refused(tmp_path, capsys):
    for fraction in ("0", "-0.5", "1.5"):
        assert cli_main(["data", "corpus", "--out", str(tmp_path / "c"), "--fraction", fraction]) == 2
        assert "must lie in (0, 1]" in one_line_error(capsys)
    assert not (tmp_path / "c").exists()


def test_exported_weights_are_readable_like_the_other_files(tmp_path):
    from smoltrain.config import Config, ModelConfig
    from smoltrain.model.transformer import build_model
    from smoltrain.report.hf_export import export_hf
    from smoltrain.train.load_model import save_model_folder

    config = Config(model=ModelConfig(vocab_size=256, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                      intermediate_size=64, max_seq_len=32))
    config.data.seq_len, config.train.global_batch_tokens = 32, 256
    save_model_folder(build_model(config.model), config, tmp_path / "folder")
    out = export_hf(tmp_path / "folder", tmp_path / "hf")
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)
    assert mode(out / "model.safetensors") == mode(out / "config.json")
    assert mode(tmp_path / "folder" / "model.safetensors") == mode(tmp_path / "folder" / "config.yaml")


# ----------------------------------------------------------------------------- evaluation provenance


ODD_ITEMS = [
    {"query": "1+1=", "choices": [" 2", " 3"], "gold": 0},
    {"query": "2+2 =", "choices": [" 4", " 5", " 44"], "gold": 1},
    {"query": "what is 7-3?", "choices": [" 4", " 3"], "gold": 0},
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shards) -> Path:
    """A finished 2-step run with a byte tokenizer (token i is byte i, 256 is end of text)."""
    from test_parallel_trainer import write_byte_tokenizer

    from smoltrain.train.trainer import run

    root = tmp_path_factory.mktemp("trained")
    write_byte_tokenizer(root / "tokenizer.json")
    raw = json.loads(json.dumps(TINY))
    raw["model"]["vocab_size"] = 258
    raw["data"].update(sources={"web": str(shards / "web")}, tokenizer=str(root / "tokenizer.json"))
    raw["train"]["out_dir"] = str(root / "run")
    raw["eval"]["val_batches"] = 0
    run(config_from_dict(raw))
    (root / "odd.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ODD_ITEMS))
    return root


def test_results_json_records_the_model_step_tokens_settings_and_version(trained_run, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert cli_main(["eval", str(trained_run / "run"), "--tasks", str(trained_run / "odd.jsonl"), "--limit", "2",
                     "--seed", "3", "--val-batches", "0", "--device", "cpu", "--out", str(out)]) == 0
    provenance = json.loads(out.read_text())["provenance"]
    state = json.loads((trained_run / "run" / "checkpoints" / "step_00000002" / "train_state.json").read_text())
    assert provenance["model"] == {"path": str((trained_run / "run").resolve()),
                                   "checkpoint": str((trained_run / "run" / "checkpoints" / "step_00000002").resolve()),
                                   "step": 2, "tokens": state["tokens"]}
    assert state["tokens"] == 2 * TINY["train"]["global_batch_tokens"]
    assert provenance["tasks"] == {"odd": {"kind": "multiple_choice", "items": 2, "num_fewshot": 0, "formulation": "cloze",
                                           "metric": "acc_norm_nospace"}}
    assert (provenance["limit"], provenance["seed"], provenance["smoltrain_version"]) == (2, 3, __version__)
    assert "at step 2 (128 tokens)" in out.with_suffix(".md").read_text()


def test_log_samples_writes_every_item_with_its_log_likelihoods(trained_run, tmp_path):
    from smoltrain.eval.run import evaluate
    from smoltrain.eval.scoring import encode_pair, load_tokenizer, loglikelihoods
    from smoltrain.train.checkpoint import load_model_from_checkpoint

    out = tmp_path / "results.json"
    report = evaluate(str(trained_run / "run"), [str(trained_run / "odd.jsonl")], val_batches=0, device="cpu",
                      out=out, log_samples=True, progress=False)
    samples = [json.loads(line) for line in (tmp_path / "results.samples.jsonl").read_text().splitlines()]
    assert report["samples"] == str(tmp_path / "results.samples.jsonl")
    assert [s["choices"] for s in samples] == [item["choices"] for item in ODD_ITEMS]
    # The logged log-likelihoods are the model's, scored one request at a time without batching.
    model, _ = load_model_from_checkpoint(trained_run / "run")
    tokenizer = load_tokenizer(trained_run / "tokenizer.json")
    for sample, item in zip(samples, ODD_ITEMS):
        want = [loglikelihoods(model.eval(), [encode_pair(tokenizer, item["query"], c)], batch_size=1)[0]
                for c in item["choices"]]
        assert sample["logprobs"] == pytest.approx(want, rel=1e-5)
    accuracy = sum(s["acc_norm_nospace"] for s in samples) / len(samples)
    assert report["tasks"]["odd"]["acc_norm_nospace"] == pytest.approx(accuracy)


def test_a_hugging_face_folder_takes_validation_shards(trained_run, shards, tmp_path, capsys):
    from smoltrain.eval.run import evaluate
    from smoltrain.report.hf_export import export_hf

    hf = export_hf(trained_run / "run", tmp_path / "hf", tokenizer=trained_run / "tokenizer.json")
    out = tmp_path / "results.json"
    assert cli_main(["eval", str(hf), "--tasks", str(trained_run / "odd.jsonl"), "--validation", str(shards / "val"),
                     "--val-batches", "2", "--batch-size", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["provenance"]["validation"] == {"val": str(shards / "val")}
    assert report["provenance"]["model"]["step"] is None  # an export does not know its step
    # The same shards named in the checkpoint's config give the same loss.
    config = config_from_dict({"model": {**TINY["model"], "vocab_size": 258},
                               "data": {"seq_len": 32, "validation": {"val": str(shards / "val")},
                                        "tokenizer": str(trained_run / "tokenizer.json")}})
    want = evaluate(str(trained_run / "run"), [str(trained_run / "odd.jsonl")], val_batches=2, batch_size=2,
                    device="cpu", config=config, progress=False)["val"]["val"]
    # Windows as long as the model's context (32), 2 batches of 2.
    assert report["val"]["val"]["tokens"] == want["tokens"] == 2 * 2 * 32
    assert report["val"]["val"]["loss"] == pytest.approx(want["loss"], rel=1e-5)


@pytest.mark.parametrize("device, message", [
    ("tpu", "--device tpu: not a device"),
    ("cuda:99" if __import__("torch").cuda.is_available() else "cuda", "CUDA device"),
])
def test_eval_device_mistakes_are_one_line(trained_run, device, message, capsys):
    assert cli_main(["eval", str(trained_run / "run"), "--device", device]) == 2
    assert message in one_line_error(capsys)


def test_in_training_evaluation_prints_one_console_line():
    from smoltrain.train.metrics import eval_console_line

    result = {"val": {"prose": {"loss": 3.41234, "bpb": 1.2, "tokens": 10}, "code": {"loss": 2.5, "bpb": 1.0, "tokens": 10}},
              "tasks": {"arithmetic_choice": {"score": 0.41, "centred": 0.1}, "prose_cloze": {"score": 0.297, "centred": 0.0}},
              "aggregate": {"centred": 0.05, "score": 0.35, "random_baseline": 0.3, "tasks": 2}}
    assert eval_console_line(100, result) == ("eval step 100 | val prose 3.412 code 2.500 | aggregate +0.050 | "
                                              "arithmetic_choice 0.410 prose_cloze 0.297")
    assert eval_console_line(5, {"val": {}, "tasks": {}, "aggregate": {}}) is None
    # An objective's own evaluations join the line (numbers only, no standard errors or counts).
    dpo = {"val": {}, "tasks": {}, "dpo": {"accuracy": 0.75, "accuracy_stderr": 0.05, "n": 64, "chat": {"no_think": 0.5}}}
    assert eval_console_line(7, dpo) == "eval step 7 | dpo accuracy 0.750 chat/no_think 0.500"


def test_a_tp_only_run_is_not_labelled_fsdp2():
    from smoltrain.train.distributed import data_parallel_kind

    assert data_parallel_kind(1, 1, False) == "no data parallel"  # tp 2 on 2 ranks: nothing wraps the model
    assert [data_parallel_kind(1, 2, False), data_parallel_kind(2, 2, False), data_parallel_kind(1, 2, True)] == [
        "FSDP2", "HSDP", "DDP"]
