"""`smoltrain export`: any model -> a folder that transformers' AutoModelForCausalLM loads offline,
with the tokenizer, a chat generation config and the model card (why it lives above report/).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from smoltrain.files import write_atomic
from smoltrain.model.hf import hf_architecture, to_hf_config, to_hf_names
from smoltrain.report.model_card import lineage, model_card
from smoltrain.train.load_model import (
    WEIGHTS_FILE,
    _full_state_dict,
    _prepare_out_dir,
    _save_tensors,
    _stored_dtype,
    _tokenizer_source,
    copy_tokenizer,
    load_any,
)


def export_hf(
    path_or_model: str | os.PathLike | nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads offline.

    dtype: of the saved weights; default the model's, or for a model folder the dtype it was stored in
    (an imported bf16 checkpoint exports as bf16, bit for bit).
    """
    source = None
    if isinstance(path_or_model, nn.Module):
        model = getattr(path_or_model, "_orig_mod", path_or_model)
        model_config = dataclasses.replace(
            model.config, rope_theta=float(model.rope_theta), rope_scaling=model.rope_scaling,
            max_seq_len=max(model.config.max_seq_len, model.rope_cos.shape[0])
        )
    else:
        source = Path(path_or_model)
        model, config, known_tokenizer = load_any(source)
        model_config = config.model
        tokenizer = tokenizer if tokenizer is not None else known_tokenizer
        if dtype is None and (source / WEIGHTS_FILE).is_file():
            dtype = _stored_dtype(source / WEIGHTS_FILE)
    architecture = hf_architecture(model_config)  # fail before writing anything
    _tokenizer_source(tokenizer)
    out = _prepare_out_dir(out_dir, source)
    state = _full_state_dict(model)
    dtype = dtype or next(iter(state.values())).dtype
    state = {name: t.to(dtype) for name, t in to_hf_names(state).items()}
    special_ids = copy_tokenizer(tokenizer, out, model_config.max_seq_len)
    _save_tensors(out / WEIGHTS_FILE, state)
    hf = to_hf_config(model_config, special_ids, dtype)
    assert hf["architectures"] == [architecture]
    if (out / "chat_template.jinja").is_file():
        _write_chat_generation_config(out, special_ids)
    write_atomic(out / "config.json", json.dumps(hf, indent=2, sort_keys=True) + "\n")
    write_atomic(out / "README.md", model_card(source, out, model_config, architecture))
    return out


def _write_chat_generation_config(out: Path, special_ids: dict[str, int]) -> None:
    """A chat model's turn ends with <|im_end|>: transformers' generate() stops there (and at eos)."""
    from tokenizers import Tokenizer

    end_of_turn = Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id("<|im_end|>")
    eos = list(dict.fromkeys(i for i in (end_of_turn, special_ids.get("eos")) if i is not None))
    config = {"eos_token_id": eos[0] if len(eos) == 1 else eos, "do_sample": False}
    for role in ("bos", "pad"):
        if role in special_ids:
            config[f"{role}_token_id"] = special_ids[role]
    write_atomic(out / "generation_config.json", json.dumps(config, indent=2) + "\n")


def check_export(model: nn.Module, hf_dir: str | os.PathLike, input_ids: torch.Tensor, new_tokens: int = 24) -> dict:
    """Load an exported folder with transformers and compare it with `model` (ours, in eval mode, of the
    same dtype): the largest logit difference on `input_ids`, and whether greedy continuations of the
    first row's first 16 tokens agree token for token."""
    from transformers import AutoModelForCausalLM

    from smoltrain.model.generate import generate

    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=next(model.parameters()).dtype).eval()
    prompt = input_ids[0, :16].tolist()
    with torch.no_grad():
        diff = float((model(input_ids) - theirs(input_ids=input_ids).logits).abs().max())
        greedy = theirs.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        greedy_match = generate(model, [prompt], new_tokens)[0] == greedy
    return {"architecture": theirs.config.architectures[0], "max_logit_diff": diff, "greedy_match": greedy_match}



def export_checked(model_path: str | os.PathLike, out_dir: str | os.PathLike, input_ids: torch.Tensor,
                   fallback_tokenizer: str | None = None) -> dict:
    """`export_hf` in fp32 (with the tokenizer the model knows, else `fallback_tokenizer`), then check_export on
    `input_ids`: {"path", "model", "files", "card_stages" (the model card's lineage), "architecture",
    "max_logit_diff", "greedy_match"}."""
    model, _, known = load_any(model_path)
    path = export_hf(model_path, out_dir, tokenizer=None if known else fallback_tokenizer, dtype=torch.float32)
    return {"path": str(path), "model": str(model_path), "files": sorted(p.name for p in path.iterdir()),
            "card_stages": " -> ".join(s.objective for s in lineage(model_path)),
            **check_export(model.float().eval(), path, input_ids)}
