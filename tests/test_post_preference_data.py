"""Preference data: tokenized exactly as TRL 1.16's DPOTrainer tokenizes and collates the same rows with
the same tokenizer; every bad-row kind is a file:line error or a counted skip."""

import json
import types

import pytest
import torch
from tokenizers import processors

from smoltrain.data.tokenizer import END_OF_TEXT, save_tokenizer, train_tokenizer
from smoltrain.errors import DataError
from smoltrain.post.preference.data import Pair, TextTokenizer, collate, load_preferences, summed_logprobs, tokenize_pair

TEXTS = ["the quick brown fox jumps over the lazy dog", "what is two plus two? four. five.", "hello world, hello there"]
ROWS = [
    {"prompt": "Q: what is two plus two?\nA:", "chosen": " four.", "rejected": " five."},
    {"prompt": "the quick brown", "chosen": " fox jumps over the lazy dog", "rejected": " dog"},
    # a prompt whose end merges with the answer ("hel" + "lo"): the merged token moves into the answers
    {"prompt": "hello world, hel", "chosen": "lo there", "rejected": "lo world" + END_OF_TEXT},
    {"prompt": "", "chosen": "hello there", "rejected": "hello world"},
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """Two tokenizer folders: plain (no BOS), and one whose post-processor adds a BOS token."""
    tok = train_tokenizer(TEXTS * 20, 300, False)
    plain = tmp_path_factory.mktemp("plain")
    save_tokenizer(tok, plain)
    tok.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tok.token_to_id("<|im_start|>"))]
    )
    with_bos = tmp_path_factory.mktemp("bos")
    save_tokenizer(tok, with_bos)
    config = json.loads((with_bos / "tokenizer_config.json").read_text())
    config["bos_token"] = "<|im_start|>"
    (with_bos / "tokenizer_config.json").write_text(json.dumps(config))
    return {"plain": plain, "bos": with_bos}


