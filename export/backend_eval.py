"""``kvexport eval --bundle DIR --backend torch|executorch|onnxruntime``: the harness's tasks
through the exact artifact a user ships.

The protocol is the harness's (:mod:`adaptive_kv.evaluate`), run through a backend's decoder
step instead of :class:`~adaptive_kv.session.Session`:

- multiple choice: the context is prefilled in chunks (committed under the bundle's policy);
  each continuation is then fed from that state (its tokens at full precision within their
  chunk, as in the harness) and its summed log-likelihood read off the logits; the state is
  restored before the next continuation (onnxruntime and torch restore a copy of their
  state; the .pte replays the context, its cache being inside the program);
- wikitext2: windows of ``--context`` tokens prefilled chunk by chunk, every token after the
  first scored; perplexity = exp(mean NLL).

The same tokens reach every backend, so their accuracies differ only by what the backends
compute differently.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from adaptive_kv.cache import ContextOverflowError
from adaptive_kv.evaluate import EvalConfig, EvalResult, encode_pair
from adaptive_kv.formats import BIT_WIDTHS
from adaptive_kv.tasks import MC_TASKS, TARGET_DELIMITER, DataError, load_multiple_choice, load_text

from . import bundle as B
from .backends import BACKENDS, open_backend

BUNDLE_TASKS = (*MC_TASKS, "wikitext2")


class BundleEvaluator:
    def __init__(self, bundle_dir: str | Path, backend: str, config: EvalConfig, threads: int | None = None, progress: bool = True):
        from transformers import AutoTokenizer

        if backend not in BACKENDS:
            raise ValueError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
        if config.task not in BUNDLE_TASKS:
            raise DataError(f"task {config.task} is not run through bundles; choose one of {', '.join(BUNDLE_TASKS)}")
        self.bundle = B.verify(bundle_dir)
        self.config, self.progress = config, progress
        self.backend = open_backend(backend, self.bundle, threads=threads)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.bundle.path))
        cache = self.bundle.manifest["cache"]
        self.bits_per_value = {p["bits"]: p["bits_per_value"] for p in cache["pools"]}
        self.values_per_token = 2 * cache["layers"] * cache["kv_heads"] * cache["head_dim"]
        pol = self.bundle.manifest["policy"]
        budget = f"@{pol['kv_budget_bits']}" if pol.get("kv_budget_bits") else ""
        self.result = EvalResult(config.task, f"{pol['name']}{budget} [{backend}]", chunk_size=self.backend.chunk_size,
                                 hadamard=cache["hadamard"], context=config.context if config.task == "wikitext2" else None,
                                 query_bits=cache.get("query_bits", 32))

    def _count_cache(self) -> None:
        """Add the cached tokens' storage bits to the result's average."""
        n = self.backend.seq_len
        bits = self.backend.token_bits()[:n].long()
        cost = sum(self.bits_per_value[b] * int((bits == b).sum()) for b in BIT_WIDTHS if b in self.bits_per_value)
        self.result._bits_tokens += cost
        self.result._tokens += n

    def run(self) -> EvalResult:
        t0 = time.perf_counter()
        if self.config.task in MC_TASKS:
            self._multiple_choice()
        else:
            self._perplexity()
        self.result.seconds = time.perf_counter() - t0
        self.result.finish(self.values_per_token)
        return self.result

    def _bar(self, items, desc: str):
        return tqdm(items, desc=f"{desc} [{self.backend.name}]", disable=not self.progress, dynamic_ncols=True, leave=False)

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ids [N] in chunks (committed) -> logits [N, V] of every position."""
        return torch.cat([self.backend.forward(chunk) for chunk in ids.split(self.backend.chunk_size)])

    def _multiple_choice(self) -> None:
        items = load_multiple_choice(self.config.task, self.config.data, self.config.limit)
        correct = [0, 0]
        b = self.backend
        for item in self._bar(items, self.config.task):
            pairs = [encode_pair(self.tokenizer, item.context, c) for c in item.continuations]
            ctx = torch.tensor(pairs[0][0])
            if ctx.numel() == 0:
                raise DataError(f"empty context in a {self.config.task} item: {item}")
            longest = max(len(p[1]) for p in pairs)
            if ctx.numel() + longest > b.max_seq_len:
                raise ContextOverflowError(f"item needs {ctx.numel() + longest} tokens, above the bundle's max_seq_len={b.max_seq_len}")
            b.reset()
            last = self._logits(ctx)[-1]  # [V]
            self._count_cache()
            snap = b.snapshot()
            lls = []
            for j, (_, cont) in enumerate(pairs):
                if j:
                    b.restore(snap)
                cont = torch.tensor(cont)
                logits = torch.cat([last[None], self._logits(cont)[:-1]])  # [L, V]: the logits predicting each token
                lls.append(float(logits.log_softmax(-1).gather(-1, cont[:, None]).sum()))
            ll = torch.tensor(lls)
            chars = torch.tensor([float(len(c) - len(TARGET_DELIMITER)) for c in item.continuations])
            correct[0] += int(ll.argmax() == item.label)
            correct[1] += int((ll / chars).argmax() == item.label)
        r = self.result
        r.n, r.accuracy, r.accuracy_norm = len(items), correct[0] / len(items), correct[1] / len(items)

    def _perplexity(self) -> None:
        ids = torch.tensor(self.tokenizer.encode(load_text(self.config.data), add_special_tokens=False))
        w = self.config.context
        if w > self.backend.max_seq_len:
            raise ContextOverflowError(f"--context {w} exceeds the bundle's max_seq_len={self.backend.max_seq_len}; pass a smaller --context")
        starts = list(range(0, ids.numel() - w + 1, w))[: self.config.limit]
        if not starts:
            raise DataError(f"the text has {ids.numel()} tokens, fewer than one --context window of {w}")
        nll = 0.0
        for st in self._bar(starts, "wikitext2"):
            window = ids[st : st + w]
            self.backend.reset()
            logits = self._logits(window)
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], window[1:], reduction="sum"))
            self._count_cache()
        self.result.n, self.result.perplexity = len(starts), math.exp(nll / (len(starts) * (w - 1)))
