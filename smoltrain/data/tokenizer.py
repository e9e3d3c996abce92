"""Tokenizers: train a byte-level BPE, load any tokenizer.json or HF folder, and compare tokenizers.

Pre-tokenisation is Llama-3's (SmolLM3's tokenizer): digits in groups of at most three, so numbers
split the same way everywhere, which the playbook counts as a win for math. The comparison reports the
playbook's measures: fertility (tokens per word), share of words split in several tokens, bytes/token.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from smoltrain.data.readers import DocumentReader, expand_inputs
from smoltrain.data.shards import file_sha256
from smoltrain.errors import DataError
from smoltrain.files import write_atomic, write_json

END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = [END_OF_TEXT, "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Llama-3 split pattern: contractions, letters with one leading non-letter, 1-3 digits, punctuation runs, spaces.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The one list of special tokens by role (GPT-2/SmolLM, Llama-3, SentencePiece, ChatML conventions):
# names a caller may use for a role instead of a literal token; first match wins. Tokenizing, HF
# export and evaluation all look roles up here.
ROLE_TOKENS = {
    "eos": [END_OF_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eos|>"],
    "bos": ["<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|bos|>"],
    "pad": ["<|pad|>", "<pad>", "<|finetune_right_pad_id|>", END_OF_TEXT, "<|end_of_text|>"],
    "unk": ["<unk>", "<|unk|>"],
}
ROLE_TOKENS["end_of_text"] = ROLE_TOKENS["eos"]


# ----------------------------------------------------------------------------- training


def new_bpe_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
    """Byte-level BPE; the special tokens take the first ids (end of text is 0)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"vocab size {vocab_size} is below the 256 bytes + {len(SPECIAL_TOKENS)} special tokens")
    tok = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike) -> Path:
    """tokenizer.json + the two small files transformers needs to load it as a fast tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "tokenizer.json", lambda tmp: tok.save(str(tmp)))
    specials = {"eos_token": END_OF_TEXT, "bos_token": None, "pad_token": END_OF_TEXT, "unk_token": None}
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "extra_special_tokens": SPECIAL_TOKENS[1:],
        **specials,
    })
    write_json(out / "special_tokens_map.json", {k: v for k, v in specials.items() if v is not None})
    return out / "tokenizer.json"


def train_tokenizer_files(inputs: list[str], vocab_size: int, out_dir: str | os.PathLike, text_key: str = "text",
                          max_mb: float | None = None, show_progress: bool = True) -> Path:
    """`smoltrain data tokenizer`: train on the files (at most max_mb, shared evenly by the files)."""
    files = expand_inputs(inputs)
    budget = None if max_mb is None else int(max_mb * 1e6 / len(files))

    def texts():
        for path in files:
            used = 0
            for text in DocumentReader(path, text_key):
                yield text
                used += len(text)
                if budget is not None and used >= budget:
                    break

    tok = train_tokenizer(texts(), vocab_size, show_progress)
    if tok.get_vocab_size() < vocab_size:
        print(f"note: the inputs only support {tok.get_vocab_size()} tokens (asked for {vocab_size})")
    return save_tokenizer(tok, out_dir)


# ----------------------------------------------------------------------------- loading


def _tokenizer_json(path: str | os.PathLike) -> Path | None:
    p = Path(path)
    if p.is_file():
        return p
    if (p / "tokenizer.json").is_file():
        return p / "tokenizer.json"
    return None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer.json, a folder with one, or any Hugging Face folder transformers can make fast."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such tokenizer file or folder")
    file = _tokenizer_json(p)
    if file is not None:
        try:
            return Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception on malformed files
            raise DataError(f"{file}: not a tokenizers JSON file ({str(e).splitlines()[0]})") from None
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(p))
    except Exception as e:
        raise DataError(f"{p}: no tokenizer.json and transformers cannot load it ({str(e).splitlines()[0]})") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"{p}: transformers loads it only as a slow tokenizer; save a tokenizer.json first")
    return backend


def tokenizer_file_hash(path: str | os.PathLike) -> str | None:
    """The hash shards record: sha256 of the tokenizer.json bytes (None for folders without one)."""
    file = _tokenizer_json(path)
    return file_sha256(file) if file is not None else None


def special_token_id(tok: Tokenizer, name: str) -> int:
    """Id of a literal special token ('<|im_start|>') or of a role ('eos', 'bos', 'pad')."""
    for candidate in ROLE_TOKENS.get(name, [name]):
        token_id = tok.token_to_id(candidate)
        if token_id is not None:
            return token_id
    tried = ", ".join(ROLE_TOKENS.get(name, [name]))
    raise DataError(f"the tokenizer has no {name} token (tried {tried})")


# ----------------------------------------------------------------------------- comparison


def source_name(path: Path) -> str:
    """'code.train.jsonl.gz' -> 'code': the report groups files by the first dotted part of the name."""
    return path.name.split(".")[0]


def measure(tok: Tokenizer, texts: list[str]) -> dict:
    """Fertility, split-word share and bytes per token of `texts` (words: whitespace-separated)."""
    tokens = sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))
    words = Counter(w for text in texts for w in text.split())
    unique = list(words)
    # A word inside running text follows a space: encode it that way.
    pieces = tok.encode_batch_fast([" " + w for w in unique], add_special_tokens=False)
    split = sum(words[w] for w, e in zip(unique, pieces) if len(e.ids) > 1)
    num_words = sum(words.values())
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "documents": len(texts),
        "words": num_words,
        "tokens": tokens,
        "bytes": num_bytes,
        "fertility": tokens / max(1, num_words),
        "split_word_share": split / max(1, num_words),
        "bytes_per_token": num_bytes / max(1, tokens),
    }


def tokenizer_report(tokenizer_paths: list[str], inputs: list[str], text_key: str = "text",
                     max_mb_per_source: float = 2.0) -> dict:
    """{"tokenizers": {path: {"vocab_size", "sources": {source: measures}}}} on the same sampled text."""
    files = expand_inputs(inputs)
    samples: dict[str, list[str]] = {}
    budget = int(max_mb_per_source * 1e6)
    for path in files:
        texts = samples.setdefault(source_name(path), [])
        used = sum(len(t) for t in texts)
        for text in DocumentReader(path, text_key):
            if used >= budget:
                break
            texts.append(text)
            used += len(text)
    report = {"inputs": [str(f) for f in files], "max_mb_per_source": max_mb_per_source, "tokenizers": {}}
    for path in tokenizer_paths:
        tok = load_tokenizer(path)
        report["tokenizers"][str(path)] = {
            "vocab_size": tok.get_vocab_size(),
            "sources": {name: measure(tok, texts) for name, texts in samples.items()},
        }
    return report


def report_markdown(report: dict) -> str:
    lines = ["| tokenizer | vocab | source | fertility (tokens/word) | split words | bytes/token |", "|---|---|---|---|---|---|"]
    for path, entry in report["tokenizers"].items():
        for source, m in entry["sources"].items():
            lines.append(
                f"| {path} | {entry['vocab_size']} | {source} | {m['fertility']:.3f} | "
                f"{100 * m['split_word_share']:.1f}% | {m['bytes_per_token']:.2f} |"
            )
    return "\n".join(lines) + "\n"
