"""Qwen3-Next (dense) against transformers' Qwen3NextForCausalLM on its torch fallback path: imported
logits, export round trip, 10 training steps; and a packed row of the hybrid against its documents alone."""

import pytest
import torch
from hf_training_parity import assert_training_matches_transformers, imported_pair
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

from smoltrain.model.generate import generate
from smoltrain.report.hf_export import export_hf
from smoltrain.train.load_model import import_hf, load_any

# 4 layers: 3 gated DeltaNet + 1 gated full attention; 2 key heads serving 4 value heads; partial RoPE.
HF_CONFIG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                 linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4, num_experts=0,
                 max_position_embeddings=256, pad_token_id=None)


def _hf_next(seed: int = 0) -> Qwen3NextForCausalLM:
    """Norm weights (and dt_bias, A_log) away from their init, so a (1 + w) slip or a swapped vector shows."""
    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(Qwen3NextConfig(**HF_CONFIG))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape))
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_next")
    return (*imported_pair(_hf_next(), root), root)


def test_imported_qwen3_next_logits_match_transformers_and_export_round_trips(pair):
    hf, ours, config, root = pair
    m = config.model
    assert (m.full_attention_every, m.partial_rotary_factor, m.linear_num_value_heads) == (4, 0.25, 4)
    ids = torch.randint(0, 128, (2, 100), generator=torch.Generator().manual_seed(1))  # 100 tokens: two chunks of 64
    with torch.no_grad():
        ours_logits, theirs = ours(ids), hf(ids).logits
    assert (ours_logits - theirs).abs().max().item() <= 1e-4
    export_hf(ours, root / "exported")
    again = Qwen3NextForCausalLM.from_pretrained(root / "exported", dtype=torch.float32, local_files_only=True).eval()
    assert again.config.layer_types == hf.config.layer_types
    expected = hf.state_dict()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_packed_row_of_the_hybrid_gives_each_document_its_alone_logits(pair):
    _, ours, _, _ = pair
    lengths = [30, 1, 50, 19]
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 128, (1, n), generator=g) for n in lengths]
    document_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        packed = ours(torch.cat(docs, dim=1), document_ids=document_ids)
        alone = torch.cat([ours(d) for d in docs], dim=1)
    assert (packed - alone).abs().max().item() <= 1e-5


def test_ten_training_steps_give_transformers_losses(tmp_path):
    hf = _hf_next(seed=3).train()
    hf.save_pretrained(tmp_path / "hf")
    ours, _, _ = load_any(import_hf(tmp_path / "hf", tmp_path / "ours"))
    assert_training_matches_transformers(hf, ours, steps=10, seq_len=24, rel=1e-4)


def test_greedy_generation_from_the_recurrent_state_equals_transformers(pair):
    hf, ours, _, _ = pair
    g = torch.Generator().manual_seed(4)
    # Two prompts batched (left-padded: the padding is a document of its own) on our side, alone on theirs.
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 13)]
    ours_out = generate(ours, prompts, 12)
    for prompt, mine in zip(prompts, ours_out):
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
        assert mine == theirs[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", ["qwen3_next", "gemma3"])
def test_parameter_counts_of_the_new_layer_styles_match_the_built_models(kind):
    from smoltrain.config import ModelConfig
    from smoltrain.model.flops import parameter_counts
    from smoltrain.model.gemma3.hf import STYLE as GEMMA
    from smoltrain.model.qwen3_next.hf import STYLE as NEXT
    from smoltrain.model.transformer import build_model, count_parameters

    base = dict(vocab_size=96, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=48, max_seq_len=32)
    extra = (dict(NEXT, full_attention_every=2, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                  linear_value_head_dim=12) if kind == "qwen3_next" else dict(GEMMA, sliding_window=8, global_every=2))
    config = ModelConfig(**base, **extra)
    assert parameter_counts(config)["total"] == count_parameters(build_model(config))


def test_the_attention_vs_hybrid_ablation_runs_at_a_tiny_size(tmp_path):
    from pathlib import Path

    import yaml
    from pretrain_helpers import tiny_pretrain_config, write_two_sources

    from smoltrain.ablate.grid import ablate
    from smoltrain.ablate.spec import load_ablation
    from smoltrain.model.flops import parameter_counts

    path = Path(__file__).resolve().parents[1] / "recipes" / "ablations" / "attention-vs-hybrid.yaml"
    shipped = load_ablation(path)
    counts = {v: parameter_counts(shipped.config_for(v, 0).model)["total"] for v in shipped.variants}
    assert abs(counts["hybrid-3to1"] / counts["baseline"] - 1) < 0.01  # equal parameters, as the recipe says
    assert [shipped.config_for("hybrid-3to1", 0).model.layer_kind(i) for i in range(4)] == ["linear"] * 3 + ["global"]

    tiny = tiny_pretrain_config(write_two_sources(tmp_path / "data"), tmp_path / "unused").to_dict()
    tiny["train"] = {k: v for k, v in tiny["train"].items() if k not in ("out_dir", "max_steps", "seed")}
    raw = {**yaml.safe_load(path.read_text()), "baseline": tiny, "budget": {"steps": 3}, "eval": {"val_batches": 0},
           "param_tolerance": 1.0}
    results = ablate(spec=load_ablation(raw=raw, out_dir=str(tmp_path / "ablation")))
    assert set(results["arms"]) == {"baseline", "hybrid-3to1"}
    runs = [r for arm in results["arms"].values() for r in arm["runs"]]
    assert len(runs) == 4 and len({r["tokens"] for r in runs}) == 1  # same tokens in every run
    assert all(r["tokens_per_s"] for r in runs)


def test_loss_by_position_buckets_each_token_by_its_place_in_its_document(pair):
    from smoltrain.eval.validation import position_sums
    from smoltrain.model.transformer import token_logprobs

    _, ours, _, _ = pair
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 128, (2, 40), generator=g)
    labels = torch.randint(0, 128, (2, 40), generator=g)
    labels[1, :3] = -100
    documents = torch.tensor([[0] * 25 + [1] * 15, [0] * 40])
    sums = position_sums(ours, [{"input_ids": ids, "labels": labels, "document_ids": documents}], 4, torch.device("cpu"))
    # Brute force: every document alone, its tokens' nats by position into buckets of 10.
    expected = torch.zeros(4, 2, dtype=torch.float64)
    for row, spans in ((0, [(0, 25), (25, 40)]), (1, [(0, 40)])):
        for a, b in spans:
            with torch.no_grad():
                nats = -token_logprobs(ours, ids[row : row + 1, a:b], labels[row : row + 1, a:b])[0]
            for p in range(b - a):
                if labels[row, a + p] != -100:
                    expected[p // 10] += torch.tensor([nats[p].item(), 1.0], dtype=torch.float64)
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-4)



