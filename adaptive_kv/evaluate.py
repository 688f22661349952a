"""The accuracy harness: every task runs through the packed cache under each policy.

Protocol (also in README):
- Multiple choice (hellaswag, arc_easy, arc_challenge, openbookqa, piqa): lm-eval's zero-shot
  prompts (tasks.py) and its context/continuation tokenization. The context is prefilled in
  chunks and committed to the packed cache under the policy; each continuation is then scored
  as one chunk against that cache (its own tokens at full precision, as any chunk). acc =
  argmax of summed log-likelihood, acc_norm = argmax of log-likelihood / continuation length
  in characters (lm-eval's definitions).
- wikitext2: the raw test text tokenized whole, cut into disjoint windows of ``context``
  tokens; each window is prefilled chunk by chunk through the cache (later chunks attend to
  the packed earlier ones) and every token after the first is scored. Perplexity =
  exp(total NLL / scored tokens).
- oracle (an upper bound, not a deployable policy): before each item, its plan is the
  budget-optimal allocation of the damage measured on the whole future text (MC: the context
  followed by each choice, damage summed over choices; wikitext2: the window; passkey: the
  prompt followed by the true answer).
- passkey: synthetic retrieval prompts of ``context`` tokens, prefilled through the cache,
  then greedy decoding (each generated token committed like any other); correct when the
  first number generated equals the hidden key.
Several policies are evaluated in one pass over the same items: the first chunk of a sequence
meets an empty cache, so its forward is policy-independent and computed once for all of them.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .cache import ContextOverflowError
from .decoder import ChunkOutput, PackedLlama
from .policy import Policy
from .session import Session, SessionConfig
from .tasks import ALL_TASKS, MC_TASKS, TARGET_DELIMITER, DataError, MultipleChoiceItem, load_multiple_choice, load_text, passkey_trials


PASSKEY_GEN_ROOM = 8


@dataclass(frozen=True)
class EvalConfig:
    task: str
    data: Path | None = None
    limit: int | None = None
    context: int = 2048  # wikitext2 window / passkey prompt length, in tokens
    chunk_size: int = 32
    hadamard: bool = True
    group_size: int = 64
    seed: int = 0
    query_bits: int = 32  # 8: attention with int8 query rows (CacheConfig.query_bits)

    def __post_init__(self) -> None:
        if self.task not in ALL_TASKS:
            raise DataError(f"unknown task {self.task!r}; known tasks: {', '.join(ALL_TASKS)}")
        if self.limit is not None and self.limit <= 0:
            raise DataError(f"--limit must be positive, got {self.limit}")
        if self.context < 2 * self.chunk_size:
            raise ValueError(f"--context {self.context} must be at least two chunks ({2 * self.chunk_size} tokens)")


@dataclass
class EvalResult:
    task: str
    policy: str
    n: int = 0
    accuracy: float | None = None
    accuracy_norm: float | None = None
    perplexity: float | None = None
    avg_bits: float = 0.0  # storage bits per K/V value (scales included), averaged over cached tokens
    kv_bytes_per_token: float = 0.0
    seconds: float = 0.0
    hadamard: bool = True
    chunk_size: int = 32
    context: int | None = None
    query_bits: int = 32
    _bits_tokens: float = field(default=0.0, repr=False)
    _tokens: int = field(default=0, repr=False)

    def add_cache(self, session: Session) -> None:
        self._bits_tokens += session.cache.bits_per_value() * session.seq_len
        self._tokens += session.seq_len

    def finish(self, values_per_token: int) -> None:
        self.avg_bits = self._bits_tokens / max(self._tokens, 1)
        self.kv_bytes_per_token = self.avg_bits * values_per_token / 8

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing context spaces move to the continuation; continuation tokens
    are those of tokenize(context + continuation) past len(tokenize(context))."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx) :]


class Evaluator:
    """Runs one task for several policies over the same items."""

    def __init__(
        self,
        decoder: PackedLlama,
        tokenizer,
        policies: list[Policy],
        config: EvalConfig,
        progress: bool = True,
        hadamard: list[bool] | None = None,
        query_bits: list[int] | None = None,
    ):
        """``hadamard`` / ``query_bits`` override the config's per policy (to compare both in one pass)."""
        self.decoder, self.tokenizer, self.config, self.progress = decoder, tokenizer, config, progress
        long_task = config.task in ("wikitext2", "passkey")
        max_len = config.context if long_task else max(config.context, 512)
        rot = hadamard if hadamard is not None else [config.hadamard] * len(policies)
        if len(rot) != len(policies):
            raise ValueError(f"{len(rot)} hadamard flags for {len(policies)} policies")
        qbits = query_bits if query_bits is not None else [config.query_bits] * len(policies)
        if len(qbits) != len(policies):
            raise ValueError(f"{len(qbits)} query_bits for {len(policies)} policies")
        self.sessions = [
            Session(decoder, p, SessionConfig(max_seq_len=max_len, chunk_size=config.chunk_size, group_size=config.group_size, hadamard=h,
                                              query_bits=qb))
            for p, h, qb in zip(policies, rot, qbits)
        ]
        self.results = [
            EvalResult(config.task, p.name, hadamard=h, chunk_size=config.chunk_size, context=config.context if long_task else None,
                       query_bits=qb)
            for p, h, qb in zip(policies, rot, qbits)
        ]
        self.any_features = any(p.needs_features for p in policies)
        self.oracles = [i for i, p in enumerate(policies) if hasattr(p, "prepare")]

    def _prepare_oracles(self, seqs: list[torch.Tensor], cached: int, tail: int = 0) -> None:
        """Give the oracle policies the damage of the ``cached`` tokens, measured with the whole
        future text ``seqs`` (each starts with the cached tokens); ``tail`` more tokens (generated
        ones) get the cheapest width."""
        if not self.oracles:
            return
        from .sensitivity import first_order_damage

        damage: dict[bool, torch.Tensor] = {}
        for i in self.oracles:
            cfg = self.sessions[i].config
            if cfg.hadamard not in damage:
                damage[cfg.hadamard] = sum(
                    first_order_damage(self.decoder.model, x, hadamard=cfg.hadamard, group_size=cfg.group_size)[:cached] for x in seqs
                )
            self.sessions[i].policy.prepare(damage[cfg.hadamard], tail=tail)

    def _shared_first_chunk(self, ids: torch.Tensor, logits: str) -> ChunkOutput:
        """Forward of a sequence's first chunk (empty cache: the same for every policy)."""
        s = self.sessions[0]
        s.reset()
        want = "all" if self.any_features or logits == "all" else logits
        return self.decoder(ids[None], s.cache, logits=want, with_stats=self.any_features)

    def _prefill_all(self, ids: torch.Tensor, logits: str):
        """Yield (index, session, logits) for each policy after prefilling ``ids`` [T]."""
        first = ids[: self.config.chunk_size]
        t0 = time.perf_counter()
        shared = self._shared_first_chunk(first, logits)
        t_shared = time.perf_counter() - t0
        for i, s in enumerate(self.sessions):
            t0 = time.perf_counter()
            s.reset()
            s.commit(shared, first)
            head = shared.logits[0] if logits == "all" else shared.logits[0, -1]
            rest = s.feed(ids[first.numel() :], logits=logits) if ids.numel() > first.numel() else None
            out = head if rest is None else (torch.cat([head, rest]) if logits == "all" else rest)
            self.results[i].seconds += t_shared + time.perf_counter() - t0
            yield i, s, out

    # ---- tasks ---------------------------------------------------------------------------
    def run(self) -> list[EvalResult]:
        task = self.config.task
        if task in MC_TASKS:
            self._multiple_choice(load_multiple_choice(task, self.config.data, self.config.limit))
        elif task == "wikitext2":
            self._perplexity()
        else:
            self._passkey()
        vpt = self.sessions[0].cache.config.values_per_token
        for r in self.results:
            r.finish(vpt)
        return self.results

    def _bar(self, items, desc: str):
        return tqdm(items, desc=desc, disable=not self.progress, dynamic_ncols=True, leave=False)

    def _multiple_choice(self, items: list[MultipleChoiceItem]) -> None:
        correct = [[0, 0] for _ in self.sessions]
        for item in self._bar(items, self.config.task):
            pairs = [encode_pair(self.tokenizer, item.context, c) for c in item.continuations]
            ctx = torch.tensor(pairs[0][0])
            if ctx.numel() == 0:
                raise DataError(f"empty context in a {self.config.task} item: {item}")
            conts = [p[1] for p in pairs]
            self._prepare_oracles([torch.tensor(p[0] + p[1]) for p in pairs], ctx.numel())
            # lm-eval normalizes by the choice's length without the target delimiter
            chars = torch.tensor([float(len(c) - len(TARGET_DELIMITER)) for c in item.continuations])
            for i, s, last in self._prefill_all(ctx, "last"):
                t0 = time.perf_counter()
                ll = self._score_continuations(s, last, conts)
                correct[i][0] += int(ll.argmax() == item.label)
                correct[i][1] += int((ll / chars).argmax() == item.label)
                self.results[i].add_cache(s)
                self.results[i].seconds += time.perf_counter() - t0
        for r, (acc, acc_norm) in zip(self.results, correct):
            r.n, r.accuracy, r.accuracy_norm = len(items), acc / len(items), acc_norm / len(items)

    def _score_continuations(self, s: Session, last: torch.Tensor, conts: list[list[int]]) -> torch.Tensor:
        """Summed log-likelihood [C] of each continuation given the cached context; nothing committed."""
        longest = max(len(c) for c in conts)
        if s.seq_len + longest > s.config.max_seq_len:
            raise ContextOverflowError(f"item needs {s.seq_len + longest} tokens, above max_seq_len={s.config.max_seq_len}; raise --context")
        batch = torch.zeros(len(conts), longest, dtype=torch.long)
        for j, c in enumerate(conts):
            batch[j, : len(c)] = torch.tensor(c)
        out = self.decoder(batch, s.cache, logits="all", with_stats=False)  # [C, L, V]
        logp = torch.cat([last.expand(len(conts), 1, -1), out.logits[:, :-1]], dim=1).log_softmax(-1)
        tok_ll = logp.gather(-1, batch[..., None])[..., 0]  # [C, L]
        mask = torch.arange(longest)[None] < torch.tensor([len(c) for c in conts])[:, None]
        return (tok_ll * mask).sum(-1)

    def _perplexity(self) -> None:
        ids = torch.tensor(self.tokenizer.encode(load_text(self.config.data), add_special_tokens=False))
        w = self.config.context
        starts = list(range(0, ids.numel() - w + 1, w))[: self.config.limit]
        if not starts:
            raise DataError(f"the text has {ids.numel()} tokens, fewer than one --context window of {w}")
        nll = [0.0] * len(self.sessions)
        for st in self._bar(starts, "wikitext2"):
            window = ids[st : st + w]
            self._prepare_oracles([window], w)
            for i, s, logits in self._prefill_all(window, "all"):
                nll[i] += float(torch.nn.functional.cross_entropy(logits[:-1], window[1:], reduction="sum"))
                self.results[i].add_cache(s)
        scored = len(starts) * (w - 1)
        for r, total in zip(self.results, nll):
            r.n, r.perplexity = len(starts), math.exp(total / scored)

    def _passkey(self) -> None:
        # Leave room for the generated digits inside the context.
        trials = passkey_trials(self.tokenizer, self.config.context - PASSKEY_GEN_ROOM, self.config.limit or 20, seed=self.config.seed)
        hits = [0] * len(self.sessions)
        for trial in self._bar(trials, "passkey"):
            prompt = torch.tensor(self.tokenizer.encode(trial.prompt, add_special_tokens=False))
            answer = self.tokenizer.encode(trial.prompt + " " + trial.answer + ".", add_special_tokens=False)[prompt.numel() :]
            self._prepare_oracles([torch.tensor(prompt.tolist() + answer)], prompt.numel() + len(answer), tail=PASSKEY_GEN_ROOM)
            for i, s in enumerate(self.sessions):
                t0 = time.perf_counter()
                s.reset()
                gen = list(s.generate(prompt, max_new_tokens=len(trial.answer) + 2))
                found = re.findall(r"\d+", self.tokenizer.decode(gen))
                hits[i] += int(bool(found) and found[0] == trial.answer)
                self.results[i].add_cache(s)
                self.results[i].seconds += time.perf_counter() - t0
        for r, h in zip(self.results, hits):
            r.n, r.accuracy = len(trials), h / len(trials)
