"""Ablations: noise verdicts on synthetic results with a known spread, the parameter-count warning,
the ablation file, resume of a half-finished grid, and a tiny ablation end to end."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from smoltrain.ablate.compare import BETTER, NO_SPREAD, WITHIN_NOISE, WORSE, compare, parameter_warnings, pooled_std
from smoltrain.ablate.grid import RECORD, ablate
from smoltrain.ablate.spec import load_ablation
from smoltrain.config import load_config
from smoltrain.errors import ConfigError
from smoltrain.model.transformer import Transformer

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "ablations"

TINY = {
    "model": {"vocab_size": 256, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 64, "max_seq_len": 64},
    "data": {"seq_len": 32},
    "train": {"global_batch_tokens": 128, "micro_batch_size": 4, "log_every": 5},
}


def _meta_count(model_cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(model_cfg).parameters())


# ----------------------------------------------------------------------------- noise and verdicts


def test_pooled_std_matches_numpy():
    rng = np.random.default_rng(0)
    groups = [rng.normal(3.0, 0.1, size=n).tolist() for n in (2, 3, 5, 1)]
    spread, dof = pooled_std(groups)
    used = [np.asarray(g) for g in groups if len(g) > 1]
    expected = math.sqrt(sum(np.var(g, ddof=1) * (len(g) - 1) for g in used) / sum(len(g) - 1 for g in used))
    assert dof == 1 + 2 + 4
    assert spread == pytest.approx(expected, rel=1e-12)


def test_verdicts_separate_real_effects_from_seed_noise():
    """Seed noise 0.01: a 0.1 shift (10 sigma) is a finding in the right direction, 0.002 is noise."""
    rng = np.random.default_rng(1)
    noise = lambda: rng.normal(0.0, 0.01, size=5).tolist()  # noqa: E731
    results = {
        "baseline": {"val/web/loss": [3.0 + e for e in noise()], "tasks/arc/acc": [0.40 + e for e in noise()]},
        "worse-loss": {"val/web/loss": [3.1 + e for e in noise()], "tasks/arc/acc": [0.50 + e for e in noise()]},
        "better-loss": {"val/web/loss": [2.9 + e for e in noise()], "tasks/arc/acc": [0.30 + e for e in noise()]},
        "same": {"val/web/loss": [3.002 + e for e in noise()], "tasks/arc/acc": [0.398 + e for e in noise()]},
    }
    got = {(v.variant, v.metric): v for v in compare(results, noise_sigma=2.0)}
    assert got["worse-loss", "val/web/loss"].verdict == WORSE  # loss: higher is worse
    assert got["worse-loss", "tasks/arc/acc"].verdict == BETTER  # accuracy: higher is better
    assert got["better-loss", "val/web/loss"].verdict == BETTER
    assert got["better-loss", "tasks/arc/acc"].verdict == WORSE
    assert got["same", "val/web/loss"].verdict == WITHIN_NOISE
    assert got["same", "tasks/arc/acc"].verdict == WITHIN_NOISE
    v = got["same", "val/web/loss"]
    spread, _ = pooled_std([results[a]["val/web/loss"] for a in results])
    assert v.threshold == pytest.approx(2.0 * spread * math.sqrt(1 / 5 + 1 / 5))
    assert v.difference == pytest.approx(np.mean(results["same"]["val/web/loss"]) - np.mean(results["baseline"]["val/web/loss"]))


def test_verdict_error_rates_match_the_known_spread():
    """Under no true difference the 2-sigma rule flags ~5% of ablations (t with 21 dof: 5.8%);
    a true difference of 5 standard errors is found almost always."""
    rng = np.random.default_rng(2)
    seeds, sigma = 8, 0.05
    se = sigma * math.sqrt(2 / seeds)
    false_alarms = hits = 0
    trials = 1000
    for _ in range(trials):
        arms = {"baseline": {"loss": rng.normal(2.0, sigma, seeds).tolist()},
                "null": {"loss": rng.normal(2.0, sigma, seeds).tolist()},
                "real": {"loss": rng.normal(2.0 - 5 * se, sigma, seeds).tolist()}}
        got = {v.variant: v.verdict for v in compare(arms)}
        false_alarms += got["null"] != WITHIN_NOISE
        hits += got["real"] == BETTER
    assert 0.025 < false_alarms / trials < 0.10
    assert hits / trials > 0.97


def test_one_seed_per_arm_has_no_spread_to_judge_by():
    got = compare({"baseline": {"loss": [3.0]}, "x": {"loss": [2.0]}})
    assert [v.verdict for v in got] == [NO_SPREAD] and got[0].threshold is None


# ----------------------------------------------------------------------------- parameter counts


def test_parameter_warning_only_above_five_percent():
    warnings = parameter_warnings({"baseline": 1_000_000, "plus4": 1_040_000, "minus6": 940_000, "plus6": 1_060_001})
    assert set(warnings) == {"minus6", "plus6"}
    assert "-6.0%" in warnings["minus6"] and "equal parameters" in warnings["minus6"]


def test_example_ablations_compare_at_equal_parameters():
    """The architecture ablations shipped in recipes/ablations keep every variant within 5% of the
    baseline (counted on a real model built on the meta device, not with the counting formula)."""
    for name in ("attention-heads", "tied-embeddings", "document-masking", "rope-nope"):
        spec = load_ablation(RECIPES / f"{name}.yaml")
        counts = {v: _meta_count(spec.config_for(v, 0).model) for v in spec.variants}
        assert parameter_warnings(counts) == {}, name
    untied = load_ablation(RECIPES / "tied-embeddings.yaml").config_for("untied", 0).model
    assert not untied.tie_embeddings
    heads = load_ablation(RECIPES / "attention-heads.yaml")
    assert sorted(heads.config_for(v, 0).model.num_kv_heads for v in heads.variants) == [1, 2, 4, 8]


def test_every_shipped_ablation_file_loads_and_shares_the_baseline():
    files = sorted(p for p in RECIPES.glob("*.yaml") if p.name != "baseline.yaml")
    assert len(files) >= 5
    baseline = load_config(RECIPES / "baseline.yaml")
    for path in files:
        spec = load_ablation(path)
        assert len(spec.variants) >= 2 and len(spec.seeds) >= 2
        if spec.stage != "pretrain":
            continue  # a post-training ablation starts from its own recipe (tests/test_grpo_train.py)
        config = spec.config_for("baseline", spec.seeds[0])
        assert config.model == baseline.model
        assert config.train.max_steps == math.ceil(spec.budget_tokens / baseline.train.global_batch_tokens)


# ----------------------------------------------------------------------------- the ablation file


def _write(tmp_path, data) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("change, message", [
    ({"variantz": {}}, r"ablation.yaml:\d+: unknown key 'variantz' \(did you mean 'variants'\?\)"),
    ({"variants": {"a": ["train.seed=3"]}}, r"'train.seed' is set by the ablation itself"),
    ({"variants": {"a": {"eval.limit": 3}}}, r"'eval.limit' is set by the ablation itself"),
    ({"variants": {"a": ["model.num_kv_heads=3"]}}, r"variants.a: model.num_heads \(4\) must be divisible by model.num_kv_heads \(3\)"),
    ({"variants": {"a": ["model.nonsense=1"]}}, r"variants.a: unknown key 'model.nonsense'"),
    ({"variants": {"baseline": ["model.num_kv_heads=1"]}}, r"'baseline' is reserved"),
    ({"budget": {"steps": 0}}, r"budget.steps: expected a positive integer"),
    ({"budget": {"epochs": 2}}, r"budget: expected \{steps: N\} or \{tokens: N\}"),
    ({"seeds": [1, 1]}, r"seeds: repeated seed"),
    ({"baseline": "missing.yaml"}, r"baseline: recipe .*missing.yaml not found"),
])
def test_bad_ablation_files_name_the_key(tmp_path, change, message):
    data = {"baseline": TINY, "variants": {"a": ["model.num_kv_heads=1"]}, "seeds": [0, 1], "budget": {"steps": 10}}
    data.update(change)
    with pytest.raises(ConfigError, match=message):
        load_ablation(_write(tmp_path, data))


def test_token_budget_becomes_steps_per_variant_batch(tmp_path):
    data = {"baseline": TINY, "variants": {"big-batch": ["train.global_batch_tokens=256"]}, "seeds": 2,
            "budget": {"tokens": 1000}}
    spec = load_ablation(_write(tmp_path, data))
    assert spec.seeds == [0, 1]
    assert spec.config_for("baseline", 0).train.max_steps == 8  # ceil(1000 / 128)
    assert spec.config_for("big-batch", 1).train.max_steps == 4  # ceil(1000 / 256)
    assert spec.config_for("big-batch", 1).train.seed == 1
    assert spec.config_for("big-batch", 1).train.out_dir.endswith("runs/big-batch/seed1")


# ----------------------------------------------------------------------------- grid and resume


class FakeTrainer:
    """Writes metrics.jsonl like the trainer, resuming from its own last logged step; the loss
    depends on the config (untied is 0.2 better) and on the seed. Can be told to die mid-run."""

    def __init__(self, die_in_call: int | None = None, die_at_step: int = 0):
        self.calls: list[tuple[str, int, int]] = []  # (run dir name, seed, first step trained)
        self.die_in_call, self.die_at_step = die_in_call, die_at_step

    def __call__(self, config):
        run = Path(config.train.out_dir)
        run.mkdir(parents=True, exist_ok=True)
        metrics = run / "metrics.jsonl"
        done = 0
        if metrics.is_file():
            done = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
        self.calls.append((run.parent.name, config.train.seed, done + 1))
        effect = 0.0 if config.model.tie_embeddings else -0.2
        with metrics.open("a") as f:
            for step in range(done + 1, config.train.max_steps + 1):
                if len(self.calls) == self.die_in_call and step == self.die_at_step:
                    raise KeyboardInterrupt
                if step % config.train.log_every == 0 or step == config.train.max_steps:
                    noise = random.Random(f"{config.train.seed}/{step}").gauss(0.0, 0.01)
                    loss = 2.0 + 3.0 * math.exp(-step / 10) + effect + noise
                    f.write(json.dumps({"step": step, "tokens": step * 128, "loss": loss, "lr": 1e-3, "grad_norm": 1.0,
                                        "tokens_per_s": 1000.0, "mfu": None, "elapsed_s": step * 0.1}) + "\n")
                    f.flush()
            f.write(json.dumps({"step": config.train.max_steps, "eval": {
                "val": {"web": {"loss": loss + 0.1, "bpb": 1.0, "tokens": 512}}}}) + "\n")
        return {"step": config.train.max_steps}


def _spec(tmp_path, seeds=(0, 1, 2)):
    data = {"baseline": TINY, "variants": {"untied": {"model.tie_embeddings": False}}, "seeds": list(seeds),
            "budget": {"steps": 20}}
    return load_ablation(_write(tmp_path, data), out_dir=str(tmp_path / "out"))


def _no_eval(config, run_dir):
    raise AssertionError("the trainer logged a final evaluation; nothing to evaluate again")


def test_resume_of_a_half_finished_ablation_reruns_only_what_is_missing(tmp_path):
    spec = _spec(tmp_path)
    trainer = FakeTrainer(die_in_call=3, die_at_step=12)  # killed in the 3rd run (baseline seed 1), step 12
    with pytest.raises(KeyboardInterrupt):
        ablate(spec=spec, train_fn=trainer, evaluate_fn=_no_eval)
    assert [c[:2] for c in trainer.calls] == [("baseline", 0), ("untied", 0), ("baseline", 1)]
    assert json.loads((spec.run_dir("baseline", 1) / RECORD).read_text())["finished"] is False

    resumed = FakeTrainer()
    results = ablate(spec=spec, train_fn=resumed, evaluate_fn=_no_eval)
    # Finished runs are not touched; the killed one continues after its last logged step (10).
    assert resumed.calls == [("baseline", 1, 11), ("untied", 1, 1), ("baseline", 2, 1), ("untied", 2, 1)]

    again = FakeTrainer()
    ablate(spec=spec, train_fn=again, evaluate_fn=_no_eval)
    assert again.calls == []

    # The resumed grid gives the same numbers as one that was never interrupted.
    fresh = _spec(tmp_path / "fresh")
    reference = ablate(spec=fresh, train_fn=FakeTrainer(), evaluate_fn=_no_eval)
    strip = lambda r: {a: d["metrics"] for a, d in r["arms"].items()}  # noqa: E731
    assert strip(results) == strip(reference)
    verdict = {(v["variant"], v["metric"]): v["verdict"] for v in results["verdicts"]}
    assert verdict["untied", "train/final_loss"] == BETTER
    assert verdict["untied", "val/web/loss"] == BETTER
    assert "untied" in results["parameter_warnings"]  # untied at the same width: +26% parameters
    on_disk = json.loads((Path(spec.out_dir) / "results.json").read_text())
    assert on_disk["verdicts"] == results["verdicts"]
    assert Path(results["report_md"]).is_file() and Path(results["report_html"]).is_file()
    for png in ("loss_curves.png", "eval.png", "throughput.png", "parameters.png"):
        assert (Path(spec.out_dir) / "figures" / png).read_bytes()[:4] == b"\x89PNG"


def test_run_that_reached_its_budget_is_only_evaluated(tmp_path):
    spec = _spec(tmp_path, seeds=(0, 1))
    trainer = FakeTrainer()
    ablate(spec=spec, train_fn=trainer, evaluate_fn=_no_eval)
    run = spec.run_dir("untied", 1)
    record = json.loads((run / RECORD).read_text())
    record["finished"] = False  # killed after training, before its evaluation was recorded
    (run / RECORD).write_text(json.dumps(record))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # the final eval line is lost
    evaluated = []

    def evaluate(config, run_dir):
        evaluated.append(Path(run_dir))
        return {"val": {"web": {"loss": 2.5, "bpb": 1.0, "tokens": 512}}}

    again = FakeTrainer()
    ablate(spec=spec, train_fn=again, evaluate_fn=evaluate)
    assert again.calls == [] and evaluated == [run]


def test_changed_config_in_an_existing_run_folder_is_an_error(tmp_path):
    spec = _spec(tmp_path, seeds=(0, 1))
    ablate(spec=spec, train_fn=FakeTrainer(), evaluate_fn=_no_eval)
    data = yaml.safe_load((tmp_path / "ablation.yaml").read_text())
    data["baseline"]["model"]["hidden_size"] = 64
    changed = load_ablation(_write(tmp_path, data), out_dir=spec.out_dir)
    with pytest.raises(ConfigError, match=r"seed0 was trained with a different config: model.hidden_size \(32 then, 64 now\)"):
        ablate(spec=changed, train_fn=FakeTrainer(), evaluate_fn=_no_eval)


# ----------------------------------------------------------------------------- end to end


def _counting_shards(folder: Path, num_documents: int, vocab: int, seed: int) -> None:
    """Documents that count upward modulo the vocabulary from a random start: learnable in a few steps."""
    from smoltrain.data.shards import ShardWriter, shard_name, token_dtype, write_meta

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 40, size=num_documents)
    starts = rng.integers(1, vocab, size=num_documents)
    tokens = np.concatenate([(s + np.arange(n)) % (vocab - 1) + 1 for s, n in zip(starts, lengths)])
    with ShardWriter(folder, shard_name("toy", 0), token_dtype(vocab)) as writer:
        writer.add_documents(tokens, lengths)
        entry = writer.close()
    write_meta(folder, shards=[entry], dtype=token_dtype(vocab), vocab_size=vocab, tokenizer_hash=None)


@pytest.mark.slow
def test_tiny_ablation_end_to_end_with_the_real_trainer_and_evaluation(tmp_path):
    from smoltrain.ablate.grid import train_with_trainer
    from smoltrain.data.tokenizer import save_tokenizer, train_tokenizer

    # A byte-level tokenizer of 320 tokens only gives bits per byte their byte counts.
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 50, 320, False)
    tokenizer, vocab = save_tokenizer(tok, tmp_path / "tok"), tok.get_vocab_size()  # about 290 tokens
    _counting_shards(tmp_path / "train", 2000, vocab, seed=0)
    _counting_shards(tmp_path / "val", 200, vocab, seed=1)
    baseline = {
        "model": {"vocab_size": 320, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64, "max_seq_len": 32},
        "data": {"sources": {"toy": str(tmp_path / "train")}, "validation": {"toy": str(tmp_path / "val")}, "seq_len": 32,
                 "tokenizer": str(tokenizer)},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "schedule": "constant"},
        "train": {"global_batch_tokens": 256, "micro_batch_size": 8, "log_every": 2, "save_every": 1000,
                  "eval_every": 1000, "device": "cpu", "tensorboard": False},
    }
    data = {"baseline": baseline, "variants": {"no-document-masking": ["model.document_masking=false"]},
            "seeds": [0, 1], "budget": {"steps": 12}, "eval": {"val_batches": 2, "batch_size": 4}}
    spec = load_ablation(_write(tmp_path, data), out_dir=str(tmp_path / "out"))
    calls = []
    counting = lambda config: calls.append(config.train.out_dir) or train_with_trainer(config)  # noqa: E731

    results = ablate(spec=spec, train_fn=counting)
    assert len(calls) == 4
    assert results["parameter_warnings"] == {}  # masking changes no parameter
    for arm in ("baseline", "no-document-masking"):
        val = results["arms"][arm]["metrics"]["val/toy/loss"]
        assert len(val["values"]) == 2
        assert max(val["values"]) < math.log(vocab) - 1.0  # learned the counting pattern, far below uniform
        for run in results["arms"][arm]["runs"]:
            assert run["tokens"] == 12 * 256
            assert (Path(run["run_dir"]) / "checkpoints" / "latest").is_file()
    metrics = {v["metric"] for v in results["verdicts"] if v["variant"] == "no-document-masking"}
    assert {"train/final_loss", "val/toy/loss", "val/toy/bpb"} <= metrics
    assert all(v["verdict"] in (BETTER, WORSE, WITHIN_NOISE) for v in results["verdicts"])
    assert "## Verdicts" in Path(results["report_md"]).read_text()

    ablate(spec=spec, train_fn=counting)  # everything finished: nothing is trained again
    assert len(calls) == 4


def test_ablate_cli_reports_a_bad_file_in_one_line(tmp_path, capsys):
    from smoltrain.cli import main

    path = _write(tmp_path, {"baseline": TINY, "variants": {"a": ["model.num_kv_heads=3"]}, "seeds": [0], "budget": {"steps": 1}})
    assert main(["ablate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "variants.a: model.num_heads (4) must be divisible by model.num_kv_heads (3)" in err
