"""The demo: its unigram baseline against a brute-force count, its budget arithmetic and stage
bookkeeping by hand, and the whole playbook end to end on a tiny recipe (a few percent of the
embedded corpus, a model of a few thousand parameters): the report card's rows and the exported
model card."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from smoltrain.cli import main
from smoltrain.config import DataConfig
from smoltrain.data.shards import ShardWriter, shard_name, token_dtype, write_meta
from smoltrain.demo.chain import STAGE_FLOOR, TRAIN_SHARES, nominal_seconds, parse_stages, reused_records, stage_seconds
from smoltrain.demo.steps import DemoSizes
from smoltrain.eval.validation import unigram_losses
from smoltrain.files import write_json
from smoltrain.train.speed import fastest_config


def _shard(folder: Path, documents: list[list[int]], vocab: int) -> None:
    folder.mkdir(parents=True)
    with ShardWriter(folder, shard_name("s", 0), token_dtype(vocab)) as writer:
        for doc in documents:
            writer.add_document(np.array(doc))
        entry = writer.close()
    write_meta(folder, shards=[entry], dtype=token_dtype(vocab), vocab_size=vocab, tokenizer_hash=None)


def test_unigram_loss_matches_a_brute_force_count(tmp_path):
    vocab = 10
    rng = np.random.default_rng(0)
    train = [rng.integers(0, 6, size=n).tolist() for n in (5, 17, 40)]  # ids 6..9 never seen in training
    val = [[0, 1, 1, 2, 9], [3, 3, 5]]
    _shard(tmp_path / "train", train, vocab)
    _shard(tmp_path / "val", val, vocab)
    data = DataConfig(sources={"a": str(tmp_path / "train")}, validation={"a": str(tmp_path / "val")})
    counts = Counter(t for doc in train for t in doc)
    total = sum(counts.values())
    tokens = [t for doc in val for t in doc]
    expected = -sum(math.log((counts[t] + 0.5) / (total + 0.5 * vocab)) for t in tokens) / len(tokens)
    assert unigram_losses(data, vocab) == {"a": pytest.approx(expected, rel=1e-12)}


def test_each_stage_gets_its_share_of_what_is_left_but_never_less_than_its_floor():
    nominal = nominal_seconds(600.0, ["pretrain", "sft", "apo", "grpo"])  # no ablation: shares renormalised
    total = TRAIN_SHARES["pretrain"] + TRAIN_SHARES["sft"] + TRAIN_SHARES["apo"] + TRAIN_SHARES["grpo"]
    assert nominal["sft"] == pytest.approx(600.0 * TRAIN_SHARES["sft"] / total)
    assert sum(nominal.values()) == pytest.approx(600.0)
    pending = ["sft", "apo", "grpo", "merge"]  # merge trains nothing: no share
    share = TRAIN_SHARES["sft"] / (TRAIN_SHARES["sft"] + TRAIN_SHARES["apo"] + TRAIN_SHARES["grpo"])
    assert stage_seconds("sft", 400.0, pending, nominal["sft"]) == pytest.approx(400.0 * share)
    # Pretraining overran on a loaded machine and 20 s are left: the floor, not 20 s x the share.
    assert stage_seconds("sft", 20.0, pending, nominal["sft"]) == pytest.approx(STAGE_FLOOR * nominal["sft"])
    assert stage_seconds("grpo", -50.0, ["grpo", "merge"], nominal["grpo"]) == pytest.approx(STAGE_FLOOR * nominal["grpo"])


def test_speed_choice_pays_each_stages_warm_compile():
    probe = {"configs": {"fp32 eager": {"tokens_per_s": 7000.0, "compile": "off"},
                         "bf16 compile": {"tokens_per_s": 12000.0, "compile": "on", "compile_s": 60.0, "recompile_s": 8.0}}}
    # 300 s: 7000 x 300 = 2.1M tokens eager; 12000 x (300 - 3 x 8) = 3.3M compiled
    assert fastest_config(probe, 300.0, 3) == "bf16 compile"
    # 20 s: 140k eager; 12000 x (20 - 3 x 8) < 0 -> nothing
    assert fastest_config(probe, 20.0, 3) == "fp32 eager"


def test_stages_are_named_in_playbook_order_and_typos_get_a_hint(tmp_path, capsys):
    assert parse_stages("merge, sft") == ["sft", "merge"]
    assert parse_stages(None)[:2] == ["ablation", "pretrain"]
    out = tmp_path / "demo"
    out.mkdir()
    write_json(out / "demo.json", {"stages": {}})
    assert main(["demo", "--out", str(out), "--stages", "sfft"]) == 2
    assert "unknown stage 'sfft' (did you mean 'sft'?)" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--stages", "grpo"]) == 2  # nothing to start from
    assert "--stages grpo needs a finished sft stage" in capsys.readouterr().err


def test_set_names_a_stage_and_a_key(tmp_path, capsys):
    """`--set STAGE:KEY=VALUE` changes one stage's recipe; a missing stage or an unknown one is a one-line error."""
    assert main(["demo", "--out", str(tmp_path / "d"), "--set", "optim.lr=1e-3"]) == 2
    assert "--set optim.lr=1e-3: expected STAGE:KEY=VALUE" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "d"), "--set", "sftt:optim.lr=1e-3"]) == 2
    assert "--set sftt:...: no such demo stage" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_a_rerun_stage_makes_the_stages_after_it_stale(tmp_path):
    done = {stage: {"done": True, "model": f"m/{stage}"} for stage in ("ablation", "pretrain", "sft", "apo", "grpo", "merge")}
    write_json(tmp_path / "demo.json", {"stages": done})
    assert set(reused_records(tmp_path, ["grpo"])) == {"ablation", "pretrain", "sft", "apo", "merge"}
    assert set(reused_records(tmp_path, ["apo", "merge"])) == {"ablation", "pretrain", "sft"}  # GRPO started from APO
    assert set(reused_records(tmp_path, ["sft"])) == {"ablation", "pretrain"}
    done["sft"]["done"] = False  # a stage that did not finish is never reused
    write_json(tmp_path / "demo.json", {"stages": done})
    assert "sft" not in reused_records(tmp_path, ["merge"])


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "is not a demo folder" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


