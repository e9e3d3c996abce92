"""`smoltrain data preferences`: SmolLM3's off-policy pairs, chosen from a strong model and rejected from a weak one.

Both models answer every prompt through their chat template with batched greedy generation (the same
`generate_replies` the chat evals use). A pair is kept only when both answers are usable: they
differ, neither is empty, both reached their end-of-turn token (a cut answer would teach length),
and with `--verify math` the chosen answer is right and the rejected one wrong, with `--verify rule`
the chosen reply keeps the system prompt's rule and the rejected one breaks it (SmolLM3's APO gained
its 15-20 IFEval points from pairs like these) and, where the prompt row has an "answer", both
answers are right: the pair then differs in the rule alone. A rejected reply that breaks the rule
and gets the answer wrong is replaced by the row's `rule_breaking` reply when it has one (the right
answer under another rule; the summary counts these as "rejected_rewritten").
"""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from pathlib import Path

from smoltrain.errors import ConfigError, DataError
from smoltrain.files import write_atomic
from smoltrain.post.chat.template import END_THINK, THINK
from smoltrain.post.preference.data import read_rows

REFERENCE = "reference"  # --chosen-model reference: the prompt row's own reference reply
PERSONA = "embedded:persona"  # --prompts: the embedded training questions under system-prompt rules
VERIFY = ("math", "rule")
PLAIN_STOP = "\n\n"  # plain text: an answer ends at the first blank line (the corpus's document layout)


def read_prompts(path: str, count: int | None = None, mode: str | None = None) -> list[dict]:
    """Rows {"messages" | "prompt", "chat_template_kwargs"?, "answer"?, "reference"?, "rule"?}; `embedded`
    is the embedded chat data's training arithmetic, whose reference replies are its worked solutions;
    `embedded:persona` its training questions under a system-prompt rule, with replies that keep it
    (and the answer of the arithmetic ones)."""
    if path == PERSONA:
        from smoltrain.post.embedded import persona_prompts

        return persona_prompts("train", count or 200, 0, mode or "no_think")
    if path == "embedded":
        from smoltrain.post.embedded import arithmetic_prompts, direct_response, think_response

        think = mode == "think"
        rows = arithmetic_prompts("train", count or 200, 0, "think" if think else "no_think")
        for row in rows:
            row["reference"] = think_response(row["steps"], row["answer"]) if think else direct_response(row["answer"])
            # plain text: the pretraining corpus's own layout of a worked problem
            row["text"] = f"Question: {row['question']}\nAnswer:"
            row["text_reference"] = " " + "\n".join(row["steps"]) + f"\n#### {row['answer']}"
        return rows
    prompts = []
    for line, row in read_rows(path):
        where = f"{path}:{line}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with 'messages' (a message list) or 'prompt' (text)")
        if isinstance(row.get("prompt"), str) and "messages" not in row:
            row = {**row, "messages": [{"role": "user", "content": row["prompt"]}]}
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} messages")
        if messages[-1]["role"] == "assistant":
            raise DataError(f"{where}: the prompt ends with an assistant message; nothing is left to answer")
        prompts.append({k: v for k, v in row.items() if k != "prompt"} | {"where": where})
        if count is not None and len(prompts) >= count:
            break
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def _with_mode(prompts: list[dict], mode: str | None) -> list[dict]:
    if mode is None:
        return prompts
    return [{**p, "chat_template_kwargs": {**p.get("chat_template_kwargs", {}), "enable_thinking": mode == "think"}}
            for p in prompts]


def _replies(model_path: str, prompts: list[dict], max_new_tokens: int, batch_size: int, device, template: str | None,
             temperature: float, seed: int) -> list[dict]:
    if model_path == REFERENCE:
        missing = [p.get("where", "?") for p in prompts if not isinstance(p.get("reference"), str)]
        if missing:
            raise DataError(f"{missing[0]}: --chosen-model reference needs a 'reference' reply in every prompt row")
        return [{"text": p["reference"], "tokens": None, "stopped": True} for p in prompts]
    from smoltrain.post.chat.evals import generate_replies
    from smoltrain.post.chat.template import load_chat_tokenizer
    from smoltrain.train.distributed import resolve_device
    from smoltrain.train.load_model import load_any

    device = resolve_device(device, what="--device")
    model, _, tokenizer_path = load_any(model_path, device=device)
    if tokenizer_path is None:
        raise ConfigError(f"{model_path}: no tokenizer is known for this model")
    tokenizer = load_chat_tokenizer(tokenizer_path, template)
    return generate_replies(model, tokenizer, prompts, max_new_tokens, batch_size, temperature=temperature,
                            seed=seed if temperature > 0 else None)


