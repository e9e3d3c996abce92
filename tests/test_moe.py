"""Mixture of experts against independent references: transformers' load_balancing_loss_func, a
per-token brute-force MoE, Qwen3-MoE and OLMoE logits and 10-step training losses in transformers,
the loss-free bias rule by hand, and one-line errors for router options we do not compute."""

import json

import pytest
import torch
import torch.nn.functional as F
from hf_training_parity import assert_training_matches_transformers
from transformers import AutoModelForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from smoltrain.config import ModelConfig
from smoltrain.errors import CheckpointError
from smoltrain.model.hf import from_hf_config
from smoltrain.model.moe import MoE, RouterStats, load_balancing_loss, update_expert_bias
from smoltrain.model.transformer import build_model
from smoltrain.report.hf_export import export_hf
from smoltrain.train.load_model import import_hf, load_any

BASE = dict(vocab_size=200, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64, max_seq_len=64,
            qk_norm=True, num_experts=6, experts_per_token=2, expert_hidden=24)

# (transformers class, our switches): dense layers by list and by step, renormalised top-k or not, OLMoE's full-width QK-norm.
SHAPES = [
    ("Qwen3MoeForCausalLM", dict(num_layers=3, moe_dense_layers=[0], norm_topk_prob=True, tie_embeddings=False)),
    ("Qwen3MoeForCausalLM", dict(num_layers=4, moe_every=2, norm_topk_prob=False, tie_embeddings=True, head_dim=16)),
    ("OlmoeForCausalLM", dict(num_layers=2, qk_norm_per_head=False, norm_topk_prob=False, tie_embeddings=False)),
]


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Norm weights away from 1 and a wider router, so misnamed norms and misrouted experts show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g))


def test_aux_loss_equals_transformers_on_random_router_logits():
    g = torch.Generator().manual_seed(0)
    for experts, k, layers in [(8, 2, 3), (6, 1, 1), (16, 4, 2)]:
        logits = [torch.randn(50, experts, generator=g) * 3 for _ in range(layers)]
        stats = [RouterStats(x, x.topk(k).indices) for x in logits]
        ours = load_balancing_loss(stats, experts, k)
        theirs = load_balancing_loss_func(tuple(logits), experts, k)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # Balanced: each of 8 experts tops 2 of 16 tokens and the mean probabilities are equal -> k = 1.
    balanced = torch.eye(8).repeat(2, 1) * 10
    assert load_balancing_loss([RouterStats(balanced, balanced.topk(1).indices)], 8, 1).item() == pytest.approx(1.0, abs=1e-6)


def _brute_force_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: softmax, top-k, optional renormalisation, weighted SwiGLU sum."""
    out = torch.zeros_like(x)
    experts = moe.experts
    for t in range(x.shape[0]):
        probs = F.softmax(moe.gate.weight @ x[t], dim=-1)
        weights, chosen = probs.topk(moe.top_k)
        if moe.norm_topk_prob:
            weights = weights / weights.sum()
        for w, j in zip(weights, chosen.tolist()):
            h = F.silu(experts.gate_proj[j] @ x[t]) * (experts.up_proj[j] @ x[t])
            out[t] = out[t] + w * (experts.down_proj[j] @ h)
    return out


@pytest.mark.parametrize("norm", [True, False])
def test_sorted_dispatch_equals_token_by_token_reference_forward_and_backward(norm):
    config = ModelConfig(**{**BASE, "num_layers": 1, "norm_topk_prob": norm, "num_experts": 8, "experts_per_token": 3})
    model = build_model(config, seed=1)
    _randomise(model, 1)
    moe = model.layers[0].mlp
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(2))
    ours = moe(x)
    grads = torch.autograd.grad(ours.square().sum(), list(moe.parameters()))
    reference = _brute_force_moe(moe, x)
    expected = torch.autograd.grad(reference.square().sum(), list(moe.parameters()))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")
def test_grouped_gemm_path_equals_the_per_expert_slices_with_an_empty_expert():
    """The CUDA path (F.grouped_mm), run here on torch's CPU kernel, against the CPU path."""
    model = build_model(ModelConfig(**{**BASE, "num_experts": 5}, num_layers=1), seed=4)
    experts = model.layers[0].mlp.experts
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(5))
    counts = torch.tensor([6, 0, 5, 4, 5])  # expert 1 gets nothing
    outputs, grads = [], []
    for path in (experts._sliced, experts._grouped):
        out = path(x, counts)
        outputs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), list(experts.parameters())))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads[0][0][1].abs().sum() == 0  # the empty expert's gradient is zero, not missing


