"""Round 2 of hardening (issue 24), post-training a real model as a new user would: explicit steps win
over SFT's derived ones, inputs are checked before step 1, finished runs say so, and more."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import types
from pathlib import Path

import pytest
import yaml
from chat_helpers import BOILERPLATE, VOCAB, chat_tokenizers, conversations
from rich.console import Console

from smoltrain import cli
from smoltrain.config import Config, DataConfig, ModelConfig
from smoltrain.model.transformer import build_model
from smoltrain.post.chat.data import write_conversations
from smoltrain.post.sft.stage import load_sft_config
from smoltrain.train.load_model import save_model_folder

SEQ = 128
MODEL = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 64, "max_seq_len": SEQ, "nope_every": 2}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = chat_tokenizers(tmp_path_factory.mktemp("hardening_post"))
    config = Config(model=ModelConfig(**MODEL), data=DataConfig(seq_len=SEQ))
    save_model_folder(build_model(config.model, seed=3), config, root / "init", tokenizer=root / "base")
    write_conversations(root / "chat.jsonl", conversations(24))
    return root


def sft_recipe(root: Path, out: Path, **train_keys) -> dict:
    """SFT's own defaults for sft.epochs (2) and sft.warmup_fraction (0.03): the recipe leaves them out."""
    return {
        "data": {"seq_len": SEQ},
        "sft": {"data": [str(root / "chat.jsonl")], "chat_eval_items": 0},
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "train": {"init": str(root / "init"), "out_dir": str(out), "log_every": 1, "save_every": 100,
                  "eval_every": 1000, "global_batch_tokens": 2 * SEQ, "micro_batch_size": 2, "tensorboard": False,
                  "device": "cpu", "compile": "off", "precision": "fp32", **train_keys},
        "eval": {"val_batches": 0},
    }


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_an_explicit_max_steps_wins_over_sfts_epochs_in_the_run_and_in_smoltrain_config(root, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", sft_recipe(root, tmp_path / "run", max_steps=3))
    config = load_sft_config(path, ["optim.warmup_steps=1"])
    assert (config.sft.epochs, config.train.max_steps, config.sft.warmup_fraction, config.optim.warmup_steps) == (None, 3, None, 1)
    derived = load_sft_config(write_recipe(tmp_path / "d.yaml", sft_recipe(root, tmp_path / "run")))
    assert (derived.sft.epochs, derived.sft.warmup_fraction) == (2.0, 0.03)  # nothing given: SFT derives them

    assert cli.main(["config", str(path)]) == 0
    printed = capsys.readouterr().out
    shown = yaml.safe_load(printed)
    assert shown["train"]["max_steps"] == 3 and shown["sft"]["epochs"] is None
    assert shown["optim"]["lr"] == 3e-3 and shown["optim"]["grad_clip"] == 0.2  # SFT's defaults, as the run has them
    assert "train.max_steps 3 as given (sft.epochs not used)" in printed

    assert cli.main(["sft", str(path)]) == 0
    out = capsys.readouterr().out
    assert "train.max_steps 3 as given" in out
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["step"] == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 3

    # tokens/s of every position the model ran and of the label tokens (assistant replies), named so
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    label_tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + steps, steps)]
    for record, labels in zip(steps, label_tokens):
        all_tokens = 2 * SEQ  # global_batch_tokens: 2 packed rows of SEQ a step
        assert record["label_tokens_per_s"] / record["tokens_per_s"] == pytest.approx(labels / all_tokens)
        assert labels < all_tokens
    assert "label tok/s" in out


