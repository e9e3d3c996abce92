"""Chat templates, conversation data, embedded chat data and chat evals (the parts SFT, DPO and GRPO share)."""

import gzip
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from smoltrain.config import ModelConfig
from smoltrain.data.tokenizer import save_tokenizer, train_tokenizer
from smoltrain.errors import ConfigError, DataError
from smoltrain.eval.answers import is_correct
from smoltrain.model.transformer import build_model
from smoltrain.post.chat import evals as chat_eval
from smoltrain.post.chat.data import (
    Conversation,
    assistant_modes,
    conversation_mode,
    read_conversations,
    system_prompt,
    write_conversations,
)
from smoltrain.post.chat.template import (
    DEFAULT_SYSTEM_PROMPT,
    encode_chat,
    encode_prompt,
    load_chat_tokenizer,
    render,
    write_chat_tokenizer,
)
from smoltrain.post.embedded import (
    MIXTURE,
    apply_rule,
    arithmetic_items,
    arithmetic_prompts,
    chat_conversations,
    ensure_embedded_chat,
    follows_rule,
    persona_prompts,
    rules,
)

TEXT = ("The answer is 42. What does json.dumps do? Serialize obj to a JSON formatted str. "
        "system user assistant Reasoning Mode think no_think Custom Instructions Metadata ") * 30


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer([TEXT], 400, show_progress=False), root / "base")
    write_chat_tokenizer(root / "base", root / "smollm3", "smollm3")
    write_chat_tokenizer(root / "base", root / "chatml", "chatml")
    return root


@pytest.fixture(scope="module")
def tok(folders):
    return load_chat_tokenizer(folders / "smollm3")


def system_block(mode, instructions=DEFAULT_SYSTEM_PROMPT):
    return (f"<|im_start|>system\n## Metadata\n\nReasoning Mode: {mode}\n\n## Custom Instructions\n\n"
            f"{instructions}\n\n<|im_end|>\n")


