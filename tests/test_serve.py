"""`smoltrain serve`: the official openai client against a served tiny model (greedy replies equal
`smoltrain generate`'s, streaming, seeds, stops, errors, auth, 50 concurrent requests) and the engine's
continuous batching against `generate` run one prompt at a time."""

import asyncio
import json
import threading
import time

import httpx2
import openai
import pytest
import torch
import uvicorn
from serve_helpers import CONTEXT, running, tiny_chat_model

from smoltrain import cli
from smoltrain.model.generate import generate
from smoltrain.post.chat.repl import generate_file, load_chat_model
from smoltrain.post.chat.template import encode_prompt, end_of_turn_id
from smoltrain.serve import build_app
from smoltrain.serve.engine import Engine, Sequence
from smoltrain.serve.streams import TextStream

KEY = "test-key-0123"
CAP = 64  # the server's max_tokens cap in these tests


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model on a shared 2-core machine: more threads only contend
    folder = tiny_chat_model(tmp_path_factory.mktemp("serve"))
    model, tokenizer = load_chat_model(folder, device="cpu")
    yield folder, model, tokenizer
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def served(chat_model):
    """(base URL, engine) of the tiny model served with an 8-row batch."""
    _, model, tokenizer = chat_model
    app = build_app(model, tokenizer, name="tiny", max_tokens=CAP, max_batch=8, max_queue=64)
    with running(app) as url:
        yield url, app.state.server.engine


@pytest.fixture
def server(served):
    return served[0]


def client(url: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, timeout=60, **kwargs)


CONVERSATIONS = [
    ([{"role": "user", "content": "What is 2 + 3?"}], {}),
    ([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}],
     {"enable_thinking": False}),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "Count to three."}], {"enable_thinking": True}),
]


def test_greedy_chat_equals_smoltrain_generate(chat_model, server, tmp_path):
    folder, model, tokenizer = chat_model
    rows = [{"messages": messages, "chat_template_kwargs": kwargs} for messages, kwargs in CONVERSATIONS]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    generate_file(model, tokenizer, tmp_path / "in.jsonl", tmp_path / "out.jsonl", max_new_tokens=20)
    expected = [json.loads(line)["completions"][0] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    api = client(server)
    for (messages, kwargs), text in zip(CONVERSATIONS, expected):
        reply = api.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=20,
                                            extra_body={"chat_template_kwargs": kwargs})
        assert reply.choices[0].message.content == text
        assert reply.choices[0].message.role == "assistant"
        prompt = encode_prompt(tokenizer, messages, **kwargs)
        assert reply.usage.prompt_tokens == len(prompt)
        assert reply.choices[0].finish_reason == ("length" if reply.usage.completion_tokens == 20 else "stop")


def test_streamed_chunks_join_to_the_greedy_reply(chat_model, server):
    _, model, tokenizer = chat_model
    messages, kwargs = CONVERSATIONS[1]
    ids = generate(model, [encode_prompt(tokenizer, messages, **kwargs)], 24, stop_tokens=[end_of_turn_id(tokenizer)])[0]
    stream = client(server).chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=24,
                                                    stream=True, stream_options={"include_usage": True},
                                                    extra_body={"chat_template_kwargs": kwargs})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tokenizer.decode(ids, skip_special_tokens=False)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # token by token, not one block
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length" if len(ids) == 24 else "stop"]
    assert chunks[-1].usage.completion_tokens == len(ids) and chunks[-1].choices == []


