"""Model behaviour against independent references: documents run alone, brute-force attention,
F.cross_entropy, the z-loss formula, and an unchunked loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from smoltrain.config import ModelConfig
from smoltrain.model import loss, transformer
from smoltrain.model.transformer import build_model

BASE = dict(vocab_size=200, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96, max_seq_len=64)


@pytest.mark.parametrize("switches", [dict(), dict(nope_every=2), dict(qk_norm=True, num_kv_heads=1)])
def test_document_masked_packed_sequence_equals_each_document_alone(switches):
    model = build_model(ModelConfig(**{**BASE, **switches}), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [7, 12, 1, 20]
    documents = [torch.randint(0, 200, (n,), generator=g) for n in lengths]
    packed = torch.cat(documents)[None]
    document_ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        together = model(packed, document_ids=document_ids)[0]
        alone = torch.cat([model(d[None])[0] for d in documents])
        unmasked = model(packed)[0]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked, alone, atol=1e-3)  # the mask does something


def test_init_depends_only_on_seed_and_parameter_name():
    small = build_model(ModelConfig(**BASE), seed=4)
    # Deeper, untied: a different module tree, yet every shared name starts from the same values.
    large = build_model(ModelConfig(**{**BASE, "num_layers": 4}, tie_embeddings=False), seed=4)
    small_state, large_state = small.state_dict(), large.state_dict()
    assert set(small_state) < set(large_state)
    for name, tensor in small_state.items():
        assert torch.equal(tensor, large_state[name]), name
    # Every matrix gets its own stream: no two tensors of one shape coincide.
    assert not torch.equal(small_state["layers.0.self_attn.k_proj.weight"], small_state["layers.0.self_attn.v_proj.weight"])
    assert not torch.equal(small_state["layers.0.mlp.gate_proj.weight"], small_state["layers.1.mlp.gate_proj.weight"])
    other_seed = build_model(ModelConfig(**BASE), seed=5).state_dict()
    assert not torch.equal(other_seed["embed_tokens.weight"], small_state["embed_tokens.weight"])
    # Drawn from Normal(0, init_std): std within 2% for 12800 samples.
    assert abs(small_state["embed_tokens.weight"].std().item() - 0.02) < 0.02 * 0.02 * 3
    assert torch.equal(small_state["norm.weight"], torch.ones(64))


def test_init_is_the_same_when_blocks_are_wrapped_for_activation_checkpointing():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    plain = build_model(ModelConfig(**BASE), seed=1)
    wrapped = build_model(ModelConfig(**BASE), seed=99)
    for i, block in enumerate(wrapped.layers):
        wrapped.layers[i] = checkpoint_wrapper(block)
    assert any("_checkpoint_wrapped_module" in name for name, _ in wrapped.named_parameters())
    wrapped.init_weights(1)  # parameter names now carry the wrapper prefix
    for (name, a), (_, b) in zip(plain.named_parameters(), wrapped.named_parameters()):
        assert torch.equal(a, b), name


def test_activation_checkpointing_every_nth_block_wraps_only_those():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from smoltrain.train.parallelize import apply_activation_checkpointing

    model = build_model(ModelConfig(**{**BASE, "num_layers": 5}), seed=0)
    apply_activation_checkpointing(model, every=2)
    assert [isinstance(block, CheckpointWrapper) for block in model.layers] == [True, False, True, False, True]


def _brute_force_attention(attention, x):
    """softmax(q k^T / sqrt(d)) v with each KV head copied for its group of query heads, causal."""
    batch, seq, _ = x.shape
    heads, kv_heads, dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
    q = (x @ attention.q_proj.weight.T).view(batch, seq, heads, dim).transpose(1, 2)
    k = (x @ attention.k_proj.weight.T).view(batch, seq, kv_heads, dim).transpose(1, 2)
    v = (x @ attention.v_proj.weight.T).view(batch, seq, kv_heads, dim).transpose(1, 2)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
    scores = scores.masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), float("-inf"))
    y = scores.softmax(-1) @ v
    return y.transpose(1, 2).reshape(batch, seq, heads * dim) @ attention.o_proj.weight.T


@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 2), (8, 1)], ids=["MHA", "GQA", "MQA"])
def test_attention_heads_share_kv_as_grouped_query_attention(num_heads, num_kv_heads):
    config = ModelConfig(**{**BASE, "num_heads": num_heads, "num_kv_heads": num_kv_heads}, position_encoding="none")
    model = build_model(config, seed=2)
    attention = model.layers[0].self_attn
    head_dim = 64 // num_heads
    assert attention.q_proj.weight.shape == (num_heads * head_dim, 64)
    assert attention.k_proj.weight.shape == (num_kv_heads * head_dim, 64)
    assert attention.v_proj.weight.shape == (num_kv_heads * head_dim, 64)
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(0))
    empty = torch.empty(0)
    with torch.no_grad():
        ours = attention(x, empty, empty, None)
    torch.testing.assert_close(ours, _brute_force_attention(attention, x), atol=1e-5, rtol=1e-5)


def _batch(seed=0, batch=2, seq=16, ignore=True):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 200, (batch, seq), generator=g)
    labels = torch.randint(0, 200, (batch, seq), generator=g)
    if ignore:
        labels[0, :5] = -100  # e.g. prompt tokens in SFT
    return input_ids, labels


def test_loss_equals_cross_entropy_of_the_logits():
    model = build_model(ModelConfig(**BASE, tie_embeddings=False), seed=0)
    input_ids, labels = _batch()
    with torch.no_grad():
        out = model(input_ids, labels=labels)
        logits = model(input_ids)
    expected = F.cross_entropy(logits.reshape(-1, 200), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.ce_loss, expected)
    assert out.num_tokens.item() == 2 * 16 - 5
    summed = model(input_ids, labels=labels, reduction="sum")
    torch.testing.assert_close(summed.loss, expected * 27)


def test_z_loss_adds_weight_times_mean_squared_log_normaliser():
    weight = 1e-2
    model = build_model(ModelConfig(**BASE, z_loss=weight), seed=0)
    with torch.no_grad():  # make log Z clearly non-zero
        model.embed_tokens.weight.mul_(30)
    input_ids, labels = _batch()
    with torch.no_grad():
        out = model(input_ids, labels=labels)
        logits = model(input_ids).reshape(-1, 200)
    valid = labels.reshape(-1) != -100
    log_z = torch.logsumexp(logits, -1)[valid]
    ce = F.cross_entropy(logits, labels.reshape(-1), ignore_index=-100)
    assert log_z.pow(2).mean() > 1.0
    torch.testing.assert_close(out.ce_loss, ce)
    torch.testing.assert_close(out.loss, ce + weight * log_z.pow(2).mean())


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_equals_unchunked_in_value_and_gradient(monkeypatch, tied):
    config = ModelConfig(**BASE, tie_embeddings=tied, z_loss=1e-3)
    input_ids, labels = _batch(seq=24)

    def loss_and_grads(model):
        out = model(input_ids, labels=labels)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    whole_loss, whole_grads = loss_and_grads(build_model(config, seed=0))
    monkeypatch.setattr(loss, "LOSS_CHUNK_ELEMENTS", 200 * 5)  # 5 tokens per chunk: 10 chunks
    chunked_loss, chunked_grads = loss_and_grads(build_model(config, seed=0))
    torch.testing.assert_close(chunked_loss, whole_loss)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("tied", [True, False])
def test_compiled_blocks_and_loss_match_eager_in_value_and_gradient(monkeypatch, tied):
    """apply_compile's graphs (aot_eager: the capture and autograd plumbing without codegen time)
    over chunked, checkpointed loss chunks give eager's loss and gradients, tied head included."""
    from smoltrain.train.parallelize import apply_compile

    torch._dynamo.reset()
    config = ModelConfig(**BASE, tie_embeddings=tied, z_loss=1e-3, nope_every=2)
    input_ids, labels = _batch(seq=24)
    monkeypatch.setattr(loss, "LOSS_CHUNK_ELEMENTS", 200 * 20)  # chunks of 20, 20 and 8 tokens

    def loss_and_grads(model):
        out = model(input_ids, labels=labels)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager_loss, eager_grads = loss_and_grads(build_model(config, seed=0))
    graphs = []

    def recording_aot_eager(graph, example_inputs):
        graphs.append(graph.code)
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(graph, example_inputs)

    compiled = build_model(config, seed=0)
    apply_compile(compiled, backend=recording_aot_eager)
    compiled_loss, compiled_grads = loss_and_grads(compiled)
    assert any("cross_entropy" in code for code in graphs) and any("scaled_dot_product" in code for code in graphs)
    assert set(compiled.state_dict()) == set(build_model(config, seed=0).state_dict())  # names unchanged
    torch.testing.assert_close(compiled_loss, eager_loss)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_token_logprobs_equal_log_softmax_of_logits_at_the_labels_and_chunk_alike(monkeypatch):
    model = build_model(ModelConfig(**BASE), seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 200, (3, 11), generator=g)
    labels = torch.randint(0, 200, (3, 11), generator=g)
    labels[0, :4] = -100
    with torch.no_grad():
        logits = model(ids).float()
        expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        expected = torch.where(labels != -100, expected, 0.0)
        got = transformer.token_logprobs(model, ids, labels, temperature=0.7)
        summed = model(ids, labels=labels, reduction="sum")
        plain = transformer.token_logprobs(model, ids, labels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(-plain.sum(), summed.loss, atol=1e-4, rtol=1e-5)  # the loss is their negative sum
    # Chunked (recomputed in backward) equals one pass, in value and gradient.
    full = transformer.token_logprobs(model, ids, labels)
    (grad_full,) = torch.autograd.grad(full.sum(), model.layers[0].mlp.up_proj.weight)
    monkeypatch.setattr(loss, "LOSS_CHUNK_ELEMENTS", 200 * 5)
    chunked = transformer.token_logprobs(model, ids, labels)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_chunked, grad_full, atol=1e-6, rtol=1e-5)
