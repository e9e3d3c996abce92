"""Tokenization throughput: `smoltrain data tokenize` against Hugging Face `encode_batch`, same text, same run.

    python bench/tokenization.py                       # the embedded corpus (built once under --cache-dir)
    python bench/tokenization.py --corpus DIR --tokenizer T

Ours is timed end to end (read, gunzip, JSON, encode, write shards); encode_batch and encode_batch_fast
(no offsets, what ours calls in each worker) only encode texts already in memory, so the ratios are
conservative. Not named tokenize.py: a script's folder is first on sys.path, and a bench/tokenize.py
would shadow the stdlib module that inspect (and so torch) imports. Each side runs --repeats times, alternating; best kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", help="folder of *.jsonl.gz (default: the embedded corpus)")
    p.add_argument("--tokenizer", help="tokenizer.json or folder (default: the embedded tokenizer)")
    p.add_argument("--cache-dir", default=".cache/smoltrain")
    p.add_argument("--workers", type=int, default=None, help="our worker processes (default: all cores)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import tokenizers

    from smoltrain.config import DataConfig
    from smoltrain.data.readers import DocumentReader, expand_inputs
    from smoltrain.data.tokenize_shards import tokenize
    from smoltrain.data.tokenizer import load_tokenizer

    corpus, tokenizer = args.corpus, args.tokenizer
    if corpus is None or tokenizer is None:
        from smoltrain.data.embedded import ensure_embedded_data

        data = ensure_embedded_data(DataConfig(embedded=True, cache_dir=args.cache_dir))
        corpus = corpus or str(Path(data.tokenizer).parent / "corpus")
        tokenizer = tokenizer or data.tokenizer
    files = expand_inputs([str(Path(corpus) / "*.jsonl.gz")])
    texts = [t for f in files for t in DocumentReader(f)]
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    tok = load_tokenizer(tokenizer)

    best = {"ours": float("inf"), "hf": float("inf"), "hf_fast": float("inf")}
    tokens = {}
    for _ in range(args.repeats):
        started = time.perf_counter()
        encodings = tok.encode_batch(texts, add_special_tokens=False)
        best["hf"] = min(best["hf"], time.perf_counter() - started)
        tokens["hf"] = sum(len(e.ids) for e in encodings) + len(texts)  # + one end-of-text per document, as ours
        del encodings
        started = time.perf_counter()
        encodings = tok.encode_batch_fast(texts, add_special_tokens=False)  # no offsets: what ours calls
        best["hf_fast"] = min(best["hf_fast"], time.perf_counter() - started)
        del encodings
        out = tempfile.mkdtemp(prefix="bench-tokenize-")
        try:
            started = time.perf_counter()
            meta = tokenize(tokenizer, [str(f) for f in files], out, workers=args.workers, show_progress=False)
            best["ours"] = min(best["ours"], time.perf_counter() - started)
            tokens["ours"] = meta["num_tokens"]
        finally:
            shutil.rmtree(out, ignore_errors=True)
    assert tokens["ours"] == tokens["hf"], tokens  # same text, same tokens
    print(json.dumps({
        "text_mb": round(num_bytes / 1e6, 2),
        "documents": len(texts),
        "tokens": tokens["ours"],
        "ours_s": round(best["ours"], 3),
        "ours_tokens_per_s": round(tokens["ours"] / best["ours"]),
        "ours_mb_per_s": round(num_bytes / 1e6 / best["ours"], 2),
        "hf_encode_batch_s": round(best["hf"], 3),
        "hf_encode_batch_tokens_per_s": round(tokens["hf"] / best["hf"]),
        "ratio_ours_over_hf": round(best["hf"] / best["ours"], 3),
        "hf_encode_batch_fast_s": round(best["hf_fast"], 3),
        "ratio_ours_over_hf_fast": round(best["hf_fast"] / best["ours"], 3),
        "workers": args.workers or len(os.sched_getaffinity(0)),
        "cores": len(os.sched_getaffinity(0)),
        "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }))


if __name__ == "__main__":
    main()
