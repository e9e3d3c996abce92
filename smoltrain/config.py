"""Typed configuration: YAML sections -> dataclasses, `--set a.b=c` overrides, validation.

Everything is checked before anything is allocated: unknown keys get a "did you mean" hint and
impossible combinations name the keys involved. Values are coerced by the field's annotation,
so `--set optim.lr=3e-4` and YAML `lr: 3e-4` mean the same thing.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml

from smoltrain.errors import ConfigError
from smoltrain.files import load_yaml, write_atomic

# ----------------------------------------------------------------------------- sections


@dataclass
class RopeScaling:
    """Stretching RoPE past the length a model was trained at, as transformers' `rope_parameters`
    defines it: `linear` divides every frequency by `factor`; `yarn` divides only the slow ones
    (fewer than `beta_slow` turns in the original window), keeps the fast ones (more than `beta_fast`
    turns), ramps between, and scales cos/sin by attention_factor (default 0.1 ln(factor) + 1)."""

    rope_type: Literal["default", "linear", "yarn"] = "yarn"  # default: no scaling (a stage switching it off)
    factor: float = 1.0
    original_max_seq_len: Optional[int] = None  # yarn: the window the model was trained at (HF original_max_position_embeddings)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None  # None: derived from factor (and mscale / mscale_all_dim, DeepSeek's form)
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True  # round the ramp's ends to whole frequency pairs (transformers' default)


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3  # == num_heads: MHA, 1: MQA, between: GQA
    head_dim: Optional[int] = None  # derived as hidden_size // num_heads unless given (Qwen3 sets it)
    intermediate_size: int = 1536  # SwiGLU width
    tie_embeddings: bool = True
    position_encoding: Literal["rope", "none"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None  # YaRN or linear RoPE scaling (long context without or with training)
    nope_every: int = 0  # k > 0: every k-th layer (1-based) has no positions, as HF SmolLM3's no_rope_layers
    document_masking: bool = True  # attend only within a document; positions restart per document
    qk_norm: bool = False  # RMSNorm on queries and keys per head (Qwen3)
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2), a stability term
    init_std: float = 0.02
    norm_eps: float = 1e-6
    max_seq_len: int = 2048
    attention_kernel: Literal["auto", "sdpa", "flex"] = "auto"  # auto: flex on CUDA, sdpa on CPU
    qk_norm_per_head: bool = True  # False: QK-norm over the full q / k width (OLMoE)
    # Mixture of experts (num_experts > 0): token-choice top-k, softmax router, dropless.
    num_experts: int = 0
    experts_per_token: int = 2
    expert_hidden: Optional[int] = None  # per-expert SwiGLU width; default intermediate_size // experts_per_token
    shared_expert_hidden: int = 0  # > 0: one shared SwiGLU expert of this width for every token (ungated sum)
    norm_topk_prob: bool = True  # renormalise the top-k router weights to sum to 1
    moe_dense_layers: list[int] = field(default_factory=list)  # layers with a dense MLP (HF mlp_only_layers)
    moe_every: int = 1  # layer i is MoE iff (i + 1) % moe_every == 0 (HF decoder_sparse_step)
    aux_loss_coef: float = 0.01  # x transformers' load_balancing_loss_func (balanced = experts_per_token)
    router_z_loss: float = 0.0  # x mean(logsumexp(router logits)^2) (ST-MoE)
    bias_update_rate: float = 0.0  # > 0: DeepSeek-V3 aux-loss-free bias, +-rate per optimizer step
    # Gemma 3: local sliding-window layers with a global one every k-th, and its block and norm style.
    sliding_window: int = 0  # > 0: local layers attend to the last W tokens, themselves included
    global_every: int = 0  # with sliding_window: every k-th layer (1-based) attends globally (Gemma 3: 6)
    rope_local_theta: Optional[float] = None  # RoPE base of the local layers (Gemma 3: 10000); None: rope_theta
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), w starting at 0, in float32 (Gemma)
    sandwich_norm: bool = False  # a norm after attention and after the MLP too (Gemma 2 and 3)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), rounded to the weights' dtype (Gemma)
    mlp_activation: Literal["silu", "gelu_tanh"] = "silu"  # the gated MLP's activation (Gemma: gelu_tanh)
    query_pre_attn_scalar: Optional[int] = None  # attention scale = this ** -0.5 (None: head_dim ** -0.5)
    # Hybrid (Qwen3-Next): gated DeltaNet linear attention in every layer but every k-th, which attends fully.
    full_attention_every: int = 0  # > 0: hybrid, a full-attention layer every k-th (1-based; Qwen3-Next: 4)
    partial_rotary_factor: float = 1.0  # RoPE turns the first head_dim x this dimensions of q and k (Qwen3-Next: 0.25)
    attention_output_gate: bool = False  # attention output times sigmoid(a second query projection) (Qwen3-Next)
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32  # a multiple of linear_num_key_heads
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel: int = 4  # the short causal convolution before the delta rule

    @property
    def resolved_expert_hidden(self) -> int:
        return self.expert_hidden or max(1, self.intermediate_size // self.experts_per_token)

    def is_moe_layer(self, layer: int) -> bool:
        """Qwen3-MoE's rule: sparse unless listed in mlp_only_layers, every decoder_sparse_step-th layer."""
        return self.num_experts > 0 and layer not in self.moe_dense_layers and (layer + 1) % self.moe_every == 0

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.resolved_head_dim * self.partial_rotary_factor)

    def layer_kind(self, layer: int) -> str:
        """linear (gated DeltaNet), local (sliding window) or global attention."""
        return "linear" if self.is_linear_layer(layer) else "local" if self.is_local_layer(layer) else "global"

    def is_linear_layer(self, layer: int) -> bool:
        """HF Qwen3-Next's layer_types: linear_attention unless (i + 1) % full_attention_interval == 0."""
        return self.full_attention_every > 0 and (layer + 1) % self.full_attention_every != 0

    def is_local_layer(self, layer: int) -> bool:
        """HF Gemma 3's layer_types: sliding_attention unless (i + 1) % sliding_window_pattern == 0."""
        return self.sliding_window > 0 and not (self.global_every > 0 and (layer + 1) % self.global_every == 0)

    def uses_rope(self, layer: int) -> bool:
        """HF SmolLM3 semantics: no_rope_layers[i] = 1 (RoPE) unless (i + 1) % interval == 0."""
        if self.position_encoding == "none":
            return False
        return not (self.nope_every > 0 and (layer + 1) % self.nope_every == 0)


