"""Load test of `smoltrain serve`: N concurrent streaming clients (the official openai client) for a fixed
time against a served model, then one client, then transformers' `generate` one request at a time on the
same model (exported), in one run. Prints one JSON object: requests/s, time to first token and per-request
decode tokens/s at the 50th / 99th percentile, errors (must be 0), and the ratios against the peer.

    python bench/serve.py                                   # a 3.7M-parameter model built here, CPU, 1 thread
    python bench/serve.py --model RUN_OR_MODEL --clients 16 --seconds 60 --threads 8

Every request is greedy with the same max_tokens; a freshly drawn model never emits <|im_end|>, so every
reply is exactly max_tokens long on both sides (a trained --model may stop earlier: tokens/s stays comparable).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx2  # noqa: E402
import numpy as np  # noqa: E402
import openai  # noqa: E402
import torch  # noqa: E402

from smoltrain.post.chat.template import encode_prompt, end_of_turn_id  # noqa: E402
from smoltrain.post.embedded import chat_conversations  # noqa: E402


def tiny_model(root: Path) -> Path:
    """A model folder with a chat tokenizer trained on the embedded chat data (2048 tokens)."""
    from smoltrain.config import Config, DataConfig, ModelConfig
    from smoltrain.data.tokenizer import save_tokenizer, train_tokenizer
    from smoltrain.model.transformer import build_model
    from smoltrain.post.chat.template import write_chat_tokenizer
    from smoltrain.train.load_model import save_model_folder

    texts = [m["content"] for source in chat_conversations("train", 400).values() for c in source for m in c.messages]
    save_tokenizer(train_tokenizer(texts, 2048, show_progress=False), root / "base")
    write_chat_tokenizer(root / "base", root / "tok", "smollm3")
    config = Config(model=ModelConfig(vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                                      intermediate_size=768, max_seq_len=1024), data=DataConfig(seq_len=1024))
    return save_model_folder(build_model(config.model, seed=0), config, root / "model", tokenizer=root / "tok")


def questions(count: int = 200) -> list[list[dict]]:
    """Conversations of the embedded chat data's held-out split, up to their first user message."""
    out = []
    for source in chat_conversations("heldout", count).values():
        for c in source:
            first = next(i for i, m in enumerate(c.messages) if m["role"] == "user")
            out.append(c.messages[: first + 1])
    return out


def percentiles(values: list[float]) -> dict:
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))} if values else {}


def summary(records: list[dict], wall_s: float, errors: int) -> dict:
    tokens = sum(r["tokens"] for r in records)
    return {"requests": len(records), "errors": errors, "requests_per_s": len(records) / wall_s,
            "tokens_per_s": tokens / wall_s, "ttft_s": percentiles([r["ttft"] for r in records]),
            "request_tokens_per_s": percentiles([(r["tokens"] - 1) / (r["end"] - r["ttft"]) for r in records
                                                 if r["tokens"] > 1 and r["end"] > r["ttft"]])}


# ----------------------------------------------------------------------------- ours, over HTTP


def start_server(model: Path, clients: int, threads: int, max_tokens: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "smoltrain", "serve", str(model), "--port", str(port), "--device",
                               "cpu", "--max-batch", str(clients), "--max-queue", str(4 * clients), "--max-tokens",
                               str(max_tokens), "--name", "bench"], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            if httpx2.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx2.HTTPError:
            pass
        time.sleep(0.2)
    server.terminate()
    raise SystemExit("the server did not answer /health within 180 s")


async def load(url: str, conversations: list[list[dict]], clients: int, seconds: float, max_tokens: int) -> dict:
    api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    records, errors, counter = [], 0, iter(range(10**9))
    start = time.perf_counter()
    stop_at = start + seconds

    async def client():
        nonlocal errors
        while time.perf_counter() < stop_at:
            messages = conversations[next(counter) % len(conversations)]
            t0, first, tokens = time.perf_counter(), None, 0
            try:
                stream = await api.chat.completions.create(model="bench", messages=messages, temperature=0,
                                                           max_tokens=max_tokens, stream=True,
                                                           stream_options={"include_usage": True})
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter()
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
            except openai.OpenAIError:
                errors += 1
                continue
            end = time.perf_counter()
            records.append({"ttft": (first or end) - t0, "end": end - t0, "tokens": tokens})

    await asyncio.gather(*[client() for _ in range(clients)])
    await api.close()
    return summary(records, time.perf_counter() - start, errors)


# ----------------------------------------------------------------------------- the peer: transformers, one at a time


def transformers_one_at_a_time(model_path: Path, conversations: list[list[dict]], seconds: float, max_tokens: int,
                               work: Path) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from smoltrain.post.chat.repl import load_chat_model
    from smoltrain.report.hf_export import export_hf

    _, tokenizer = load_chat_model(model_path, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(export_hf(model_path, work / "hf"), dtype=torch.float32).eval()
    eot = end_of_turn_id(tokenizer)

    class FirstToken(BaseStreamer):  # put() gets the prompt first, then each new token
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    records, start, i = [], time.perf_counter(), 0
    while time.perf_counter() < start + seconds:
        ids = torch.tensor([encode_prompt(tokenizer, conversations[i % len(conversations)])])
        i += 1
        streamer, t0 = FirstToken(), time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=eot, pad_token_id=eot,
                              streamer=streamer)
        end = time.perf_counter()
        new = out[0, ids.shape[1]:].tolist()
        tokens = new.index(eot) if eot in new else len(new)  # as the server counts: up to the stop token
        records.append({"ttft": (streamer.first or end) - t0, "end": end - t0, "tokens": tokens})
    return summary(records, time.perf_counter() - start, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model, run or Hugging Face folder with a chat tokenizer (default: a tiny one)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase (N clients, 1 client, transformers)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the peer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = Path(args.model) if args.model else tiny_model(work)
        conversations = questions()
        server, url = start_server(model, args.clients, args.threads, args.max_tokens)
        try:
            asyncio.run(load(url, conversations[:4], 2, 3.0, args.max_tokens))  # warm up
            many = asyncio.run(load(url, conversations, args.clients, args.seconds, args.max_tokens))
            one = asyncio.run(load(url, conversations, 1, args.seconds, args.max_tokens))
        finally:
            server.terminate()
            server.wait(timeout=30)
        peer = transformers_one_at_a_time(model, conversations, args.seconds, args.max_tokens, work)
    result = {
        "bench": "serve", "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__, "model": args.model or "tiny (3.7M)",
        "clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens,
        "served_n_clients": many, "served_1_client": one, "transformers_one_at_a_time": peer,
        "ratio_requests_per_s_vs_transformers": many["requests_per_s"] / peer["requests_per_s"],
        "ratio_tokens_per_s_vs_transformers": many["tokens_per_s"] / peer["tokens_per_s"],
        "ratio_1_client_tokens_per_s_vs_transformers": one["tokens_per_s"] / peer["tokens_per_s"],
    }
    print(json.dumps(result, indent=2))
    if many["errors"] or one["errors"]:
        raise SystemExit(f"{many['errors'] + one['errors']} requests failed")


if __name__ == "__main__":
    main()
