"""Per-token features the precision policies read: the paper's s_t = [H_t, R_t, V_t, C_t].

All are computed from the step that processes token t, before its K/V is committed:
- entropy H_t of softmax(z_t), the next-token distribution at t (nats);
- rarity R_t = -log((c(x_t) + 1) / (N + |V_obs| + 1)), counts over the tokens seen *before* t
  in this sequence (c = occurrences of x_t, N = tokens seen, |V_obs| = distinct tokens seen);
- attention variance V_t: variance of the final layer's attention distribution of query t over
  the keys it sees (n_t = t + 1 of them), averaged over query heads: sum(p^2)/n - 1/n^2;
- confidence C_t = max_v softmax(z_t)_v (the paper gives no formula; this is the inference-time
  stand-in for "probability of the actual next token").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import ops  # noqa: F401  (defines the kvq ops, logit_stats among them)

FEATURE_NAMES: tuple[str, ...] = ("entropy", "rarity", "attn_var", "confidence")


@dataclass
class TokenFeatures:
    """Features of T tokens, each [T] float32, plus their ids and positions [T] int64."""

    entropy: torch.Tensor
    rarity: torch.Tensor
    attn_var: torch.Tensor
    confidence: torch.Tensor
    token_ids: torch.Tensor
    positions: torch.Tensor

    def matrix(self, names: tuple[str, ...] = FEATURE_NAMES) -> torch.Tensor:
        """[T, len(names)] in the given order."""
        unknown = [n for n in names if n not in FEATURE_NAMES + ("position",)]
        if unknown:
            raise ValueError(f"unknown features {unknown}; known: {FEATURE_NAMES + ('position',)}")
        cols = [self.positions.float() if n == "position" else getattr(self, n) for n in names]
        return torch.stack(cols, dim=-1).float()


def next_token_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [T, V] -> (entropy [T] in nats, confidence = max probability [T]).

    The kvq op (:mod:`adaptive_kv.ops`): its compiled kernel once the library is loaded, else the
    log_softmax reference; the exported graph calls the same op, so eager and .pte agree."""
    return torch.ops.kvq.logit_stats(logits.float())


def attention_variance(sum_p2: torch.Tensor, n_keys: torch.Tensor) -> torch.Tensor:
    """sum_p2: [H, T] sum of squared attention weights per head; n_keys: [T] -> [T] head mean."""
    n = n_keys.float()
    return (sum_p2 / n - 1.0 / (n * n)).mean(0)


class RarityTracker(nn.Module):
    """Running token counts of one sequence; ``observe`` scores tokens, then counts them."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.register_buffer("counts", torch.zeros(vocab_size, dtype=torch.int64))
        self.seen = 0
        self.distinct = 0

    def reset(self) -> None:
        self.counts.zero_()
        self.seen = self.distinct = 0

    def observe(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [T] -> rarity [T], each token scored on the counts before it (chunk order respected)."""
        t = ids.shape[0]
        earlier = torch.ones(t, t, dtype=torch.bool).tril(-1)  # [i, j]: j before i
        same = (ids[:, None] == ids[None, :]) & earlier
        c = self.counts[ids] + same.sum(1)
        first_here = (self.counts[ids] == 0) & ~same.any(1)  # new to the sequence at i
        new_before = torch.cumsum(first_here.long(), 0) - first_here.long()
        n = self.seen + torch.arange(t)
        v_obs = self.distinct + new_before
        rarity = -torch.log((c + 1).float() / (n + v_obs + 1).float())
        self.counts.index_add_(0, ids, torch.ones_like(ids))
        self.seen += t
        self.distinct += int(first_here.sum())
        return rarity