TINY_RECIPE = {
    "model": {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 96, "max_seq_len": 64},
    "data": {"embedded": True, "embedded_vocab_size": 512, "embedded_fraction": 0.03, "seq_len": 64},
    "optim": {"lr": 1e-2, "warmup_steps": 2, "schedule": "cosine", "min_lr": 1e-3},
    "train": {"global_batch_tokens": 512, "micro_batch_size": 8, "device": "cpu", "tensorboard": False},
    "eval": {"batch_size": 8},
}


TINY_SIZES = DemoSizes(sft_rows_per_step=8, chat_items=2, think_items=2, suite_items=4, val_batches=1, chat_new_tokens=8,
                       think_new_tokens=12, sample_new_tokens=8, preference_prompts=8, apo_pairs_per_step=4, apo_epochs=1,
                       soup_checkpoints=2, rejected_temperature=1.0)
# the stages' recipes shrunk the way a user changes them: `--set STAGE:KEY=VALUE`
TINY_OVERRIDES = {"sft": ["sft.embedded_conversations=64"],
                  "grpo": ["grpo.prompts_per_step=2", "grpo.num_generations=2", "grpo.max_completion_length=8",
                           "grpo.overlong_max_len=8", "grpo.overlong_cache=4", "grpo.eval_count=2", "train.micro_batch_size=4"]}