USER = {"role": "user", "content": "What is 2 + 3?"}
THINK_REPLY = {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\nThe answer is 5."}
DIRECT_REPLY = {"role": "assistant", "content": "The answer is 5."}


# ----------------------------------------------------------------------------- templates


def test_smollm3_renders_default_prompt_only_without_a_system_prompt(tok):
    assert render(tok, [USER, THINK_REPLY]) == (
        system_block("/think") + "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n2 + 3 = 5\n</think>\nThe answer is 5.<|im_end|>\n")
    with_system = render(tok, [{"role": "system", "content": "Be brief. /no_think"}, USER, DIRECT_REPLY])
    assert with_system == (system_block("/no_think", "Be brief.") + "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
                           "<|im_start|>assistant\n<think>\n\n</think>\nThe answer is 5.<|im_end|>\n")
    assert DEFAULT_SYSTEM_PROMPT not in with_system
    via_kwargs = render(tok, [USER, DIRECT_REPLY], custom_instructions="Be brief.", enable_thinking=False)
    assert via_kwargs == with_system
    # a flag alone is not a prompt: the default one is rendered
    assert render(tok, [{"role": "system", "content": "/no_think"}, USER, DIRECT_REPLY]) == render(
        tok, [USER, DIRECT_REPLY], enable_thinking=False)


def test_system_flag_overrides_enable_thinking_and_generation_prompt_has_empty_think_block(tok):
    prompt = render(tok, [{"role": "system", "content": "/no_think"}, USER], add_generation_prompt=True,
                    enable_thinking=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n")
    assert "Reasoning Mode: /no_think" in prompt
    assert render(tok, [USER], add_generation_prompt=True).endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
                                                                    "<|im_start|>assistant\n")


def test_a_trailing_user_flag_switches_the_mode_mid_chat(tok):
    messages = [USER, DIRECT_REPLY, {"role": "user", "content": "And 4 + 4? /think"},
                {"role": "assistant", "content": "<think>\n4 + 4 = 8\n</think>\nThe answer is 8."}]
    text = render(tok, messages, enable_thinking=False)
    assert text.count("<think>\n\n</think>\n") == 1
    assert assistant_modes(Conversation(messages, {"enable_thinking": False})) == ["no_think", "think"]
    assert conversation_mode(Conversation(messages, {"enable_thinking": False})) == "mixed"


def test_tools_are_listed_in_the_system_block_and_tool_results_are_user_turns(tok):
    tool = {"name": "add", "description": "add two numbers"}
    messages = [USER, {"role": "assistant", "content": "<tool_call>add</tool_call>"}, {"role": "tool", "content": "5"},
                DIRECT_REPLY]
    text = render(tok, messages, xml_tools=[tool], python_tools=["def f(): ..."], enable_thinking=False)
    assert json.dumps(tool) + "\n</tools>" in text and "def f(): ...\n</tools>" in text
    assert "<|im_start|>user\n5<|im_end|>" in text
    assert render(tok, messages, tools=[tool], enable_thinking=False) == render(tok, messages, xml_tools=[tool],
                                                                                enable_thinking=False)


@pytest.mark.parametrize("template", ["smollm3", "chatml"])
def test_assistant_mask_is_content_and_end_of_turn_only(folders, template):
    tok = load_chat_tokenizer(folders / template)
    messages = [{"role": "system", "content": "Be brief."}, USER, THINK_REPLY,
                {"role": "user", "content": "Again /no_think"}, DIRECT_REPLY]
    ids, mask = encode_chat(tok, messages)
    assert ids == tok(render(tok, messages), add_special_tokens=False)["input_ids"]
    # independent: the masked tokens, run by run, are each assistant's content followed by <|im_end|>
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    assert [tok.decode(r) for r in runs] == [THINK_REPLY["content"] + "<|im_end|>", DIRECT_REPLY["content"] + "<|im_end|>"]


def test_chat_template_file_is_what_transformers_loads(folders):
    assert (folders / "smollm3" / "chat_template.jinja").is_file()
    plain = AutoTokenizer.from_pretrained(folders / "smollm3", local_files_only=True)
    ours = load_chat_tokenizer(folders / "smollm3")
    messages = [USER, DIRECT_REPLY]
    assert plain.apply_chat_template(messages, tokenize=False, enable_thinking=False) == render(ours, messages,
                                                                                               enable_thinking=False)
    assert encode_prompt(ours, [USER]) == plain.apply_chat_template([USER], add_generation_prompt=True,
                                                                    return_dict=True)["input_ids"]


def test_model_template_needs_one_and_missing_special_tokens_are_refused(tmp_path, folders):
    with pytest.raises(ConfigError, match="no chat template"):
        write_chat_tokenizer(folders / "base", tmp_path / "model", "model")
    write_chat_tokenizer(folders / "chatml", tmp_path / "kept", "model")
    assert (tmp_path / "kept" / "chat_template.jinja").read_text() == (folders / "chatml" / "chat_template.jinja").read_text()
    save_tokenizer(_no_chat_tokens_tokenizer(), tmp_path / "plain")
    with pytest.raises(DataError, match="<think>"):
        write_chat_tokenizer(tmp_path / "plain", tmp_path / "out", "smollm3")


def _no_chat_tokens_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world"] * 5, trainers.BpeTrainer(vocab_size=270, special_tokens=["<|endoftext|>"],
                                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


# ----------------------------------------------------------------------------- conversation data


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"messages": [USER, DIRECT_REPLY], "chat_template_kwargs": {"enable_thinking": False}}
BAD_ROWS = {
    "not_json": ("{not json", "not valid JSON"),
    "no_messages": ({"text": "hi"}, "no 'messages'"),
    "empty_messages": ({"messages": []}, "'messages' is empty"),
    "unknown_role": ({"messages": [{"role": "bot", "content": "x"}, DIRECT_REPLY]}, "unknown role 'bot'"),
    "no_assistant": ({"messages": [USER]}, "no assistant turn"),
    "not_string": ({"messages": [USER, {"role": "assistant", "content": ["x"]}]}, "content is list, not a string"),
    "none_content": ({"messages": [{"role": "user", "content": None}, DIRECT_REPLY]}, "content None"),
    "none_system": ({"messages": [{"role": "system", "content": None}, USER, DIRECT_REPLY]}, "SmolLM3 SFT bug"),
    "none_custom_instructions": ({"messages": [USER, DIRECT_REPLY], "chat_template_kwargs": {"custom_instructions": None}},
                                 "custom_instructions is None"),
    "unknown_kwarg": ({"messages": [USER, DIRECT_REPLY], "chat_template_kwargs": {"enable_thinkin": True}},
                      "unknown key 'enable_thinkin'"),
    "prompt_only": ({"prompt": "hi"}, "without 'completion'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_every_bad_row_kind_is_a_one_line_error_naming_file_and_line(tmp_path, kind):
    row, message = BAD_ROWS[kind]
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, GOOD, row])
    with pytest.raises(DataError) as error:
        read_conversations([str(path)])
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_skip_bad_counts_what_it_skipped(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD] + [row for row, _ in BAD_ROWS.values()] + [GOOD])
    data = read_conversations([str(path)], skip_bad=True)
    assert len(data.conversations) == 2
    assert sum(data.skipped.values()) == len(BAD_ROWS)
    assert data.skipped["none_system_prompt"] == 2