def _plain_replies(model_path: str, prompts: list[dict], max_new_tokens: int, batch_size: int, device,
                   temperature: float, seed: int) -> list[dict]:
    """Plain-text continuations (no chat template), cut at the first blank line; "stopped" when one
    (or the end-of-text token) came before the length limit."""
    if model_path == REFERENCE:
        return [{"text": p["text_reference"], "tokens": None, "stopped": True} for p in prompts]
    from smoltrain.data.tokenizer import load_tokenizer
    from smoltrain.eval.scoring import end_of_text_id
    from smoltrain.model.generate import generate
    from smoltrain.train.distributed import resolve_device
    from smoltrain.train.load_model import load_any

    model, _, tokenizer_path = load_any(model_path, device=resolve_device(device, what="--device"))
    if tokenizer_path is None:
        raise ConfigError(f"{model_path}: no tokenizer is known for this model")
    tok = load_tokenizer(tokenizer_path)
    eos = end_of_text_id(tok)
    encoded = [tok.encode(p["text"]).ids for p in prompts]
    replies = []
    for start in range(0, len(prompts), batch_size):
        outputs = generate(model, encoded[start : start + batch_size], max_new_tokens, temperature=temperature,
                           stop_tokens=[eos] if eos is not None else [], seed=seed + start if temperature > 0 else None)
        for ids in outputs:
            text = tok.decode(ids, skip_special_tokens=False)
            cut = text.find(PLAIN_STOP)
            replies.append({"text": text if cut < 0 else text[:cut], "tokens": len(ids),
                            "stopped": cut >= 0 or len(ids) < max_new_tokens})
    return replies


def _passes(verify: str, prompt: dict, text: str) -> bool:
    """--verify's check of one reply: math, the answer is right; rule, the system prompt's rule is kept."""
    from smoltrain.eval.answers import is_correct
    from smoltrain.post.embedded import follows_rule

    return is_correct(text, prompt["answer"]) if verify == "math" else follows_rule(prompt["rule"], text)


# --verify: (the summary's rate name, why a pair is dropped when the chosen fails, when the rejected passes)
_VERIFY_NAMES = {"math": ("accuracy", "chosen_wrong", "rejected_right"),
                 "rule": ("adherence", "chosen_breaks_rule", "rejected_keeps_rule")}
REJECTED_WRONG_ANSWER = "rejected_wrong_answer"  # a rule pair whose rejected reply also has the arithmetic wrong


def verdict(prompt: dict, chosen: dict, rejected: dict, verify: str | None) -> str | None:
    """Why the pair is dropped, or None to keep it."""
    if not chosen["text"].strip() or not rejected["text"].strip():
        return "empty_answer"
    if not chosen["stopped"] or not rejected["stopped"]:
        return "cut_at_max_tokens"
    if prompt.get("chat_template_kwargs", {}).get("enable_thinking") is False and any(
            tag in side["text"] for side in (chosen, rejected) for tag in (THINK, END_THINK)):
        # a no_think reply with think text: the template renders its turn without the empty think
        # block, so the pair's shared prompt is cut and APO taught "</think>" inside no_think replies
        return "think_text_in_no_think"
    if chosen["text"].strip() == rejected["text"].strip():
        return "identical"
    if verify is not None:
        _, chosen_fails, rejected_passes = _VERIFY_NAMES[verify]
        if not _passes(verify, prompt, chosen["text"]):
            return chosen_fails
        if _passes(verify, prompt, rejected["text"]):
            return rejected_passes
    if verify == "rule" and prompt.get("answer") is not None:
        # A rule pair whose rejected reply also gets the arithmetic wrong teaches the number too:
        # APO-zero pushed right answers down with the wrong ones (held-out accuracy 31% -> 14% in the
        # demo; LOG.md). Kept only when both answers are right, the pair differs in the rule alone.
        if not _passes("math", prompt, chosen["text"]):
            return "chosen_wrong_answer"
        if not _passes("math", prompt, rejected["text"]):
            return REJECTED_WRONG_ANSWER
    return None


def _check_prompts(prompts: list[dict], verify: str | None, plain: bool) -> None:
    """What --plain and --verify need of every prompt row, as one-line errors (fills the plain text in)."""
    if plain:
        for p in prompts:
            if "text" not in p:  # a jsonl row: its prompt text, or its one user message
                user = [m for m in p["messages"] if m["role"] == "user"]
                if len(p["messages"]) != 1 or not user:
                    raise DataError(f"{p.get('where', '?')}: --plain takes a 'prompt' text (or one user message)")
                p["text"] = user[0]["content"]
            p.setdefault("text_reference", p.get("reference"))
    if verify == "math":
        missing = [p.get("where", "?") for p in prompts if not isinstance(p.get("answer"), (str, int, float))]
        if missing:
            raise DataError(f"{missing[0]}: --verify math needs an 'answer' in every prompt row")
    if verify == "rule":
        from smoltrain.post.embedded import rules

        known = {r["id"] for r in rules()}
        bad = next((p for p in prompts if p.get("rule") not in known), None)
        if bad is not None:
            raise DataError(f"{bad.get('where', '?')}: --verify rule needs a 'rule' in every prompt row, one of "
                            f"{', '.join(sorted(known))}; got {bad.get('rule')!r}")


