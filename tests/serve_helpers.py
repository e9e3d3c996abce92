"""A tiny chat model folder and a server running in a thread of the test process, shared by the serve tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import uvicorn
from chat_helpers import VOCAB, chat_tokenizers

from smoltrain.config import Config, DataConfig, ModelConfig
from smoltrain.model.transformer import build_model
from smoltrain.train.load_model import save_model_folder

CONTEXT = 256


def tiny_chat_model(root: Path, **model_changes) -> Path:
    """A 2-layer GQA model folder with the smollm3 chat tokenizer (the chat CLI tests' model), drawn with
    init_std 0.3: its greedy replies differ from prompt to prompt and token to token, so any slip in positions,
    masks or cache shows. (At 0.02 every reply is "\n" repeated; 30 SFT steps, 19 s here, give "The answer is"
    then spaces.) model_changes: other ModelConfig fields (an MoE: num_experts=...)."""
    tokenizers = chat_tokenizers(root / "tok")
    config = Config(model=ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                      intermediate_size=64, max_seq_len=CONTEXT, init_std=0.3, **model_changes),
                    data=DataConfig(seq_len=CONTEXT))
    save_model_folder(build_model(config.model, seed=0), config, root / "model", tokenizer=tokenizers / "smollm3")
    return root / "model"


@contextlib.contextmanager
def running(app, start_timeout_s: float = 30.0):
    """Serve `app` on 127.0.0.1 at a free port (the socket is bound before the thread starts: no race for
    the port); yields the base URL and stops the server (and so the engine) on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
