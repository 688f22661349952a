"""One sequence's decoding state: packed cache + rarity counts + policy, and the commit step.

Prompt tokens (in chunks) and generated tokens go through the same path: forward the chunk
(it attends to itself at full precision), compute its features, let the policy choose each
token's bit-width, then commit (pack) its K/V into the cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .cache import CacheConfig, ContextOverflowError, PackedKVCache
from .decoder import ChunkOutput, PackedLlama
from .features import RarityTracker, TokenFeatures, next_token_stats
from .policy import Policy


@dataclass(frozen=True)
class SessionConfig:
    max_seq_len: int = 2048
    chunk_size: int = 32  # prefill chunk: tokens of one chunk see each other at full precision
    group_size: int = 64
    hadamard: bool = True
    query_bits: int = 32  # 8: attention scores keys with int8 query rows (CacheConfig.query_bits)

    def __post_init__(self) -> None:
        if self.chunk_size <= 0 or self.max_seq_len <= 0:
            raise ValueError(f"chunk_size ({self.chunk_size}) and max_seq_len ({self.max_seq_len}) must be positive")


class Session:
    """Decode one sequence with ``policy`` over a packed cache sized by the policy's layout."""

    def __init__(self, decoder: PackedLlama, policy: Policy, config: SessionConfig = SessionConfig()):
        if config.max_seq_len > decoder.max_positions:
            raise ValueError(
                f"max_seq_len={config.max_seq_len} exceeds the model's max_position_embeddings={decoder.max_positions}"
            )
        self.decoder, self.policy, self.config = decoder, policy, config
        cache_cfg = CacheConfig(
            num_layers=decoder.num_layers,
            num_kv_heads=decoder.num_kv_heads,
            head_dim=decoder.head_dim,
            layout=policy.layout(config.max_seq_len),
            group_size=config.group_size,
            hadamard=config.hadamard,
            query_bits=config.query_bits,
        )
        self.cache = PackedKVCache(cache_cfg)
        self.rarity = RarityTracker(decoder.vocab_size)

    def reset(self) -> None:
        self.cache.reset()
        self.rarity.reset()

    @property
    def seq_len(self) -> int:
        return self.cache.seq_len

    def forward(self, ids: torch.Tensor, logits: str = "all") -> ChunkOutput:
        """ids: [T] or [B, T] -> the chunk's outputs, nothing committed."""
        ids = ids if ids.dim() == 2 else ids[None]
        if self.policy.needs_features:
            logits = "all"  # entropy/confidence need every position's distribution
        return self.decoder(ids, self.cache, logits=logits, with_stats=self.policy.needs_features)

    def features(self, out: ChunkOutput, ids: torch.Tensor) -> TokenFeatures:
        """Features of a batch-1 chunk (counts the tokens for rarity)."""
        t = ids.shape[-1]
        ids = ids.reshape(t)
        rarity = self.rarity.observe(ids)
        if self.policy.needs_features:
            if out.logits is None or out.logits.shape[1] != t or out.attn_var is None:
                raise RuntimeError("a feature-driven policy got a chunk forwarded without all logits and attention stats")
            entropy, confidence = next_token_stats(out.logits[0])
            attn_var = out.attn_var[0]
        else:  # static / positional policies read no features: skip the vocabulary-wide softmax
            entropy = confidence = attn_var = torch.zeros(t)
        positions = torch.arange(self.seq_len, self.seq_len + t)
        return TokenFeatures(entropy, rarity, attn_var, confidence, ids, positions)

    def commit(self, out: ChunkOutput, ids: torch.Tensor) -> torch.Tensor:
        """Let the policy choose the chunk's widths, pack its K/V; returns [T] widths used."""
        feats = self.features(out, ids)
        if getattr(self.policy, "budgeted", False):
            bits = self.policy.choose(feats, spent=self.cache.spent_bits())
        else:
            bits = self.policy.choose(feats)
        return self.cache.commit(out.k[:, 0], out.v[:, 0], bits)

    def feed(self, ids: torch.Tensor, logits: str = "last") -> torch.Tensor | None:
        """Prefill ids [T] in chunks, committing each; returns the logits asked for ("all": [T, V], "last": [V])."""
        ids = ids.reshape(-1)
        if self.seq_len + ids.numel() > self.config.max_seq_len:
            raise ContextOverflowError(
                f"{ids.numel()} tokens on top of {self.seq_len} exceed max_seq_len={self.config.max_seq_len}; "
                "raise --max-seq-len or shorten the prompt"
            )
        parts = []
        chunks = ids.split(self.config.chunk_size)
        for n, chunk in enumerate(chunks):
            want = logits if logits == "all" else ("last" if n == len(chunks) - 1 and logits == "last" else "none")
            out = self.forward(chunk, logits=want)
            self.commit(out, chunk)
            if out.logits is not None and want != "none":
                parts.append(out.logits[0] if want == "all" else out.logits[0, -1])
        if not parts:
            return None
        return torch.cat(parts) if logits == "all" else parts[-1]

    def generate(
        self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, eos_ids: tuple[int, ...] = (), seed: int = 0
    ) -> Iterator[int]:
        """Prefill ``prompt`` then yield up to ``max_new_tokens`` tokens (greedy when temperature == 0)."""
        gen = torch.Generator().manual_seed(seed)
        logits = self.feed(prompt, logits="last")
        for i in range(max_new_tokens):
            if temperature > 0:
                tok = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
            else:
                tok = int(logits.argmax())
            yield tok
            if tok in eos_ids or i == max_new_tokens - 1 or self.seq_len >= self.config.max_seq_len:
                return
            logits = self.feed(torch.tensor([tok]), logits="last")
