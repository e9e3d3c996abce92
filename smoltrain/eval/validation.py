"""Validation loss per data source, and bits per byte so different tokenizers can be compared; the
unigram loss is the reference a model that ignores context scores.

bpb = (nats over the text's tokens) / (ln 2 x the text's UTF-8 bytes). Special tokens (end of
text) have no bytes and are left out of both sums, as nanochat does; the loss keeps them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Iterable

import numpy as np
import torch

from smoltrain.eval.scoring import LOGPROB_CHUNK_ELEMENTS, _autocast, load_tokenizer, sum_over_ranks
from smoltrain.model.transformer import token_logprobs


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def _uses_byte_level(tokenizer) -> bool:
    spec = json.loads(tokenizer.to_str())

    def has_byte_level(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has_byte_level(v) for v in node.values())
        if isinstance(node, list):
            return any(has_byte_level(v) for v in node)
        return False

    return has_byte_level(spec.get("decoder")) or has_byte_level(spec.get("pre_tokenizer"))


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (int64 [vocab]); 0 for special tokens."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    lengths = torch.zeros(max(vocab.values()) + 1, dtype=torch.int64)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    if _uses_byte_level(tokenizer):
        byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
        for token, i in vocab.items():
            if token in special:
                continue
            # Added non-special tokens are stored as plain text, vocabulary tokens byte-mapped.
            mapped = all(ch in byte_of for ch in token)
            lengths[i] = len(token) if mapped else len(token.encode("utf-8"))
    else:
        for token, i in vocab.items():
            if token not in special:
                lengths[i] = len(tokenizer.decode([i], skip_special_tokens=False).encode("utf-8"))
    return lengths


@torch.no_grad()
def validation_metrics(
    model,
    batches: Iterable[dict],
    token_bytes: torch.Tensor,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """{"loss", "bpb", "tokens"} over batches of the loader's dicts (input_ids, labels, document_ids)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return metrics_from_sums(validation_sums(model, batches, token_bytes, device, autocast_dtype))


