"""Chat templates as Jinja stored beside the tokenizer, and the one way smoltrain renders a chat.

Rendering and the loss mask come from transformers' `apply_chat_template` on the template that is
saved as `chat_template.jinja` next to tokenizer.json, so what smoltrain trains on is exactly what
transformers renders for the exported model: there is no second, hand-written renderer to drift.
Assistant turns sit in `{% generation %}` blocks covering their content and the end-of-turn token,
not the `<|im_start|>assistant\n` header nor the newline after (TRL 1.16's assistant-only mask).

`smollm3` follows Hugging Face SmolLM3's template, simplified: a system block with the reasoning
mode and the custom instructions (the system message without its flags, else the
`custom_instructions` keyword, else the default prompt, which is therefore rendered only when the
conversation has no system prompt); `/think` or `/no_think` in the system message override
`enable_thinking` (default: think); direct answers get an empty think block before them, and so
does the no_think generation prompt. Two departures: no date/knowledge-cutoff lines (a rendered
chat is a pure function of its input), and a user message ending with `/think` or `/no_think`
switches the mode from that turn on (multi-turn chats that change mode mid-way). Tool results are
rendered as user turns, as SmolLM3 does, so they are never trained on.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from smoltrain.errors import ConfigError, DataError
from smoltrain.files import write_atomic

END_OF_TURN = "<|im_end|>"
START_OF_TURN = "<|im_start|>"
THINK, END_THINK = "<think>", "</think>"
CHAT_TOKENS = (START_OF_TURN, END_OF_TURN, THINK, END_THINK)
END_OF_TURN_TOKENS = (END_OF_TURN, "<end_of_turn>")  # ChatML's, Gemma's
EMPTY_THINK = "<think>\n\n</think>\n"
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face."
TEMPLATE_FILE = "chat_template.jinja"

# Keywords a conversation may carry in `chat_template_kwargs` (smoltalk2's names).
TEMPLATE_KWARGS = ("enable_thinking", "custom_instructions", "xml_tools", "python_tools")

SMOLLM3 = r"""{#- smoltrain's SmolLM3 chat template (hybrid reasoning: /think and /no_think) -#}
{%- set ns = namespace(mode="/think" if (enable_thinking is not defined or enable_thinking) else "/no_think", instructions="") -%}
{%- if custom_instructions is defined and custom_instructions is string -%}
{%- set ns.instructions = custom_instructions -%}
{%- endif -%}
{%- if messages and messages[0].role == "system" -%}
{%- set system = messages[0].content -%}
{%- if "/no_think" in system -%}{%- set ns.mode = "/no_think" -%}{%- elif "/think" in system -%}{%- set ns.mode = "/think" -%}{%- endif -%}
{%- set stripped = system.replace("/no_think", "").replace("/think", "").strip() -%}
{%- if stripped -%}{%- set ns.instructions = stripped -%}{%- endif -%}
{%- endif -%}
{%- if tools is defined and tools -%}{%- set xml_tools = tools -%}{%- endif -%}
{{- "<|im_start|>system\n## Metadata\n\nReasoning Mode: " + ns.mode + "\n\n## Custom Instructions\n\n" -}}
{{- (ns.instructions if ns.instructions else "You are a helpful AI assistant named SmolLM, trained by Hugging Face.") + "\n\n" -}}
{%- if (xml_tools is defined and xml_tools) or (python_tools is defined and python_tools) -%}
{{- "### Tools\n\n" -}}
{%- if xml_tools is defined and xml_tools -%}
{{- "You may call one or more functions to assist with the user query.\nYou are provided with function signatures within <tools></tools> XML tags:\n\n<tools>\n" -}}
{%- for tool in xml_tools -%}{{- (tool if tool is string else tool | tojson) + "\n" -}}{%- endfor -%}
{{- "</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>\n\n" -}}
{%- endif -%}
{%- if python_tools is defined and python_tools -%}
{{- "When you send a message containing Python code between '<code>' and '</code>' tags, it will be executed in a stateful Jupyter notebook environment, and you will then be given the output to continued reasoning in an agentic loop.\n\nYou can use the following tools in your python code like regular functions:\n<tools>\n" -}}
{%- for tool in python_tools -%}{{- (tool if tool is string else tool | tojson) + "\n" -}}{%- endfor -%}
{{- "</tools>\n\nThe state persists between code executions: so variables that you define in one step are still available thereafter.\n\n" -}}
{%- endif -%}
{%- endif -%}
{{- "<|im_end|>\n" -}}
{%- for message in messages -%}
{%- if message.role == "user" -%}
{%- if message.content.rstrip().endswith("/no_think") -%}{%- set ns.mode = "/no_think" -%}{%- elif message.content.rstrip().endswith("/think") -%}{%- set ns.mode = "/think" -%}{%- endif -%}
{{- "<|im_start|>user\n" + message.content + "<|im_end|>\n" -}}
{%- elif message.role == "tool" -%}
{{- "<|im_start|>user\n" + message.content + "<|im_end|>\n" -}}
{%- elif message.role == "assistant" -%}
{{- "<|im_start|>assistant\n" -}}
{%- if ns.mode == "/no_think" and not message.content.startswith("<think>") -%}{{- "<think>\n\n</think>\n" -}}{%- endif -%}
{%- generation -%}{{- message.content + "<|im_end|>" -}}{%- endgeneration -%}
{{- "\n" -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- "<|im_start|>assistant\n" + ("<think>\n\n</think>\n" if ns.mode == "/no_think" else "") -}}
{%- endif -%}
"""

CHATML = r"""{#- ChatML (plain, for reasoning mid-training: no reasoning-mode system block) -#}
{%- for message in messages -%}
{%- if message.role == "assistant" -%}
{{- "<|im_start|>assistant\n" -}}
{%- generation -%}{{- message.content + "<|im_end|>" -}}{%- endgeneration -%}
{{- "\n" -}}
{%- else -%}
{{- "<|im_start|>" + message.role + "\n" + message.content + "<|im_end|>\n" -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- "<|im_start|>assistant\n" -}}
{%- endif -%}
"""

# Gemma 3's published template, text only, with {% generation %} markers: the system message opens
# the first user turn, the assistant's role is `model`, contents are trimmed.
GEMMA = r"""{#- Gemma 3's chat template (text), with generation markers for assistant-only training -#}
{{- bos_token or "" -}}
{%- if messages and messages[0].role == "system" -%}
{%- set first_user_prefix = messages[0].content + "\n\n" -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set first_user_prefix = "" -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if (message.role == "user") != (loop.index0 % 2 == 0) -%}
{{- raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") -}}
{%- endif -%}
{%- if message.role == "assistant" -%}
{{- "<start_of_turn>model\n" -}}
{%- generation -%}{{- message.content | trim -}}{{- "<end_of_turn>" -}}{%- endgeneration -%}
{{- "\n" -}}
{%- else -%}
{{- "<start_of_turn>" + message.role + "\n" + (first_user_prefix if loop.first else "") + (message.content | trim) + "<end_of_turn>\n" -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- "<start_of_turn>model\n" -}}
{%- endif -%}
"""
GEMMA_TOKENS = ("<start_of_turn>", "<end_of_turn>")

# Published templates without {% generation %} markers, and their training twins: the same text for
# every conversation, with markers (TRL swaps in training templates the same way). Keyed by the
# exact Jinja source; `model` uses the twin, so SmolLM2 keeps its own template and its default prompt.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_TRAINING = r"""{#- SmolLM2's template with {% generation %} markers: renders the same text -#}
{%- for message in messages -%}
{%- if loop.first and messages[0].role != "system" -%}
{{- "<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
" -}}
{%- endif -%}
{%- if message.role == "assistant" -%}
{{- "<|im_start|>assistant
" -}}
{%- generation -%}{{- message.content + "<|im_end|>" -}}{%- endgeneration -%}
{{- "
" -}}
{%- else -%}
{{- "<|im_start|>" + message.role + "
" + message.content + "<|im_end|>
" -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- "<|im_start|>assistant
" -}}
{%- endif -%}
"""
TRAINING_TWINS = {SMOLLM2: SMOLLM2_TRAINING}

TEMPLATES = {"smollm3": SMOLLM3, "chatml": CHATML, "gemma": GEMMA}
TEMPLATE_CHOICES = ("smollm3", "chatml", "gemma", "model")
# The special tokens each template needs in the vocabulary.
TEMPLATE_TOKENS = {"smollm3": CHAT_TOKENS, "chatml": CHAT_TOKENS[:2], "gemma": GEMMA_TOKENS}


# ----------------------------------------------------------------------------- files


def _tokenizer_folder(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(tokenizer.json, its folder when the folder holds the companion files)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise DataError(f"{p}: no tokenizer.json in this folder")
        return p / "tokenizer.json", p
    if not p.is_file():
        raise DataError(f"{p}: no such tokenizer file or folder")
    return p, p.parent if (p.parent / "tokenizer_config.json").is_file() else None


def model_template(path: str | os.PathLike) -> str | None:
    """The chat template a tokenizer folder carries (chat_template.jinja, else tokenizer_config.json)."""
    _, folder = _tokenizer_folder(path)
    if folder is None:
        return None
    if (folder / TEMPLATE_FILE).is_file():
        return (folder / TEMPLATE_FILE).read_text()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def template_text(name: str, tokenizer: str | os.PathLike | None = None) -> str:
    """The Jinja source of a template by name; `model` is the tokenizer's own."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name == "model":
        template = model_template(tokenizer) if tokenizer is not None else None
        if template is None:
            raise ConfigError(f"sft.chat_template: model, but the tokenizer {tokenizer} has no chat template "
                              "(choose smollm3 or chatml)")
        return TRAINING_TWINS.get(template, template)
    raise ConfigError(f"sft.chat_template: unknown template {name!r} (expected one of {', '.join(TEMPLATE_CHOICES)})")


def has_generation_markers(template: str) -> bool:
    return "generation" in template and "endgeneration" in template


def missing_chat_tokens(tokenizer: str | os.PathLike, template: str) -> list[str]:
    """The special tokens `template` renders that the tokenizer does not have."""
    from tokenizers import Tokenizer

    source_json, _ = _tokenizer_folder(tokenizer)
    vocab = Tokenizer.from_file(str(source_json)).get_vocab(with_added_tokens=True)
    needed = CHAT_TOKENS if template == "smollm3" else CHAT_TOKENS[:2] if template == "chatml" else ()
    return [t for t in needed if t not in vocab]


def write_chat_tokenizer(tokenizer: str | os.PathLike, out_dir: str | os.PathLike, template: str = "smollm3") -> Path:
    """Copy a tokenizer into out_dir with `chat_template.jinja` beside tokenizer.json; returns out_dir.

    The template's special tokens must already be in the vocabulary (the embedded tokenizer has them):
    adding them here would change the ids a trained model's embeddings were learnt for.
    """
    source_json, source_folder = _tokenizer_folder(tokenizer)
    text = template_text(template, tokenizer)
    missing = missing_chat_tokens(tokenizer, template)
    if missing:
        raise DataError(f"{source_json}: the {template} chat template needs the special tokens {', '.join(missing)}; "
                        f"set sft.add_special_tokens: true to add them (the embedding and head grow), or use "
                        f"sft.chat_template model or chatml (no reasoning modes)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    for name in names:
        src = source_folder / name if source_folder is not None else (source_json if name == "tokenizer.json" else None)
        if src is not None and src.is_file() and src.resolve() != (out / name).resolve():
            write_atomic(out / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
    if not (out / "tokenizer_config.json").is_file():
        write_atomic(out / "tokenizer_config.json", json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000}, indent=2) + "\n")
    config = json.loads((out / "tokenizer_config.json").read_text())
    if "chat_template" in config:  # chat_template.jinja is the one place; a second copy would shadow it
        del config["chat_template"]
        write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    write_atomic(out / TEMPLATE_FILE, text)
    return out


# ----------------------------------------------------------------------------- rendering


def load_chat_tokenizer(path: str | os.PathLike, template: str | None = None):
    """A transformers tokenizer from a tokenizer folder or tokenizer.json; `template` (a name) replaces
    its chat template in memory. Refuses a tokenizer with no template at all."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    file, folder = _tokenizer_folder(path)
    try:
        if folder is not None:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        else:
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(file), clean_up_tokenization_spaces=False)
    except Exception as e:  # noqa: BLE001 (transformers raises many kinds for a bad folder)
        raise DataError(f"{path}: transformers cannot load this tokenizer ({str(e).splitlines()[0]})") from None
    if template is not None:
        tokenizer.chat_template = template_text(template, path)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{path}: the tokenizer has no chat template (write one with smollm3 or chatml)")
    return tokenizer


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
    """The conversation as text, exactly as transformers renders it with the tokenizer's template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


def encode_chat(tokenizer, messages: list[dict], **kwargs) -> tuple[list[int], list[int]]:
    """(token ids, assistant mask): the mask is 1 on tokens inside `{% generation %}` blocks."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        **kwargs)
    ids = list(out["input_ids"])
    mask = list(out["assistant_masks"])
    return ids, mask


def encode_chats(tokenizer, chats: list[tuple[list[dict], dict]]) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(ids, assistant mask, text) of many (messages, kwargs) chats: `encode_chat`'s result for each, as
    int64 and bool arrays, with one render call per distinct set of keywords and one Rust encode_batch.

    The chats are rendered by transformers' own Jinja renderer (their generation spans in characters),
    then the spans become token masks exactly as `apply_chat_template` maps them (char_to_token of a
    span's first and last character). A test holds it equal to encode_chat.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    groups: dict[str, list[int]] = {}  # chats with equal keywords share a call (its set-up was ~15% of rendering chat by chat)
    for i, (_, kwargs) in enumerate(chats):
        groups.setdefault(repr(sorted(kwargs.items())), []).append(i)
    texts, spans = [""] * len(chats), [None] * len(chats)
    for members in groups.values():
        messages = [[{k: v for k, v in m.items() if v is not None} for m in chats[i][0]] for i in members]  # as apply_chat_template
        rendered, indices = render_jinja_template(conversations=messages, chat_template=tokenizer.chat_template,
                                                  return_assistant_tokens_mask=True,
                                                  **{**tokenizer.special_tokens_map, **chats[members[0]][1]})
        for i, text, chat_spans in zip(members, rendered, indices):
            texts[i], spans[i] = text, chat_spans
    result = []
    for text, chat_spans, encoding in zip(texts, spans, _backend(tokenizer).encode_batch(texts, add_special_tokens=False)):
        ids = np.array(encoding.ids, dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for start_char, end_char in chat_spans:
            start, end = encoding.char_to_token(start_char), encoding.char_to_token(end_char - 1)
            if start is None:
                break
            mask[start : end + 1 if end else len(ids)] = True
        result.append((ids, mask, text))
    return result


def _backend(tokenizer):
    """The Rust tokenizer set as `tokenizer(texts, add_special_tokens=False)` sets it before its own
    encode_batch call (no truncation, no padding, its split_special_tokens), without that call's
    conversion of every encoding into Python lists and theirs into arrays (~7% of a worker's time, profiled)."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    if backend.encode_special_tokens != bool(tokenizer.split_special_tokens):
        backend.encode_special_tokens = bool(tokenizer.split_special_tokens)
    return backend


def encode_prompt(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    """Token ids of the conversation followed by the generation prompt (what a model continues)."""
    text = render(tokenizer, messages, add_generation_prompt=True, **kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def has_reasoning_modes(tokenizer) -> bool:
    """Whether the template renders think and no_think differently (smollm3 does; SmolLM2's own and
    chatml do not): asked of the template itself, so any template answers for itself."""
    messages = [{"role": "user", "content": "1 + 1?"}]
    return render(tokenizer, messages, True, enable_thinking=True) != render(tokenizer, messages, True, enable_thinking=False)


def end_of_turn_id(tokenizer) -> int:
    """ChatML's <|im_end|>, else Gemma's <end_of_turn>."""
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            return token_id
    raise DataError(f"the tokenizer has no end-of-turn token ({' or '.join(END_OF_TURN_TOKENS)})")


__all__ = [
    "CHATML",
    "DEFAULT_SYSTEM_PROMPT",
    "EMPTY_THINK",
    "END_OF_TURN",
    "END_OF_TURN_TOKENS",
    "GEMMA",
    "END_THINK",
    "SMOLLM3",
    "TEMPLATES",
    "TEMPLATE_CHOICES",
    "TEMPLATE_KWARGS",
    "THINK",
    "encode_chat",
    "encode_chats",
    "encode_prompt",
    "end_of_turn_id",
    "has_generation_markers",
    "has_reasoning_modes",
    "load_chat_tokenizer",
    "missing_chat_tokens",
    "model_template",
    "render",
    "template_text",
    "write_chat_tokenizer",
]
