"""A small tokenizer that knows the chat text (conversations stay short), shared by the chat tests."""

from pathlib import Path

from smoltrain.data.tokenizer import save_tokenizer, train_tokenizer
from smoltrain.post.chat.template import write_chat_tokenizer
from smoltrain.post.embedded import chat_conversations

VOCAB = 512
BOILERPLATE = ("system\n## Metadata\n\nReasoning Mode: /think /no_think\n\n## Custom Instructions\n\n"
               "You are a helpful AI assistant named SmolLM, trained by Hugging Face.\n\nuser\nassistant\n")


def conversations(n: int, seed: int = 0) -> list:
    data = chat_conversations("train", n, seed)
    return [c for source in data.values() for c in source]


def chat_tokenizers(root: Path) -> Path:
    """root/base (no template), root/smollm3 and root/chatml (with chat_template.jinja)."""
    texts = [BOILERPLATE] * 50 + [m["content"] for c in conversations(300) for m in c.messages]
    save_tokenizer(train_tokenizer(texts, VOCAB, show_progress=False), root / "base")
    write_chat_tokenizer(root / "base", root / "smollm3", "smollm3")
    write_chat_tokenizer(root / "base", root / "chatml", "chatml")
    return root