def test_one_system_prompt_replaced_by_none_is_refused(tmp_path):
    """The playbook's bug: a dataset where one system prompt became None must not load."""
    rows = [{"messages": [{"role": "system", "content": f"Rule {i}."}, USER, DIRECT_REPLY]} for i in range(20)]
    rows[13]["messages"][0]["content"] = None
    path = write_jsonl(tmp_path / "personas.jsonl", rows)
    with pytest.raises(DataError, match=r"personas.jsonl:14: .*None"):
        read_conversations([str(path)])


def test_prompt_completion_rows_gzip_and_parquet_read_the_same(tmp_path):
    rows = [{"prompt": "What is 2 + 3?", "completion": "The answer is 5."},
            {"prompt": [USER], "completion": [DIRECT_REPLY], "chat_template_kwargs": {"enable_thinking": False}}]
    plain = read_conversations([str(write_jsonl(tmp_path / "a.jsonl", rows))]).conversations
    assert plain[0].messages == [USER, DIRECT_REPLY] == plain[1].messages
    assert plain[1].kwargs == {"enable_thinking": False}
    write_conversations(tmp_path / "b.jsonl.gz", plain)
    assert [c.messages for c in read_conversations([str(tmp_path / "b.jsonl.gz")]).conversations] == [c.messages for c in plain]
    table = pa.Table.from_pylist([{"messages": [USER, DIRECT_REPLY],
                                   "chat_template_kwargs": {"enable_thinking": True, "custom_instructions": "Be brief."}},
                                  {"messages": [{"role": "user", "content": None}, DIRECT_REPLY],
                                   "chat_template_kwargs": {"enable_thinking": True, "custom_instructions": "x"}}])
    pq.write_table(table, tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c.parquet:row 2: message 0 \(user\) has content None"):
        read_conversations([str(tmp_path / "c.parquet")])
    data = read_conversations([str(tmp_path / "c.parquet")], skip_bad=True)
    assert data.conversations[0].kwargs == {"enable_thinking": True, "custom_instructions": "Be brief."}
    assert system_prompt(data.conversations[0]) == "Be brief."
    assert data.conversations[0].source == "c"


# ----------------------------------------------------------------------------- embedded chat data


def test_embedded_chat_is_seeded_and_held_out_questions_never_train():
    first, again = chat_conversations("train", 300, seed=0), chat_conversations("train", 300, seed=0)
    assert [c.to_row() for s in first.values() for c in s] == [c.to_row() for s in again.values() for c in s]
    train = {i["question"] for i in arithmetic_items("train", 2000)}
    heldout = {i["question"] for i in arithmetic_items("heldout", 100)}
    assert not train & heldout
    for conv in (c for s in first.values() for c in s):
        for m in conv.messages:
            if m["role"] == "user":
                assert re.sub(r" /(no_)?think$", "", m["content"]) not in heldout


def test_embedded_answers_are_right_and_modes_match_the_reply_format(tok):
    for item in arithmetic_prompts("heldout", 30, mode="think"):
        last = item["steps"][-1]  # the last step computes the answer
        assert is_correct(f"<think>{last}</think>The answer is {item['answer']}.", item["answer"])
    data = chat_conversations("train", 400, seed=1)
    modes = {conversation_mode(c) for s in data.values() for c in s}
    assert modes == {"think", "no_think", "mixed"}
    for conv in (c for s in data.values() for c in s):
        replies = [m["content"] for m in conv.messages if m["role"] == "assistant"]
        for mode, reply in zip(assistant_modes(conv), replies):
            assert reply.startswith("<think>\n") == (mode == "think")
        if conv.source == "persona":
            rule = next(r["id"] for r in rules() if r["system"] == system_prompt(conv))
            assert follows_rule(rule, replies[-1])
        text = render(tok, conv.messages, **conv.kwargs)
        assert system_prompt(conv) is None or system_prompt(conv) in text


def test_rules_are_checked_on_the_final_answer():
    answer = "The answer is 42."
    for rule in rules():
        assert follows_rule(rule["id"], apply_rule(rule["id"], answer, "42"))
    assert not follows_rule("caps", answer) and not follows_rule("end:banana", answer)
    assert not follows_rule("max_words:3", answer) and follows_rule("max_words:3", "<think>a b c d e</think>Just 42.")
    assert follows_rule("end:banana", "The answer is 42. Banana.")
    assert not follows_rule("start:Okay", "")


def test_embedded_chat_files_are_cached_and_readable(tmp_path):
    files = ensure_embedded_chat(tmp_path, seed=0, count=200)
    assert ensure_embedded_chat(tmp_path, seed=0, count=200) == files
    data = read_conversations(files)
    assert {c.source for c in data.conversations} == {"arithmetic", "persona", "stdlib", "multiturn"}
    with gzip.open(files[0], "rt") as f:
        assert len(f.readlines()) == round(200 * MIXTURE["arithmetic"])


# ----------------------------------------------------------------------------- chat evals


def test_chat_eval_bookkeeping_against_scripted_replies(tok, monkeypatch, one_thread):
    """A scripted 'model' answers known prompts: every rate must be the hand-computed one."""
    model = build_model(ModelConfig(vocab_size=400, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                    intermediate_size=64, max_seq_len=512), seed=0)
    count, persona_count = 6, 4
    no_think = {p["question"]: p["answer"] for p in arithmetic_prompts("heldout", count, mode="no_think")}
    personas = persona_prompts("heldout", persona_count)
    first_question = next(iter(no_think))

    def scripted(model, prompts, max_new_tokens, **kwargs):
        out = []
        for ids in prompts:
            text = tok.decode(ids)
            question = text.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]
            persona = next((i for i, p in enumerate(personas) if p["messages"][0]["content"] + "\n" in text), None)
            if persona is not None:  # personas: follows the rule of the first two, ignores the others
                reply = apply_rule(personas[persona]["rule"], "The answer is 7.", "7") if persona < 2 else "..."
            elif text.endswith("<think>\n\n</think>\n"):  # no_think: right on even answers
                answer = no_think[question]
                reply = f"The answer is {answer}." if int(float(answer.strip('$'))) % 2 == 0 else "The answer is -1."
            elif question == first_question:  # think, but no think block: right, badly formatted
                reply = f"The answer is {no_think[question]}."
            else:  # think: a valid block, always right, then stops
                reply = f"<think>\nsteps\n</think>\nThe answer is {no_think[question]}."
            out.append(tok(reply, add_special_tokens=False)["input_ids"])
        return out

    monkeypatch.setattr(chat_eval, "generate", scripted)
    details = []
    results = chat_eval.chat_evals(model, tok, count=count, persona_count=persona_count, max_new_tokens=400,
                                   think_max_new_tokens=400, details=details)
    even = [int(float(a.strip("$"))) % 2 == 0 for a in no_think.values()]
    assert results["no_think_accuracy"] == pytest.approx(sum(even) / count)
    assert results["think_accuracy"] == 1.0
    assert results["adherence"] == 0.5
    # the format is a think-mode measure: one think reply of `count` lacks its block; tag-free no_think
    # and persona replies do not count (a base model writes those for nothing)
    assert results["think_format"] == pytest.approx((count - 1) / count) and results["stop_rate"] == 1.0
    p = sum(even) / count
    assert results["no_think_accuracy_stderr"] == pytest.approx((p * (1 - p) / (count - 1)) ** 0.5)
    think_lengths = [d["tokens"] for d in details if d["set"] == "think"]
    assert results["think_length"] == pytest.approx(sum(think_lengths) / count)
    assert results["n"] == {"no_think": count, "think": count, "persona": persona_count}
    assert "items" not in results

    # per item, in the sets' fixed order: the same rates, for comparing two models item by item
    paired = chat_eval.chat_evals(model, tok, count=count, persona_count=persona_count, max_new_tokens=400,
                                  think_max_new_tokens=400, think_count=2, per_item=True)
    assert paired["n"] == {"no_think": count, "think": 2, "persona": persona_count}
    assert paired["items"]["no_think_accuracy"] == [float(e) for e in even]
    assert paired["items"]["adherence"] == [1.0, 1.0, 0.0, 0.0]
    assert paired["items"]["think_format"] == [0.0, 1.0]  # the first think reply lacks its block
    for name, values in paired["items"].items():
        assert paired[name] == pytest.approx(sum(values) / len(values))


