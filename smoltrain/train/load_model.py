"""Loading and saving "any model": our model folder (config.yaml + model.safetensors), a Hugging Face
folder, a training run or one checkpoint, and GGUF import; above the model layer (it reads runs and data).

The Hugging Face mapping itself (config and names, per family) is model/hf.py's; this module does the files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from smoltrain.config import Config, ModelConfig, config_from_dict, load_config, save_config
from smoltrain.errors import CheckpointError
from smoltrain.files import write_atomic
from smoltrain.model.hf import from_hf_config, from_hf_names
from smoltrain.model.transformer import Transformer, canonical_name

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
# Copied as they are when present; tokenizer_config.json is written when the source has none.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

def _config_for_model(model_config: ModelConfig, tokenizer: str | None = None) -> Config:
    """A full, valid Config around an imported model section (sequence length capped by the model)."""
    seq_len = min(2048, model_config.max_seq_len)
    micro_batch = 8
    batches = -(-65536 // (micro_batch * seq_len))
    raw = {
        "model": dataclasses.asdict(model_config),
        "data": {"seq_len": seq_len, "tokenizer": tokenizer},
        "train": {"micro_batch_size": micro_batch, "global_batch_tokens": batches * micro_batch * seq_len},
    }
    return config_from_dict(raw)


# ----------------------------------------------------------------------------- weights


def _full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our parameter names (wrappers stripped) -> full CPU tensors (DTensor shards gathered)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        state[canonical_name(name)] = tensor.detach().to("cpu").contiguous()
    return state



def _expected_shapes(model_config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Transformer(model_config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def _check_state(state: dict[str, torch.Tensor], model_config: ModelConfig, where: str) -> None:
    expected = _expected_shapes(model_config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        raise CheckpointError(f"{where}: weights do not match the config ({'; '.join(parts)})")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(state[name].shape)}, the config implies {shape}")


def _model_from_state(model_config: ModelConfig, state: dict[str, torch.Tensor], device, where: str) -> Transformer:
    """Build on meta, materialise on `device` and copy the weights in (no wasted random init)."""
    _check_state(state, model_config, where)
    with torch.device("meta"):
        model = Transformer(model_config)
    model.to_empty(device=device)
    model.load_state_dict(state, strict=True)
    model.set_rope(max_seq_len=model_config.max_seq_len)  # rope tables are buffers to_empty left blank
    return model.eval()


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """One model.safetensors or a sharded set with its index."""
    single = folder / WEIGHTS_FILE
    index = folder / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(single)
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            tensors = {}
            for shard in shards:
                tensors.update(load_file(folder / shard))
            return tensors
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: cannot read weights ({e})") from None
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(f"{folder}: only PyTorch .bin weights found; convert them to safetensors first")
    raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} (or sharded model.safetensors.index.json)")


def _stored_dtype(path: Path) -> torch.dtype | None:
    """The floating dtype of a safetensors file's matrices, without reading the tensors."""
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            return names.get(f.get_slice(key).get_dtype())
    return None


# ----------------------------------------------------------------------------- weights files


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        # safetensors creates its file 0600; give it the mode of the folder's other files (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)

    write_atomic(path, write)


def _prepare_out_dir(out_dir: str | os.PathLike, source: Path | None = None) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder")
    if source is not None and out.resolve() == source.resolve():
        raise CheckpointError(f"{out}: the output folder must differ from the input folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{out}: cannot create the output folder ({e.strerror})") from None
    stale = out / "model.safetensors.index.json"  # a sharded index left there would shadow our single file
    if stale.is_file():
        stale.unlink()
    return out


# ----------------------------------------------------------------------------- tokenizer files


def _tokenizer_source(tokenizer: str | os.PathLike | None) -> Path | None:
    if tokenizer is None:
        return None
    path = Path(tokenizer)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path}: no tokenizer.json in this tokenizer folder")
        return path
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer not found (expected a tokenizer.json or a folder holding one)")
    if path.name == "tokenizer.json" and (path.parent / "tokenizer_config.json").is_file():
        return path.parent  # its companion files (special tokens, chat template) travel with it
    return path