@torch.no_grad()
def validation_sums(model, batches: Iterable[dict], token_bytes: torch.Tensor, device: torch.device,
                    autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """float64 [nats of all tokens, nats of text tokens, tokens, bytes]: sums that add across ranks."""
    vocab = model.config.vocab_size
    token_bytes = token_bytes.to(device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    text_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = 0
    total_bytes = 0
    for batch in batches:
        input_ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        document_ids = batch.get("document_ids")
        rows = _rows_per_forward(input_ids, vocab)
        for s in range(0, input_ids.shape[0], rows):
            docs = document_ids[s : s + rows].to(device) if document_ids is not None else None
            target = labels[s : s + rows]
            with _autocast(device, autocast_dtype):
                nats = -token_logprobs(model, input_ids[s : s + rows], target, document_ids=docs).flatten()
            valid = target != -100
            nbytes = torch.where(valid, token_bytes[target.clamp(min=0)], 0).flatten()
            total_nats += nats.sum().double()
            text_nats += (nats * (nbytes > 0)).sum().double()
            total_tokens += int(valid.sum())
            total_bytes += int(nbytes.sum())
    return torch.stack([total_nats, text_nats, torch.tensor(float(total_tokens), dtype=torch.float64, device=device),
                        torch.tensor(float(total_bytes), dtype=torch.float64, device=device)])


def _rows_per_forward(input_ids: torch.Tensor, vocab: int) -> int:
    # Full-vocabulary logits for a few rows at a time: 16 x 2048 x 49152 float32 would be 6 GiB.
    return max(1, LOGPROB_CHUNK_ELEMENTS // (input_ids.shape[1] * vocab))


def _forwards(batches: list[dict], vocab: int) -> int:
    return sum(-(-b["input_ids"].shape[0] // _rows_per_forward(b["input_ids"], vocab)) for b in batches)


def metrics_from_sums(sums: torch.Tensor) -> dict:
    total_nats, text_nats, total_tokens, total_bytes = sums.tolist()
    if total_tokens == 0:
        return {"loss": float("nan"), "bpb": float("nan"), "tokens": 0}
    bpb = text_nats / (math.log(2) * total_bytes) if total_bytes else float("nan")
    return {"loss": total_nats / total_tokens, "bpb": bpb, "tokens": int(total_tokens)}


def resolve_data_config(config):
    """The config with data paths resolved (the embedded corpus is built on first use, then cached)."""
    if not config.data.embedded:
        return config
    from smoltrain.data.embedded import ensure_embedded_data

    return dataclasses.replace(config, data=ensure_embedded_data(config.data))


def validation_per_source(model, config, num_batches: int, batch_size: int, device=None, autocast_dtype=None,
                          data_parallel: tuple[int, int, object] | None = None) -> dict:
    """{source: {"loss", "bpb", "tokens"}} over the first `num_batches` validation batches of each source.

    data_parallel = (dp_rank, dp_world, process group): each data-parallel rank scores every
    dp_world-th batch and the sums are all-reduced, so a distributed run spends 1/dp_world of the
    time, with every rank running as many forwards as the busiest (`sum_over_ranks`).
    """
    from smoltrain.data.loader import validation_batches

    config = resolve_data_config(config)
    if not config.data.validation or num_batches <= 0:
        return {}
    if not config.data.tokenizer:
        from smoltrain.errors import ConfigError

        raise ConfigError("data.tokenizer is needed to count bytes for bits per byte")
    token_bytes = token_byte_lengths(load_tokenizer(config.data.tokenizer))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rank, world, group = data_parallel or (0, 1, None)
    results = {}
    for source in config.data.validation:
        batches = list(validation_batches(config, source, num_batches, batch_size))
        sums = validation_sums(model, batches[rank::world], token_bytes, device, autocast_dtype)
        if world > 1 and batches:  # every rank sees the same batches, so all skip or none
            forwards = [_forwards(batches[r::world], model.config.vocab_size) for r in range(world)]
            sums = sum_over_ranks(model, sums, forwards, rank, group, batches[0]["input_ids"][:1].to(device))
        results[source] = metrics_from_sums(sums)
    return results


@torch.no_grad()
def position_sums(model, batches: Iterable[dict], buckets: int, device: torch.device) -> torch.Tensor:
    """float64 [buckets, 2] (nats, tokens) of the label tokens by their position in their document (the
    context they see: `document_ids` restart it), in `buckets` equal slices of the row length."""
    from smoltrain.model.attention import positions_from_documents

    sums = torch.zeros(buckets, 2, dtype=torch.float64, device=device)
    for batch in batches:
        input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        documents = batch.get("document_ids")
        documents = documents.to(device) if documents is not None else torch.zeros_like(input_ids)
        nats = -token_logprobs(model, input_ids, labels, document_ids=documents)
        width = -(-input_ids.shape[1] // buckets)
        bucket = positions_from_documents(documents) // width
        valid = labels != -100
        sums[:, 0].index_add_(0, bucket[valid], nats[valid].double())
        sums[:, 1].index_add_(0, bucket[valid], torch.ones_like(nats[valid], dtype=torch.float64))
    return sums


def loss_by_position(model, config, num_batches: int, batch_size: int, buckets: int = 4, device=None) -> dict:
    """{"val/position/0-63": mean loss, ...} over the validation sources pooled: early against late
    tokens of a document (a hybrid's linear layers forget, softmax attention does not)."""
    from smoltrain.data.loader import validation_batches

    config = resolve_data_config(config)
    if not config.data.validation or num_batches <= 0:
        return {}
    device = torch.device(device) if device is not None else next(model.parameters()).device
    sums = sum(position_sums(model, list(validation_batches(config, source, num_batches, batch_size)), buckets, device)
               for source in config.data.validation)
    width = -(-config.data.seq_len // buckets)
    return {f"val/position/{i * width}-{(i + 1) * width - 1}": float(nats / tokens)
            for i, (nats, tokens) in enumerate(sums.tolist()) if tokens}


def unigram_losses(data, vocab_size: int) -> dict[str, float]:
    """Cross-entropy (nats/token) of each source's validation tokens under the unigram distribution
    of its training tokens (add-1/2 smoothing): the loss of a model that ignores context."""
    from smoltrain.data.shards import TokenSource

    def tokens(folder: str, start: int = 0, size: int | None = None) -> np.ndarray:
        source = TokenSource(folder)
        out = np.empty(min(size or source.num_tokens, source.num_tokens - start), dtype=np.int64)
        source.read(start, out)
        source.close()
        return out

    losses = {}
    for source, val_folder in data.validation.items():
        counts, start = np.zeros(vocab_size, dtype=np.int64), 0
        while len(chunk := tokens(data.sources[source], start, 1 << 20)):  # 1M tokens at a time
            counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
            start += len(chunk)
        log_probs = np.log((counts + 0.5) / (counts.sum() + 0.5 * vocab_size))
        losses[source] = float(-log_probs[tokens(val_folder)].mean())
    return losses