def test_generate_replies_cuts_at_end_of_turn_like_an_unrestricted_run(tok, monkeypatch, one_thread):
    model = build_model(ModelConfig(vocab_size=400, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                    intermediate_size=64, max_seq_len=256), seed=0)
    prompts = arithmetic_prompts("heldout", 4)
    free = [r["tokens"] for r in chat_eval.generate_replies(model, tok, prompts, max_new_tokens=12)]
    ids = [chat_eval.generate(model, [encode_prompt(tok, p["messages"], **p["chat_template_kwargs"])], 12)[0]
           for p in prompts]
    stop = ids[0][3]  # pretend a token this model does produce is the end of turn
    monkeypatch.setattr(chat_eval, "end_of_turn_id", lambda tokenizer: stop)
    replies = chat_eval.generate_replies(model, tok, prompts, max_new_tokens=12, batch_size=3)
    assert free == [12] * 4
    for reply, full in zip(replies, ids):
        cut = full.index(stop) if stop in full else len(full)
        assert reply["tokens"] == cut and reply["text"] == tok.decode(full[:cut])
        assert reply["stopped"] == (stop in full)


def test_trl_accepts_our_templates_for_assistant_only_loss(folders):
    """TRL 1.16's own checks: generation markers, the end-of-turn token inside the mask, and earlier
    turns rendered identically when a turn is added (prefix preservation)."""
    trl_templates = pytest.importorskip("trl.chat_template_utils")
    for name in ("smollm3", "chatml"):
        tok = load_chat_tokenizer(folders / name)
        assert trl_templates.has_generation_markers(tok.chat_template)
        assert trl_templates.is_chat_template_stop_token_trained(tok)
        assert trl_templates.is_chat_template_prefix_preserving(tok)
        assert trl_templates.get_training_chat_template(tok) is None  # nothing for TRL to patch


