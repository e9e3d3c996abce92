"""Gemma 3 against transformers: imported logits, export round trip, 10 training steps and greedy
generation of Gemma3ForCausalLM; sliding-window masks against transformers' mask functions and a
packed row against its documents run alone; sft with the gemma chat template, then chat generation."""

from pathlib import Path

import pytest
import torch
import yaml
from chat_helpers import VOCAB as VOCAB_SFT
from chat_helpers import chat_tokenizers, conversations
from hf_training_parity import assert_training_matches_transformers, imported_pair
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_overlay

from smoltrain.config import Config, DataConfig, ModelConfig
from smoltrain.data.tokenizer import save_tokenizer
from smoltrain.model.attention import build_mask
from smoltrain.model.gemma3.hf import STYLE
from smoltrain.model.generate import generate
from smoltrain.model.transformer import build_model
from smoltrain.post.chat.data import write_conversations
from smoltrain.post.chat.template import (
    GEMMA_TOKENS,
    encode_chat,
    encode_prompt,
    end_of_turn_id,
    load_chat_tokenizer,
    write_chat_tokenizer,
)
from smoltrain.post.sft.stage import load_sft_config, sft
from smoltrain.report.hf_export import export_hf
from smoltrain.train.load_model import import_hf, load_any, save_model_folder

WINDOW = 8
# 7 layers: a global one (the sixth) among local ones; head_dim 16 with query_pre_attn_scalar 24 so
# a head_dim-derived scale shows; GQA; two RoPE bases.
HF_CONFIG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=7, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                 max_position_embeddings=256, rope_theta=100000.0, rope_local_base_freq=1000.0, pad_token_id=0)


def _hf_gemma(seed: int = 0, **changes) -> Gemma3ForCausalLM:
    """A tiny Gemma 3 with norm weights away from 0: a (1 + w) slip or a swapped norm shows."""
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**{**HF_CONFIG, **changes}))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(0.3 * torch.randn(p.shape))
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers' model, ours imported from its save_pretrained folder, folder root)."""
    root = tmp_path_factory.mktemp("gemma3")
    return (*imported_pair(_hf_gemma(), root), root)


def test_imported_gemma3_logits_match_transformers_and_export_round_trips(pair):
    hf, ours, config, root = pair
    m = config.model
    assert (m.sliding_window, m.global_every, m.rope_theta, m.rope_local_theta) == (WINDOW, 6, 100000.0, 1000.0)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))  # 40 tokens > window 8
    with torch.no_grad():
        ours_logits, theirs = ours(ids), hf(ids).logits
    assert (ours_logits - theirs).abs().max().item() <= 1e-5
    export_hf(ours, root / "exported")
    again = Gemma3ForCausalLM.from_pretrained(root / "exported", dtype=torch.float32, local_files_only=True).eval()
    assert again.config.layer_types == hf.config.layer_types
    expected = hf.state_dict()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    with torch.no_grad():
        assert torch.equal(again(ids).logits, theirs)


def test_sliding_window_document_mask_equals_transformers_mask_functions():
    document_ids = torch.tensor([[0] * 13 + [1] * 4 + [2] * 15])
    seq = document_ids.shape[1]
    positions = torch.arange(seq)

    def same_document(b, h, q, kv):
        return document_ids[b, q] == document_ids[b, kv]

    mask_fn = and_masks(causal_mask_function, sliding_window_overlay(WINDOW), same_document)
    q, kv = positions[:, None], positions[None, :]
    expected = mask_fn(0, 0, q, kv)
    assert torch.equal(build_mask(document_ids, "sdpa", WINDOW)[0, 0], expected)
    from torch.nn.attention.flex_attention import create_mask

    block = build_mask(document_ids, "flex", WINDOW) if torch.cuda.is_available() else None
    if block is not None:  # the CUDA path's BlockMask holds the same mask
        assert torch.equal(create_mask(block.mask_mod, 1, 1, seq, seq, device="cuda")[0, 0].cpu(), expected)


def test_packed_row_gives_each_document_its_alone_logits(pair):
    _, ours, _, _ = pair
    lengths = [13, 4, 15]
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 128, (1, n), generator=g) for n in lengths]
    document_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        packed = ours(torch.cat(docs, dim=1), document_ids=document_ids)
        alone = torch.cat([ours(d) for d in docs], dim=1)
    assert (packed - alone).abs().max().item() <= 1e-5


def test_ten_training_steps_give_transformers_losses(tmp_path):
    # No pad token: transformers' embedding gives its row no gradient (padding_idx), ours trains every row.
    hf = _hf_gemma(seed=3, pad_token_id=None).train()
    hf.save_pretrained(tmp_path / "hf")
    ours, _, _ = load_any(import_hf(tmp_path / "hf", tmp_path / "ours"))
    assert_training_matches_transformers(hf, ours, steps=10, seq_len=20, rel=1e-4)


def test_greedy_generation_past_the_window_equals_transformers(pair):
    hf, ours, _, _ = pair
    g = torch.Generator().manual_seed(4)
    # Prompts shorter and longer than the window, batched (left-padded) on our side, alone on theirs.
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (5, 11)]
    new_tokens = 14  # the decoded tokens run past the window of every local layer
    ours_out = generate(ours, prompts, new_tokens)
    for prompt, mine in zip(prompts, ours_out):
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
        assert mine == theirs[0, len(prompt):].tolist()