@dataclass
class StageConfig:
    """One stage of a multi-stage curriculum; omitted fields keep the previous stage's value."""

    name: str = "stage"
    start_step: int = 0
    mixture: dict[str, float] = field(default_factory=dict)
    seq_len: Optional[int] = None  # long-context stage: a new sequence length
    rope_theta: Optional[float] = None  # ABF: a larger RoPE base for long context
    rope_scaling: Optional[RopeScaling] = None  # YaRN / linear scaling from this stage on (rope_type default: off)
    reset_schedule: bool = False  # fresh warmup/decay starting at start_step
    lr: Optional[float] = None  # peak lr of the fresh schedule


# The embedded demo corpus's sources (data/corpus.py builds them): what data.mixture may name with data.embedded.
EMBEDDED_SOURCES = ("prose", "code", "math")


@dataclass
class DataConfig:
    # Where tokenized shards live: source name -> folder of `<name>_<5 digits>.bin/.idx` + meta.json.
    # With `embedded: true` these (and validation, tokenizer) are filled in by the embedded build.
    sources: dict[str, str] = field(default_factory=dict)
    validation: dict[str, str] = field(default_factory=dict)  # source name -> validation shard folder
    mixture: dict[str, float] = field(default_factory=dict)  # source name -> weight (empty: equal)
    tokenizer: Optional[str] = None  # tokenizer.json or a Hugging Face tokenizer folder
    embedded: bool = False  # build the embedded demo corpus, tokenizer and shards on first use
    embedded_vocab_size: int = 4096
    embedded_fraction: float = 1.0  # share of the embedded corpus to build (tests use a few percent)
    cache_dir: str = ".cache/smoltrain"
    seq_len: int = 2048
    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 0.0  # floor of cosine and WSD decay
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay_embeddings: bool = True  # playbook stability rule; norms and biases never decay
    grad_clip: float = 1.0  # 0 disables clipping
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_steps: int = 100
    decay_fraction: float = 0.1  # WSD: share of steps spent decaying
    decay_shape: Literal["linear", "1-sqrt"] = "linear"