def test_seeded_choices_sample_what_generate_samples_with_that_seed(chat_model, server):
    _, model, tokenizer = chat_model
    messages = CONVERSATIONS[0][0]
    prompt = encode_prompt(tokenizer, messages)
    # no top_p: it sorts the tiny random model's near-uniform probabilities, whose order float noise can swap
    reply = client(server).chat.completions.create(model="tiny", messages=messages, temperature=0.9, max_tokens=16, n=2,
                                                   seed=11)
    for index, choice in enumerate(reply.choices):
        ids = generate(model, [prompt], 16, temperature=0.9, stop_tokens=[end_of_turn_id(tokenizer)],
                       seed=11 + index)[0]
        assert choice.index == index and choice.message.content == tokenizer.decode(ids, skip_special_tokens=False)
    assert reply.choices[0].message.content != reply.choices[1].message.content
    streamed = ["", ""]
    for chunk in client(server).chat.completions.create(model="tiny", messages=messages, temperature=0.9, max_tokens=16,
                                                        n=2, seed=11, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert streamed == [choice.message.content for choice in reply.choices]


def test_a_stop_string_cuts_the_reply_streamed_or_not(server):
    api = client(server)
    messages = CONVERSATIONS[0][0]
    full = api.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=30).choices[0].message.content
    stop = full[10:13]
    cut = full[: full.index(stop)]
    reply = api.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=30, stop=[stop, "\x00"])
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (cut, "stop")
    chunks = list(api.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=30, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_text_completions_continue_the_raw_prompt(chat_model, server):
    _, model, tokenizer = chat_model
    text = "The answer is"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stops = [end_of_turn_id(tokenizer)] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    expected = tokenizer.decode(generate(model, [ids], 12, stop_tokens=stops)[0], skip_special_tokens=False)
    reply = client(server).completions.create(model="tiny", prompt=text, temperature=0, max_tokens=12)
    assert reply.choices[0].text == expected and reply.usage.prompt_tokens == len(ids)
    streamed = client(server).completions.create(model="tiny", prompt=text, temperature=0, max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list().data] == ["tiny"]
    assert httpx2.get(f"{server}/health").json()["status"] == "ok"


@pytest.mark.parametrize("change, status, words", [
    ({"temperature": 5}, 400, "temperature"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"max_tokens": CAP + 1}, 400, "at most 64"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"n": 99}, 400, "n"),
    ({"chat_template_kwargs": {"bogus": 1}}, 400, "bogus"),
    ({"messages": [{"role": "user", "content": "word " * CONTEXT}]}, 400, "context"),
    ({"model": "gpt-9"}, 404, "does not exist"),
])
def test_bad_requests_get_openai_style_4xx_errors(server, change, status, words):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **change}
    response = httpx2.post(f"{server}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    with pytest.raises(openai.APIStatusError) as raised:  # the official client sees the same
        extra = {"chat_template_kwargs": body.pop("chat_template_kwargs")} if "chat_template_kwargs" in body else None
        client(server).chat.completions.create(**body, extra_body=extra)
    assert raised.value.status_code == status


def test_malformed_and_oversized_bodies_and_unknown_paths_do_not_hurt_the_server(server):
    bad_json = httpx2.post(f"{server}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    big = httpx2.post(f"{server}/v1/chat/completions", content=b"x" * (2**21 + 1), headers={"content-type": "application/json"})
    assert big.status_code == 413 and "at most" in big.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(40):
            yield b"y" * 2**16

    streamed = httpx2.post(f"{server}/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    for path in ("/../etc/passwd", "/page.html", "/static/x.js"):
        response = httpx2.get(f"{server}{path}")
        assert response.status_code == 404 and response.json()["error"]["code"] == "404"
    assert httpx2.get(f"{server}/health").json()["status"] == "ok"  # still serving


def test_fifty_concurrent_requests_are_all_answered_and_batched(chat_model, served):
    _, model, tokenizer = chat_model
    server, engine = served
    questions = [f"What is {i} + {i % 7}?" for i in range(50)]
    eot = end_of_turn_id(tokenizer)
    alone = [tokenizer.decode(generate(model, [encode_prompt(tokenizer, [{"role": "user", "content": q}])], 8,
                                       stop_tokens=[eot])[0], skip_special_tokens=False) for q in questions]

    async def ask_all():
        api = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
        replies = await asyncio.wait_for(asyncio.gather(*[
            api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=8)
            for q in questions]), timeout=300)
        await api.close()
        return replies

    steps_before = engine.steps
    replies = asyncio.run(ask_all())
    assert [r.choices[0].message.content for r in replies] == alone
    # one request at a time takes a decoding step per token after its first; batched, rows share steps
    one_at_a_time = sum(r.usage.completion_tokens - 1 for r in replies)
    assert engine.steps - steps_before < one_at_a_time / 2
    assert httpx2.get(f"{server}/health").json() == {"status": "ok", "running": 0, "waiting": 0}


def test_an_api_key_guards_every_v1_route_but_not_the_page(chat_model):
    _, model, tokenizer = chat_model
    with running(build_app(model, tokenizer, name="tiny", max_tokens=8, api_key=KEY)) as url:
        for key in ("wrong", KEY[:-1], KEY + "3"):
            with pytest.raises(openai.AuthenticationError):
                client(url, api_key=key).models.list()
        no_header = httpx2.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert no_header.status_code == 401 and no_header.json()["error"]["code"] == "invalid_api_key"
        reply = client(url, api_key=KEY).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                                 max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens <= 3
        assert httpx2.get(f"{url}/").status_code == 200 and httpx2.get(f"{url}/health").status_code == 200


def test_a_full_queue_answers_503_and_the_queued_request_is_served_later(chat_model):
    _, model, tokenizer = chat_model
    app = build_app(model, tokenizer, name="tiny", max_tokens=8, max_batch=1, max_queue=1)
    engine = app.state.server.engine
    start, engine.start = engine.start, lambda: None  # hold the engine so that the queue fills
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    with running(app) as url:
        first: list = []
        waiter = threading.Thread(target=lambda: first.append(httpx2.post(f"{url}/v1/chat/completions", json=body, timeout=60)))
        waiter.start()
        deadline = time.monotonic() + 30
        while engine.waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = httpx2.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert second.status_code == 503 and second.json()["error"]["code"] == "queue_full"
        start()
        waiter.join(timeout=60)
        assert first[0].status_code == 200 and first[0].json()["choices"][0]["message"]["role"] == "assistant"


def test_the_serve_verb_serves_the_folder_on_localhost_with_the_key_from_the_environment(chat_model, monkeypatch, capsys):
    folder = chat_model[0]
    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.update(app=app, **kwargs))
    monkeypatch.setenv("SMOLTRAIN_API_KEY", KEY)
    assert cli.main(["serve", str(folder), "--port", "8123", "--device", "cpu"]) == 0
    assert (calls["host"], calls["port"]) == ("127.0.0.1", 8123)
    with running(calls["app"]) as url:
        assert [m.id for m in client(url, api_key=KEY).models.list().data] == [folder.name]
        with pytest.raises(openai.AuthenticationError):
            client(url).models.list()
    assert cli.main(["serve", str(folder), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the engine and the text alone


@pytest.mark.parametrize("stops, expected", [([], "Prix: 5 € 😀 and héllo wörld"), (["llo w"], "Prix: 5 € 😀 and hé"),
                                             (["😀"], "Prix: 5 € ")])
def test_streamed_text_never_splits_a_character_nor_shows_what_a_stop_cuts(chat_model, stops, expected):
    _, _, tokenizer = chat_model
    text = "Prix: 5 € 😀 and héllo wörld"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) / 2  # the 512-token vocabulary spells the accents and the emoji in byte pieces
    stream, deltas = TextStream(tokenizer, stops), []
    for token in ids:
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    deltas.append(stream.close())
    assert "".join(deltas) == expected and not any("\ufffd" in d for d in deltas)
    shown = ""
    for d in deltas:  # nothing a stop later cut was ever shown
        shown += d
        assert expected.startswith(shown)




def test_requests_joining_a_running_batch_decode_as_they_would_alone(chat_model):
    """A joins alone; at A's 3rd token B (a longer prompt: the batch is padded on the left), C (a shorter
    one) and D (with a stop token) join; C and D end first (rows and columns are cut). Each equals
    generate on its own prompt."""
    _, model, _ = chat_model
    prompts = {"A": [5, 17, 99, 3, 250, 41], "B": list(range(30, 52)), "C": [7, 8], "D": [300, 301, 302]}
    budgets = {"A": 14, "B": 10, "C": 3, "D": 10}
    alone = {name: generate(model, [prompt], budgets[name])[0] for name, prompt in prompts.items()}
    stop = alone["D"][4]  # D stops at its 5th token, or earlier where that token came before
    engine = Engine(model, max_batch=4, max_queue=4)
    got = {name: [] for name in prompts}
    ended = threading.Event()
    reasons = {}

    def sequence(name):
        def emit(token):
            got[name].append(token)
            if name == "A" and len(got["A"]) == 3:
                engine.submit([sequence("B"), sequence("C"), sequence("D")])
            return True

        def finish(reason):
            reasons[name] = reason
            if len(reasons) == len(prompts):
                ended.set()

        return Sequence(prompt=prompts[name], max_tokens=budgets[name], emit=emit, finish=finish,
                        stop_tokens=frozenset([stop] if name == "D" else []))

    engine.start()
    try:
        engine.submit([sequence("A")])
        assert ended.wait(timeout=120)
    finally:
        engine.stop()
    for name in "ABC":
        assert got[name] == alone[name], name
    assert got["D"] == alone["D"][: alone["D"].index(stop)]  # the stop token itself is not emitted
    assert reasons == {"A": "length", "B": "length", "C": "length", "D": "stop"}
    # B, C, D joined at A's 4th token and decoded in A's steps: 13 steps (one at a time: over 13 + 9 + 2)
    assert engine.steps == 13