GEMMA_MODEL = dict(vocab_size=VOCAB_SFT, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=1, head_dim=16,
                   intermediate_size=64, max_seq_len=128, sliding_window=WINDOW, global_every=3, rope_local_theta=10000.0,
                   rope_theta=1_000_000.0, **STYLE)


def _gemma_tokenizer(root: Path) -> Path:
    """The chat tests' tokenizer with Gemma's two turn tokens added, and the gemma template beside it."""
    from tokenizers import Tokenizer

    chat_tokenizers(root)
    tok = Tokenizer.from_file(str(root / "base" / "tokenizer.json"))
    tok.add_special_tokens(list(GEMMA_TOKENS))
    save_tokenizer(tok, root / "gemma_base")
    return write_chat_tokenizer(root / "gemma_base", root / "gemma", "gemma")


def test_sft_on_gemma_trains_model_turns_only_and_generates_as_transformers(tmp_path):
    tokenizer_dir = _gemma_tokenizer(tmp_path)
    tok = load_chat_tokenizer(tokenizer_dir)
    convs = conversations(12)
    # Assistant-only mask: the masked tokens spell the model turns' contents and their <end_of_turn>, nothing else.
    for conv in convs[:4]:
        ids, mask = encode_chat(tok, conv.messages)
        masked = tok.decode([t for t, m in zip(ids, mask) if m])
        assert masked == "".join(m["content"].strip() + "<end_of_turn>" for m in conv.messages if m["role"] == "assistant")
    config = Config(model=ModelConfig(**{**GEMMA_MODEL, "vocab_size": len(tok)}), data=DataConfig(seq_len=128))
    save_model_folder(build_model(config.model, seed=3), config, tmp_path / "init", tokenizer=tokenizer_dir)
    write_conversations(tmp_path / "chat.jsonl", convs)
    raw = {"data": {"seq_len": 128},
           "sft": {"data": [str(tmp_path / "chat.jsonl")], "epochs": None, "warmup_fraction": None, "chat_eval_items": 0,
                   "chat_template": "gemma"},
           "optim": {"lr": 3e-3, "warmup_steps": 1, "schedule": "constant"},
           "train": {"init": str(tmp_path / "init"), "out_dir": str(tmp_path / "run"), "max_steps": 3, "log_every": 1,
                     "save_every": 100, "eval_every": 1000, "global_batch_tokens": 256, "micro_batch_size": 2,
                     "tensorboard": False, "device": "cpu", "compile": "off"},
           "eval": {"val_batches": 0}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert sft(load_sft_config(tmp_path / "r.yaml"))["finished"]
    # Chat generation from the run equals transformers' greedy generation of the exported model.
    model, _, _ = load_any(tmp_path / "run")
    prompt = [{"role": "user", "content": convs[0].messages[0]["content"] if convs[0].messages[0]["role"] == "user"
               else convs[0].messages[1]["content"]}]
    ids = encode_prompt(tok, prompt)
    eot = end_of_turn_id(tok)
    ours = generate(model.eval(), [ids], 20, stop_tokens=[eot])[0]
    export_hf(tmp_path / "run", tmp_path / "hf")
    hf = Gemma3ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=eot, pad_token_id=0)
    theirs = theirs[0, len(ids):].tolist()
    assert ours == (theirs[:-1] if theirs and theirs[-1] == eot else theirs)


def test_grpo_shared_prompt_logprobs_of_gemma_equal_the_full_rows(pair):
    """completion_logprobs (each prompt once, its completions attending to it) keeps the sliding window:
    prompts and completions longer than the window give the full rows' log-probabilities."""
    from smoltrain.model.transformer import token_logprobs
    from smoltrain.post.rl.rollout import completion_logprobs, generate_rollouts, micro_batches

    _, ours, _, _ = pair
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (3, 12)]
    rollouts = generate_rollouts(ours, prompts, num_generations=2, max_completion_length=10, temperature=1.0,
                                 generator=torch.Generator().manual_seed(0))
    for batch in micro_batches(rollouts, torch.zeros(4), size=4):
        with torch.no_grad():
            full = token_logprobs(ours, batch["input_ids"], batch["labels"])
            shared = completion_logprobs(ours, batch)
        torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)


def test_decoding_keeps_only_the_window_of_local_layers(pair):
    from smoltrain.model.generate import _decode_step, _prefill

    _, ours, config, _ = pair
    state = _prefill(ours, [list(range(1, 21)), list(range(3, 9))], max_new_tokens=12, lockstep=None, repeats=2)
    for column in range(state.longest, state.longest + 11):
        state.ids[:, column] = 5
        _decode_step(ours, state, column)
    cache = state.cache
    for layer in range(config.model.num_layers):
        local = config.model.is_local_layer(layer)
        # 20 prompt tokens and 11 own ones: a local layer keeps the prompt's last 7 and a ring of 8
        assert cache.prompts[0][layer].shape[2] == (WINDOW - 1 if local else 20)
        assert cache.keys[layer].shape[2] == (WINDOW if local else 12)