# The projections a LoRA adapter may wrap: every nn.Linear of a block (Hugging Face's names, which
# peft's adapter files and PeftModel.from_pretrained use too).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    """Low-rank adapters through peft (train/lora.py): the base stays frozen, only A and B train."""

    r: int = 16
    alpha: float = 32.0  # peft's lora_alpha: the update is scaled by alpha / r
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # all linear layers (QLoRA's advice)


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 1000
    log_every: int = 10
    save_every: int = 500
    eval_every: int = 500
    keep_checkpoints: int = 2
    global_batch_tokens: int = 65536
    micro_batch_size: int = 8
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: Literal["auto", "on", "off"] = "auto"  # auto: per-block compile on CUDA
    activation_checkpointing: bool = False
    # Recompute every Nth block only (1: all). 2 keeps half the blocks' activations for half the
    # recompute: the trade to try when a model almost fits without checkpointing.
    activation_checkpointing_every: int = 1
    peak_tflops: Optional[float] = None  # overrides the table of known accelerators for MFU
    init: Optional[str] = None  # model folder to start from (imported weights)
    spike_std: float = 6.0  # a loss this many std above its recent mean is a spike
    spike_window: int = 50
    spike_action: Literal["warn", "skip", "rewind"] = "warn"
    spike_skip_batches: int = 10  # rewind: batches skipped after the checkpoint
    tensorboard: bool = True
    lora: Optional[LoRAConfig] = None  # set: train low-rank adapters on a frozen base (sft, dpo, grpo)


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the world size leaves after dp_replicate and tp
    tp: int = 1
    cp: int = 1  # context parallel: the sequence split over this many ranks (train/context_parallel.py)
    ddp: bool = False  # plain DistributedDataParallel instead of FSDP2
    sequence_parallel: bool = True
    loss_parallel: bool = False  # tp > 1: head and logits split by vocabulary, never gathered in training
    ep: int = 1  # expert parallel: each data-parallel rank holds num_experts / ep experts; tokens travel by all_to_all


@dataclass
class EvalConfig:
    # Embedded tasks or groups (embedded, arithmetic, code_tokens, ...), task files (F.jsonl) or
    # published datasets (ADAPTER=PATH, e.g. arc_easy=data/ARC-Easy); `@mcf` for lettered choices.
    tasks: list[str] = field(default_factory=list)
    limit: Optional[int] = None  # items per task (embedded tasks generate this many)
    batch_size: int = 16
    val_batches: int = 20  # validation batches per source
    num_fewshot: int = 0
    seed: int = 0  # the embedded suite and few-shot draws; not train.seed, so every run sees the same items
    haystack_files: list[str] = field(default_factory=list)  # long-context tasks' essay haystack (default: embedded prose)
    position_buckets: int = 0  # > 0: validation loss by position in this many log-spaced buckets (long-context curve)


@dataclass
class Config:
    """The shared sections. A stage's own section (sft, dpo, grpo) lives in its module, which composes
    it in as a subclass with one more field and registers it (`register_stage_config`); a stage section
    read into a plain Config (a model folder an SFT run saved, read by `smoltrain eval`) is kept as read."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    other_sections: dict = field(default_factory=dict, repr=False, compare=False)  # stage sections kept as read

    # Batches of data.seq_len tokens, train.global_batch_tokens a step (pretraining, SFT); a stage that
    # batches pairs or rollouts sets False, and neither key is its to set or to check.
    token_batches: ClassVar[bool] = True

    def validate_stage(self) -> None:
        """The stage section's own checks (a stage's subclass); the shared sections have none here."""

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        kept = out.pop("other_sections")
        return {**out, **kept}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- coercion


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (expected one of: {', '.join(options)})"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none", "~") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed (expected one of: {', '.join(map(str, args))})")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls, values: Any, prefix: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{full}'{_did_you_mean(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    path, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return path.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings to a raw config mapping (values parsed as YAML)."""
    for text in overrides or []:
        keys, value = _parse_override(text)
        node = raw
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: '{k}' is not a section")
            node = child
        node[keys[-1]] = value
    return raw


