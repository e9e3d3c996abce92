"""`smoltrain serve` on a mixture-of-experts model: greedy chat replies through the openai client equal
`smoltrain generate`'s, with prompts of different lengths batched together (left padding goes through the router)."""

import concurrent.futures
import json

import openai
from serve_helpers import running, tiny_chat_model

from smoltrain.post.chat.repl import generate_file, load_chat_model
from smoltrain.serve import build_app

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour, any colour you like."}],
    [{"role": "user", "content": "Hi"}],
]


def test_greedy_chat_on_an_moe_model_equals_smoltrain_generate(tmp_path, one_thread):
    # 4 experts, top-2, renormalised, a dense first layer: the router decides per token, so a padded or batched row
    # that routed differently would change the reply.
    folder = tiny_chat_model(tmp_path, num_experts=4, experts_per_token=2, expert_hidden=32, moe_dense_layers=[0])
    model, tokenizer = load_chat_model(folder, device="cpu")
    assert model.config.num_experts == 4
    rows = [{"messages": messages} for messages in CONVERSATIONS]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    generate_file(model, tokenizer, tmp_path / "in.jsonl", tmp_path / "out.jsonl", max_new_tokens=16)
    expected = [json.loads(line)["completions"][0] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(set(expected)) == len(expected), "the replies differ, so a mix-up between rows would show"
    app = build_app(model, tokenizer, name="moe", max_tokens=32, max_batch=4, max_queue=8)
    with running(app) as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        for messages, text in zip(CONVERSATIONS, expected):
            reply = api.chat.completions.create(model="moe", messages=messages, temperature=0, max_tokens=16)
            assert reply.choices[0].message.content == text
        # The three at once, as the engine batches whatever arrives together.
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda m: api.chat.completions.create(model="moe", messages=m, temperature=0, max_tokens=16),
                                    CONVERSATIONS))
        assert [r.choices[0].message.content for r in replies] == expected
