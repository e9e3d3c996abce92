"""LoRA through peft: low-rank adapters in our model's projections, the base frozen, only A and B train.

peft's own layers (`inject_adapter_in_model`) replace the nn.Linear projections in place, so the model
keeps its type, methods and names (plus `.base_layer` and `.lora_A.default`): parallelize.py injects
them on the meta device before FSDP shards the blocks, initialisation stays a function of (seed,
name), and a checkpoint holds the adapters alone (the base comes back from train.init on resume).
peft is imported only when LoRA is used: its import takes 6 s on our 2-core CPU box.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from smoltrain.config import Config, LoRAConfig
from smoltrain.errors import CheckpointError
from smoltrain.files import write_atomic
from smoltrain.model.transformer import Transformer, canonical_name

ADAPTER = "default"  # peft's adapter name: the key segment `lora_A.default` in our parameter names
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PeftModel's prefix in front of the base model's own names in adapter files.
PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------- names


def is_adapter_name(name: str) -> bool:
    """lora_A / lora_B parameters (peft's dropout and scaling hold none)."""
    return ".lora_A." in name or ".lora_B." in name


def base_parameter_name(name: str) -> str:
    """The name a base parameter has without LoRA: `q_proj.base_layer.weight` -> `q_proj.weight`."""
    return canonical_name(name).replace(".base_layer.", ".")


# ----------------------------------------------------------------------------- wrap


def peft_config(cfg: LoRAConfig, base_model: str | None = None):
    """peft's config for train.lora. init "gaussian" (A ~ N(0, 1/r), B = 0): a normal draw that
    init_adapter_weights can take from our (seed, name) generators, where peft's default (Kaiming
    uniform) would draw from the global RNG and so depend on the layout."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                      init_lora_weights="gaussian", task_type="CAUSAL_LM", base_model_name_or_path=base_model)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> None:
    """peft's LoRA layers around the target projections, in place; peft freezes every other parameter.
    On the meta device the adapters stay empty (low_cpu_mem_usage): init_adapter_weights fills them."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(peft_config(cfg), model, adapter_name=ADAPTER, low_cpu_mem_usage=True)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """peft's layers in the model; none can exist while peft was never imported (which then stays so)."""
    if "peft" not in sys.modules:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def has_adapters(model: nn.Module) -> bool:
    return bool(lora_layers(model))


@torch.no_grad()
def init_adapter_weights(model: nn.Module, cfg: LoRAConfig) -> None:
    """After `init_weights(seed)`, which drew every matrix, A included, as N(0, init_std) from its own
    (seed, name) generator and kept this rank's shard: A rescaled to N(0, 1/r) (peft's "gaussian"),
    B zeroed, so the adapted model starts exactly as its base, whatever the layout."""
    std = model.config.init_std
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.mul_(1.0 / (cfg.r * std))
        elif ".lora_B." in name:
            param.zero_()


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%), the base frozen"


def base_norm(model: nn.Module) -> float:
    """L2 norm of the frozen base's weights, whatever the layout (a collective under FSDP). A LoRA
    checkpoint records it: it holds the adapters alone, and the base is re-read from train.init."""
    from smoltrain.train.optim import grad_norm  # a global norm of tensors of any layout

    return float(grad_norm([p.detach() for p in model.parameters() if not p.requires_grad]))


def check_base(model: nn.Module, saved: float | None, checkpoint: Path, init: str | None) -> None:
    """A checkpoint's adapters only mean something on the base they were trained on: refuse another
    one (train.init changed, e.g. a run folder whose latest checkpoint moved on). The tolerance, 1e-6
    relative, covers float32 norms summed in another order on another layout (~1e-7)."""
    if saved is None:
        return
    now = base_norm(model)
    if not math.isclose(now, saved, rel_tol=1e-6):
        raise CheckpointError(f"{checkpoint}: its adapters were trained on another base model (weight norm {saved:.9g}, "
                              f"now {now:.9g}): train.init {init} changed since")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The frozen base, without a second copy: every peft layer skips its adapter (what peft's
    `disable_adapter()` does). peft also clears the adapters' requires_grad; it is put back at once,
    before any forward, because FSDP2 fixes a parameter's requires_grad when it first gathers it."""
    layers = lora_layers(model)
    trainable = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        for param, requires_grad in trainable:
            param.requires_grad_(requires_grad)
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, requires_grad in trainable:
            param.requires_grad_(requires_grad)


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """peft's merge-and-unload on our model, in place: each layer adds alpha / r x B @ A into its base
    weight (peft's `merge`), then the base nn.Linear takes the layer's place again. Returns the plain,
    trainable model."""
    layers = set(lora_layers(model))
    for name, module in [(n, m) for n, m in model.named_modules() if m in layers]:
        module.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model.requires_grad_(True)


