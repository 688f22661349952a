"""``kvexport run``: a verified bundle in the ExecuTorch Python runtime, generating with streaming.

Checksums first (a corrupt or truncated file never reaches the runtime), then the kvq kernel
library, the program and the tokenizer. The program keeps the cache; this side chunks the
prompt, picks tokens (greedy, or sampled at a temperature) and reads back the width each token
was stored at to report the cache's bytes by precision.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptive_kv.cache import ContextOverflowError

from . import bundle as B


@dataclass
class RunStats:
    prompt_tokens: int
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # tokens after the first (the first comes from the prefill logits)
    kv_tokens_by_bits: dict[int, int] = field(default_factory=dict)
    kv_bytes_by_bits: dict[int, int] = field(default_factory=dict)
    kv_bytes_allocated: int = 0
    stopped: str = ""  # "eos", "max_new_tokens" or "context"

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s and self.new_tokens > 1 else 0.0

    def kv_bits_per_value(self, values_per_token: int) -> float:
        n = sum(self.kv_tokens_by_bits.values())
        return 8 * sum(self.kv_bytes_by_bits.values()) / (n * values_per_token) if n else 0.0

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "prefill_s": self.prefill_s, "decode_s": self.decode_s,
            "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s,
            "kv_tokens_by_bits": self.kv_tokens_by_bits, "kv_bytes_by_bits": self.kv_bytes_by_bits,
            "kv_bytes_allocated": self.kv_bytes_allocated, "stopped": self.stopped,
        }


def set_runtime_threads(n: int) -> None:
    """ExecuTorch's own thread pool (XNNPACK and the kvq kernels); OMP/torch settings do not reach it."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(int(n))


class BundleRunner:
    def __init__(self, path: str | Path, threads: int | None = None):
        from transformers import AutoTokenizer

        from adaptive_kv import ops

        from .pte_runner import PteDecoder

        self.bundle = B.verify(path)
        ops.load_executorch_library()  # FileNotFoundError naming `make setup` when it is not built
        if threads is not None:
            set_runtime_threads(threads)
        self.decoder = PteDecoder(self.bundle.program)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.bundle.path))
        cache = self.bundle.manifest["cache"]
        self.values_per_token = 2 * cache["layers"] * cache["kv_heads"] * cache["head_dim"]

    @property
    def max_seq_len(self) -> int:
        return self.decoder.max_seq_len

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return tok.encode(prompt, add_special_tokens=False)

    def kv_usage(self, stats: RunStats) -> None:
        """Fill stats' cache numbers from the program's token_bits."""
        bits = self.decoder.token_bits()[: self.decoder.seq_len].long()
        per_token = self.bundle.bytes_per_token()
        stats.kv_tokens_by_bits = {b: int((bits == b).sum()) for b in per_token}
        stats.kv_bytes_by_bits = {b: n * per_token[b] for b, n in stats.kv_tokens_by_bits.items()}
        stats.kv_bytes_allocated = self.bundle.manifest["cache"]["bytes_allocated"]

    def generate(
        self,
        ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        on_token: Callable[[int], None] | None = None,
    ) -> tuple[list[int], RunStats]:
        """Prefill ``ids`` then generate up to ``max_new_tokens`` (greedy unless temperature > 0)."""
        if not ids:
            raise ValueError("the prompt is empty")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if len(ids) >= self.max_seq_len:
            raise ContextOverflowError(
                f"the prompt is {len(ids)} tokens; this bundle holds {self.max_seq_len} tokens of context with room for at least one "
                "new token: shorten the prompt or re-export with a larger --max-seq-len"
            )
        gen = torch.Generator().manual_seed(seed)
        eos = set(self.decoder.eos_ids)
        self.decoder.reset()
        stats = RunStats(prompt_tokens=len(ids))
        t0 = time.perf_counter()
        logits, _ = self.decoder.feed(torch.tensor(ids, dtype=torch.int64))
        stats.prefill_s = time.perf_counter() - t0
        out: list[int] = []
        t1 = time.perf_counter()
        while True:
            tok = self._pick(logits, temperature, gen)
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if tok in eos:
                stats.stopped = "eos"
            elif len(out) >= max_new_tokens:
                stats.stopped = "max_new_tokens"
            elif self.decoder.seq_len >= self.max_seq_len:
                stats.stopped = "context"
            if stats.stopped:
                break
            if len(out) == 1:
                t1 = time.perf_counter()  # decode speed counts the tokens after the first
            logits = self.decoder.forward(torch.tensor([tok]))[-1]
        stats.decode_s = time.perf_counter() - t1 if len(out) > 1 else 0.0
        stats.new_tokens = len(out)
        self.kv_usage(stats)
        return out, stats

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> int:
        if temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.double() / temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen))