def _special_token_ids(tokenizer_json: Path, tokenizer_config: dict) -> dict[str, int]:
    """bos/eos/pad/unk ids: from tokenizer_config.json when it has the key (null: no such token), else
    guessed from the special tokens' conventional names (<|endoftext|> is bos and eos, as in SmolLM2)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
    from smoltrain.data.tokenizer import END_OF_TEXT, ROLE_TOKENS

    hints = {
        "bos": ROLE_TOKENS["bos"] + [END_OF_TEXT],  # SmolLM2 begins documents with <|endoftext|>
        "eos": ROLE_TOKENS["eos"],
        "pad": [t for t in ROLE_TOKENS["pad"] if t not in ROLE_TOKENS["eos"]],  # no guessed pad = eos
        "unk": ROLE_TOKENS["unk"],
    }
    ids = {}
    for role, candidates in hints.items():
        key = f"{role}_token"
        named = tokenizer_config[key] if key in tokenizer_config else next((c for c in candidates if c in specials), None)
        if isinstance(named, dict):
            named = named.get("content")
        token_id = tok.token_to_id(named) if isinstance(named, str) else None
        if token_id is not None:
            ids[role] = token_id
    return ids


def copy_tokenizer(tokenizer: str | os.PathLike | None, out_dir: Path, model_max_length: int) -> dict[str, int]:
    """Copy tokenizer files into out_dir, writing a tokenizer_config.json that transformers'
    AutoTokenizer loads when the source has none. Returns the special token ids."""
    source = _tokenizer_source(tokenizer)
    if source is None:
        return {}
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file() and (source / name).resolve() != (out_dir / name).resolve():
                write_atomic(out_dir / name, lambda tmp, name=name: shutil.copyfile(source / name, tmp))
    elif source.resolve() != (out_dir / "tokenizer.json").resolve():
        write_atomic(out_dir / "tokenizer.json", lambda tmp: shutil.copyfile(source, tmp))
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    ids = _special_token_ids(out_dir / "tokenizer.json", tokenizer_config)
    if not tokenizer_config:
        from tokenizers import Tokenizer

        vocab = {i: t for t, i in Tokenizer.from_file(str(out_dir / "tokenizer.json")).get_vocab(with_added_tokens=True).items()}
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{f"{role}_token": vocab[i] for role, i in ids.items()},
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
        }
        write_atomic(config_path, json.dumps(tokenizer_config, indent=2) + "\n")
    return ids


def _folder_tokenizer(folder: Path) -> Path | None:
    return folder if (folder / "tokenizer.json").is_file() else None


# ----------------------------------------------------------------------------- model folder


def save_model_folder(model: nn.Module, config: Config, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """config.yaml (resolved) + model.safetensors (our names) + tokenizer files when known.

    The RoPE base and table length are read from the model, so a long-context stage's ABF theta
    is what gets saved. config.yaml is written last: its presence marks a complete folder.
    """
    _tokenizer_source(tokenizer)  # fail before writing anything
    out = _prepare_out_dir(out_dir)
    base = getattr(model, "_orig_mod", model)
    model_config = config.model
    if isinstance(base, Transformer):
        model_config = dataclasses.replace(
            model_config, rope_theta=float(base.rope_theta), rope_scaling=base.rope_scaling,
            max_seq_len=max(model_config.max_seq_len, base.rope_cos.shape[0])
        )
    config = dataclasses.replace(config, model=model_config)
    _save_tensors(out / WEIGHTS_FILE, _full_state_dict(model))
    tokenizer = tokenizer if tokenizer is not None else _existing(config.data.tokenizer)
    copy_tokenizer(tokenizer, out, model_config.max_seq_len)
    if (out / "tokenizer.json").is_file():
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=str((out / "tokenizer.json").resolve())))
    save_config(config, out / CONFIG_FILE)
    return out


def _existing(path: str | None) -> str | None:
    return path if path and Path(path).exists() else None


def load_model_folder(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Transformer, Config]:
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder}: not a model folder (no {CONFIG_FILE})")
    config = load_config(folder / CONFIG_FILE)
    state = _read_safetensors(folder)
    return _model_from_state(config.model, state, device, str(folder)), config


def _read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return hf


def _load_hf_folder(folder: Path, device) -> tuple[Transformer, Config]:
    model_config = from_hf_config(_read_hf_config(folder), str(folder / "config.json"))
    state = from_hf_names(_read_safetensors(folder), model_config.tie_embeddings)
    model = _model_from_state(model_config, state, device, str(folder))
    tokenizer = folder / "tokenizer.json"
    return model, _config_for_model(model_config, str(tokenizer.resolve()) if tokenizer.is_file() else None)


def _is_checkpoint(folder: Path) -> bool:
    """A training run folder (checkpoints/), its checkpoints/ folder (latest), or one checkpoint
    (DCP .metadata, the COMPLETE marker, or a step_<8 digits> name)."""
    return (
        (folder / "checkpoints").is_dir()
        or (folder / "latest").is_file()
        or (folder / ".metadata").is_file()
        or (folder / "COMPLETE").is_file()
        or re.fullmatch(r"step_\d{8}", folder.name) is not None
    )


def _embedded_tokenizer(config: Config) -> str | None:
    # Only when the embedded data was already built (it is, for any run trained on it): building
    # the corpus as a side effect of exporting would be a surprise.
    if not config.data.embedded or not Path(config.data.cache_dir).is_dir():
        return None
    try:
        from smoltrain.data.embedded import ensure_embedded_data
    except ImportError:
        return None
    return _existing(ensure_embedded_data(config.data).tokenizer)


def load_any(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Transformer, Config, str | None]:
    """A model from a model folder, a Hugging Face folder, a training run folder or a checkpoint folder,
    with its config and tokenizer (a tokenizer.json file or a folder holding one; None when unknown)."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such file or folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: expected a folder (model folder, Hugging Face folder, run or checkpoint)")
    if (folder / CONFIG_FILE).is_file() and ((folder / WEIGHTS_FILE).is_file() or not _is_checkpoint(folder)):
        model, config = load_model_folder(folder, device)
        tokenizer = _folder_tokenizer(folder) or _existing(config.data.tokenizer)
        return model, config, str(tokenizer) if tokenizer else None
    if _is_checkpoint(folder):
        from smoltrain.train.checkpoint import load_model_from_checkpoint

        model, config = load_model_from_checkpoint(str(folder), device)
        tokenizer = _existing(config.data.tokenizer) or _embedded_tokenizer(config)
        return model, config, tokenizer
    if (folder / "config.json").is_file():
        model, config = _load_hf_folder(folder, device)
        tokenizer = _folder_tokenizer(folder)
        return model, config, str(tokenizer) if tokenizer else None
    raise CheckpointError(
        f"{folder}: not a model folder ({CONFIG_FILE} + {WEIGHTS_FILE}), Hugging Face folder (config.json), "
        "run folder (checkpoints/) or checkpoint (checkpoints/step_<8 digits>)"
    )