# ----------------------------------------------------------------------------- loading


# The sections the stage modules own, and the Config subclass each composes its own in with.
STAGE_SECTIONS = ("sft", "dpo", "grpo")
_STAGE_CONFIGS: dict[str, type[Config]] = {}


def register_stage_config(section: str, cls: type[Config]) -> type[Config]:
    """A stage module's Config with its section (`sft`) composed in: what a mapping holding that
    section is read as, so `load_config(recipe).sft.epochs` works wherever the stage is imported."""
    if section not in STAGE_SECTIONS:
        raise ValueError(f"{section}: add it to STAGE_SECTIONS, the sections a plain Config keeps as read")
    _STAGE_CONFIGS[section] = cls
    return cls


def _config_class(raw: dict) -> type[Config]:
    """The registered stage Config of the one stage section in raw; a plain Config for none or several
    (a run folder saved before each stage owned its section carries all three)."""
    named = [name for name in STAGE_SECTIONS if name in raw]
    return _STAGE_CONFIGS.get(named[0], Config) if len(named) == 1 else Config


def _build_config(cls: type[Config], raw: dict) -> Config:
    fields = {f.name for f in dataclasses.fields(cls)} - {"other_sections"}
    kept = {name: raw[name] for name in STAGE_SECTIONS if name in raw and name not in fields}
    for key in raw:
        if key not in fields and key not in kept:
            raise ConfigError(f"unknown key '{key}'{_did_you_mean(str(key), sorted(fields | set(STAGE_SECTIONS)))}")
    config = _build(cls, {k: v for k, v in raw.items() if k in fields}, "")
    config.other_sections = kept
    return config


def config_from_dict(raw: dict, overrides: list[str] | None = None, base_model: dict | None = None,
                     cls: type[Config] | None = None) -> Config:
    """Sections -> a validated Config (cls: a stage's, else the one the stage section in raw names).
    base_model: the model section of the model training starts from (train.init, read by
    train/stage_config.py), under the model keys the mapping gives."""
    raw = apply_overrides(dict(raw or {}), overrides or [])
    # Keys the recipe or --set gave (not defaults): a model to start from fills in the others.
    explicit = frozenset(f"{section}.{key}" for section, values in raw.items() if isinstance(values, dict)
                         for key in values)
    given = raw.get("model")
    if base_model is not None and (given is None or isinstance(given, dict)):
        raw = {**raw, "model": {**base_model, **(given or {})}}  # (a section that is not a mapping: the builder's error)
    config = _build_config(cls or _config_class(raw), raw)
    validate(config)
    config.explicit = explicit
    return config


def replace_sections(config: Config, **sections) -> Config:
    """`dataclasses.replace` of whole sections that keeps the record of the keys the recipe gave
    (`explicit`), which train.init's model resolution reads."""
    out = dataclasses.replace(config, **sections)
    if hasattr(config, "explicit"):
        out.explicit = config.explicit
    return out


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or start from defaults when path is None), apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        raw = load_yaml(p) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of sections (model, data, optim, train, ...)")
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{path}: {e}") from None
        raise


def differences(before: Config, after: Config) -> list[tuple[str, Any, Any]]:
    """(key, value before, value after) for every config key whose value differs, e.g. on resume."""
    out = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in list(a) + [k for k in b if k not in a]:
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
        elif a != b:
            out.append((prefix, a, b))

    walk(before.to_dict(), after.to_dict(), "")
    return out


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temp name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, config.to_yaml())


