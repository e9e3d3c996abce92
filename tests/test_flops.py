"""Counting against independent references: transformers' parameter count and the playbook formula."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from smoltrain.config import ModelConfig
from smoltrain.model.flops import (
    flops_per_token,
    kv_cache_bytes_per_token,
    parameter_counts,
    training_memory_bytes,
)
from smoltrain.model.transformer import Transformer

SHAPES = [
    dict(vocab_size=320, hidden_size=64, num_layers=3, num_heads=8, num_kv_heads=2, intermediate_size=160, tie_embeddings=True),
    dict(vocab_size=512, hidden_size=96, num_layers=2, num_heads=6, num_kv_heads=6, intermediate_size=256, tie_embeddings=False),
    dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1, intermediate_size=128, tie_embeddings=True),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_parameter_count_matches_transformers_llama(shape):
    cfg = ModelConfig(**shape, max_seq_len=64)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, tie_word_embeddings=cfg.tie_embeddings,
    ))
    # parameters() deduplicates a tied head, as our "total" does.
    assert parameter_counts(cfg)["total"] == sum(p.numel() for p in hf.parameters())


def test_parameter_count_matches_transformers_qwen3_with_qk_norm_and_head_dim():
    cfg = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                      intermediate_size=128, qk_norm=True, max_seq_len=64)
    hf = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=128, tie_word_embeddings=True,
    ))
    assert parameter_counts(cfg)["total"] == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("shape", SHAPES)
def test_parameter_count_matches_our_model(shape):
    cfg = ModelConfig(**shape, max_seq_len=64)
    with torch.device("meta"):
        model = Transformer(cfg)
    counts = parameter_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" in n or "lm_head" in n)
    assert counts["embedding"] == embedding
    assert counts["non_embedding"] == counts["total"] - embedding


def test_flops_per_token_is_the_playbook_formula_at_smollm2_135m_shape():
    cfg = ModelConfig(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                      intermediate_size=1536, max_seq_len=2048)
    with torch.device("meta"):
        model = Transformer(cfg)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    matmul += 49152 * 576  # tied head: its matmul runs on the embedding matrix
    expected = 6 * matmul + 6 * 30 * 576 * 2048
    assert flops_per_token(cfg, 2048) == expected
    assert 134e6 < parameter_counts(cfg)["total"] < 136e6  # "135M"


def test_kv_cache_shrinks_with_gqa_by_the_head_ratio():
    mha = ModelConfig(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=32, intermediate_size=8192)
    gqa = ModelConfig(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192)
    assert kv_cache_bytes_per_token(mha) == 2 * 16 * 32 * 64 * 2
    assert kv_cache_bytes_per_token(mha) == 4 * kv_cache_bytes_per_token(gqa)


def test_training_memory_sharding_and_checkpointing_reduce_the_right_terms():
    cfg = ModelConfig(vocab_size=128256, hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=4,
                      intermediate_size=11008, max_seq_len=4096)
    full = training_memory_bytes(cfg, micro_batch_size=2, seq_len=4096)
    params = parameter_counts(cfg)["total"]
    assert full["weights"] == 4 * params and full["optimizer"] == 8 * params
    sharded = training_memory_bytes(cfg, micro_batch_size=2, seq_len=4096, num_shards=8)
    assert sharded["optimizer"] == full["optimizer"] // 8
    assert sharded["activations"] == full["activations"]
    checkpointed = training_memory_bytes(cfg, micro_batch_size=2, seq_len=4096, activation_checkpointing=True)
    # Checkpointing keeps each block's input instead of its ~6h + 2kv + 4I values (one block recomputed).
    per_layer = 6 * 2048 + 2 * 4 * 128 + 4 * 11008
    saved_values = 2 * 4096 * ((36 - 1) * per_layer - 36 * 2048)
    assert full["activations"] - checkpointed["activations"] == saved_values * 2  # bf16 bytes
    assert checkpointed["activations"] < full["activations"] / 2
    # Every 2nd block of 36: 18 keep only their input, 18 keep everything, one is recomputed at a time.
    half = training_memory_bytes(cfg, micro_batch_size=2, seq_len=4096, activation_checkpointing=True, checkpoint_every=2)
    assert full["activations"] - half["activations"] == 2 * 4096 * ((18 - 1) * per_layer - 18 * 2048) * 2
    assert checkpointed["total"] == sum(v for k, v in checkpointed.items() if k != "total")


def test_tensor_parallel_splits_activations_and_with_loss_parallel_the_logits():
    cfg = ModelConfig(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192)
    logits = 2 * 2 * 4096 * cfg.vocab_size * 4  # float32 logits and their gradient
    alone = training_memory_bytes(cfg, micro_batch_size=2, seq_len=4096)
    split = training_memory_bytes(cfg, micro_batch_size=2, seq_len=4096, tensor_parallel=2)
    assert split["activations"] - logits == (alone["activations"] - logits) // 2  # logits on every TP rank
    vocab_split = training_memory_bytes(cfg, micro_batch_size=2, seq_len=4096, tensor_parallel=2, loss_parallel=True)
    assert vocab_split["activations"] == split["activations"] - logits // 2