def _pair_row(prompt: dict, chosen: dict, rejected: dict, plain: bool) -> dict:
    if plain:
        return {"prompt": prompt["text"], "chosen": chosen["text"], "rejected": rejected["text"]}
    row = {"prompt": prompt["messages"], "chosen": [{"role": "assistant", "content": chosen["text"]}],
           "rejected": [{"role": "assistant", "content": rejected["text"]}]}
    if prompt.get("chat_template_kwargs"):
        row["chat_template_kwargs"] = prompt["chat_template_kwargs"]
    return row


def _summary(prompts: list[dict], chosen: list[dict], rejected: list[dict], kept: list[tuple], dropped: Counter,
             verify: str | None) -> dict:
    """Kept and dropped pairs, lengths of the kept answers, and with --verify both sides' pass rates."""
    def mean_tokens(replies):
        values = [x["tokens"] for x in replies if x["tokens"] is not None]
        return statistics.mean(values) if values else None

    kept_chosen, kept_rejected = [c for _, c, _ in kept], [r for _, _, r in kept]
    summary = {
        "prompts": len(prompts), "kept": len(kept), "dropped": dict(sorted(dropped.items())),
        "chosen_tokens_mean": mean_tokens(kept_chosen), "rejected_tokens_mean": mean_tokens(kept_rejected),
        "chosen_chars_mean": statistics.mean(len(c["text"]) for c in kept_chosen),
        "rejected_chars_mean": statistics.mean(len(r["text"]) for r in kept_rejected),
    }
    if verify is not None:
        rate = _VERIFY_NAMES[verify][0]
        for side, replies in (("chosen", chosen), ("rejected", rejected)):
            summary[f"{side}_{rate}"] = sum(_passes(verify, p, x["text"]) for p, x in zip(prompts, replies)) / len(prompts)
    return summary


def build_preferences(prompts_path: str, chosen_model: str, rejected_model: str, out: str | os.PathLike,
                      mode: str | None = None, verify: str | None = None, count: int | None = None,
                      max_new_tokens: int = 256, batch_size: int = 32, device: str = "auto",
                      chat_template: str | None = None, temperature: float = 0.0, seed: int = 0,
                      plain: bool = False) -> dict:
    """Write out (jsonl of conversational pairs, or plain-text ones with `plain`: prompts as text, no
    chat template, answers cut at the first blank line) and out's .summary.json; returns the summary."""
    if verify not in (None, *VERIFY):
        raise ConfigError(f"--verify must be one of {', '.join(VERIFY)}, got {verify!r}")
    if mode not in (None, "think", "no_think"):
        raise ConfigError(f"mode must be think or no_think, got {mode!r}")
    if plain and mode is not None:
        raise ConfigError("--plain prompts have no chat template, so no --think / --no-think mode")
    prompts = _with_mode(read_prompts(prompts_path, count, mode), mode)
    _check_prompts(prompts, verify, plain)
    if plain:
        if REFERENCE in (chosen_model, rejected_model) and any(not isinstance(p["text_reference"], str) for p in prompts):
            raise DataError("--chosen-model reference needs a 'reference' reply in every prompt row")
        chosen = _plain_replies(chosen_model, prompts, max_new_tokens, batch_size, device, temperature, seed)
        rejected = _plain_replies(rejected_model, prompts, max_new_tokens, batch_size, device, temperature, seed + 1)
    else:
        chosen = _replies(chosen_model, prompts, max_new_tokens, batch_size, device, chat_template, temperature, seed)
        rejected = _replies(rejected_model, prompts, max_new_tokens, batch_size, device, chat_template, temperature, seed + 1)
    dropped: Counter = Counter()
    kept, rewritten = [], 0
    for prompt, c, r in zip(prompts, chosen, rejected):
        reason = verdict(prompt, c, r, verify)
        if reason == REJECTED_WRONG_ANSWER and isinstance(prompt.get("rule_breaking"), str):
            # The model broke the rule and the arithmetic. The row's own counterfactual (the right
            # answer under another rule) stands in as the rejected reply, so the rule is still taught
            # on arithmetic questions: without these pairs adherence there fell while it rose on the
            # others (LOG.md).
            r = {"text": prompt["rule_breaking"], "tokens": None, "stopped": True}
            reason = verdict(prompt, c, r, verify)
            rewritten += not reason
        if reason:
            dropped[reason] += 1
        else:
            kept.append((_pair_row(prompt, c, r, plain), c, r))
    if not kept:
        raise DataError(f"no pair was kept out of {len(prompts)} prompts ({', '.join(f'{k}: {v}' for k, v in sorted(dropped.items()))})")
    summary = {**_summary(prompts, chosen, rejected, kept, dropped, verify), "rejected_rewritten": rewritten,
               "chosen_model": chosen_model,
               "rejected_model": rejected_model, "mode": mode, "verify": verify, "plain": plain}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, text in ((path, "".join(json.dumps(row) + "\n" for row, _, _ in kept)),
                         (path.with_name(path.name + ".summary.json"), json.dumps(summary, indent=2) + "\n")):
        write_atomic(target, text)
    return summary


__all__ = ["build_preferences", "read_prompts", "verdict", "PERSONA", "REFERENCE", "VERIFY"]
