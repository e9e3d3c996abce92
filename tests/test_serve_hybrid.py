"""`smoltrain serve` on Gemma 3 (sliding-window layers) and a Qwen3-Next hybrid (gated-DeltaNet layers): greedy chat
replies through the openai client equal `smoltrain generate`'s, one request at a time and three batched together."""

import concurrent.futures
import json

import openai
import pytest
from serve_helpers import running, tiny_chat_model

from smoltrain.post.chat.repl import generate_file, load_chat_model
from smoltrain.serve import build_app

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour, any colour you like."}],
    [{"role": "user", "content": "Hi"}],
]
# 2 layers each. Gemma 3: a local layer with a window of 8 (prompts of ~20-40 tokens and 24-token replies overrun it)
# then a global one. The hybrid: a gated-DeltaNet layer (conv and recurrent state per row) then gated full attention.
MODELS = {
    "gemma3": dict(qk_norm=True, qk_norm_per_head=True, norm_plus_one=True, sandwich_norm=True, embed_scale=True,
                   mlp_activation="gelu_tanh", sliding_window=8, global_every=2, rope_local_theta=10000.0),
    "qwen3_next": dict(full_attention_every=2, qk_norm=True, norm_plus_one=True, attention_output_gate=True,
                       partial_rotary_factor=0.5, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                       linear_value_head_dim=8),
}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_greedy_chat_equals_smoltrain_generate(tmp_path, family, one_thread):
    folder = tiny_chat_model(tmp_path, **MODELS[family])
    model, tokenizer = load_chat_model(folder, device="cpu")
    kinds = {model.config.layer_kind(i) for i in range(model.config.num_layers)}
    assert kinds == ({"local", "global"} if family == "gemma3" else {"linear", "global"})
    rows = [{"messages": messages} for messages in CONVERSATIONS]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    generate_file(model, tokenizer, tmp_path / "in.jsonl", tmp_path / "out.jsonl", max_new_tokens=24)
    expected = [json.loads(line)["completions"][0] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(set(expected)) == len(expected), "the replies differ, so a mix-up between rows would show"
    app = build_app(model, tokenizer, name=family, max_tokens=32, max_batch=4, max_queue=8)
    with running(app) as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        ask = lambda messages: api.chat.completions.create(model=family, messages=messages, temperature=0, max_tokens=24)
        assert [ask(messages).choices[0].message.content for messages in CONVERSATIONS] == expected
        # The three at once: rows of different lengths, left-padded and right-aligned in the shared cache.
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(ask, CONVERSATIONS))
        assert [r.choices[0].message.content for r in replies] == expected