# ----------------------------------------------------------------------------- a LoRA run outside training


def load_lora_model(checkpoint: Path, config: Config, device="cpu", merge: bool = True) -> nn.Module:
    """A LoRA run's model from one of its checkpoints, which hold the adapters alone: the base is
    rebuilt as training built it (train.init's weights, else the seed's), then the adapters are
    loaded; merged into a plain Transformer unless merge=False."""
    from smoltrain.train.checkpoint import load_checkpoint
    from smoltrain.train.parallelize import load_full_state_dict

    with torch.device("meta"):
        model = Transformer(config.model)
    apply_lora(model, config.train.lora)
    model.to_empty(device=device)
    model.set_rope(theta=config.model.rope_theta)  # buffers are not in the checkpoint
    model.init_weights(config.train.seed)
    init_adapter_weights(model, config.train.lora)
    if config.train.init:
        from smoltrain.train.load_model import load_any

        if not Path(config.train.init).exists():
            raise CheckpointError(f"{checkpoint}: a LoRA checkpoint holds the adapters alone; its base model "
                                  f"(train.init {config.train.init}) is gone")
        base, _, _ = load_any(config.train.init, device=device)
        load_full_state_dict(model, base.state_dict())
        del base
    load_checkpoint(checkpoint, model, None)
    return merge_adapters(model) if merge else model


def save_adapter(model: nn.Module, cfg: LoRAConfig, out_dir: str | os.PathLike, base_model: str | None = None) -> Path:
    """A PEFT adapter folder: adapter_config.json (peft's own LoraConfig) and adapter_model.safetensors
    with Hugging Face module names, as `PeftModel.save_pretrained` writes them, so that
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(exported_base), out_dir)` loads it."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from smoltrain.model.hf import to_hf_names

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    # peft's names without the adapter name (`q_proj.lora_A.weight`), then ours -> Hugging Face's.
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    state = {f"{PEFT_PREFIX}{name}": tensor.detach().cpu().contiguous()
             for name, tensor in to_hf_names({canonical_name(k): v for k, v in state.items()}).items()}
    write_atomic(out / ADAPTER_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    with tempfile.TemporaryDirectory() as tmp:
        peft_config(cfg, base_model).save_pretrained(tmp)  # peft's own serialisation of its config
        text = (Path(tmp) / ADAPTER_CONFIG).read_text()
    write_atomic(out / ADAPTER_CONFIG, text)
    return out


def export_adapter(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """`smoltrain export RUN --adapter OUT`: the adapters of a LoRA run's newest checkpoint."""
    from smoltrain.train.checkpoint import find_checkpoint, read_config, read_train_state

    checkpoint = find_checkpoint(path, required=True)
    config = read_config(checkpoint)
    if config.train.lora is None:
        raise CheckpointError(f"{path}: not a LoRA run (train.lora is not set): it has no adapter to export")
    model_config = dataclasses.replace(config.model, rope_theta=read_train_state(checkpoint).get("rope_theta", config.model.rope_theta))
    config = dataclasses.replace(config, model=model_config)
    model = load_lora_model(checkpoint, config, merge=False)
    return save_adapter(model, config.train.lora, out_dir, base_model=config.train.init)


def adapter_summary(out: Path) -> str:
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    return f"r {config['r']}, alpha {config['lora_alpha']:g}, targets {', '.join(sorted(config['target_modules']))}"


__all__ = ["adapter_summary", "adapters_disabled", "apply_lora", "base_norm", "base_parameter_name", "check_base", "export_adapter",
           "has_adapters", "init_adapter_weights", "is_adapter_name", "load_lora_model", "lora_layers", "merge_adapters", "peft_config",
           "save_adapter", "trainable_summary"]