def _trl_tokenized(folder, rows, max_length):
    """TRL's own DPOTrainer._prepare_dataset on a datasets.Dataset of the rows, with the
    transformers tokenizer of the same folder."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder))
    fake = types.SimpleNamespace(_tokenizer=hf)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    dataset = trl_dpo.DPOTrainer._prepare_dataset(fake, datasets.Dataset.from_list(rows), hf, args, "train")
    return hf, [Pair(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in dataset]


@pytest.mark.parametrize("kind", ["plain", "bos"])
def test_tokenization_equals_trl_dpo_trainer(tokenizer_dirs, kind):
    folder = tokenizer_dirs[kind]
    hf, trl_pairs = _trl_tokenized(folder, ROWS, 1024)
    tok = TextTokenizer.load(folder)
    assert tok.eos_token == hf.eos_token
    ours = [tokenize_pair(r, tok) for r in ROWS]
    assert ours == trl_pairs
    if kind == "bos":  # BOS once, at the start of the prompt
        bos = hf.convert_tokens_to_ids("<|im_start|>")
        assert all(p.prompt_ids[:1] == [bos] and bos not in p.chosen_ids for p in ours)
    # the merge across the boundary really happened in this data: the prompt lost its last token
    assert len(ours[2].prompt_ids) < len(tok.encode(ROWS[2]["prompt"]))


def test_collated_batch_equals_trl_collator_with_truncation(tokenizer_dirs):
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    tok = TextTokenizer.load(tokenizer_dirs["bos"])
    pairs = [tokenize_pair(r, tok) for r in ROWS]
    max_length = 9  # cuts the long chosen answer of row 1
    ours = collate(pairs, max_length, pad_id=tok.eos_id)
    examples = [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs]
    trl = trl_dpo.DataCollatorForPreference(pad_token_id=tok.eos_id, max_length=max_length)(examples)
    assert torch.equal(ours["input_ids"], trl["input_ids"])
    # TRL's loss takes log-probs of the shifted completion mask; ours are labels at t for token t + 1
    shifted = trl["completion_mask"][:, 1:].bool()
    want = torch.full_like(ours["labels"], -100)
    want[:, :-1][shifted] = trl["input_ids"][:, 1:][shifted]
    assert torch.equal(ours["labels"], want)
    assert torch.equal(ours["completion_tokens"], shifted.sum(dim=1))


def test_summed_logprobs_split_chosen_and_rejected():
    labels = torch.tensor([[-100, 5, 6], [-100, -100, 7], [3, -100, -100], [-100, 1, 2]])
    per_token = torch.tensor([[9.0, -1.0, -2.0], [9.0, 9.0, -3.0], [-4.0, 9.0, 9.0], [9.0, -5.0, -6.0]])
    chosen, rejected = summed_logprobs(per_token, labels)
    assert chosen.tolist() == [-3.0, -3.0] and rejected.tolist() == [-4.0, -11.0]


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


BAD = [
    ("not json {", "not valid JSON", "not_json"),
    ([1, 2], "expected a JSON object", "not_object"),
    ({"prompt": "a", "chosen": "b"}, "missing 'rejected'", "missing_key"),
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, "'chosen' is int", "bad_type"),
    ({"prompt": "a", "chosen": "  ", "rejected": "c"}, "empty 'chosen' answer", "empty_answer"),
    ({"prompt": "a", "chosen": "same", "rejected": "same"}, "identical", "identical"),
    ({"prompt": "the quick brown fox " * 20, "chosen": "b", "rejected": "c"}, "leave no room", "prompt_too_long"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": "x", "rejected": "y"}, "list of messages", "bad_type"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "x"}],
      "rejected": [{"role": "assistant", "content": "y"}]}, "assistant messages only", "bad_type"),
]


@pytest.mark.parametrize("line,message,kind", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_each_bad_row_is_a_file_line_error_or_a_counted_skip(tmp_path, tokenizer_dirs, line, message, kind):
    tok = TextTokenizer.load(tokenizer_dirs["plain"])
    path = _write(tmp_path / "p.jsonl", [ROWS[0], "", line, ROWS[1]])
    with pytest.raises(DataError, match=rf"p\.jsonl:3: .*{message}"):
        load_preferences(path, tok, max_length=32)
    data = load_preferences(path, tok, max_length=32, skip_bad=True)
    assert len(data) == 2 and dict(data.skipped) == {kind: 1}
    assert data.sources == [f"{path}:1", f"{path}:4"]


def test_conversational_rows_without_a_template_are_refused(tmp_path, tokenizer_dirs):
    tok = TextTokenizer.load(tokenizer_dirs["plain"])
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "x"}],
           "rejected": [{"role": "assistant", "content": "y"}]}
    with pytest.raises(DataError, match=r"p\.jsonl:1: conversational rows .* need a chat template"):
        load_preferences(_write(tmp_path / "p.jsonl", [row]), tok)


def test_a_file_of_only_bad_rows_says_so(tmp_path, tokenizer_dirs):
    tok = TextTokenizer.load(tokenizer_dirs["plain"])
    path = _write(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "b"}])
    with pytest.raises(DataError, match=r"no preference pairs \(1 bad rows skipped\)"):
        load_preferences(path, tok, skip_bad=True)
    with pytest.raises(DataError, match="no such preference file"):
        load_preferences(tmp_path / "missing.jsonl", tok)


CHAT_ROWS = [
    {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
     "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}],
     "chat_template_kwargs": {"enable_thinking": False}},
    {"prompt": [{"role": "system", "content": "Answer in capital letters only."}, {"role": "user", "content": "Say hi."}],
     "chosen": [{"role": "assistant", "content": "HI"}], "rejected": [{"role": "assistant", "content": "hi there"}],
     "chat_template_kwargs": {"enable_thinking": True}},
]


@pytest.mark.parametrize("template", ["smollm3", "chatml"])
def test_conversational_rows_render_and_tokenize_as_trl_does(tmp_path, template):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from chat_helpers import chat_tokenizers

    from smoltrain.post.preference.data import chat_render

    folder = chat_tokenizers(tmp_path) / template
    rows = CHAT_ROWS if template == "smollm3" else [{k: v for k, v in r.items() if k != "chat_template_kwargs"} for r in CHAT_ROWS]
    _, trl_pairs = _trl_tokenized(folder, rows, 1024)
    tok = TextTokenizer.load(folder)
    render = chat_render(folder)
    ours = [tokenize_pair(r, tok, render) for r in rows]
    assert ours == trl_pairs
    # the answers end with the end-of-turn token; the prompt ends with the assistant header
    end = tok.tokenizer.token_to_id("<|im_end|>")
    assert all(end in p.chosen_ids and end in p.rejected_ids for p in ours)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_preferences(path, tok, render=render).pairs == ours