def test_smollm2s_template_gets_a_training_twin_that_renders_the_same_text(folders, tmp_path):
    from smoltrain.post.chat.template import SMOLLM2, SMOLLM2_TRAINING

    original = AutoTokenizer.from_pretrained(folders / "base", local_files_only=True)
    original.chat_template = SMOLLM2
    original.save_pretrained(tmp_path / "smollm2")
    write_chat_tokenizer(tmp_path / "smollm2", tmp_path / "kept", "model")
    twin = load_chat_tokenizer(tmp_path / "kept")
    assert twin.chat_template == SMOLLM2_TRAINING
    chats = [[USER, DIRECT_REPLY], [{"role": "system", "content": "Be brief."}, USER, THINK_REPLY, USER, DIRECT_REPLY]]
    for messages in chats:
        for prompt in (False, True):
            shown = messages[:-1] if prompt else messages
            assert render(twin, shown, add_generation_prompt=prompt) == original.apply_chat_template(
                shown, tokenize=False, add_generation_prompt=prompt)
    ids, mask = encode_chat(twin, chats[0])
    assert tok_decode_masked(twin, ids, mask) == DIRECT_REPLY["content"] + "<|im_end|>"


def tok_decode_masked(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_adherence_needs_a_finished_reply(tok, monkeypatch, one_thread):
    """A reply cut at the token limit is no answer, even when its text happens to keep the rule (a base
    model's 48 tokens of "0.0.0..." are one "word" under 'Reply in at most 3 words')."""
    model = build_model(ModelConfig(vocab_size=400, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                    intermediate_size=64, max_seq_len=512), seed=0)
    personas = persona_prompts("heldout", 2)  # rules "caps" and "lower"
    limit = 40  # "THE ANSWER IS 7." is ~16 tokens of this small vocabulary

    def scripted(model, prompts, max_new_tokens, **kwargs):
        out = []
        for ids in prompts:
            text = tok.decode(ids)
            if personas[0]["messages"][0]["content"] + "\n" in text:
                out.append(tok("THE ANSWER IS 7.", add_special_tokens=False)["input_ids"])
            else:  # keeps "lower" but never ends its turn
                out.append(tok("the answer " * 20, add_special_tokens=False)["input_ids"][:max_new_tokens])
        return out

    monkeypatch.setattr(chat_eval, "generate", scripted)
    results = chat_eval.chat_evals(model, tok, count=0, persona_count=2, max_new_tokens=limit)
    assert [follows_rule(p["rule"], t) for p, t in zip(personas, ["THE ANSWER IS 7.", "the answer " * 20])] == [True, True]
    assert results["adherence"] == 0.5 and results["stop_rate"] == 0.5
