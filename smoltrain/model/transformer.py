"""The SmolLM3-style decoder, top to bottom: RMSNorm, attention (GQA, RoPE/NoPE, QK-norm), SwiGLU,
block, model (embed -> blocks -> norm -> tied head -> loss of model/loss.py), initialisation.

Module names follow Hugging Face's Llama family (minus the `model.` prefix), so export is a rename.
Initialisation is a function of (seed, parameter name) only, never of the parallel layout.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from smoltrain.config import ModelConfig
from smoltrain.model.attention import (
    SharedPromptMask,
    apply_rotary,
    attend,
    attend_shared_prompt,
    build_mask,
    positions_from_documents,
    resolve_kernel,
    rotary_tables,
    window_band,
)
from smoltrain.model.delta_rule import segments_from_documents
from smoltrain.model.layers import MLP, RMSNorm
from smoltrain.model.linear_attention import GatedDeltaNet
from smoltrain.model.loss import LossOutput, chunked_logprobs, chunked_loss, cross_entropy_sums, label_logprobs
from smoltrain.model.moe import MoE, load_balancing_loss, router_z_loss


class KVCache:
    """Keys and values of every layer for max_len tokens, for incremental decoding. Allocated per layer
    at its first update, shaped like its keys: under tensor parallelism a rank holds only its heads.

    After prefilling each prompt once, `share_prompts(repeats, ...)` keeps them as one copy that the
    prompt's `repeats` rows attend to (cascade attention: the prompt's keys are read once per group,
    not once per row) and starts an empty cache for the rows' own tokens. A sliding-window layer then
    keeps only what its window can still see: the prompt's last window - 1 keys and a ring of window
    own keys (Gemma 3 at 32k tokens and window 512: 5 of 6 layers hold 1/64 of the keys)."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device, dtype=torch.float32):
        self.num_layers, self.batch, self.max_len = config.num_layers, batch, max_len
        self.device, self.dtype = device, dtype
        self.windows = [config.sliding_window if config.is_local_layer(i) else 0 for i in range(config.num_layers)]
        self.keys: list[torch.Tensor | None] = [None] * self.num_layers
        self.values: list[torch.Tensor | None] = [None] * self.num_layers
        self.length = 0  # tokens already stored
        # per layer keys, values; the padding bias of the full prompt width
        self.prompts: tuple[list, list, torch.Tensor] | None = None
        self.linear: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # linear layers: (conv state, recurrent state)

    def linear_state(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.linear.get(layer, (None, None))

    def set_linear_state(self, layer: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        self.linear[layer] = (conv, state)

    def _capacity(self, layer: int) -> int:
        """Own tokens a layer stores: a ring of the window for a local layer once prompts are shared."""
        window = self.windows[layer]
        return min(self.max_len, window) if self.prompts is not None and window > 0 else self.max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        capacity = self._capacity(layer)
        if self.keys[layer] is None:
            shape = (self.batch, k.shape[1], capacity, k.shape[3])
            self.keys[layer] = torch.zeros(shape, device=self.device, dtype=self.dtype)
            self.values[layer] = torch.zeros(shape, device=self.device, dtype=self.dtype)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens, asked for {end}")
        if capacity < self.max_len:  # a ring (one token per decoding step): order does not matter unmasked
            self.keys[layer][:, :, self.length % capacity] = k[:, :, 0]
            self.values[layer][:, :, self.length % capacity] = v[:, :, 0]
            return self.keys[layer][:, :, : min(end, capacity)], self.values[layer][:, :, : min(end, capacity)]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def share_prompts(self, repeats: int, bias: torch.Tensor, max_new_tokens: int) -> None:
        """The stored tokens become the shared prompts (bias [prompts, 1, 1, length]: -inf on padding);
        `repeats` rows per prompt (prompt-major) then store up to max_new_tokens each."""
        def kept(tensor: torch.Tensor | None, window: int) -> torch.Tensor | None:
            if tensor is None:  # a linear layer
                return None
            tensor = tensor[:, :, : self.length]
            return tensor[:, :, -(window - 1) :].clone() if 0 < window - 1 < self.length else tensor

        self.prompts = ([kept(k, w) for k, w in zip(self.keys, self.windows)],
                        [kept(v, w) for v, w in zip(self.values, self.windows)], bias)
        self.linear = {layer: (conv.repeat_interleave(repeats, 0), state.repeat_interleave(repeats, 0))
                       for layer, (conv, state) in self.linear.items()}
        self.keys, self.values = [None] * self.num_layers, [None] * self.num_layers
        self.batch, self.max_len, self.length = self.batch * repeats, max_new_tokens, 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, window: int = 0) -> torch.Tensor:
        """window > 0 (a sliding-window layer): a decoding step reads only the keys of its window; the
        mask of a step without shared prompts carries the window already."""
        own = self.length + k.shape[2]  # own tokens after this step's
        k, v = self.update(layer, k, v)
        if self.prompts is None:
            return attend(q, k, v, mask)
        keys, values, bias = self.prompts[0][layer], self.prompts[1][layer], self.prompts[2]
        bias = bias[..., bias.shape[-1] - keys.shape[2] :]  # a local layer kept the prompt's last columns
        if window > 0:  # one query per row: it sees the kept prompt columns from `start` on, and its ring
            start = max(keys.shape[2] + own - window, 0)
            keys, values, bias = keys[:, :, start:], values[:, :, start:], bias[..., start:]
        return attend_shared_prompt(q, keys, values, bias, k, v)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.resolved_head_dim
        self.use_rope = config.uses_rope(layer)
        self.window = config.sliding_window if config.is_local_layer(layer) else 0
        # sdpa scales by head_dim ** -0.5; Gemma's query_pre_attn_scalar is folded into the queries.
        scalar = config.query_pre_attn_scalar
        self.query_scale = 1.0 if scalar in (None, self.head_dim) else (self.head_dim / scalar) ** 0.5
        hidden = config.hidden_size
        self.output_gate = config.attention_output_gate
        # With the output gate, q_proj also makes the gate: [query | gate] per head (Qwen3-Next's layout).
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim * (2 if self.output_gate else 1), bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.qk_norm_per_head = config.qk_norm_per_head
        if config.qk_norm:
            q_width = self.head_dim if config.qk_norm_per_head else self.num_heads * self.head_dim
            k_width = self.head_dim if config.qk_norm_per_head else self.num_kv_heads * self.head_dim
            self.q_norm = RMSNorm(q_width, config.norm_eps, config.norm_plus_one)
            self.k_norm = RMSNorm(k_width, config.norm_eps, config.norm_plus_one)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1 instead of num_heads: tensor parallelism shards the projections and leaves local head counts.
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.output_gate:
            q, gate = q.view(batch, seq, -1, 2 * self.head_dim).chunk(2, dim=-1)
            q, gate = q.reshape(batch, seq, -1), gate.reshape(batch, seq, -1)
        if self.q_norm is not None and not self.qk_norm_per_head:  # over the full width (OLMoE)
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(batch, seq, -1, self.head_dim)
        k = k.view(batch, seq, -1, self.head_dim)
        v = v.view(batch, seq, -1, self.head_dim)
        if self.q_norm is not None and self.qk_norm_per_head:  # per head, before RoPE (Qwen3)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.use_rope and cos.shape[-1] < self.head_dim:  # partial RoPE: the other dimensions carry no position
            rot = cos.shape[-1]
            q = torch.cat([apply_rotary(q[..., :rot], cos.to(q.dtype), sin.to(q.dtype)), q[..., rot:]], dim=-1)
            k = torch.cat([apply_rotary(k[..., :rot], cos.to(k.dtype), sin.to(k.dtype)), k[..., rot:]], dim=-1)
        elif self.use_rope:
            q, k = apply_rotary(q, cos.to(q.dtype), sin.to(q.dtype)), apply_rotary(k, cos.to(k.dtype), sin.to(k.dtype))
        if self.query_scale != 1.0:
            q = q * self.query_scale
        y = attend(q, k, v, mask) if cache is None else cache.attend(self.layer, q, k, v, mask, self.window)
        y = y.transpose(1, 2).reshape(batch, seq, -1)
        return self.o_proj(y * torch.sigmoid(gate) if self.output_gate else y)


class Block(nn.Module):
    """Pre-norm block; with sandwich_norm (Gemma) the attention and MLP outputs are normed too, under
    Gemma's names: post_attention_layernorm is then the norm after attention, not the one before the MLP."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        norm = functools.partial(RMSNorm, config.hidden_size, config.norm_eps, config.norm_plus_one)
        self.input_layernorm = norm()
        self.linear = config.is_linear_layer(layer)
        if self.linear:  # a hybrid's linear layer: `mask` brings the document segments (or None)
            self.linear_attn = GatedDeltaNet(config, layer)
        else:
            self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = norm()
        self.sandwich = config.sandwich_norm
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MoE(config) if config.is_moe_layer(layer) else MLP(config)

    def mix(self, x, cos, sin, mask, cache: KVCache | None) -> torch.Tensor:
        if self.linear:
            return self.linear_attn(x, mask, cache)
        return self.self_attn(x, cos, sin, mask, cache)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None) -> torch.Tensor:
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.mix(self.input_layernorm(x), cos, sin, mask, cache))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.mix(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


KEEP_SCALING = object()  # set_rope's "leave the RoPE scaling as it is"


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, config.norm_plus_one)
        # Tied: the head reuses the embedding matrix (no second Parameter to keep tied through
        # meta-device builds, FSDP and checkpoints).
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope_theta = config.rope_theta
        self.rope_scaling = config.rope_scaling
        self._register_rope(config.max_seq_len, device=None)
        # Set by apply_tensor_parallel(loss_parallel=True): the head's logits stay vocabulary-sharded
        # DTensors into a vocabulary-parallel loss.
        self.loss_parallel = False

    def _register_rope(self, max_seq_len: int, device) -> None:
        cos, sin = rotary_tables(self.config.rotary_dim, max_seq_len, self.rope_theta, device=device,
                                 scaling=self.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.config.rope_local_theta is not None:  # Gemma 3: sliding-window layers have their own base
            cos, sin = rotary_tables(self.config.rotary_dim, max_seq_len, self.config.rope_local_theta, device=device)
            self.register_buffer("rope_local_cos", cos, persistent=False)
            self.register_buffer("rope_local_sin", sin, persistent=False)

    def set_rope(self, theta: float | None = None, max_seq_len: int | None = None, scaling=KEEP_SCALING) -> None:
        """Long-context extension: a larger RoPE base (ABF), longer tables, and/or RoPE scaling
        (a RopeScaling; None or rope_type default: none; left out: keep the current one)."""
        if theta is not None:
            self.rope_theta = theta
        if scaling is not KEEP_SCALING:
            self.rope_scaling = None if scaling is None or scaling.rope_type == "default" else scaling
        length = max(max_seq_len or 0, self.rope_cos.shape[0])
        device = self.rope_cos.device if self.rope_cos.device.type != "meta" else None
        self._register_rope(length, device)

    # ------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        reduction: str = "mean",
        temperature: float = 1.0,
        logits_to_keep: int = 0,
    ):
        """Logits [batch, seq, vocab] when labels is None, else a LossOutput (reduction "mean" or
        "sum"), or with reduction="none" the float32 log-probability of each label [batch, seq]
        (0 where the label is -100) from logits divided by `temperature`: the one per-token
        primitive that validation, scoring, DPO and GRPO build on (see `token_logprobs`).

        document_ids [batch, seq] turn on intra-document masking (if the config enables it) with
        positions restarting per document. position_ids and a boolean attention_mask
        [batch, 1, seq, seq_kv] override both, for padded batches and cached decoding.
        logits_to_keep > 0 computes logits for the last positions only (a prefill needs one).
        """
        batch, seq = input_ids.shape
        offset = cache.length if cache is not None else 0
        use_documents = self.config.document_masking and document_ids is not None
        kernel = resolve_kernel(self.config.attention_kernel, input_ids.device)

        if position_ids is None:
            if use_documents:
                position_ids = positions_from_documents(document_ids)
            else:
                position_ids = torch.arange(offset, offset + seq, device=input_ids.device).expand(batch, seq)
        mask = attention_mask
        if mask is None and use_documents:
            mask = build_mask(document_ids, kernel)
        if mask is None and offset > 0:  # decoding after a prefix: causal relative to the cache
            keys = torch.arange(offset + seq, device=input_ids.device)
            queries = torch.arange(offset, offset + seq, device=input_ids.device)
            mask = (keys[None, :] <= queries[:, None])[None, None]
        cos = self.rope_cos[position_ids][:, None]
        sin = self.rope_sin[position_ids][:, None]
        inputs = {"global": (cos, sin, mask)}  # per kind of layer: global, local (sliding window), linear
        if self.config.sliding_window > 0:
            inputs["local"] = self._local_inputs(position_ids, cos, sin, mask, document_ids if use_documents else None,
                                                 attention_mask is None and offset == 0, kernel)
        if self.config.full_attention_every > 0:
            inputs["linear"] = (None, None, self._linear_segments(document_ids if use_documents else None, attention_mask))

        x = self.embed_tokens(input_ids)
        if self.config.embed_scale:  # Gemma: sqrt(hidden) rounded to the weights' dtype (34.0 for 1152 in bf16)
            x = x * torch.tensor(self.config.hidden_size**0.5).to(self.embed_tokens.weight.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, *inputs[self.config.layer_kind(i)], cache)
        if cache is not None:
            cache.length += seq
        # The final norm stays out of the loss chunks: under sequence parallel it is where the
        # sequence-sharded residual stream is gathered back (the chunks are flattened tokens).
        x = self.norm(x)
        if labels is None:
            logits = self.output(x[:, -logits_to_keep:] if logits_to_keep else x)
            return logits.full_tensor() if self.loss_parallel else logits
        if reduction == "none":
            return self._token_logprobs(x, labels, temperature)
        return self._loss(x, labels, reduction)

    @staticmethod
    def _linear_segments(document_ids: torch.Tensor | None, attention_mask):
        """Document index per token for the linear layers (their state and convolution restart per document),
        or the SharedPromptMask itself (the layer runs each prompt once and continues its tails).
        A caller's mask is generation's left-padded prefill: the last query of each row sees exactly its
        real keys, so padding (0) and prompt (1) are two documents and the state starts at the prompt."""
        if attention_mask is None:
            return segments_from_documents(document_ids) if document_ids is not None else None
        if isinstance(attention_mask, SharedPromptMask):  # GRPO's prompts once, tails from their state
            return attention_mask
        seq = attention_mask.shape[-2]
        return attention_mask[:, 0, -1, -seq:].long()

    def _local_inputs(self, position_ids, cos, sin, mask, document_ids, fresh: bool, kernel: str) -> tuple:
        """cos, sin and mask of the sliding-window layers. A fresh forward (no cache offset, no caller's
        mask) builds its document or causal mask with the window; a caller's or a cache's mask gets the band."""
        if self.config.rope_local_theta is not None:
            cos, sin = self.rope_local_cos[position_ids][:, None], self.rope_local_sin[position_ids][:, None]
        window = self.config.sliding_window
        if fresh:
            documents = document_ids if document_ids is not None else torch.zeros_like(position_ids)
            return cos, sin, build_mask(documents, kernel, window)
        if isinstance(mask, SharedPromptMask):  # left-padded prompts then their tails: columns are positions
            prompt_len, tail_len = mask.prompt_len, mask.tail_len
            return cos, sin, dataclasses.replace(
                mask, prompt_mask=window_band(mask.prompt_mask, window, prompt_len, prompt_len, position_ids.device),
                tail_mask=window_band(mask.tail_mask, window, tail_len, prompt_len + tail_len, position_ids.device))
        seq = position_ids.shape[1]
        return cos, sin, window_band(mask, window, seq, mask.shape[-1] if mask is not None else seq, position_ids.device)

    def output(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits; under loss parallel a DTensor sharded over the vocabulary."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        weight = self.embed_tokens.weight
        if self.loss_parallel:  # the tied head is the vocabulary-sharded embedding
            from torch.distributed.tensor import DTensor, Replicate

            hidden = DTensor.from_local(hidden, weight.device_mesh, [Replicate()], run_check=False)
        return F.linear(hidden, weight)

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str) -> LossOutput:
        out = chunked_loss(self.loss_chunk, hidden, labels, self.config.vocab_size, self.config.z_loss, reduction)
        if not self.moe_layers():
            return out
        # Balancing terms are per token already: a "sum" loss (divided by the batch's tokens later)
        # carries them times its token count, so both reductions train on CE + coef x aux.
        scale = out.num_tokens.float() if reduction == "sum" else 1.0
        return out._replace(loss=out.loss + scale * self.router_loss())

    def moe_layers(self) -> list[MoE]:
        return [block.mlp for block in self.layers if isinstance(block.mlp, MoE)]

    def router_loss(self) -> torch.Tensor:
        """aux_loss_coef x transformers' load-balancing loss + router_z_loss x z-loss, of the last forward."""
        stats = [layer.stats for layer in self.moe_layers()]
        cfg = self.config
        loss = cfg.aux_loss_coef * load_balancing_loss(stats, cfg.num_experts, cfg.experts_per_token)
        if cfg.router_z_loss:
            loss = loss + cfg.router_z_loss * router_z_loss(stats)
        return loss

    @torch.no_grad()
    def router_metrics(self) -> dict[str, float]:
        """The last forward's router: aux loss, z-loss and mean router entropy (ln E is uniform)."""
        stats = [layer.stats for layer in self.moe_layers() if layer.stats is not None]
        if not stats:
            return {}
        cfg = self.config
        probs = torch.cat([s.logits for s in stats]).softmax(dim=-1)
        return {
            "moe_aux": float(load_balancing_loss(stats, cfg.num_experts, cfg.experts_per_token)),
            "moe_z": float(router_z_loss(stats)),
            "moe_entropy": float(-(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()),
        }

    def _token_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
        return chunked_logprobs(self.token_logprob_chunk, hidden, labels, self.config.vocab_size, temperature)

    def token_logprob_chunk(self, hidden: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
        """log p(label) of each token of one chunk: head, temperature, log-softmax, gather."""
        logits = self.output(hidden).float()
        if temperature != 1.0:  # GRPO scores samples drawn at a temperature with the same scaling
            logits = logits / temperature
        return label_logprobs(logits, labels)

    def loss_chunk(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy and z-loss of one chunk: head, log-softmax, gather. One function so
        that `apply_compile` can fuse it (each pass over the float32 logits runs once, not per op)."""
        return cross_entropy_sums(self.output(hidden).float(), labels, self.config.z_loss)

    # ------------------------------------------------------------------------- init

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Normal(0, init_std) matrices, ones for norms; each tensor drawn from its own generator
        keyed by (seed, canonical name), then sharded if the parameter is a DTensor."""
        for name, param in self.named_parameters():
            full = _initial_value(canonical_name(name), tuple(param.shape), self.config.init_std, seed)
            if self.config.norm_plus_one and param.ndim == 1 and ".linear_attn." not in name:  # (1 + w) norms start at w = 0
                full.zero_()
            if name.endswith("linear_attn.A_log"):  # decay rates exp(A) in (1, 16), the range FLA draws them from
                full = _initial_value(canonical_name(name) + "/A", (2, *param.shape), 1.0, seed)[0].sigmoid().mul(15).add(1).log()
            _copy_full_into(param, full)
        for layer in self.moe_layers():  # a buffer, left blank by a meta-device build
            layer.expert_bias.zero_()
        self.set_rope(max_seq_len=self.rope_cos.shape[0])


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   **forward_kwargs) -> torch.Tensor:
    """[batch, seq] float32 log p(labels[b, t] | tokens up to t), 0 where labels is -100. Labels
    [batch, seq, k] score k candidate tokens at each position in one forward ([batch, seq, k]).
    Goes through the model's forward (wrappers such as FSDP2 unshard there), so call this, not a method."""
    return model(input_ids, labels=labels, reduction="none", temperature=temperature, **forward_kwargs)


def canonical_name(name: str) -> str:
    """Parameter name without wrapper prefixes added by compile or activation checkpointing."""
    for wrapper in ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def _initial_value(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights
        return torch.ones(shape)
    key = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def _copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = None
    if DTensor is not None and isinstance(param, DTensor):
        # Every rank holds the same full tensor, so each takes its shard locally (no communication).
        local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full.to(param.device, param.dtype))


def build_model(config: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> Transformer:
    """A model with initialised weights on `device` (parallel builds start from meta, see train.parallelize)."""
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["Transformer", "KVCache", "LossOutput", "build_model", "count_parameters", "canonical_name", "token_logprobs"]
