"""SFT data at scale: preparation tokens/s against tokenizers' encode_batch on the same rendered text, peak
memory of `smoltrain sft` (2 steps, tiny model) as the conversations grow, and time to step 1 when cached.

Writes N synthetic smoltalk2-shaped conversations (system prompts, custom instructions, think and
no_think turns, multi-turn) into --files jsonl.gz files once, then per N: run 1 of `smoltrain sft`
prepares into a fresh cache, run 2 (a new run folder) finds it. Peak memory is the summed PSS of the
run's process tree (its preparation workers included; pages a fork shares count once), sampled
every 0.1 s. The speed ratio is measured apart, on --ratio-conversations conversations, alternating
with the peer in one window (a shared machine's load moves between minutes): encode_batch on all
cores encodes their rendered text already in memory, ours prepares them end to end (read, gunzip,
JSON, check, render, encode, write shards and plan).

    python bench/sft_data.py --conversations 20000
    python bench/sft_data.py --conversations 100000 300000 --tokenizer /path/smollm2 --template chatml
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the of and to in is that it for on with as was at by an be this which or from but not are have one all "
         "were when we there can more if out so about what up its into than them only new some could time these two "
         "may then first any like now such make over our even most after also made many well way down should because "
         "long get through back much before go good same right take three world still own last never under while").split()


def synthetic_row(r: random.Random, sentences: list[str], short: bool = False) -> dict:
    """One smoltalk2-shaped row, ~260 tokens: a fifth with custom instructions, half in think mode with a
    reasoning block, a third multi-turn. Text is drawn from a pool of sentences (fast to write 1M rows).
    `short`: the same shape in one turn of a sentence or two a message (~52 tokens with SmolLM2 and chatml), for 1M rows on a busy box."""
    def text(lo: int, hi: int) -> str:
        return " ".join(r.choice(sentences) for _ in range(r.randint(lo, 1 if short else hi)))

    messages, kwargs = [], {"enable_thinking": r.random() < 0.5}
    if r.random() < 0.2:
        kwargs["custom_instructions"] = text(1, 2)
    for _ in range(1 if short else r.choice((1, 1, 2, 3))):
        messages.append({"role": "user", "content": text(1, 4)})
        answer = text(1 if short else 2, 10)
        messages.append({"role": "assistant", "content": f"<think>\n{text(1, 5)}\n</think>\n{answer}"
                         if kwargs["enable_thinking"] else answer})
    return {"messages": messages, "chat_template_kwargs": kwargs}


def write_data(folder: Path, count: int, files: int, short: bool = False) -> list[str]:
    done = folder / "done.json"
    paths = [folder / f"smoltalk{i:02d}.train.jsonl.gz" for i in range(files)]
    if done.is_file() and json.loads(done.read_text()) == {"count": count, "files": files, "short": short}:
        return [str(p) for p in paths]
    folder.mkdir(parents=True, exist_ok=True)
    r = random.Random(0)
    sentences = [" ".join(r.choice(WORDS) for _ in range(r.randint(6, 18))).capitalize() + "." for _ in range(20000)]
    for i, path in enumerate(paths):
        with gzip.open(path, "wt", compresslevel=1) as f:
            for _ in range(count // files + (i < count % files)):
                f.write(json.dumps(synthetic_row(r, sentences, short)) + "\n")
    done.write_text(json.dumps({"count": count, "files": files, "short": short}))
    return [str(p) for p in paths]


def rendered_texts(files: list[str], tokenizer_dir: Path, sample: int, instructions_as_system: bool) -> list[str]:
    """The text the preparation tokenizes: custom instructions moved into a system message as it moves them."""
    from smoltrain.post.chat.data import ConversationReader
    from smoltrain.post.chat.template import load_chat_tokenizer, render

    chat = load_chat_tokenizer(tokenizer_dir)
    texts = []
    for path in files:
        for conv in ConversationReader(path):
            instructions = conv.kwargs.pop("custom_instructions", None) if instructions_as_system else None
            if instructions and conv.messages[0]["role"] != "system":
                conv.messages.insert(0, {"role": "system", "content": instructions})
            texts.append(render(chat, conv.messages, **conv.kwargs))
            if len(texts) == sample:
                return texts
    return texts


def settings_of(template: str, seq_len: int):
    from smoltrain.post.sft.prepare import Settings

    return Settings(seq_len, template, instructions_as_system=template != "smollm3")  # what run_sft's recipe sets


def cpu_seconds() -> float:
    """CPU time of this process (its threads) and of its children that have been waited for."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def same_window_ratio(files: list[str], tokenizer_dir: Path, template: str, seq_len: int, cache: Path, repeats: int) -> tuple:
    """(ours, encode_batch) tokens per wall second and per CPU second on the same conversations,
    alternating, best of `repeats` each: ours prepares them from the files with all cores (worker
    processes, waited for), encode_batch (all cores) encodes their rendered text. On a shared box the
    CPU seconds are the steadier figure (other jobs' load moves the wall clock between minutes)."""
    from tokenizers import Tokenizer

    from smoltrain.post.sft.prepare import load_prepared, named_files, prepare

    texts = rendered_texts(files, tokenizer_dir, 10**9, settings_of(template, seq_len).instructions_as_system)
    fast = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ours, peer = [0.0, 0.0], [0.0, 0.0]  # tokens per wall second, per CPU second
    for attempt in range(repeats):
        start, cpu = time.perf_counter(), cpu_seconds()
        tokens = sum(len(e.ids) for e in fast.encode_batch(texts, add_special_tokens=False))
        peer = [max(peer[0], tokens / (time.perf_counter() - start)), max(peer[1], tokens / (cpu_seconds() - cpu))]
        start, cpu = time.perf_counter(), cpu_seconds()
        folder = prepare(named_files(files), tokenizer_dir, settings_of(template, seq_len), cache / str(attempt),
                         show_progress=False)
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        tokens = int(load_prepared(folder)[0].lengths.sum())
        ours = [max(ours[0], tokens / wall), max(ours[1], tokens / cpu)]
    return ours, peer