# ----------------------------------------------------------------------------- validation


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_model(m: ModelConfig) -> None:
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_seq_len"):
        require(getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
    if m.head_dim is None:
        require(
            m.hidden_size % m.num_heads == 0,
            f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads})",
        )
    else:
        require(m.head_dim > 0, f"model.head_dim must be positive, got {m.head_dim}")
    require(
        m.num_heads % m.num_kv_heads == 0,
        f"model.num_heads ({m.num_heads}) must be divisible by model.num_kv_heads ({m.num_kv_heads})",
    )
    if m.position_encoding == "rope":
        require(
            m.resolved_head_dim % 2 == 0,
            f"model.head_dim ({m.resolved_head_dim}) must be even with model.position_encoding=rope",
        )
        require(m.rope_theta > 0, f"model.rope_theta must be positive, got {m.rope_theta}")
    if m.rope_scaling is not None:
        validate_rope_scaling(m.rope_scaling, "model.rope_scaling")
    require(m.nope_every >= 0, f"model.nope_every must be >= 0, got {m.nope_every}")
    require(m.z_loss >= 0, f"model.z_loss must be >= 0, got {m.z_loss}")
    require(m.init_std > 0, f"model.init_std must be positive, got {m.init_std}")
    require(m.norm_eps > 0, f"model.norm_eps must be positive, got {m.norm_eps}")
    if m.full_attention_every > 0:
        for key in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                    "linear_conv_kernel"):
            require(getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
        require(m.linear_num_value_heads % m.linear_num_key_heads == 0,
                 f"model.linear_num_value_heads ({m.linear_num_value_heads}) must be a multiple of "
                 f"model.linear_num_key_heads ({m.linear_num_key_heads})")
    require(0 < m.partial_rotary_factor <= 1 and m.rotary_dim % 2 == 0,
             f"model.partial_rotary_factor must be in (0, 1] and turn an even number of dimensions, got {m.partial_rotary_factor}")
    for key in ("sliding_window", "global_every", "full_attention_every"):
        require(getattr(m, key) >= 0, f"model.{key} must be >= 0, got {getattr(m, key)}")
    for key in ("rope_local_theta", "query_pre_attn_scalar"):
        require(getattr(m, key) is None or getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
    if m.num_experts > 0:
        _validate_moe(m)
        require(m.mlp_activation == "silu", f"model.mlp_activation={m.mlp_activation!r}: experts compute SwiGLU (silu) only")


def validate_rope_scaling(r: RopeScaling, key: str) -> None:
    if r.rope_type == "default":
        return
    require(r.factor >= 1, f"{key}.factor must be >= 1, got {r.factor}")
    if r.rope_type == "yarn":
        require(r.original_max_seq_len is not None and r.original_max_seq_len > 0,
                 f"{key}.original_max_seq_len must be a positive length with rope_type yarn, got {r.original_max_seq_len}")
        require(r.beta_fast > r.beta_slow > 0, f"{key}: beta_fast ({r.beta_fast}) must exceed beta_slow ({r.beta_slow}) > 0")
        require(r.attention_factor is None or r.attention_factor > 0, f"{key}.attention_factor must be positive, got {r.attention_factor}")


def _validate_moe(m: ModelConfig) -> None:
    require(0 < m.experts_per_token <= m.num_experts,
             f"model.experts_per_token must be in 1..model.num_experts ({m.num_experts}), got {m.experts_per_token}")
    require(m.expert_hidden is None or m.expert_hidden > 0, f"model.expert_hidden must be positive, got {m.expert_hidden}")
    require(m.shared_expert_hidden >= 0, f"model.shared_expert_hidden must be >= 0, got {m.shared_expert_hidden}")
    require(m.moe_every > 0, f"model.moe_every must be positive, got {m.moe_every}")
    bad = [i for i in m.moe_dense_layers if not 0 <= i < m.num_layers]
    require(not bad, f"model.moe_dense_layers: layer {bad[0] if bad else 0} outside 0..{m.num_layers - 1}")
    for key in ("aux_loss_coef", "router_z_loss", "bias_update_rate"):
        require(getattr(m, key) >= 0, f"model.{key} must be >= 0, got {getattr(m, key)}")


def validate_eval(e: EvalConfig) -> None:
    require(e.batch_size > 0, f"eval.batch_size must be positive, got {e.batch_size}")
    require(e.val_batches >= 0, f"eval.val_batches must be >= 0, got {e.val_batches}")
    require(e.num_fewshot >= 0, f"eval.num_fewshot must be >= 0, got {e.num_fewshot}")
    require(e.limit is None or e.limit > 0, f"eval.limit must be positive (or null for all items), got {e.limit}")


def source_names(d: DataConfig) -> list[str]:
    """The training sources a mixture may name: the embedded corpus's own with data.embedded (its
    paths are filled in on first use), else data.sources' keys."""
    return list(EMBEDDED_SOURCES) if d.embedded else list(d.sources)


def _check_mixture(mixture: dict[str, float], key: str, sources: list[str]) -> None:
    for name, weight in mixture.items():
        if sources:
            require(name in sources, f"{key}.{name}: no such source{_did_you_mean(name, sources)}")
        require(weight >= 0, f"{key}.{name} must be >= 0, got {weight}")
    require(not mixture or any(w > 0 for w in mixture.values()),
             f"{key}: no positive weight ({', '.join(f'{n}: {w:g}' for n, w in mixture.items())})")


def validate_lora(t: TrainConfig, p: ParallelConfig) -> None:
    lora = t.lora
    if lora is None:
        return
    require(lora.r > 0, f"train.lora.r must be positive, got {lora.r}")
    require(lora.alpha > 0, f"train.lora.alpha must be positive, got {lora.alpha}")
    require(0 <= lora.dropout < 1, f"train.lora.dropout must lie in [0, 1), got {lora.dropout}")
    require(bool(lora.target_modules), f"train.lora.target_modules must name at least one of: {', '.join(LORA_TARGETS)}")
    for name in lora.target_modules:
        require(name in LORA_TARGETS, f"train.lora.target_modules: no module '{name}'{_did_you_mean(name, list(LORA_TARGETS))}")
    # peft's layers replace the nn.Linear that the tensor-parallel plan shards column- and row-wise.
    require(p.tp == 1, f"train.lora needs parallel.tp 1 (got {p.tp}): tensor parallelism does not shard peft's layers")
    # Activation checkpointing recomputes blocks without the RNG state (parallelize.py): dropout
    # masks would differ between forward and recomputation.
    require(lora.dropout == 0 or not t.activation_checkpointing,
             "train.lora.dropout > 0 needs train.activation_checkpointing false (the recomputed forward would draw other masks)")


def validate(c: Config) -> None:
    validate_model(c.model)
    d, o, t, p = c.data, c.optim, c.train, c.parallel
    # data.seq_len is a stage's row length only with token batches; else the validation rows' when there are any
    rows = c.token_batches or (c.eval.val_batches > 0 and bool(d.validation or d.embedded))
    require(d.seq_len > 0, f"data.seq_len must be positive, got {d.seq_len}")
    require(not rows or d.seq_len <= c.model.max_seq_len,
             f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({c.model.max_seq_len})")
    sources = source_names(d)
    _check_mixture(d.mixture, "data.mixture", sources)
    previous = -1
    for i, stage in enumerate(d.stages):
        require(stage.start_step > previous, f"data.stages[{i}].start_step must increase, got {stage.start_step}")
        previous = stage.start_step
        seq_len = stage.seq_len or d.seq_len
        require(
            seq_len <= c.model.max_seq_len,
            f"data.stages[{i}].seq_len ({seq_len}) exceeds model.max_seq_len ({c.model.max_seq_len})",
        )
        _check_mixture(stage.mixture, f"data.stages[{i}].mixture", sources)
        if stage.rope_scaling is not None:
            validate_rope_scaling(stage.rope_scaling, f"data.stages[{i}].rope_scaling")
    require(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    require(0 <= o.min_lr <= o.lr, f"optim.min_lr ({o.min_lr}) must lie in [0, optim.lr ({o.lr})]")
    require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and optim.beta2 must lie in [0, 1)")
    require(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    require(0 <= o.decay_fraction <= 1, f"optim.decay_fraction must lie in [0, 1], got {o.decay_fraction}")
    require(o.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {o.grad_clip}")
    require(t.out_dir.strip() != "", "train.out_dir must name a folder, got an empty string "
             "(the run would write its checkpoints and metrics into the current directory)")
    for key in ("max_steps", "log_every", "save_every", "eval_every", "global_batch_tokens", "micro_batch_size", "keep_checkpoints",
                "spike_std", "spike_window", "activation_checkpointing_every"):
        require(getattr(t, key) > 0, f"train.{key} must be positive, got {getattr(t, key)}")
    require(t.spike_skip_batches >= 0, f"train.spike_skip_batches must be >= 0, got {t.spike_skip_batches}")
    require(t.peak_tflops is None or t.peak_tflops > 0, f"train.peak_tflops must be positive, got {t.peak_tflops}")
    # One process and data.seq_len here; every stage's length over the data-parallel degree is
    # checked at launch (the pretraining objective's preflight), before the model is built.
    if c.token_batches:
        grad_accumulation(t, d.seq_len, 1)
    for key in ("dp_replicate", "tp", "cp"):
        require(getattr(p, key) >= 1, f"parallel.{key} must be >= 1, got {getattr(p, key)}")
    require(p.dp_shard == -1 or p.dp_shard >= 1, f"parallel.dp_shard must be -1 (auto) or >= 1, got {p.dp_shard}")
    validate_lora(t, p)
    check_tensor_parallel(c.model, p)
    check_expert_parallel(c.model, p)
    validate_eval(c.eval)
    c.validate_stage()


def grad_accumulation(t: TrainConfig, seq_len: int, dp_world: int) -> int:
    """Micro-batches per optimizer step on each rank: global_batch_tokens = micro_batch_size x
    seq_len x this x data-parallel ranks. The one place the batch split is computed and checked."""
    per_step = t.micro_batch_size * seq_len * dp_world
    if t.global_batch_tokens % per_step:
        raise ConfigError(
            f"train.global_batch_tokens ({t.global_batch_tokens}) must be a multiple of "
            f"train.micro_batch_size x seq_len x data-parallel ranks "
            f"({t.micro_batch_size} x {seq_len} x {dp_world} = {per_step})"
        )
    return t.global_batch_tokens // per_step


def check_expert_parallel(m: ModelConfig, p: ParallelConfig, dp_world: int | None = None) -> None:
    """What parallel.ep asks of the model and layout (dp_world once the world size is known): whole
    experts per rank, ep ranks dividing the data-parallel ones (FSDP2 or DDP for the rest), no TP."""
    require(p.ep >= 1, f"parallel.ep must be >= 1, got {p.ep}")
    if p.ep == 1:
        return
    require(m.num_experts > 0, f"parallel.ep ({p.ep}) needs an MoE model (model.num_experts > 0)")
    require(m.num_experts % p.ep == 0, f"parallel.ep ({p.ep}) must divide model.num_experts ({m.num_experts})")
    require(p.tp == 1, f"parallel.ep ({p.ep}) combines with FSDP2 or DDP, not with parallel.tp ({p.tp})")
    require(dp_world is None or dp_world % p.ep == 0,
             f"parallel.ep ({p.ep}) must divide the data-parallel world ({dp_world})")


def check_tensor_parallel(m: ModelConfig, p: ParallelConfig) -> None:
    """What parallel.tp asks of the model: whole KV heads and SwiGLU columns per rank, no DDP."""
    require(m.num_kv_heads % p.tp == 0, f"parallel.tp ({p.tp}) must divide model.num_kv_heads ({m.num_kv_heads})")
    require(m.intermediate_size % p.tp == 0,
             f"parallel.tp ({p.tp}) must divide model.intermediate_size ({m.intermediate_size})")
    require(not (p.ddp and p.tp > 1),
             "parallel.ddp replicates whole models and cannot combine with parallel.tp > 1; use FSDP (ddp: false)")