@pytest.mark.slow
def test_grpo_generate_and_eval_run_on_a_hybrid(tmp_path):
    """`smoltrain grpo` for 2 steps on a tiny hybrid (shared-prompt training, rollouts from the recurrent
    state, its pass@k evaluation); then `smoltrain generate` answers chat prompts of two lengths alike
    batched and alone, and `smoltrain eval` scores its log-likelihood tasks alike at batch 1 and 4."""
    import json
    import subprocess
    import sys

    import yaml
    from chat_helpers import chat_tokenizers
    from test_grpo_train import RECIPE, TESTS, grpo

    raw = json.loads(json.dumps(RECIPE))
    raw["model"].update(num_layers=2, full_attention_every=2, attention_output_gate=True, linear_num_key_heads=2,
                        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
    raw["data"]["tokenizer"] = str(chat_tokenizers(tmp_path / "tok") / "smollm3")
    raw["train"].update(max_steps=2, save_every=2, eval_every=2)
    raw["grpo"].update(num_iterations=1)
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(raw))
    run = grpo(tmp_path / "grpo.yaml", tmp_path / "run")
    assert run.returncode == 0, run.stderr
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m and "event" not in m] == [1, 2]
    assert all(m["grad_norm"] > 0 for m in lines if "loss" in m and "event" not in m)
    assert any("pass@2" in m["eval"]["grpo"] for m in lines if "eval" in m)

    def cli(*args: str) -> str:
        env = {"PYTHONPATH": str(TESTS.parent), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "smoltrain", *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    (tmp_path / "in.jsonl").write_text('{"prompt": "What is 2 + 2?"}\n{"prompt": "Name a colour, then count to three."}\n')
    outputs = []
    for batch in (1, 2):
        cli("generate", str(tmp_path / "run"), "--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / f"g{batch}.jsonl"),
            "--max-new-tokens", "8", "--batch-size", str(batch))
        outputs.append([json.loads(x)["completions"] for x in (tmp_path / f"g{batch}.jsonl").read_text().splitlines()])
    assert len(outputs[0]) == 2 and outputs[0] == outputs[1]
    scores = []
    for batch in (1, 4):
        cli("eval", str(tmp_path / "run"), "--tasks", "arithmetic", "--limit", "6", "--val-batches", "0", "--batch-size",
            str(batch), "--out", str(tmp_path / f"eval{batch}.json"))
        tasks = json.loads((tmp_path / f"eval{batch}.json").read_text())["tasks"]
        scores.append({f"{name}/{key}": value for name, task in tasks.items() for key, value in task.items()
                       if key in ("score", "acc", "acc_norm") and value is not None})
    assert scores[0] and scores[0] == pytest.approx(scores[1])
