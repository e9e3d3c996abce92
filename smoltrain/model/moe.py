"""Mixture-of-experts MLP: a softmax router picks top-k experts per token (dropless), tokens are sorted
by expert, the experts' SwiGLU runs as one grouped GEMM (per-expert slices where torch lacks it), outputs are
weighted and summed back per token; plus the balancing terms (aux loss, router z-loss, loss-free bias).

Names follow Hugging Face's Qwen3-MoE / OLMoE (`mlp.gate` is the router) with the experts stacked
(torchtitan's layout): experts.gate_proj / up_proj [E, F, D], experts.down_proj [E, D, F].
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from smoltrain.config import ModelConfig
from smoltrain.model.layers import MLP


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights; forward takes tokens already sorted by expert."""

    def __init__(self, num_experts: int, hidden: int, expert_hidden: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, expert_hidden, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, expert_hidden, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, expert_hidden))

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's experts: all of them, or under expert parallelism (train/expert_parallel.py)
        the local shard of the DTensors, to which x has already been dispatched."""
        weights = (self.gate_proj, self.up_proj, self.down_proj)
        return tuple(w.to_local() if isinstance(w, DTensor) else w for w in weights)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # grouped_mm on CPU too: its kernel took 21.4 ms against the slices' 24.2 ms (fwd + bwd, 2048 token
        # slots x 16 experts 256 -> 128, 1 thread; a dense matmul of the same FLOPs: ~19 ms).
        if hasattr(F, "grouped_mm"):
            return self._grouped(x, counts)
        return self._sliced(x, counts)

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # One kernel for all experts; offs are the slice ends (int32, as the kernel wants). grouped_mm
        # has no autocast rule, so cast by hand to the autocast dtype (bf16 over fp32 weights).
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        offs = torch.cumsum(counts, 0).to(torch.int32)
        x = x.to(dtype)
        gate_proj, up_proj, down_proj = self.local_weights()
        gate = F.grouped_mm(x, gate_proj.to(dtype).transpose(-2, -1), offs=offs)
        up = F.grouped_mm(x, up_proj.to(dtype).transpose(-2, -1), offs=offs)
        return F.grouped_mm(F.silu(gate) * up, down_proj.to(dtype).transpose(-2, -1), offs=offs)

    def _sliced(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # Without F.grouped_mm: one matmul per expert on its contiguous slice (no masks, no gathers). split and
        # unbind, not indexing: their backward writes each gradient once (one cat / stack), where
        # x[a:b] and w[j] would each allocate and add a zero tensor the size of the whole input.
        parts = x.split(counts.tolist())
        gates, ups, downs = (weight.unbind(0) for weight in self.local_weights())
        outputs = [F.linear(F.silu(F.linear(part, gates[j])) * F.linear(part, ups[j]), downs[j])
                   for j, part in enumerate(parts) if part.shape[0]]
        return torch.cat(outputs) if outputs else x.new_zeros((0, x.shape[-1]))


class RouterStats:
    """One forward's routing of one layer: fp32 router logits [tokens, E] and chosen experts [tokens, k]."""

    def __init__(self, logits: torch.Tensor, chosen: torch.Tensor):
        self.logits, self.chosen = logits, chosen


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, experts = config.hidden_size, config.num_experts
        self.top_k = config.experts_per_token
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = Experts(experts, hidden, config.resolved_expert_hidden)
        self.shared_expert = MLP(config, config.shared_expert_hidden) if config.shared_expert_hidden else None
        # DeepSeek-V3's loss-free balancing: added to the scores only to pick experts, never to weight
        # them; persistent so that a resumed run routes as the saved one did.
        self.register_buffer("expert_bias", torch.zeros(experts), persistent=True)
        self.use_bias = config.bias_update_rate > 0
        self.stats: RouterStats | None = None  # the last forward's routing, read by the losses and metrics
        self.counts: torch.Tensor | None = None  # tokens per expert summed over training forwards since taken

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        # Router in float32 (torchtitan; transformers uses the model dtype, equal in float32).
        logits = F.linear(flat.float(), self.gate.weight.float())
        probs = logits.softmax(dim=-1)
        choice = probs + self.expert_bias.float() if self.use_bias else probs
        chosen = choice.topk(self.top_k, dim=-1).indices
        weights = probs.gather(1, chosen)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        self.stats = RouterStats(logits, chosen)

        # Sort the (token, slot) pairs by expert: each expert then reads one contiguous slice.
        order = chosen.reshape(-1).argsort(stable=True)
        counts = torch.bincount(chosen.reshape(-1), minlength=self.gate.out_features)
        if self.training:  # pooled over a step's micro-batches for the bias update and the load metrics
            self.counts = counts if self.counts is None else self.counts + counts
        routed = self.experts(flat[order // self.top_k], counts)
        routed = routed * weights.reshape(-1)[order, None].to(routed.dtype)
        # Unsort into [tokens, k, D] and sum over k: deterministic, unlike index_add_ with repeats.
        unsorted = torch.empty_like(routed).index_copy_(0, order, routed)
        out = unsorted.view(-1, self.top_k, shape[-1]).sum(dim=1)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.view(shape)


def take_counts(layers: list[MoE]) -> torch.Tensor | None:
    """[layers, E] tokens routed to each expert by the training forwards since the last call; resets."""
    if any(layer.counts is None for layer in layers):
        return None
    counts = torch.stack([layer.counts for layer in layers])
    for layer in layers:
        layer.counts = None
    return counts


def load_balancing_loss(stats: list[RouterStats], num_experts: int, top_k: int) -> torch.Tensor:
    """transformers' load_balancing_loss_func: pooled over layers and tokens, E x sum_i f_i P_i, where
    f_i is the share of (token, slot) picks of expert i by plain top-k of the softmax (so f sums to k
    and a balanced router scores k) and P_i its mean router probability."""
    logits = torch.cat([s.logits for s in stats])
    probs = logits.softmax(dim=-1)
    picks = probs.topk(top_k, dim=-1).indices
    share = F.one_hot(picks, num_experts).float().mean(dim=0)  # [k, E]
    return num_experts * (share * probs.mean(dim=0)).sum()


def router_z_loss(stats: list[RouterStats]) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens and layers of logsumexp(router logits)^2."""
    return torch.stack([s.logits.logsumexp(dim=-1).pow(2).mean() for s in stats]).mean()


def expert_counts(stats: list[RouterStats], num_experts: int) -> torch.Tensor:
    """[layers, E] tokens routed to each expert in the last forward."""
    return torch.stack([torch.bincount(s.chosen.reshape(-1), minlength=num_experts) for s in stats])


@torch.no_grad()
def update_expert_bias(layers: list[MoE], counts: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's sign rule with torchtitan's centering (#1506): under-loaded experts' bias rises by
    `rate`, over-loaded ones' falls; the mean change is removed so the biases keep mean 0."""
    counts = counts.float()
    delta = rate * torch.sign(counts.mean(dim=-1, keepdim=True) - counts)
    delta = delta - delta.mean(dim=-1, keepdim=True)
    for layer, change in zip(layers, delta):
        layer.expert_bias.add_(change.to(layer.expert_bias.device))


__all__ = ["MoE", "Experts", "RouterStats", "take_counts", "load_balancing_loss", "router_z_loss", "expert_counts", "update_expert_bias"]
