"""The exported folder renders, masks and generates chats exactly as smoltrain does (transformers side)."""

import json

import pytest
import torch
from chat_helpers import VOCAB, chat_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

from smoltrain.config import ModelConfig
from smoltrain.model.generate import generate
from smoltrain.model.transformer import build_model
from smoltrain.post.chat.template import (
    encode_chat,
    encode_prompt,
    end_of_turn_id,
    load_chat_tokenizer,
    render,
)
from smoltrain.report.hf_export import export_hf

TOOL = {"name": "add", "description": "Add two numbers", "parameters": {"a": "int", "b": "int"}}
CASES = {
    "think_default_prompt": ([{"role": "user", "content": "What is 2 + 3?"},
                              {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\nThe answer is 5."}], {}),
    "no_think_kwarg": ([{"role": "user", "content": "What is 2 + 3?"},
                        {"role": "assistant", "content": "The answer is 5."}], {"enable_thinking": False}),
    "system_flag": ([{"role": "system", "content": "Answer in capital letters only. /no_think"},
                     {"role": "user", "content": "What does os.path.join do?"},
                     {"role": "assistant", "content": "JOIN TWO OR MORE PATHNAME COMPONENTS."}], {}),
    "custom_instructions": ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello. Banana."}],
                            {"custom_instructions": "End every answer with the word banana.", "enable_thinking": True}),
    "multi_turn_switch": ([{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2."},
                           {"role": "user", "content": "And 2 + 2? /think"},
                           {"role": "assistant", "content": "<think>\n2 + 2 = 4\n</think>\n4."}],
                          {"enable_thinking": False}),
    "tools": ([{"role": "user", "content": "Add 2 and 3."},
               {"role": "assistant", "content": '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'},
               {"role": "tool", "content": "5"}, {"role": "assistant", "content": "The sum is 5."}],
              {"xml_tools": [TOOL], "enable_thinking": False}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = chat_tokenizers(tmp_path_factory.mktemp("tok"))
    model = build_model(ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=64, max_seq_len=512, nope_every=2), seed=0)
    export_hf(model, root / "hf", tokenizer=root / "smollm3")
    return root, model


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_template_renders_and_masks_like_smoltrain(exported, case):
    root, _ = exported
    messages, kwargs = CASES[case]
    ours = load_chat_tokenizer(root / "smollm3")
    theirs = AutoTokenizer.from_pretrained(root / "hf", local_files_only=True)
    for prompt in (False, True):
        shown = messages[:-1] if prompt else messages
        assert theirs.apply_chat_template(shown, tokenize=False, add_generation_prompt=prompt, **kwargs) == render(
            ours, shown, add_generation_prompt=prompt, **kwargs)
    out = theirs.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True, **kwargs)
    assert (list(out["input_ids"]), list(out["assistant_masks"])) == encode_chat(ours, messages, **kwargs)
    assert list(theirs.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=True, **kwargs)
                ["input_ids"]) == encode_prompt(ours, messages[:-1], **kwargs)


def test_transformers_greedy_generate_on_a_chat_prompt_equals_ours(exported, one_thread):
    root, model = exported
    ours = load_chat_tokenizer(root / "smollm3")
    hf_model = AutoModelForCausalLM.from_pretrained(root / "hf", local_files_only=True).eval()
    generation = json.loads((root / "hf" / "generation_config.json").read_text())
    stops = [end_of_turn_id(ours), ours.eos_token_id]
    assert sorted(generation["eos_token_id"]) == sorted(stops)
    for case in ("think_default_prompt", "system_flag"):
        messages, kwargs = CASES[case]
        prompt = encode_prompt(ours, messages[:-1], **kwargs)
        with torch.no_grad():
            theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
        mine = generate(model, [prompt], 24, stop_tokens=stops)[0]
        cut = next((i for i, t in enumerate(theirs) if t in stops), len(theirs))
        assert mine == theirs[:cut]