ROW_TITLES = ["base (pretrained)", "SFT", "APO-zero", "GRPO", "merged"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    """One embedded corpus, tokenizer and shards for the demo runs of this file (built by the first)."""
    return tmp_path_factory.mktemp("cache")


def _tiny_demo_recipe(tmp_path: Path, cache: Path) -> Path:
    recipe = tmp_path / "tiny.yaml"
    # Rows of 256: a chat with the smollm3 system block does not fit 64 tokens of a 512-token vocabulary.
    recipe.write_text(yaml.safe_dump({
        **TINY_RECIPE, "model": {**TINY_RECIPE["model"], "max_seq_len": 256},
        "data": {**TINY_RECIPE["data"], "seq_len": 256, "cache_dir": str(cache)},
        "train": {**TINY_RECIPE["train"], "global_batch_tokens": 2048}}))
    return recipe


@pytest.mark.slow
def test_demo_end_to_end_on_a_tiny_recipe(tmp_path, data_cache, capsys, monkeypatch):
    recipe = _tiny_demo_recipe(tmp_path, data_cache)
    out = tmp_path / "demo"
    from smoltrain.demo import demo

    # Six SFT steps teach a model of a few thousand parameters neither to write (greedy replies are
    # blank: the replies are sampled here) nor to end its turn, and a pair whose rejected reply was
    # cut at the token limit is dropped: accept cut rejected replies here (still verified wrong),
    # so the APO and merge stages run.
    from smoltrain.post.preference import generate as preference_gen

    real = preference_gen.verdict
    monkeypatch.setattr(preference_gen, "verdict", lambda prompt, chosen, rejected, verify: real(
        prompt, chosen, {**rejected, "stopped": True}, verify))

    html_path = demo(str(out), minutes=1, recipe=str(recipe), steps={"ablation": 2, "pretrain": 4, "sft": 6, "apo": 3, "grpo": 2},
                     sizes=TINY_SIZES, speed="fp32 eager", overrides=TINY_OVERRIDES)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith(f"report: {html_path}")  # the report path comes last

    markdown = (out / "report.md").read_text()
    for section in ("Report card", "1. Data", "2. Speed", "3. Ablation", "4. Pretraining", "5. Pretraining evals", "6. Post-training",
                    "7. Sample chats", "8. Hugging Face export", "9. Wall time per stage"):
        assert f"## {section}" in markdown
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == len(re.findall(r"!\[", markdown)) >= 6

    # The report card: one row per stage in playbook order, each with its chat evals or why it is missing.
    card = markdown[markdown.index("## Report card"):markdown.index("## 1. Data")]
    lines = [line for line in card.splitlines() if line.startswith("| ") and not line.startswith("| stage")]
    assert [line.split(" | ")[0].removeprefix("| ") for line in lines[:5]] == ROW_TITLES
    rows = {json.loads(p.read_text())["model"]: json.loads(p.read_text()) for p in (out / "rows").glob("*.json")}
    for line in lines[:5]:
        assert re.fullmatch(r"\d+% ± \d+", line.split(" | ")[2]), line  # no_think accuracy with its standard error
    base = json.loads((out / "rows" / "base.json").read_text())
    assert set(base["chat"]) >= {"no_think_accuracy", "think_accuracy", "adherence", "think_format", "stop_rate",
                                 "no_think_length", "think_length", "no_think_accuracy_stderr"}
    assert base["chat"]["n"] == {"no_think": 2, "think": 2, "persona": 2}
    assert len(base["chat"]["items"]["no_think_accuracy"]) == 2  # per item: stages are compared paired
    assert set(base["val"]) == {"prose", "code", "math"}
    assert len(rows) == len(list((out / "rows").glob("*.json")))

    # The exported model is the last stage's, and its model card walks the stages back to pretraining.
    card_md = (out / "hf" / "README.md").read_text()
    listed = re.findall(r"^\| \d+ \| (\w+) \|", card_md, re.M)
    assert list(dict.fromkeys(listed)) == ["pretrain", "sft", "dpo", "merge"]
    # ... with each stage's chat evals beside its pretraining evals (the same numbers as the report card)
    accuracy = re.search(r"^\| chat/no_think_accuracy \| (.+) \|$", card_md, re.M).group(1).split(" | ")
    final = json.loads((out / "rows" / "merged.json").read_text())
    assert float(accuracy[0]) == pytest.approx(base["chat"]["no_think_accuracy"], rel=1e-3)
    assert float(accuracy[-1]) == pytest.approx(final["chat"]["no_think_accuracy"], rel=1e-3)
    assert "LlamaForCausalLM" in markdown and "greedy continuations are identical" in markdown
    diff = float(re.search(r"logits differ from ours by at most ([0-9.e+-]+)", markdown).group(1))
    assert diff <= 1e-4
    ablation = json.loads((out / "ablation" / "results.json").read_text())
    assert set(ablation["arms"]) == {"baseline", "no-document-masking"}
    assert ablation["budget"]["steps"] == 2

    # --stages: re-run the last stages only, reusing the others from the same folder.
    demo(str(out), minutes=1, recipe=str(recipe), stages="merge", sizes=TINY_SIZES, speed="fp32 eager")
    marker = json.loads((out / "demo.json").read_text())
    assert marker["stages"]["merge"]["done"] and marker["stages"]["pretrain"]["steps"] == 4
    assert (out / "pretrain" / "metrics.jsonl").is_file() and (out / "report.html").is_file()


@pytest.mark.slow
def test_long_context_stage_extends_the_base_model_8x_and_scores_it_before_and_after(tmp_path, data_cache, capsys):
    """`--stages pretrain,long-context`: the extended model's length and RoPE base are 8x the recipe's (ABF),
    the base, base + YaRN and ABF models are scored up to 8x, and the ABF row's loss by position is what
    `smoltrain eval` reports for that model."""
    from smoltrain.config import load_config
    from smoltrain.demo import demo
    from smoltrain.eval.run import evaluate

    out, sizes = tmp_path / "demo", DemoSizes(**{**asdict(TINY_SIZES), "needles": 2, "long_val_batches": 2})
    demo(str(out), minutes=1, recipe=str(_tiny_demo_recipe(tmp_path, data_cache)), stages="pretrain,long-context",
         steps={"pretrain": 4, "long-context": 2}, sizes=sizes, speed="fp32 eager")
    record = json.loads((out / "demo.json").read_text())["stages"]["long-context"]
    base, extended = load_config(out / "pretrain" / "config.yaml"), load_config(Path(record["model"]) / "config.yaml")
    assert extended.model.max_seq_len == extended.data.seq_len == 8 * base.data.seq_len == 2048
    assert extended.model.rope_theta == 8 * base.model.rope_theta
    assert extended.model.hidden_size == base.model.hidden_size and record["summary"]["step"] == 2
    evals = record["evals"]
    assert evals["lengths"] == [256, 512, 1024, 2048] and list(evals["models"]) == ["base", "base + YaRN x8", "ABF x8"]
    for model in evals["models"].values():
        assert all(0 <= model["needle"][str(n)] <= 1 for n in evals["lengths"])
        assert [b["end"] for b in model["loss_by_position"]["prose"]][-1] == 2048
    theirs = evaluate(record["model"], ["passkey@256"], limit=1, val_batches=2, batch_size=2, position_buckets=8,
                      device="cpu", progress=False)["loss_by_position"]
    for source, curve in theirs.items():
        ours = evals["models"]["ABF x8"]["loss_by_position"][source]
        assert [b["loss"] for b in ours] == pytest.approx([b["loss"] for b in curve], rel=1e-4)
    # YaRN changes the rotary frequencies: the stretched base scores differently from the base
    assert evals["models"]["base + YaRN x8"]["loss_by_position"] != evals["models"]["base"]["loss_by_position"]
    markdown, printed = (out / "report.md").read_text(), capsys.readouterr().out
    assert "## Long context" in markdown and "needle @2,048" in printed
    assert all(f"| {name} |" in markdown for name in evals["models"])
    card = markdown[markdown.index("## Report card"):markdown.index("## 1. Data")]
    assert "| SFT | - |" in card  # the default card is unchanged: a stage that did not run says so


def test_time_box_stops_the_trainer_which_saves_and_returns(tmp_path):
    """A stage's time box (what the demo runs each stage in): the real trainer, told to run 100,000 steps,
    stops at the deadline with a complete checkpoint, and the caller goes on."""
    from smoltrain.config import config_from_dict
    from smoltrain.data.synthetic import write_synthetic_shards
    from smoltrain.stages import STAGES
    from smoltrain.train.checkpoint import load_model_from_checkpoint

    write_synthetic_shards(tmp_path / "data", 50_000, vocab_size=64, mean_document_tokens=50)
    config = config_from_dict({
        "model": {"vocab_size": 64, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                  "intermediate_size": 32, "max_seq_len": 16},
        "data": {"sources": {"toy": str(tmp_path / "data")}, "seq_len": 16},
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 100_000, "global_batch_tokens": 64, "micro_batch_size": 4,
                  "log_every": 50, "save_every": 100_000, "eval_every": 100_000, "device": "cpu", "tensorboard": False},
    })
    told = []
    summary, stopped = STAGES["pretrain"].run_for(config, 2.0, on_deadline=lambda: told.append(True))
    assert stopped and told == [True] and not summary["finished"] and summary["stopped_by"] == "should_stop"
    assert 0 < summary["step"] < 100_000
    model, saved = load_model_from_checkpoint(tmp_path / "run", "cpu")
    assert saved.train.max_steps == 100_000


