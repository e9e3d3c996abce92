"""A tiny pretraining run shared by the Trainer tests: two token sources that tell each other apart
("low" tokens 1-99, "high" 100-199) and a 2-layer model over them, four 16-token rows a step."""

from pathlib import Path

from synthetic_shards import write_random_documents

from smoltrain.config import Config, config_from_dict


def write_two_sources(root: Path) -> Path:
    write_random_documents(root / "low", "low", 1, 100, seed=1)
    write_random_documents(root / "high", "high", 100, 200, seed=2)
    return root


def tiny_pretrain_config(sources: Path, out_dir: Path, **train) -> Config:
    """Six steps on the CPU, no checkpoint but the last unless `train` says otherwise."""
    return config_from_dict({
        "model": {"vocab_size": 256, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64, "max_seq_len": 64},
        "data": {"sources": {"low": str(sources / "low"), "high": str(sources / "high")}, "seq_len": 16},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "train": {"out_dir": str(out_dir), "max_steps": 6, "log_every": 1, "save_every": 100, "eval_every": 1000,
                  "global_batch_tokens": 64, "micro_batch_size": 2, "tensorboard": False, "device": "cpu", **train},
    })