def model_config_of(path: str | os.PathLike) -> ModelConfig:
    """The model section of whatever `load_any` would load, without reading weights: a model folder's
    config.yaml, a Hugging Face config.json, or a checkpoint's config (with the RoPE base of the stage
    it was saved in)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder (model folder, Hugging Face folder, run or checkpoint)")
    if (folder / CONFIG_FILE).is_file() and ((folder / WEIGHTS_FILE).is_file() or not _is_checkpoint(folder)):
        return load_config(folder / CONFIG_FILE).model
    if _is_checkpoint(folder):
        from smoltrain.train.checkpoint import find_checkpoint, read_config, read_train_state, with_saved_rope

        checkpoint = find_checkpoint(folder, required=True)
        model = read_config(checkpoint).model
        return with_saved_rope(model, read_train_state(checkpoint))
    if (folder / "config.json").is_file():
        return from_hf_config(_read_hf_config(folder), str(folder / "config.json"))
    raise CheckpointError(f"{folder}: not a model folder, Hugging Face folder, run folder or checkpoint")




def tokenizer_of(path: str | os.PathLike) -> str | None:
    """The tokenizer `load_any` would return, without reading weights: the one beside a model or
    Hugging Face folder's weights, else the one its (run's) config names; None when none is known."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder (model folder, Hugging Face folder, run or checkpoint)")
    if (folder / CONFIG_FILE).is_file() and ((folder / WEIGHTS_FILE).is_file() or not _is_checkpoint(folder)):
        found = _folder_tokenizer(folder) or _existing(load_config(folder / CONFIG_FILE).data.tokenizer)
        return str(found) if found else None
    if _is_checkpoint(folder):
        from smoltrain.train.checkpoint import find_checkpoint, read_config

        config = read_config(find_checkpoint(folder, required=True))
        return _existing(config.data.tokenizer) or _embedded_tokenizer(config)
    found = _folder_tokenizer(folder)
    return str(found) if found else None


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A Hugging Face Llama / SmolLM3 / Qwen3 / Qwen3-MoE / OLMoE folder -> our model folder, weights kept in their dtype
    (renamed only), tokenizer files copied. Training can start from the result (train.init)."""
    folder = Path(hf_dir)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a Hugging Face model folder (no config.json)")
    model_config = from_hf_config(_read_hf_config(folder), str(folder / "config.json"))
    state = from_hf_names(_read_safetensors(folder), model_config.tie_embeddings)
    _check_state(state, model_config, str(folder))
    out = _prepare_out_dir(out_dir, folder)
    _save_tensors(out / WEIGHTS_FILE, {name: t.contiguous() for name, t in state.items()})
    copy_tokenizer(_folder_tokenizer(folder), out, model_config.max_seq_len)
    tokenizer = out / "tokenizer.json"
    config = _config_for_model(model_config, str(tokenizer.resolve()) if tokenizer.is_file() else None)
    save_config(config, out / CONFIG_FILE)
    return out


def _gguf_config_overrides(file: Path) -> dict:
    """What transformers' GGUF loader reads wrong: a Qwen3 file's head_dim (it maps attention.key_length for
    Qwen3-MoE only, so Qwen3Config's default 128 applies), a Qwen3-MoE file's expert width (default 768), a Gemma 3
    file's attention scale (query_pre_attn_scalar: llama.cpp uses head_dim, except the 62-layer 27B), and
    the float32 RMSNorm eps (1e-5 comes back as 9.99999975e-06), given back as the shortest decimal that
    float32 stores the same."""
    import gguf
    import numpy as np

    fields = gguf.GGUFReader(file).fields
    architecture = fields["general.architecture"].contents()
    overrides = {}
    key_length = fields.get(f"{architecture}.attention.key_length")
    if architecture == "qwen3" and key_length is not None:
        overrides["head_dim"] = int(key_length.contents())
    expert_width = fields.get(f"{architecture}.expert_feed_forward_length")  # not mapped for qwen3moe either
    if architecture == "qwen3moe" and expert_width is not None:
        overrides["moe_intermediate_size"] = int(expert_width.contents())
    if architecture == "gemma3" and key_length is not None:  # llama.cpp scales by head_dim ** -0.5; Gemma3Config's default is 256
        overrides["query_pre_attn_scalar"] = int(key_length.contents())
    eps = fields.get(f"{architecture}.attention.layer_norm_rms_epsilon")
    if eps is not None:
        overrides["rms_norm_eps"] = float(np.format_float_positional(np.float32(eps.contents()), unique=True, trim="-"))
    return overrides


def _per_expert_linears(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's in-memory MoE layout -> the per-expert Linears of its files (which from_hf_names stacks):
    `experts.gate_up_proj` (E, 2F, D) holds each expert's gate rows then its up rows, `experts.down_proj` is (E, D, F)."""
    out = {}
    for name, tensor in state.items():
        prefix, _, proj = name.rpartition(".")
        if not prefix.endswith(".mlp.experts") or proj not in ("gate_up_proj", "down_proj"):
            out[name] = tensor
            continue
        parts = {"down_proj": tensor} if proj == "down_proj" else dict(zip(("gate_proj", "up_proj"), tensor.chunk(2, dim=1)))
        for part, stacked in parts.items():
            for j, weight in enumerate(stacked.unbind(0)):
                out[f"{prefix}.{j}.{part}.weight"] = weight.contiguous()
    return out


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A llama.cpp GGUF file -> our model folder. transformers' GGUF loader dequantizes the weights
    (to float32) and rebuilds the tokenizer with the file's own chat template, which is kept."""
    import tempfile

    file = Path(gguf_path)
    if not file.is_file():
        raise CheckpointError(f"{file}: no such GGUF file")
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise CheckpointError(f"{file}: reading GGUF needs the gguf package (pip install 'smoltrain[gguf]')") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(file.parent), gguf_file=file.name, dtype=torch.float32, **_gguf_config_overrides(file)
        )
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file}: transformers cannot read this GGUF file ({str(e).splitlines()[0]})") from None
    hf = hf_model.config.to_dict()
    hf.pop("quantization_config", None)
    model_config = from_hf_config(hf, str(file))
    tensors = _per_expert_linears({k: v.detach().contiguous() for k, v in hf_model.state_dict().items()})
    state = from_hf_names(tensors, model_config.tie_embeddings)
    _check_state(state, model_config, str(file))
    out = _prepare_out_dir(out_dir)
    _save_tensors(out / WEIGHTS_FILE, state)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        # tokenizer.json holds the split the file's tokenizer.ggml.pre names; a class such as Qwen2Tokenizer
        # would impose its own on load (Qwen2's single digits on a Llama-3 vocabulary of 1-3 digit groups).
        tokenizer_config = json.loads((Path(tmp) / "tokenizer_config.json").read_text())
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        copy_tokenizer(tmp, out, model_config.max_seq_len)
    config = _config_for_model(model_config, str((out / "tokenizer.json").resolve()))
    save_config(config, out / CONFIG_FILE)
    return out