def test_stages_scored_on_the_same_items_are_compared_item_by_item():
    """A paired comparison: 20 of 400 items turned right and none wrong is a clear move, although the
    two rows' own standard errors (+-2.4 points each) overlap; the standard error is that of the
    per-item differences, checked against numpy."""
    from smoltrain.demo.report import moved
    from smoltrain.post.chat.evals import paired_difference

    rng = np.random.default_rng(0)
    start = (rng.random(400) < 0.3).astype(float)
    better = start.copy()
    better[np.flatnonzero(start == 0)[:20]] = 1.0

    def row(values):
        p = values.mean()
        return {"chat": {"adherence": p, "adherence_stderr": float(np.sqrt(p * (1 - p) / 399)),
                         "no_think_accuracy": p, "no_think_accuracy_stderr": float(np.sqrt(p * (1 - p) / 399)),
                         "items": {"adherence": values.tolist(), "no_think_accuracy": values.tolist()}}}

    diff, stderr = paired_difference(row(start)["chat"], row(better)["chat"], "adherence")
    d = better - start
    assert diff == pytest.approx(d.mean()) and stderr == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))
    assert moved({"sft": row(start), "apo": row(better)}, "apo").startswith("adherence +5 pts (moved)")
    unpaired = {name: {"chat": {k: v for k, v in r["chat"].items() if k != "items"}}
                for name, r in (("sft", row(start)), ("apo", row(better)))}
    assert moved(unpaired, "apo").startswith("adherence +5 pts (no clear change)")  # the old, unpaired test
    # turns both ways that nearly cancel: no clear change, paired or not
    mixed = better.copy()
    mixed[np.flatnonzero(start == 1)[:15]] = 0.0
    assert moved({"sft": row(start), "apo": row(mixed)}, "apo").startswith("adherence +1 pts (no clear change)")
    # rows scored on different numbers of items are not paired
    assert paired_difference(row(start)["chat"], row(better[:200])["chat"], "adherence") is None