def make_init(root: Path, tokenizer: str, template: str, seq_len: int) -> tuple[Path, Path]:
    from smoltrain.config import Config, DataConfig, ModelConfig
    from smoltrain.data.tokenizer import load_tokenizer
    from smoltrain.model.transformer import build_model
    from smoltrain.post.chat.template import write_chat_tokenizer
    from smoltrain.train.load_model import save_model_folder

    tokenizer_dir = write_chat_tokenizer(tokenizer, root / "tokenizer", template)
    vocab = load_tokenizer(tokenizer_dir / "tokenizer.json").get_vocab_size()
    config = Config(model=ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                      intermediate_size=64, max_seq_len=seq_len), data=DataConfig(seq_len=seq_len))
    if not (root / "init" / "config.yaml").is_file():
        save_model_folder(build_model(config.model, seed=0), config, root / "init", tokenizer=tokenizer_dir)
    return root / "init", tokenizer_dir


def run_sft(root: Path, init: Path, files: list[str], template: str, seq_len: int, cache: Path, out: Path) -> dict:
    """One `smoltrain sft` of 2 steps in a fresh process: wall time, time to step 1, peak memory of its tree,
    CPU seconds of its tree (the steadier figure on a shared box)."""
    import psutil

    recipe = {"data": {"seq_len": seq_len, "cache_dir": str(cache)},
              "sft": {"data": files, "chat_template": template, "epochs": None, "warmup_fraction": None, "chat_eval_items": 0,
                      "instructions_as_system": template != "smollm3"},  # chatml does not read custom_instructions
              "train": {"init": str(init), "out_dir": str(out), "max_steps": 2, "log_every": 1, "save_every": 1000,
                        "eval_every": 1000, "global_batch_tokens": 2 * seq_len, "micro_batch_size": 1, "tensorboard": False,
                        "device": "cpu", "compile": "off"},
              "eval": {"val_batches": 0}}
    path = root / "recipe.json"  # JSON is YAML
    path.write_text(json.dumps(recipe))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    start, cpu = time.perf_counter(), cpu_seconds()
    proc = subprocess.Popen([sys.executable, "-m", "smoltrain", "sft", str(path)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    peak, first_step = 0, None
    metrics = out / "metrics.jsonl"
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()))
    reader.start()
    top = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_full_info().pss for p in [top, *top.children(recursive=True)]))
        except psutil.Error:
            pass
        if first_step is None and metrics.is_file() and '"step": 1' in metrics.read_text():
            first_step = time.perf_counter() - start
        time.sleep(0.1)
    reader.join()
    if proc.returncode:
        raise SystemExit(f"smoltrain sft failed ({proc.returncode}):\n{''.join(stderr)[-3000:]}")
    report = json.loads((out / "data_report.json").read_text())
    return {"wall_s": time.perf_counter() - start, "step1_s": first_step, "peak_gb": peak / 1e9, "report": report,
            "cpu_s": cpu_seconds() - cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, nargs="*", default=[20000])
    p.add_argument("--files", type=int, default=16, help="input files per data set (smoltalk2 ships many parquet files)")
    p.add_argument("--tokenizer", help="tokenizer.json or folder (default: the embedded tokenizer)")
    p.add_argument("--template", default="smollm3", help="chat template: smollm3 (needs <think> tokens) or chatml")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--ratio-conversations", type=int, default=20000, help="conversations of the same-window ratio (0: none)")
    p.add_argument("--short", action="store_true", help="the memory runs on one-turn ~52-token conversations")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", default=".cache/bench-sft-data")
    p.add_argument("--keep", action="store_true", help="keep each prepared cache (for a later look) instead of deleting it")
    args = p.parse_args()

    import torch

    root = Path(args.workdir).resolve()
    tokenizer = args.tokenizer
    if tokenizer is None:
        from smoltrain.config import DataConfig
        from smoltrain.data.embedded import ensure_embedded_data

        tokenizer = ensure_embedded_data(DataConfig(embedded=True)).tokenizer
    init, tokenizer_dir = make_init(root, tokenizer, args.template, args.seq_len)
    print(f"# bench/sft_data.py  {datetime.date.today()}  {platform.processor() or platform.machine()}  "
          f"{os.cpu_count()} cores  torch {torch.__version__}  python {platform.python_version()}")
    print(f"tokenizer {tokenizer}, template {args.template}, seq_len {args.seq_len}, {args.files} files")
    if args.ratio_conversations:
        small = write_data(root / f"data-{args.ratio_conversations}", args.ratio_conversations, args.files)
        ours, peer = same_window_ratio(small, tokenizer_dir, args.template, args.seq_len, root / f"ratio-{time.time_ns()}",
                                       args.repeats)
        print(f"preparation of {args.ratio_conversations:,} conversations: {ours[0] / 1e3:.0f}k tokens/s, encode_batch on "
              f"their rendered text {peer[0] / 1e3:.0f}k tokens/s: {ours[0] / peer[0]:.2f}x (same window, best of {args.repeats} "
              f"each; load average {os.getloadavg()[0]:.1f}); per CPU second {ours[1] / 1e3:.0f}k vs {peer[1] / 1e3:.0f}k "
              f"tokens: {ours[1] / peer[1]:.2f}x")
    print("| conversations | tokens | prep tokens/s (run 1) | peak GB run 1 | run 1 s | peak GB run 2 | run 2 s | "
          "step 1 at (run 2) s | CPU s run 1 / run 2 | cached data set-up s | load average (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for count in args.conversations:
        files = write_data(root / f"data-{count}{'-short' if args.short else ''}", count, args.files, args.short)
        cache = root / f"cache-{count}-{time.time_ns()}"
        first = run_sft(root, init, files, args.template, args.seq_len, cache, root / f"run1-{count}")
        second = run_sft(root, init, files, args.template, args.seq_len, cache, root / f"run2-{count}")
        setup = cached_setup_s(files, root / f"run2-{count}" / "tokenizer", args.template, args.seq_len, cache)
        report = first["report"]
        print(f"| {count:,} | {report['tokens'] / 1e6:.1f}M | {report['tokens'] / report['preparation_s'] / 1e3:.0f}k | "
              f"{first['peak_gb']:.2f} | {first['wall_s']:.0f} | {second['peak_gb']:.2f} | {second['wall_s']:.1f} | "
              f"{second['step1_s']:.1f} | {first['cpu_s']:.0f} / {second['cpu_s']:.1f} | {setup:.2f} | {os.getloadavg()[0]:.1f} |",
              flush=True)
        for leftover in ([] if args.keep else [cache]) + [root / f"run1-{count}", root / f"run2-{count}"]:
            shutil.rmtree(leftover, ignore_errors=True)


def cached_setup_s(files: list[str], tokenizer_dir: Path, template: str, seq_len: int, cache: Path) -> float:
    """What the data costs a cached run before step 1: the cache key (file stats, tokenizer hashes) and
    opening the prepared folder (plan, report, shard checks)."""
    from smoltrain.post.sft.prepare import load_prepared, named_files, prepare

    start = time.perf_counter()
    load_prepared(prepare(named_files(files), tokenizer_dir, settings_of(template, seq_len), cache, show_progress=False))
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
