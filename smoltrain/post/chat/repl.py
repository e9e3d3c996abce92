"""Talking to a model through its chat template: `smoltrain chat` (a streaming REPL), `smoltrain
generate` (batched generation from a jsonl file) and `smoltrain eval --chat` (the chat evals).

The REPL keeps the conversation as messages and renders it anew each turn with the same template
SFT trained on; switching mode mid-chat appends the flag to the next user message, as the
multi-turn training data does, so earlier turns render exactly as they were generated.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import TextIO

from smoltrain.errors import CheckpointError, ConfigError, DataError
from smoltrain.files import BadLine, jsonl_rows, write_atomic
from smoltrain.post.chat.data import BadRow, prompt_from_row
from smoltrain.post.chat.template import (
    encode_prompt,
    end_of_turn_id,
    has_reasoning_modes,
    load_chat_tokenizer,
)
from smoltrain.train.distributed import resolve_device


def load_chat_model(path: str | os.PathLike, device: str = "auto", tokenizer: str | None = None,
                    template: str | None = None):
    """(model in eval mode, transformers tokenizer with its chat template) from any model path."""
    from smoltrain.train.load_model import load_any

    model, _, known = load_any(path, device=resolve_device(device, what="--device"))
    tokenizer = tokenizer or known
    if tokenizer is None:
        raise CheckpointError(f"{path}: no tokenizer is known for this model (pass --tokenizer)")
    return model.eval(), load_chat_tokenizer(tokenizer, template)


# ----------------------------------------------------------------------------- the REPL

HELP = "commands: /think, /no_think, /system TEXT (empty: none), /reset, /quit"
NO_MODES = "the chat template has no reasoning modes (think / no_think): messages are sent as typed"


def chat_repl(model, tokenizer, system: str | None = None, think: bool = True, max_new_tokens: int = 512,
              temperature: float = 0.0, top_p: float | None = None, seed: int | None = 0,
              stdin: TextIO | None = None, stdout: TextIO | None = None) -> list[dict]:
    """Read user lines, stream replies; returns the final conversation. EOF or /quit ends it."""
    from smoltrain.model.generate import generate

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    eot = end_of_turn_id(tokenizer)
    messages: list[dict] = []
    modes = has_reasoning_modes(tokenizer)
    kwargs = {"enable_thinking": think} if modes else {}
    mode, pending_flag = think, None
    print(f"mode: {'think' if think else 'no_think'}. {HELP}" if modes else f"{NO_MODES}. {HELP}", file=stdout, flush=True)
    turn = 0
    while True:
        if interactive:
            print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/quit", "/exit"):
            break
        if text.strip() in ("/think", "/no_think") and not modes:
            print(NO_MODES, file=stdout, flush=True)
            continue
        if text.strip() in ("/think", "/no_think"):
            mode = text.strip() == "/think"
            pending_flag = text.strip() if messages else None
            if not messages:
                kwargs["enable_thinking"] = mode
            print(f"mode: {'think' if mode else 'no_think'}", file=stdout, flush=True)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            messages, pending_flag = [], None
            kwargs.update({"enable_thinking": mode} if modes else {})
            print(f"system prompt {'set' if system else 'cleared'}; conversation reset", file=stdout, flush=True)
            continue
        if text.strip() == "/reset":
            messages, pending_flag = [], None
            kwargs.update({"enable_thinking": mode} if modes else {})
            print("conversation reset", file=stdout, flush=True)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {HELP}", file=stdout, flush=True)
            continue
        if pending_flag:
            text, pending_flag = f"{text} {pending_flag}", None
        messages.append({"role": "user", "content": text})
        shown = ([{"role": "system", "content": system}] if system else []) + messages
        prompt = encode_prompt(tokenizer, shown, **kwargs)
        stream = _Stream(tokenizer, eot, stdout)
        reply_ids = generate(model, [prompt], max_new_tokens, temperature=temperature, top_p=top_p,
                             stop_tokens=[eot], seed=None if seed is None else seed + turn, on_token=stream)[0]
        reply = tokenizer.decode(reply_ids, skip_special_tokens=False)
        print(reply[len(stream.printed):], file=stdout, flush=True)
        messages.append({"role": "assistant", "content": reply})
        turn += 1
    return ([{"role": "system", "content": system}] if system else []) + messages


class _Stream:
    """Prints a reply as its tokens arrive; text is printed once its characters are complete."""

    def __init__(self, tokenizer, end_of_turn: int, out: TextIO):
        self.tokenizer, self.end_of_turn, self.out = tokenizer, end_of_turn, out
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, tokens: list[int]) -> None:
        if tokens[0] == self.end_of_turn:
            return
        self.ids.append(tokens[0])
        decoded = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if not decoded.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(decoded[len(self.printed):], end="", file=self.out, flush=True)
            self.printed = decoded


# ----------------------------------------------------------------------------- batched generation


def read_prompts(path: str | os.PathLike) -> list[tuple[dict, object]]:
    """(row, Conversation) per line of a jsonl file of prompts (per record of a .json list); a bad row
    is a file:line DataError."""
    from smoltrain.data.readers import input_kind, json_list_rows

    rows = []
    listed = json_list_rows(path) if input_kind(Path(path)) == "json" else jsonl_rows(path)
    for where, row in listed:
        if isinstance(row, BadLine):
            raise DataError(f"{path}:{where}: {row.reason}")
        try:
            rows.append((row, prompt_from_row(row, f"{path}:{where}")))
        except BadRow as bad:
            raise DataError(f"{path}:{where}: {bad}") from None
    if not rows:
        raise DataError(f"{path}: no prompts")
    return rows


def generate_file(model, tokenizer, input_path: str | os.PathLike, out_path: str | os.PathLike, n: int = 1,
                  temperature: float | None = None, top_p: float | None = None, max_new_tokens: int = 256,
                  batch_size: int = 32, seed: int = 0) -> dict:
    """Every input row plus "completions" (n texts), "completion_tokens" and "stopped"; written atomically."""
    from smoltrain.post.chat.evals import generate_replies

    if n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("--n, --max-new-tokens and --batch-size must be positive")
    temperature = (0.0 if n == 1 else 0.8) if temperature is None else temperature
    if n > 1 and temperature == 0:
        raise ConfigError("--n > 1 with temperature 0 would give n identical completions; set --temperature")
    rows = read_prompts(input_path)
    prompts = [{"messages": conv.messages, "chat_template_kwargs": conv.kwargs} for _, conv in rows for _ in range(n)]
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, top_p,
                               seed=None if temperature == 0 else seed)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (row, _) in enumerate(rows):
        mine = replies[i * n : (i + 1) * n]
        record = {**row, "completions": [r["text"] for r in mine], "completion_tokens": [r["tokens"] for r in mine],
                  "stopped": [r["stopped"] for r in mine]}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    write_atomic(out, "".join(lines))
    stopped = sum(r["stopped"] for r in replies)
    return {"prompts": len(rows), "completions": len(replies), "stopped": stopped,
            "mean_tokens": sum(r["tokens"] for r in replies) / len(replies), "out": str(out)}


# ----------------------------------------------------------------------------- eval --chat


def evaluate_chat(path: str | os.PathLike, out: str | os.PathLike, device: str = "auto", count: int = 50,
                  persona_count: int = 48, seed: int = 0, tokenizer: str | None = None,
                  template: str | None = None) -> dict:
    """The chat evals of a model -> {"chat": results, "vibe": samples}; writes out (JSON), a markdown
    table beside it and every graded reply as jsonl."""
    from smoltrain.post.chat.evals import chat_evals, vibe_markdown, vibe_test

    model, chat_tokenizer = load_chat_model(path, device, tokenizer, template)
    details: list = []
    results = chat_evals(model, chat_tokenizer, count=count, persona_count=persona_count, seed=seed, details=details)
    vibe = vibe_test(model, chat_tokenizer)
    report = {"model": str(path), "chat": results, "vibe": vibe}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out.with_suffix(".md"), chat_markdown(results) + "\n## Vibe test\n\n" + vibe_markdown(vibe))
    write_atomic(out.with_suffix(".replies.jsonl"), "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in details))
    return report


CHAT_METRICS = [("no_think_accuracy", "no_think answer accuracy", True), ("think_accuracy", "think answer accuracy", True),
                ("adherence", "system-prompt adherence", True), ("think_format", "think-format validity", True),
                ("stop_rate", "stops with <|im_end|>", True), ("no_think_length", "no_think reply tokens", False),
                ("think_length", "think reply tokens", False)]


def chat_markdown(results: dict, before: dict | None = None) -> str:
    """A table of the chat evals (with `before` and change columns when given), each value ± its standard error."""
    from smoltrain.post.chat.evals import change

    def cell(r: dict, key: str, rate: bool) -> str:
        value, se = r.get(key), r.get(f"{key}_stderr", 0.0)
        if key.startswith("think") and r.get("reasoning_modes") is False:
            return "n/a (no reasoning modes)"
        if value is None or math.isnan(value):
            return "-"
        return f"{100 * value:.1f}% ± {100 * se:.1f}" if rate else f"{value:.1f} ± {se:.1f}"

    def moved(key: str, rate: bool) -> str:  # after - before, paired when both scored the same items
        found = change(before, results, key)
        return "-" if found is None or math.isnan(found[0]) else f"{found[0] * (100 if rate else 1):+.1f} ({found[1]})"

    head = "| chat eval | before | after | change |\n|---|---|---|---|" if before else "| chat eval | value |\n|---|---|"
    lines = [head]
    for key, name, rate in CHAT_METRICS:
        row = f"| {name} | " + (f"{cell(before, key, rate)} | " if before else "") + f"{cell(results, key, rate)} |"
        lines.append(row + (f" {moved(key, rate)} |" if before else ""))
    n = results.get("n", {})
    lines.append(f"\nitems: {', '.join(f'{k} {v}' for k, v in n.items())}; greedy decoding.\n")
    return "\n".join(lines)


__all__ = ["chat_markdown", "chat_repl", "evaluate_chat", "generate_file", "load_chat_model", "read_prompts"]
