"""`smoltrain eval` end to end on a model folder and its Hugging Face export, and the evaluation the
trainer runs (validation loss / bpb on real token shards, then tasks)."""

import json

import pytest
import torch
from test_eval_scoring import tiny_model, tiny_tokenizer

from smoltrain.cli import main
from smoltrain.config import Config, DataConfig, EvalConfig
from smoltrain.eval.during_training import evaluate_during_training
from smoltrain.eval.run import evaluate
from smoltrain.eval.validation import token_byte_lengths, validation_metrics

TASK = [{"query": "Question: Compute 12 + 7.\nAnswer: 12 + 7 =", "choices": [" 19", " 18", " 29"], "gold": 0},
        {"query": "def parse(items):\n    for value", "choices": [" in", " is"], "gold": 0},
        {"query": "The semantics for a slicing are as", "choices": [" follows", " object"], "gold": 0}]


def _model_folder(tmp_path):
    from smoltrain.train.load_model import save_model_folder

    model = tiny_model()
    tiny_tokenizer().save(str(tmp_path / "tokenizer.json"))
    config = Config(model=model.config, data=DataConfig(seq_len=model.config.max_seq_len))
    return save_model_folder(model, config, tmp_path / "model", tokenizer=tmp_path / "tokenizer.json"), model


@pytest.mark.slow
def test_cli_eval_writes_results_and_a_hugging_face_export_scores_the_same(tmp_path, capsys):
    from smoltrain.report.hf_export import export_hf

    folder, model = _model_folder(tmp_path)
    task_file = tmp_path / "mine.jsonl"
    task_file.write_text("".join(json.dumps(item) + "\n" for item in TASK))
    out = tmp_path / "results.json"
    code = main(["eval", str(folder), "--tasks", "arithmetic,code_tokens@mcf", "--task-file", str(task_file),
                 "--limit", "6", "--num-fewshot", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report["tasks"]) == {"arithmetic_choice", "arithmetic_answer", "code_tokens_mcf", "mine"}
    for name, result in report["tasks"].items():
        assert result["n"] == (3 if name == "mine" else 6)
        assert result["centred"] == pytest.approx((result["score"] - result["random_baseline"]) / (1 - result["random_baseline"]))
        assert len([k for k in result if k.endswith("_stderr")]) == 1
    assert report["main_metric"] == {"arithmetic_choice": "acc", "arithmetic_answer": "quasi_exact_match",
                                     "code_tokens_mcf": "acc", "mine": "acc_norm_nospace"}
    assert report["tasks"]["mine"]["random_baseline"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert report["aggregate"]["tasks"] == 4
    assert report["aggregate"]["centred"] == pytest.approx(sum(r["centred"] for r in report["tasks"].values()) / 4)
    assert "arithmetic_choice" in printed and "| mine | acc_norm_nospace |" in (tmp_path / "results.md").read_text()

    # The same model through its Hugging Face export (load_any reads config.json + safetensors).
    export_hf(folder, tmp_path / "hf")
    again = evaluate(tmp_path / "hf", ["arithmetic", "code_tokens@mcf"], task_files=[str(task_file)], limit=6,
                     num_fewshot=1, device="cpu", progress=False)
    for name, result in again["tasks"].items():
        for key, value in result.items():
            assert value == pytest.approx(report["tasks"][name][key], abs=1e-9), (name, key)


def _validation_setup(tmp_path, **eval_config):
    """A tiny model and a config with two tokenized validation sources; also the tokenizer."""
    from smoltrain.data.tokenize_shards import tokenize

    tok = tiny_tokenizer()
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    texts = {"code": ["def parse(items):\n    for value in items:\n        print(value)\n"] * 30,
             "prose": ["The semantics for a slicing are as follows. The primary must evaluate to a mapping object."] * 30}
    validation = {}
    for source, docs in texts.items():
        raw = tmp_path / f"{source}.jsonl"
        raw.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        tokenize(str(tok_path), [str(raw)], tmp_path / source, name="validation", show_progress=False)
        validation[source] = str(tmp_path / source)
    model = tiny_model()
    config = Config(model=model.config,
                    data=DataConfig(seq_len=32, tokenizer=str(tok_path), sources=validation, validation=validation),
                    eval=EvalConfig(**eval_config))
    return model, config, tok


@pytest.mark.slow
def test_evaluation_during_training_reports_validation_bpb_per_source_and_tasks(tmp_path):
    from smoltrain.data.loader import validation_batches

    model, config, tok = _validation_setup(tmp_path, tasks=["arithmetic_choice", "code_tokens"], limit=8,
                                           val_batches=2, batch_size=3)
    result = evaluate_during_training(model, config, torch.device("cpu"))
    assert set(result) == {"val", "tasks", "aggregate"}
    assert set(result["val"]) == {"code", "prose"}
    lengths = token_byte_lengths(tok)
    for source, values in result["val"].items():
        expected = validation_metrics(model, validation_batches(config, source, 2, 3), lengths)
        assert values == pytest.approx(expected)
        assert values["tokens"] == 2 * 3 * 32
    assert set(result["tasks"]) == {"arithmetic_choice", "code_tokens"}
    assert all(r["n"] == 8 for r in result["tasks"].values())
    assert result["aggregate"]["tasks"] == 2
    # The dict goes to metrics.jsonl as it is.
    json.dumps(result)


def test_validation_split_over_data_parallel_ranks_adds_up_and_keeps_ranks_in_lockstep(tmp_path, monkeypatch):
    """Each of 2 data-parallel ranks scores every 2nd batch; their sums add up to the 1-rank result,
    and both run the same number of forwards (FSDP gathers weights in each: a mismatch hangs)."""
    from smoltrain.eval import validation
    from smoltrain.eval.validation import metrics_from_sums, validation_per_source

    model, config, _ = _validation_setup(tmp_path)
    # 2 rows per forward: batches of 3 take 2 forwards; rank 0 gets batches 0 and 2, rank 1 batch 1.
    monkeypatch.setattr(validation, "LOGPROB_CHUNK_ELEMENTS", 2 * 32 * model.config.vocab_size)
    whole = validation_per_source(model, config, num_batches=3, batch_size=3)
    sums, forwards = [], []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, group=None: sums.append(tensor.clone()))
    for rank in range(2):
        calls = []
        hook = model.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(args[0].shape[0]))
        validation_per_source(model, config, num_batches=3, batch_size=3, data_parallel=(rank, 2, None))
        hook.remove()
        forwards.append(len(calls))
    assert forwards[0] == forwards[1] == 2 * 4  # 2 sources x (2 + 2) forwards; rank 1 pads 2 of them
    for i, source in enumerate(whole):  # sums arrive source by source, rank 0's then rank 1's
        added = metrics_from_sums(sums[i] + sums[len(whole) + i])
        assert added["tokens"] == whole[source]["tokens"] == 3 * 3 * 32
        assert added == pytest.approx(whole[source])
