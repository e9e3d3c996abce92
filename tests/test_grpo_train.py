"""`smoltrain grpo` through the one Trainer loop: SIGKILL in the middle of a rollout batch and re-run
reproduces the uninterrupted run's per-step rewards and losses bit for bit; two gloo ranks train like
one process; bad inputs stop before training with one line."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from chat_helpers import chat_tokenizers
from spawn_helpers import leaves_without_teardown

TESTS = Path(__file__).resolve().parent

RECIPE = {
    "model": {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 64, "max_seq_len": 128},
    "data": {"seq_len": 64},
    "optim": {"lr": 0.01, "warmup_steps": 0, "schedule": "constant"},
    # global_batch_tokens is unused by grpo; the layout check wants it whole.
    "train": {"max_steps": 6, "log_every": 1, "save_every": 3, "eval_every": 3, "global_batch_tokens": 512,
              "micro_batch_size": 4, "tensorboard": False, "device": "cpu"},
    "grpo": {"num_generations": 4, "prompts_per_step": 2, "max_completion_length": 12, "max_prompt_length": 64,
             "num_iterations": 2, "epsilon_high": 0.28, "rewards": {"grpo_test_rewards:digit_share": 1.0, "overlong": 0.5},
             "overlong_max_len": 12, "overlong_cache": 6, "eval_count": 4, "pass_k": 2, "num_prompts": 50},
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return chat_tokenizers(tmp_path_factory.mktemp("grpo_tok")) / "smollm3"


def _recipe(path: Path, tokenizer: Path, **grpo) -> Path:
    import yaml

    raw = json.loads(json.dumps(RECIPE))
    raw["data"]["tokenizer"] = str(tokenizer)
    raw["grpo"].update(grpo)
    path.write_text(yaml.safe_dump(raw))
    return path


def grpo(recipe: Path, out_dir: Path, crash: str | None = None, *extra: str):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("SMOLTRAIN_TEST_CRASH", None)
    if crash:
        env["SMOLTRAIN_TEST_CRASH"] = crash
    return subprocess.run([sys.executable, "-m", "smoltrain", "grpo", str(recipe), "--set", f"train.out_dir={out_dir}",
                           *extra], check=False, env=env, capture_output=True, text=True, timeout=300)


def per_step(out_dir: Path) -> list[tuple]:
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"], m["grad_norm"], m["reward"], m["rewards/grpo_test_rewards:digit_share/mean"],
             m["completions/mean_length"], m.get("kl")) for m in lines if "loss" in m and "event" not in m]


@pytest.mark.slow
def test_grpo_resume_after_sigkill_mid_rollout_batch_matches_uninterrupted_run(tmp_path, tokenizer):
    recipe = _recipe(tmp_path / "grpo.yaml", tokenizer, beta=0.04)  # a frozen reference, rebuilt on resume
    reference = grpo(recipe, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    expected = per_step(tmp_path / "reference")
    g = RECIPE["grpo"]  # the start line counts a step in rollouts, not in pretraining's tokens
    assert f"a step = {g['prompts_per_step']} prompts x {g['num_generations']} generations = " in reference.stdout
    assert [s[0] for s in expected] == list(range(1, 7))
    assert len({s[3] for s in expected}) == 3  # mu = 2: a new rollout batch every second step
    assert any(abs(s[1]) > 1e-6 for s in expected) and all(s[2] > 0 for s in expected)  # it trains
    kl = [json.loads(x).get("kl") for x in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()
          if '"loss"' in x]
    assert kl[0] == pytest.approx(0.0, abs=1e-7) and max(kl) > 0  # the policy leaves the reference

    run = tmp_path / "run"
    # Saved at step 3, in the middle of the second rollout batch (steps 3-4): the resumed run must
    # train step 4 on the very rollouts step 3 used, then sample steps 5-6 as the reference did.
    killed = grpo(recipe, run, "after_step_5")
    assert killed.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    finished = grpo(recipe, run)
    assert finished.returncode == 0, finished.stderr
    assert "resumed from" in finished.stdout and "step 3" in finished.stdout
    got = {s[0]: s for s in per_step(run)}
    assert [got[s] for s in range(1, 7)] == expected  # bit for bit on CPU

    # A fresh run from the finished one scores its starting model first: the same numbers as the
    # finished run's last evaluation (same weights, same held-out prompts and sampling seeds).
    follow = grpo(recipe, tmp_path / "follow", None, "--set", f"train.init={tmp_path / 'reference'}", "--set", "train.max_steps=1")
    assert follow.returncode == 0, follow.stderr
    last = [json.loads(x)["eval"]["grpo"] for x in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()
            if '"eval"' in x][-1]
    assert json.loads((tmp_path / "follow" / "eval_before.json").read_text()) == last
    assert f"start model, held-out: pass@1 {last['pass@1']:.3f}" in follow.stdout
    # pass_k 1: pass@1 stays the greedy rate (the one sample's rate is mean@1), the same as above
    single = grpo(recipe, tmp_path / "single", None, "--set", f"train.init={tmp_path / 'reference'}",
                  "--set", "train.max_steps=1", "--set", "grpo.pass_k=1")
    assert single.returncode == 0, single.stderr
    before = json.loads((tmp_path / "single" / "eval_before.json").read_text())
    assert before["pass@1"] == last["pass@1"] and "mean@1" in before and "pass@2" not in before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@leaves_without_teardown
def _worker(rank: int, world: int, recipe: str, out_dir: str, port: int) -> None:
    from smoltrain.config import load_config
    from smoltrain.post.rl.stage import run

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    run(load_config(recipe, [f"train.out_dir={out_dir}"]))
    assert not dist.is_initialized()


@pytest.mark.slow
def test_grpo_under_two_gloo_ranks_equals_one_process(tmp_path, tokenizer):
    recipe = _recipe(tmp_path / "grpo.yaml", tokenizer, prompts_per_step=4, num_iterations=1)
    one = grpo(recipe, tmp_path / "one", None, "--set", "train.max_steps=4")
    assert one.returncode == 0, one.stderr
    sys.path.insert(0, str(TESTS))
    mp.spawn(_worker, args=(2, str(recipe), str(tmp_path / "two"), _free_port()), nprocs=2, join=True)
    expected = per_step(tmp_path / "one")[:4]
    got = per_step(tmp_path / "two")[:4]
    assert [s[0] for s in got] == [1, 2, 3, 4]
    for a, b in zip(got, expected):
        assert a[3:6] == pytest.approx(b[3:6], rel=1e-6)  # the same samples and rewards
        assert a[1:3] == pytest.approx(b[1:3], rel=1e-4, abs=1e-6)  # losses and gradient norms
    evals = [json.loads(x)["eval"]["grpo"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    evals_one = [json.loads(x)["eval"]["grpo"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals[0]["n"] == 4 and evals[0]["pass@2"] == evals_one[0]["pass@2"]


@pytest.mark.parametrize("change, message", [
    ({"rewards": {"grpo_test_rewards:broken": 1.0}},
     "reward function 'grpo_test_rewards:broken' raised ZeroDivisionError: division by zero"),
    ({"rewards": {"nowhere_module:f": 1.0}}, "cannot import 'nowhere_module'"),
    ({"prompts": "{root}/no_answer.jsonl", "eval_prompts": "{root}/no_answer.jsonl"},
     "no_answer.jsonl:2: the prompt has no 'answer'"),
    ({"prompts": "{root}/empty.jsonl", "eval_prompts": "{root}/empty.jsonl"}, "empty.jsonl: no prompts in the file"),
    ({"prompts": "{root}/ok.jsonl"}, "set grpo.eval_prompts"),
    ({"prompts_per_step": 3, "num_generations": 1}, "grpo.num_generations must be >= 2"),
])
def test_bad_grpo_inputs_are_one_line_errors(tmp_path, tokenizer, change, message, capsys, monkeypatch):
    from smoltrain.cli import main

    monkeypatch.syspath_prepend(str(TESTS))
    (tmp_path / "no_answer.jsonl").write_text('{"prompt": "1 + 1 =", "answer": "2"}\n{"prompt": "2 + 2 ="}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "ok.jsonl").write_text('{"prompt": "1 + 1 =", "answer": "2"}\n')
    change = {k: v.format(root=tmp_path) if isinstance(v, str) else v for k, v in change.items()}
    recipe = _recipe(tmp_path / "grpo.yaml", tokenizer, **change)
    code = main(["grpo", str(recipe), "--set", f"train.out_dir={tmp_path / 'run'}", "--set", "train.max_steps=1"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_demo_recipe_validates_and_takes_the_demo_models_shape():
    from smoltrain.config import load_config
    from smoltrain.post.rl.stage import load_grpo_config

    recipes = TESTS.parent / "recipes"
    grpo_demo, demo = load_grpo_config(recipes / "grpo" / "demo.yaml"), load_config(recipes / "demo.yaml")
    assert grpo_demo.model == demo.model  # the demo's SFT / APO weights load into it
    assert grpo_demo.grpo.mode == "no_think" and "overlong" in grpo_demo.grpo.rewards
    assert 0 < grpo_demo.grpo.overlong_cache <= grpo_demo.grpo.overlong_max_len <= grpo_demo.grpo.max_completion_length


def test_ablation_files_take_a_grpo_stage_and_score_its_evaluation(tmp_path):
    from smoltrain.ablate.spec import load_ablation
    from smoltrain.errors import ConfigError
    from smoltrain.report.run import flatten_eval, lower_is_better

    spec = load_ablation(TESTS.parent / "recipes" / "ablations" / "grpo-length-penalty.yaml")
    assert spec.stage == "grpo" and set(spec.variants) == {"baseline", "overlong-16", "overlong-24", "overlong-32"}
    assert spec.config_for("baseline", 0).grpo.rewards == {"math_answer": 1.0}
    assert spec.config_for("overlong-24", 1).grpo.overlong_max_len == 24
    import yaml

    baseline = yaml.safe_load((TESTS.parent / "recipes" / "grpo" / "demo.yaml").read_text())
    raw = {"baseline": baseline, "variants": {"a": {"grpo.epsilon": 0.1}}, "seeds": [0], "budget": {"steps": 1},
           "stage": "rlhf"}
    with pytest.raises(ConfigError, match="stage: expected one of pretrain, sft, dpo, grpo"):
        load_ablation(raw=raw, out_dir=str(tmp_path))
    flat = flatten_eval({"val": {}, "tasks": {}, "grpo": {"pass@1": 0.25, "pass@1_stderr": 0.03, "n": 200,
                                                         "greedy_mean_length": 9.5}})
    assert flat == {"grpo/pass@1": 0.25, "grpo/greedy_mean_length": 9.5}
    assert lower_is_better("grpo/greedy_mean_length") and not lower_is_better("grpo/pass@1")