@pytest.mark.parametrize("architecture,shape", SHAPES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(SHAPES)])
def test_exported_moe_logits_match_transformers_and_import_round_trips(tmp_path, architecture, shape):
    model = build_model(ModelConfig(**BASE, **shape), seed=3)
    _randomise(model, 3)
    export_hf(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, local_files_only=True).eval()
    assert type(hf).__name__ == architecture
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(input_ids), hf(input_ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    # transformers' own save (per-expert keys on disk) imports back to the very same weights.
    hf.save_pretrained(tmp_path / "saved")
    imported, config, _ = load_any(import_hf(tmp_path / "saved", tmp_path / "ours"))
    assert config.model.num_experts == BASE["num_experts"] and config.model.moe_dense_layers == shape.get("moe_dense_layers", [])
    expected = model.state_dict()
    for name, tensor in imported.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def _hf_moe(kind: str):
    common = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.05, output_router_logits=True,
                  max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=None)
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=16, head_dim=8,
                                                  mlp_only_layers=[1], norm_topk_prob=True))
    return OlmoeForCausalLM(OlmoeConfig(**common, intermediate_size=16))


@pytest.mark.parametrize("kind", ["qwen3_moe", "olmoe"])
def test_ten_training_steps_give_transformers_loss_with_its_aux_term(tmp_path, kind):
    hf = _hf_moe(kind).train()
    hf.save_pretrained(tmp_path / "hf")
    ours, config, _ = load_any(import_hf(tmp_path / "hf", tmp_path / "ours"))
    assert config.model.aux_loss_coef == 0.05
    assert_training_matches_transformers(hf, ours, steps=10, seq_len=16, rel=1e-4)


def test_router_options_we_do_not_compute_are_one_line_errors():
    hf = _hf_moe("qwen3_moe").config.to_dict()
    hf["architectures"] = ["Qwen3MoeForCausalLM"]
    assert from_hf_config(json.loads(json.dumps(hf))).num_experts == 4
    for key, value in (("router_jitter_noise", 0.1), ("capacity_factor", 1.25)):
        with pytest.raises(CheckpointError, match=key):
            from_hf_config({**hf, key: value}, "x/config.json")
    olmoe = {**_hf_moe("olmoe").config.to_dict(), "architectures": ["OlmoeForCausalLM"], "clip_qkv": 8.0}
    with pytest.raises(CheckpointError, match="clip_qkv"):
        from_hf_config(olmoe)
    shared = build_model(ModelConfig(**BASE, num_layers=1, shared_expert_hidden=16))
    with pytest.raises(CheckpointError, match="shared_expert_hidden"):
        export_hf(shared, "unused")


def test_loss_free_bias_follows_the_sign_rule_with_centering_and_only_picks_experts():
    model = build_model(ModelConfig(**{**BASE, "num_experts": 4}, num_layers=2, bias_update_rate=0.1), seed=0)
    layers = model.moe_layers()
    counts = torch.tensor([[10, 2, 2, 2], [4, 4, 4, 4]])
    update_expert_bias(layers, counts, 0.1)
    # Layer 0: mean 4 -> signs (-1, +1, +1, +1) x 0.1, centred by their mean 0.05.
    torch.testing.assert_close(layers[0].expert_bias, torch.tensor([-0.15, 0.05, 0.05, 0.05]))
    torch.testing.assert_close(layers[1].expert_bias, torch.zeros(4))
    # A large bias forces expert 3 into every token's top-k but its weight stays its plain probability.
    layers[0].expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    x = torch.randn(8, 32)
    layers[0](x)
    assert (layers[0].stats.chosen == 3).any(dim=-1).all()
    state = model.state_dict()
    assert torch.equal(state["layers.0.mlp.expert_bias"], layers[0].expert_bias)  # saved with the checkpoint


@pytest.mark.parametrize("kind", ["qwen3_moe", "olmoe"])
def test_total_parameters_match_transformers_and_active_ones_the_hand_count(tmp_path, kind):
    from smoltrain.model.flops import flops_per_token, parameter_counts

    hf = _hf_moe(kind)
    hf.config.architectures = [type(hf).__name__]
    cfg = from_hf_config(hf.config.to_dict())
    counts = parameter_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in hf.parameters())
    # A token skips (E - k) experts of 3 x D x F in every MoE layer.
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    skipped = moe_layers * (cfg.num_experts - cfg.experts_per_token) * 3 * cfg.hidden_size * cfg.resolved_expert_hidden
    assert counts["active"] == counts["total"] - skipped
    # With every expert active (k = E) an MoE runs the FLOPs of a dense MLP E x F wide plus its router.
    every = ModelConfig(**{**BASE, "experts_per_token": BASE["num_experts"]}, num_layers=2)
    dense = ModelConfig(**{**BASE, "num_experts": 0, "intermediate_size": BASE["num_experts"] * BASE["expert_hidden"]}, num_layers=2)
    router = 2 * BASE["hidden_size"] * BASE["num_experts"]
    assert flops_per_token(every, 32) == flops_per_token(dense, 32) + 6 * router