def format_reward_func(completions, **kwargs):
    """TRL's documented reward function (GRPOTrainer docs, "Example 2"), unchanged."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def test_a_trl_reward_function_gets_trls_shapes_for_conversational_prompts(monkeypatch):
    from smoltrain.post.rl.rewards import RewardState, build_rewards, score

    seen = {}

    def progress(prompts, completions, trainer_state, **kwargs):
        seen.update(prompt=prompts[0], completion=completions[0], state=trainer_state)
        return [trainer_state.global_step / trainer_state.max_steps] * len(completions)

    module = types.ModuleType("trl_style_rewards")
    module.format_reward_func, module.progress = format_reward_func, progress
    monkeypatch.setitem(sys.modules, "trl_style_rewards", module)
    rewards = build_rewards({"trl_style_rewards:format_reward_func": 1.0, "trl_style_rewards:progress": 1.0,
                             "math_answer": 1.0}, group_size=2)
    prompts = [[{"role": "user", "content": "2 + 5?"}]] * 2
    texts = ["<think>add</think><answer>7</answer>", "The answer is 8."]
    scores = score(rewards, prompts, texts, [[1], [2]], {"answer": ["7", "7"]}, RewardState(global_step=3, max_steps=12))
    assert scores.per_function["trl_style_rewards:format_reward_func"] == [1.0, 0.0]
    assert scores.per_function["trl_style_rewards:progress"] == [0.25, 0.25]
    assert scores.per_function["math_answer"] == [1.0, 0.0]  # the built-ins still read the text
    assert seen["completion"] == [{"role": "assistant", "content": texts[0]}] and seen["prompt"] == prompts[0]
    try:  # TRL is a bench-only peer (not installed in CI); where it is, its own test of the shape too
        from trl.data_utils import is_conversational
    except ImportError:
        is_conversational = None
    if is_conversational is not None:
        assert is_conversational({"prompt": seen["prompt"], "completion": seen["completion"]})
    score(rewards[1:2], ["2 + 5?"], ["7"], [[1]], {}, RewardState(global_step=0, max_steps=12))
    assert seen["completion"] == "7"  # plain-text prompts keep plain-text completions, as TRL passes them


def test_the_doctor_takes_a_post_training_recipe_and_a_recipe_error_keeps_the_measurements(root, tmp_path, one_thread):
    from smoltrain import doctor
    from smoltrain.doctor.report import FAIL
    from smoltrain.doctor.timing import Budget

    tiny = Budget(matmul_size=32, measure_s=0.01, recipe_rows=16, copy_mb=1, sustained_s=0.05, collective_max_mb=0.0625,
                  collective_s=0.005, storage_mb=1, storage_s=0.02, write_mb=1, loader_s=0.05)
    quiet = Console(file=io.StringIO(), width=150)
    sft_path = write_recipe(tmp_path / "sft.yaml", sft_recipe(root, tmp_path / "run"))
    result = doctor.run(str(sft_path), json_out=str(tmp_path / "sft.json"), budget=tiny, console=quiet)
    written = json.loads((tmp_path / "sft.json").read_text())
    notes = [c["figure"] for c in written["checks"] if c["section"] == "loader"]
    assert len(notes) == 1 and notes[0].startswith("a sft recipe: the machine checks ran")
    assert {c["section"] for c in result["checks"]} >= {"environment", "compute", "memory", "health"}

    broken = {"model": MODEL, "data": {"seq_len": SEQ},  # no data.sources and no data.embedded: the loader refuses
              "train": {"out_dir": str(tmp_path / "pre"), "max_steps": 4, "global_batch_tokens": 2 * SEQ,
                        "micro_batch_size": 2, "device": "cpu"}}
    result = doctor.run(str(write_recipe(tmp_path / "pre.yaml", broken)), json_out=str(tmp_path / "pre.json"),
                        budget=tiny, console=quiet)
    failed = [c for c in json.loads((tmp_path / "pre.json").read_text())["checks"] if c["status"] == FAIL]
    assert [c["advice"] for c in failed if c["section"] == "loader"] == [
        "data.sources is empty: name token shard folders or set data.embedded: true"]
    assert result["measurements"][0]["compute"]  # what was measured is in the result


def test_sft_checks_its_validation_data_against_the_models_vocabulary_before_step_1(root, tmp_path, capsys):
    from tests.synthetic_shards import write_random_documents

    shards = tmp_path / "prose"
    write_random_documents(shards, "prose", 1, 256, num_tokens=2000)
    meta = json.loads((shards / "meta.json").read_text())
    (shards / "meta.json").write_text(json.dumps({**meta, "vocab_size": 4096}))  # another tokenizer's shards
    raw = sft_recipe(root, tmp_path / "run", max_steps=3)
    raw["data"]["validation"] = {"prose": str(shards)}
    raw["eval"] = {"val_batches": 1, "batch_size": 2}
    assert cli.main(["sft", str(write_recipe(tmp_path / "r.yaml", raw))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"smoltrain sft: error: model.vocab_size ({VOCAB}) is smaller than the vocabulary of "
                   "data.validation.prose (4096)"]
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_import_export_merge_and_preferences_refuse_a_non_empty_out_unless_overwrite(root, tmp_path, capsys):
    hf, model = tmp_path / "hf", tmp_path / "model"
    assert cli.main(["export", str(root / "init"), "--out", str(hf)]) == 0
    assert cli.main(["import", str(hf), "--out", str(model)]) == 0
    before = (model / "model.safetensors").read_bytes()
    live = tmp_path / "live"
    live.mkdir()
    (live / "notes.txt").write_text("a live run's init")
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "x"}\n')
    refused = {
        "import": ["import", str(hf), "--out", str(live)],
        "export": ["export", str(model), "--out", str(live)],
        "merge": ["merge", str(model), str(root / "init"), "--out", str(live)],
        "data": ["data", "preferences", "--prompts", "embedded", "--chosen-model", "reference", "--rejected-model",
                 str(model), "--out", str(tmp_path / "pairs.jsonl")],
    }
    for verb, argv in refused.items():
        capsys.readouterr()
        assert cli.main(argv) == 2, verb
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"smoltrain {verb}: error: --out ") and err.endswith(
            "is not empty: pass --overwrite to replace it, or choose another --out"), err
    assert (live / "notes.txt").read_text() == "a live run's init" and len(list(live.iterdir())) == 1

    assert cli.main(["import", str(hf), "--out", str(model), "--overwrite"]) == 0
    assert (model / "model.safetensors").read_bytes() == before
    config = yaml.safe_load((model / "config.yaml").read_text())
    assert config["data"]["tokenizer"] == str((model / "tokenizer.json").resolve())  # not the temporary folder
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing left behind

    capsys.readouterr()
    assert cli.main(["import", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "import reads a Hugging Face folder (config.json + safetensors, + tokenizer) or a .gguf file, not a " \
           ".jsonl file" in capsys.readouterr().err


def test_a_json_list_reads_as_its_jsonl_twin_for_sft_dpo_and_generate(tmp_path):
    from smoltrain.errors import DataError
    from smoltrain.post.chat.data import read_conversations
    from smoltrain.post.chat.repl import read_prompts
    from smoltrain.post.preference.data import read_rows

    def twins(name: str, rows: list) -> tuple[Path, Path]:
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / f"{name}.json").write_text(json.dumps(rows, indent=2))
        return tmp_path / f"{name}.jsonl", tmp_path / f"{name}.json"

    chats = [c.to_row() for c in conversations(5)]
    lines, listed = twins("chat", chats)
    assert [c.messages for c in read_conversations([str(listed)]).conversations] == \
           [c.messages for c in read_conversations([str(lines)]).conversations]
    pairs = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(3)]
    lines, listed = twins("pairs", pairs)
    assert [row for _, row in read_rows(listed)] == [row for _, row in read_rows(lines)]
    prompts = [{"messages": [{"role": "user", "content": f"hi {i}"}]} for i in range(3)]
    lines, listed = twins("prompts", prompts)
    assert [row for row, _ in read_prompts(listed)] == [row for row, _ in read_prompts(lines)]

    (tmp_path / "bad.json").write_text(json.dumps([chats[0], {"messages": "not a list"}]))
    with pytest.raises(DataError, match=r"bad\.json:record 2: "):
        read_conversations([str(tmp_path / "bad.json")])


def test_a_template_without_reasoning_modes_leaves_messages_alone_and_its_think_evals_are_na(root, one_thread):
    import math

    from smoltrain.post.chat.evals import chat_evals
    from smoltrain.post.chat.repl import NO_MODES, chat_markdown, chat_repl
    from smoltrain.post.chat.template import SMOLLM2, has_reasoning_modes, load_chat_tokenizer
    from smoltrain.train.load_model import load_any

    smollm2 = load_chat_tokenizer(root / "smollm3")
    smollm2.chat_template = SMOLLM2  # SmolLM2-135M-Instruct's own template, as its GGUF carries it
    assert has_reasoning_modes(load_chat_tokenizer(root / "smollm3"))
    assert not has_reasoning_modes(smollm2) and not has_reasoning_modes(load_chat_tokenizer(root / "chatml"))

    model = load_any(root / "init")[0].eval()
    out = io.StringIO()
    conversation = chat_repl(model, smollm2, max_new_tokens=4, stdin=io.StringIO("hi\n/no_think\nthere\n"), stdout=out)
    assert [m["content"] for m in conversation if m["role"] == "user"] == ["hi", "there"]  # no flag appended
    shown = out.getvalue()
    assert shown.startswith(NO_MODES) and "mode: think" not in shown and shown.count(NO_MODES) == 2

    results = chat_evals(model, smollm2, count=2, persona_count=2, max_new_tokens=4)
    assert results["n"]["think"] == 0 and results["reasoning_modes"] is False
    assert math.isnan(results["think_accuracy"]) and math.isnan(results["think_format"])
    table = chat_markdown(results)
    assert "| think answer accuracy | n/a (no reasoning modes) |" in table
    assert "| think-format validity | n/a (no reasoning modes) |" in table


def test_rerunning_a_finished_sft_or_dpo_run_says_it_is_finished_and_trains_nothing(root, tmp_path, capsys, one_thread):
    from preference_helpers import preference_rows, save_init_model, write_rows

    sft_path = write_recipe(tmp_path / "sft.yaml", sft_recipe(root, tmp_path / "sft", max_steps=2))
    save_init_model(tmp_path, "dpo_init")
    write_rows(tmp_path / "pairs.jsonl", preference_rows(16, 1))
    dpo_path = write_recipe(tmp_path / "dpo.yaml", {
        "optim": {"lr": 3e-3, "schedule": "constant"}, "eval": {"val_batches": 0},
        "train": {"max_steps": 2, "save_every": 1, "micro_batch_size": 4, "init": str(tmp_path / "dpo_init"),
                  "out_dir": str(tmp_path / "dpo"), "tensorboard": False, "device": "cpu", "precision": "fp32"},
        "dpo": {"train_data": [str(tmp_path / "pairs.jsonl")], "pairs_per_step": 4, "max_length": 64}})
    for verb, path, run in (("sft", sft_path, tmp_path / "sft"), ("dpo", dpo_path, tmp_path / "dpo")):
        assert cli.main([verb, str(path)]) == 0
        capsys.readouterr()
        before = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()}
        assert cli.main([verb, str(path)]) == 0
        out = capsys.readouterr().out
        assert f"{run} is finished (step 2 of train.max_steps 2): nothing to train" in out, out
        assert "to step" not in out and "resumed" not in out
        after = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()}
        unchanged = ["metrics.jsonl", "summary.json", "config.yaml"] + (["sft_report.md"] if verb == "sft" else [])
        assert {n: after[n] for n in unchanged} == {n: before[n] for n in unchanged}


PROBE = """
import os, sys
import torch
torch.set_num_threads(1)
from smoltrain import cli
before = len(os.listdir("/proc/self/task"))
status = cli.main(sys.argv[1:])
print(f"rank {os.environ['RANK']} status {status} threads {before} -> {len(os.listdir('/proc/self/task'))}", flush=True)
sys.exit(status)
"""


def test_a_good_torchrun_run_frees_its_process_groups_before_the_interpreter_ends(tmp_path):
    """gloo's threads, alive at interpreter finalization, aborted finished runs (exit 134). After the
    verb returns, every group's threads are joined: the OS threads are back to the count before the run
    (9 more per rank were left before the fix)."""
    import socket
    import subprocess

    from pretrain_helpers import tiny_pretrain_config, write_two_sources

    sources = write_two_sources(tmp_path / "sources")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_pretrain_config(sources, tmp_path / "run", max_steps=2).to_yaml())
    (tmp_path / "probe.py").write_text(PROBE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), str(tmp_path / "probe.py"), "train", str(recipe)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = sorted(re.findall(r"rank (\d) status (\d+) threads (\d+) -> (\d+)", done.stdout))
    assert [(rank, status) for rank, status, _, _ in lines] == [("0", "0"), ("1", "0")], done.stdout
    assert all(before == after for _, _, before, after in lines), lines


def test_skip_bad_counts_an_empty_chat_file_as_data_tokenize_does(root, tmp_path):
    from smoltrain.data.readers import DocumentReader
    from smoltrain.errors import DataError
    from smoltrain.post.chat.data import read_conversations

    (tmp_path / "empty.jsonl").write_text("")
    tokenize = DocumentReader(tmp_path / "empty.jsonl", skip_bad=True)
    assert list(tokenize) == []
    data = read_conversations([str(root / "chat.jsonl"), str(tmp_path / "empty.jsonl")], skip_bad=True)
    assert data.skipped == tokenize.skipped == {"empty_file": 1} and len(data.conversations) > 0
    with pytest.raises(DataError, match=r"empty\.jsonl: no conversations$"):
        read_conversations([str(tmp_path / "empty.jsonl")])
    with pytest.raises(DataError, match=r"^no conversations in .*empty\.jsonl \(skipped empty_file: 1\)$"):
        read_conversations([str(tmp_path / "empty.jsonl")], skip_bad=True)


def test_grpos_eval_line_names_the_sampling_temperature_and_a_small_heldout_set_has_no_stderr(tmp_path):
    from smoltrain.eval.scoring import rate_with_error
    from smoltrain.post.preference.stage import write_report
    from smoltrain.train.metrics import eval_console_line

    line = eval_console_line(5, {"grpo": {"pass@1": 0.25, "pass@1_stderr": 0.1, "pass@4": 0.5, "n": 16,
                                          "sampled_at_temperature": 0.7}})
    assert line == "eval step 5 | grpo pass@1 0.250 pass@4 0.500 (pass@k sampled at temperature 0.7)"
    assert rate_with_error(0.75, 0.0433, 100) == "0.750 ± 0.043"
    held_out = {"accuracy": 1.0, "accuracy_stderr": 0.0, "margin": 0.5, "loss": 0.1, "pairs": 8}
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 4, "eval": {"preference": held_out}}) + "\n")
    report = write_report(tmp_path).read_text()
    assert "| 8 | 4 | 1.000 (n 8: a standard error is not meaningful below 30) |" in report and "± 0.000" not in report


def test_an_imported_models_card_names_its_origin_and_licence(root, tmp_path):
    from smoltrain.report.model_card import ORIGIN

    hf, model, back = tmp_path / "hf", tmp_path / "model", tmp_path / "back"
    assert cli.main(["export", str(root / "init"), "--out", str(hf)]) == 0
    card = (hf / "README.md").read_text()
    (hf / "README.md").write_text(card.replace("library_name: transformers", "license: mit\nlibrary_name: transformers"))
    assert cli.main(["import", str(hf), "--out", str(model)]) == 0
    origin = json.loads((model / ORIGIN).read_text())
    hf_config = json.loads((hf / "config.json").read_text())
    assert origin == {"file": str(hf.resolve()), "format": "Hugging Face folder",
                      "architecture": hf_config["architectures"][0], "name": None, "source": None, "license": "mit"}
    assert cli.main(["export", str(model), "--out", str(back)]) == 0
    card = (back / "README.md").read_text()
    assert "\nlicense: mit\n" in card.split("---")[1] and "# back\n" in card
    assert f"Starts from weights imported from `{hf.resolve()}` (format Hugging Face folder, architecture " \
           f"{hf_config['architectures'][0]}); licence: mit." in card


def test_a_no_think_answer_with_think_text_never_puts_template_text_into_the_pairs(root, tmp_path):
    """The APO reply to a no_think prompt carried "</think>": a rejected no_think reply that opened a
    <think> block made the template drop the empty think block, the shared prompt was cut there and the
    chosen answer trained on "\\n\\n</think>\\n". Such a pair is now a named bad row, and `data
    preferences` drops it at the source."""
    from smoltrain.errors import DataError
    from smoltrain.post.chat.template import load_chat_tokenizer, render
    from smoltrain.post.preference.data import chat_render, load_preferences
    from smoltrain.post.preference.generate import verdict

    tok = load_chat_tokenizer(root / "smollm3")
    prompt = [{"role": "system", "content": "Answer in capital letters."}, {"role": "user", "content": "What is json?"}]
    no_think = {"enable_thinking": False}
    clean = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "A FORMAT."}],
             "rejected": [{"role": "assistant", "content": "a format."}], "chat_template_kwargs": no_think}
    leaky = {**clean, "rejected": [{"role": "assistant", "content": "<think>hm</think>a format."}]}
    write_rows = lambda path, rows: path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # noqa: E731
    write_rows(tmp_path / "pairs.jsonl", [clean, leaky, clean])
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: an answer changes how the template renders the prompt"):
        load_preferences(tmp_path / "pairs.jsonl", tok, render=chat_render(root / "smollm3"))
    data = load_preferences(tmp_path / "pairs.jsonl", tok, render=chat_render(root / "smollm3"), skip_bad=True)
    assert data.skipped == {"template_mismatch": 1} and len(data) == 2
    generation_prompt = render(tok, prompt, add_generation_prompt=True, **no_think)  # what the model answers after
    for pair in data.pairs:
        assert tok.decode(pair.prompt_ids) == generation_prompt
        assert "think>" not in tok.decode(pair.chosen_ids) + tok.decode(pair.rejected_ids)

    persona = {"messages": prompt, "chat_template_kwargs": no_think}
    reply = {"text": "A FORMAT.", "stopped": True}
    assert verdict(persona, reply, {"text": "<think>hm</think>a format.", "stopped": True}, None) == "think_text_in_no_think"
    assert verdict(persona, reply, {"text": "a format.", "stopped": True}, None) is None


def test_the_demo_budget_counts_from_the_command_and_pretraining_gives_back_the_time_lost_before(capsys, tmp_path):
    """`make demo` passes its start: the install and cold caches are in the 15 minutes, and the post-training
    stages keep their nominal time (a fresh clone's SFT got 666 steps instead of 999 when all shrank alike)."""
    import time

    from rich.console import Console as RichConsole

    from smoltrain.config import Config
    from smoltrain.demo.chain import DemoRun, nominal_seconds, pretraining_left, stage_seconds
    from smoltrain.demo.steps import DemoSizes

    stages = ["pretrain", "sft", "apo", "grpo", "merge"]
    nominal = nominal_seconds(600.0, stages)  # the plan of a fresh machine
    lost = 120.0  # seconds gone before the demo started: a pip install, a cold compile cache
    left, pending = pretraining_left(600.0 - lost, stages, nominal)
    pretrain = stage_seconds("pretrain", left, pending, nominal["pretrain"])
    assert pretrain == pytest.approx(nominal["pretrain"] - lost)
    after = 600.0 - lost - pretrain  # pretraining used its box: each post stage then finds its nominal time
    for i, stage in enumerate(["sft", "apo", "grpo"]):
        seconds = stage_seconds(stage, after, stages[1 + i:], nominal[stage])
        assert seconds == pytest.approx(nominal[stage])
        after -= seconds

    run = DemoRun(tmp_path, ["sft"], {}, Config(), 15.0, DemoSizes(), {}, {}, RichConsole(file=io.StringIO()), 90.0, {})
    assert 90.0 <= run.elapsed() < 95.0
    assert cli.main(["demo", "--started", str(time.time() + 3600)]) == 2
    assert "--started must be a time (seconds since the epoch) in the last day" in capsys.readouterr().err
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "demo: DEMO_STARTED := $(shell date +%s)" in makefile and "smoltrain demo --started $(DEMO_STARTED)" in makefile


def test_the_report_of_a_dpo_or_grpo_run_draws_its_own_curves(tmp_path, monkeypatch):
    from smoltrain.report import run as report_run
    from smoltrain.report.document import Report

    drawn = {}

    def capture(path, series, **kwargs):
        drawn[Path(path).stem] = {k: (list(x), list(y)) for k, (x, y) in series.items()}
        return Path(path)

    monkeypatch.setattr(report_run.plots, "line_plot", capture)
    dpo = [{"step": s, "loss": 0.7, "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s, "rewards/margins": 0.2 * s,
            "rewards/accuracies": 0.5 + 0.1 * s} for s in (1, 2, 3)]
    evals = [{"step": 3, "eval": {"preference": {"accuracy": 0.75, "accuracy_stderr": 0.1, "pairs": 8}}}]
    report_run.add_objective_curves(Report("dpo"), dpo, evals, tmp_path)
    assert drawn["dpo_rewards"]["rewards/margins"] == ([1, 2, 3], [0.2, 0.4, pytest.approx(0.6)])
    assert drawn["dpo_accuracy"]["rewards/accuracies"] == ([1, 2, 3], [0.6, 0.7, pytest.approx(0.8)])
    assert drawn["preference_accuracy"] == {"preference/accuracy": ([3], [0.75])}
    assert not any(name.startswith("grpo") for name in drawn)

    drawn.clear()
    grpo = [{"step": s, "loss": 0.1, "reward": 0.2 * s, "reward_std": 0.1, "accuracy": 0.1 * s, "kl": 0.01 * s,
             "completions/mean_length": 10.0 + s, "clip_ratio/region_mean": 0.0, "rewards/math_answer/mean": 0.2 * s}
            for s in (1, 2)]
    evals = [{"step": 2, "eval": {"grpo": {"pass@1": 0.5, "pass@1_stderr": 0.1, "n": 8, "sampled_at_temperature": 1.0}}}]
    report_run.add_objective_curves(Report("grpo"), grpo, evals, tmp_path)
    assert set(drawn) == {"grpo_reward", "grpo_lengths", "grpo_clipping", "grpo_kl", "grpo_reward_functions",
                          "grpo_pass_at_1"}
    assert drawn["grpo_kl"] == {"kl": ([1, 2], [0.01, 0.02])}
    assert drawn["grpo_reward_functions"] == {"rewards/math_answer/mean": ([1, 2], [0.2, 0.4])}


def test_add_special_tokens_grows_a_smollm2_like_model_with_new_rows_at_the_mean(root, tmp_path, capsys, one_thread):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from smoltrain.train.load_model import load_any

    # a tokenizer with ChatML's tokens but no <think> / </think>, as SmolLM2's
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([BOILERPLATE] * 50 + [m["content"] for c in conversations(300) for m in c.messages], trainer)
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    shape = {**MODEL, "vocab_size": tok.get_vocab_size(), "tie_embeddings": True}
    save_model_folder(build_model(ModelConfig(**shape), seed=5), Config(model=ModelConfig(**shape),
                      data=DataConfig(seq_len=SEQ)), tmp_path / "init", tokenizer=tmp_path / "tok")
    raw = sft_recipe(root, tmp_path / "run", max_steps=2)
    raw["train"]["init"] = str(tmp_path / "init")
    assert cli.main(["sft", str(write_recipe(tmp_path / "r.yaml", raw))]) == 2
    assert "set sft.add_special_tokens: true to add them" in capsys.readouterr().err

    raw["sft"]["add_special_tokens"] = True
    assert cli.main(["sft", str(write_recipe(tmp_path / "r.yaml", raw))]) == 0
    assert "sft: added <think>, </think> to the tokenizer" in capsys.readouterr().out
    before, _, _ = load_any(tmp_path / "init")
    grown, grown_config, _ = load_any(tmp_path / "run" / "init_with_chat_tokens")
    old = before.embed_tokens.weight.detach()
    new = grown.embed_tokens.weight.detach()
    assert grown_config.model.vocab_size == shape["vocab_size"] + 2 and torch.equal(new[: len(old)], old)
    assert torch.allclose(new[len(old):], old.mean(dim=0).expand(2, -1))
    ids = torch.randint(3, shape["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the old tokens' logits are unchanged
        assert torch.allclose(grown(ids)[..., : len(old)], before(ids), atol=1e-5)
    assert Tokenizer.from_file(str(tmp_path / "run" / "tokenizer" / "tokenizer.json")).token_to_id("</think>") == \
        shape["vocab_size"] + 1  # the run's tokenizer, which export and chat use
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["vocab_size"] == shape["vocab_size"] + 2


def test_precision_auto_takes_bf16_on_a_cpu_where_it_is_faster_for_the_model_and_says_why(tmp_path, monkeypatch, caplog):
    import logging

    import torch

    from smoltrain.train import distributed
    from smoltrain.train.distributed import BF16_WIN, resolve_precision

    cpu = torch.device("cpu")
    smollm2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                          num_kv_heads=3)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu, ModelConfig(**MODEL)) == "fp32"  # a tiny model: not matmul-bound, no probe
    assert not (tmp_path / "smoltrain").exists()
    key = (f"{distributed._cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
           f"2048x576x1536")
    for speedup, expected in ((1.8, "bf16"), (BF16_WIN - 0.15, "fp32")):
        distributed._cpu_auto_precision.cache_clear()
        (tmp_path / "smoltrain").mkdir(exist_ok=True)
        (tmp_path / "smoltrain" / "precision.json").write_text(json.dumps({key: speedup}))  # the cached measurement
        with caplog.at_level(logging.INFO, logger=distributed.__name__):
            assert resolve_precision("auto", cpu, smollm2, tokens=2048) == expected
        assert f"train.precision auto: {expected} on this CPU (bf16 matmuls {speedup:.2f}x fp32" in caplog.text
    assert resolve_precision("fp32", cpu, smollm2) == "fp32"  # asked for: no probe decides
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu, smollm2) == "fp32"  # bf16 would be emulated

    distributed._cpu_auto_precision.cache_clear()  # a real measurement, cached for the next process
    distributed._cpu_auto_precision(64, 128, 32)
    cached = json.loads((tmp_path / "smoltrain" / "precision.json").read_text())
    assert any(k.endswith("32x64x128") and v > 0 for k, v in cached.items())
