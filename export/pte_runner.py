"""Run an exported decoder ``.pte`` (see :mod:`export.pte`) from Python with ``executorch.runtime``.

The program keeps the cache; the host only chunks the prompt, checks the context length (the
graph cannot raise) and picks tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adaptive_kv import ops
from adaptive_kv.cache import ContextOverflowError

from .graph import feed_in_chunks


class PteDecoder:
    """One sequence at a time through a decoder .pte: ``feed`` chunks, ``generate`` greedily."""

    def __init__(self, path: str | Path, etdump: bool = False):
        from executorch.runtime import Runtime

        ops.load_executorch_library()  # the kvq::*.out kernels the program calls
        # etdump: ExecuTorch records every kernel and delegate call (bench/profile_pte.py)
        self.program = Runtime.get().load_program(str(path), enable_etdump=etdump, debug_buffer_size=0)
        self._names = set(self.program.method_names)
        # `state` (validation) is loaded on first use: its planned memory is a copy of the cache
        self._methods = {n: self.program.load_method(n) for n in self._names - {"state"}}
        self.max_seq_len = self._constant("get_max_context_len")  # cache capacity
        self.chunk_size = self._constant("get_max_seq_len")  # most tokens per forward call
        self.vocab_size = self._constant("get_vocab_size")
        self.eos_ids = tuple(self._constant("get_eos_ids", all_values=True))
        self.seq_len = 0
        self.reset()

    def _constant(self, name: str, all_values: bool = False):
        out = self._methods[name].execute([])
        return list(out) if all_values else out[0]

    def has_state_method(self) -> bool:
        return "state" in self._names

    def reset(self) -> None:
        """Start a new sequence: the next forward runs at input_pos 0, which restarts the program's cache."""
        self.seq_len = 0

    def step(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids: [T] (1 <= T <= chunk_size) -> (logits [T, V], bits [T] widths stored)."""
        start = self.seq_len
        logits = self.forward(ids)
        return logits, self.token_bits()[start : self.seq_len].long()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [T] -> logits [T, V]; no read-back of the widths (the decode hot path)."""
        t = ids.numel()
        if not 1 <= t <= self.chunk_size:
            raise ValueError(f"a step takes 1..{self.chunk_size} tokens (the exported chunk size), got {t}")
        if self.seq_len + t > self.max_seq_len:
            raise ContextOverflowError(f"context of {self.seq_len + t} tokens exceeds the program's max_seq_len={self.max_seq_len}")
        (logits,) = self._methods["forward"].execute([ids.reshape(1, t).to(torch.int64), torch.tensor([self.seq_len])])
        self.seq_len += t
        return logits[0]

    def write_etdump(self, path: str | Path) -> None:
        """The ETDump of every call so far (needs ``etdump=True``); read it with executorch.devtools.Inspector."""
        self.program.write_etdump_result_to_file(str(path), str(Path(path).with_suffix(".debug.bin")))

    def token_bits(self) -> torch.Tensor:
        """int8 [max_seq_len]: the width each cached position < seq_len is stored at (later entries are stale)."""
        return self._methods["token_bits"].execute([])[0]

    def feed(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [N] in chunks of chunk_size -> (last logits [V], bits [N])."""
        return feed_in_chunks(self.step, ids, self.seq_len, self.max_seq_len, self.chunk_size)

    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> list[int]:
        """Greedy: prefill ``prompt``, then up to ``max_new_tokens`` tokens, each committed."""
        logits, _ = self.feed(prompt)
        out: list[int] = []
        for i in range(max_new_tokens):
            tok = int(logits.argmax())
            out.append(tok)
            if tok in self.eos_ids or i == max_new_tokens - 1 or self.seq_len >= self.max_seq_len:
                break
            logits = self.forward(torch.tensor([tok]))[-1]
        return out

    def state(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The cache state, by ExportableDecoder.state_names() (needs a program exported with state_method=True)."""
        if "state" not in self._names:
            raise RuntimeError("this .pte has no `state` method; export it with state_method=True")
        if "state" not in self._methods:
            self._methods["state"] = self.program.load_method("state")
        return dict(zip(names, (t.clone() for t in self._methods["state"].execute([]))))