def test_a_stage_moved_its_target_when_the_difference_exceeds_two_combined_standard_errors():
    from smoltrain.demo.report import moved

    def row(**chat):
        return {"chat": chat, "val": {"prose": {"loss": chat.pop("loss", 5.0)}}}

    base = row(no_think_accuracy=0.0, no_think_accuracy_stderr=0.0, adherence=0.0, adherence_stderr=0.0,
               think_format=0.0, think_format_stderr=0.0, stop_rate=0.0, stop_rate_stderr=0.0)
    sft = row(no_think_accuracy=0.10, no_think_accuracy_stderr=0.06, adherence=0.5, adherence_stderr=0.07,
              think_format=1.0, think_format_stderr=0.0, stop_rate=0.0, stop_rate_stderr=0.0)
    verdicts = moved({"base": base, "sft": sft}, "sft")
    # 10 +- 6 points is inside 2 standard errors; 0% -> 100% with no noise on either side is a move;
    # the same 0% on both sides is no change
    assert verdicts == ("no_think_accuracy +10 pts (no clear change); adherence +50 pts (moved); "
                        "think_format +100 pts (moved); stop_rate +0 pts (no clear change)")
    apo = row(adherence=0.5, adherence_stderr=0.07, no_think_accuracy=0.1, no_think_accuracy_stderr=0.06,
              think_accuracy=0.1, think_accuracy_stderr=0.06, loss=4.5)
    merged = row(adherence=0.5, adherence_stderr=0.07, loss=4.2)
    grpo = row(no_think_accuracy=0.1, no_think_accuracy_stderr=0.06, no_think_length=6.9, no_think_length_stderr=0.01)
    apo["chat"].update(no_think_length=7.0, no_think_length_stderr=0.01)
    # a tenth of a token is 7 standard errors here, but no change worth a verdict
    assert moved({"apo": apo, "grpo": grpo}, "grpo") == ("no_think_accuracy +0 pts (no clear change); "
                                                          "no_think_length -0.1 tokens (no clear change)")
    assert moved({"apo": apo, "merged": merged}, "merged") == "adherence +0 pts (no clear change); val_loss -0.30"
