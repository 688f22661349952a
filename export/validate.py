"""``kvexport validate``: the bundle's three implementations agree, step by step.

Protocol: for each prompt, the torch reference (the eager decoder rebuilt from the bundle's
source model, policy and options; kvq ops on their pure-PyTorch reference unless the compiled
kernels were loaded) prefills the prompt in chunks and decodes ``steps`` tokens greedily on its
own state; its tokens drive every backend (teacher forcing). Each backend keeps its own state,
and before each of its steps the reference takes that state over and runs the same step, so
every step is compared from one shared state:

- ``max_abs_logit_diff``: over every prefill and decode position's logits;
- ``top1_agreement``: fraction of positions whose argmax equals the reference's;
- ``bits_agreement``: fraction of tokens stored at the same width;
- ``cache_bytes_equal``: fraction of the packed-cache bytes each step writes (codes, scales,
  zero points, fp16 rows) that equal the reference's; the bookkeeping state must match exactly;
- ``free_running_top1``: the backend's argmax vs the free-running reference's, whose cache
  never saw the backend's numbers (reported, not a pass criterion: see below);
- ``first_divergence``: the first (prompt, phase, step) where a bound is broken, and how.

Why steps from a shared state: a quantized cache turns float noise into discrete changes (a
K/V value on a rounding boundary takes the neighbouring code, a clip-search near-tie takes
another range), each of which perturbs every later step more than float noise does; left to
run on their own states, two correct implementations that sum matmuls in different orders
drift apart within tens of tokens. Comparing each step from the same state measures whether
the implementations compute the same function; the free-running agreement shows how far the
drift goes. A ``.pte`` without a ``state`` method cannot share its state and is compared
free-running.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import bundle as B
from .backends import open_backend, reference_decoder

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Give me three tips for staying healthy.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"",
    "Once upon a time, in a small village by the sea,",
    "Explain why the sky is blue in one paragraph.",
)


@dataclass(frozen=True)
class Tolerances:
    max_abs_logit_diff: float = 1e-2
    top1_agreement: float = 1.0
    bits_agreement: float = 0.995
    cache_bytes_equal: float = 0.999


@dataclass
class BackendReport:
    max_abs_logit_diff: float = 0.0
    top1_agreement: float = 1.0
    bits_agreement: float = 1.0
    cache_bytes_equal: float | None = None
    free_running_top1: float | None = None
    synced: bool = True
    first_divergence: dict | None = None
    ok: bool = True
    _top1: list[int] = field(default_factory=lambda: [0, 0], repr=False)
    _bits: list[int] = field(default_factory=lambda: [0, 0], repr=False)
    _cache: list[int] = field(default_factory=lambda: [0, 0], repr=False)
    _free: list[int] = field(default_factory=lambda: [0, 0], repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


def _filled_bytes_differ(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> int:
    """Differing bytes over the filled slots of every pool both sides have."""
    from adaptive_kv.formats import BIT_WIDTHS

    lengths = ref.get("lengths")
    differ = 0
    for name, r in ref.items():
        if name not in got or r.dim() != 4:  # pools: [layers, Hkv, C, X]
            continue
        bits = int(name[1:].split("_")[0])
        n = int(lengths[BIT_WIDTHS.index(bits)]) if lengths is not None else r.shape[2]
        a = r[:, :, :n].contiguous().view(torch.uint8)
        b = got[name][:, :, :n].contiguous().view(torch.uint8)
        differ += int((a != b).sum())
    return differ


class Validator:
    def __init__(self, bundle_dir: str | Path, backends: tuple[str, ...] = ("executorch", "onnxruntime"), threads: int | None = None,
                 tolerances: Tolerances = Tolerances(), progress: bool = True):
        self.bundle = B.verify(bundle_dir)
        available = [b for b in backends if (b != "executorch" or self.bundle.manifest.get("program")) and (b != "onnxruntime" or self.bundle.manifest.get("onnx"))]
        if not available:
            raise B.BundleError(f"{bundle_dir} has none of the formats to validate ({', '.join(backends)})")
        decoder, self.warnings = reference_decoder(self.bundle)
        self.reference = open_backend("torch", self.bundle, decoder)
        self.backends = {name: open_backend(name, self.bundle, threads=threads) for name in available}
        self.tol, self.progress = tolerances, progress
        # a backend's state can be shared when it returns every state tensor (the .pte: a `state` method)
        names = set(decoder.state_names())
        self.synced = {name: set(b.state()) == names for name, b in self.backends.items()}
        self.reports = {name: BackendReport(synced=self.synced[name]) for name in available}
        self.bytes_per_token = self.bundle.bytes_per_token()

    def _diverged(self, name: str, where: dict, what: str) -> None:
        rep = self.reports[name]
        if rep.first_divergence is None:
            rep.first_divergence = {**where, "what": what}

    def _compare(self, name: str, where: dict, ref_logits: torch.Tensor, logits: torch.Tensor, ref_bits: torch.Tensor, bits: torch.Tensor) -> None:
        rep = self.reports[name]
        diff = float((ref_logits - logits).abs().max())
        if diff != diff or not torch.isfinite(logits).all():  # NaN/inf logits: as far apart as it gets
            diff = float("inf")
        rep.max_abs_logit_diff = max(rep.max_abs_logit_diff, diff)
        top1 = ref_logits.argmax(-1) == logits.argmax(-1)
        rep._top1[0] += int(top1.sum()); rep._top1[1] += top1.numel()  # noqa: E702
        same_bits = ref_bits == bits
        rep._bits[0] += int(same_bits.sum()); rep._bits[1] += same_bits.numel()  # noqa: E702
        if diff > self.tol.max_abs_logit_diff:
            self._diverged(name, where, f"logits differ by {diff:.3g} (> {self.tol.max_abs_logit_diff})")
        elif not bool(top1.all()):
            self._diverged(name, where, f"top-1 token {int(logits.argmax(-1)[~top1][0])} vs the reference's {int(ref_logits.argmax(-1)[~top1][0])}")
        elif not bool(same_bits.all()):
            i = int((~same_bits).nonzero()[0])
            self._diverged(name, where, f"token stored at {int(bits[i])} bits vs the reference's {int(ref_bits[i])}")

    def run(self, prompts: list[str], steps: int, tokenizer=None) -> dict:
        from transformers import AutoTokenizer

        tok = tokenizer or AutoTokenizer.from_pretrained(str(self.bundle.path))
        ref = self.reference
        bar = tqdm(total=len(prompts) * (steps + 1), desc="validate", disable=not self.progress, dynamic_ncols=True, leave=False)
        for p, prompt in enumerate(prompts):
            ids = torch.tensor(tok.encode(prompt))
            for b in (ref, *self.backends.values()):
                b.reset()
            chunks = list(ids.split(ref.chunk_size))
            free_logits = None
            for s in range(len(chunks) + steps):
                prefill = s < len(chunks)
                if not prefill and ref.seq_len >= ref.max_seq_len:
                    break
                x = chunks[s] if prefill else free_logits[-1].argmax().reshape(1)
                where = {"prompt": p, "step": s if prefill else s - len(chunks) + 1, "phase": "prefill" if prefill else "decode"}
                # the free-running reference: its greedy tokens drive every backend (teacher forcing)
                free_logits, free_bits = ref.step(x)
                free = ref.snapshot()
                for name, b in self.backends.items():
                    before = b.state() if self.synced[name] else None
                    pos = b.seq_len  # 0 at a prompt's start: the program restarts in-graph, from whatever state it holds
                    logits, bits = b.step(x)
                    if before is None:  # no state to share: compare with the free-running reference
                        self._compare(name, where, free_logits, logits, free_bits, bits)
                        continue
                    # the reference takes over the backend's state and runs the same step
                    ref.restore(before)
                    ref_logits, ref_bits = ref.step(x, input_pos=pos)
                    self._compare(name, where, ref_logits, logits, ref_bits, bits)
                    self._compare_state(name, where, ref.state(), b.state(), ref_bits)
                    self.reports[name]._free[0] += int((free_logits.argmax(-1) == logits.argmax(-1)).sum())
                    self.reports[name]._free[1] += logits.shape[0]
                ref.restore(free)
                if not prefill or s == len(chunks) - 1:
                    bar.update()
        bar.close()
        return self._finish(prompts, steps)

    def _compare_state(self, name: str, where: dict, ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], bits: torch.Tensor) -> None:
        """After a step from a shared state: the bytes it wrote into the pools, and the bookkeeping."""
        rep = self.reports[name]
        differ = _filled_bytes_differ(ref, got)
        written = sum(self.bytes_per_token[int(b)] for b in bits)
        rep._cache[0] += written - min(differ, written)
        rep._cache[1] += written
        if differ > (1 - self.tol.cache_bytes_equal) * written:
            self._diverged(name, where, f"{differ} of the {written} packed-cache bytes written differ")
        for n, r in ref.items():
            if r.dim() < 4 and not torch.equal(r, got[n]):
                self._diverged(name, where, f"state {n} differs")

    def _finish(self, prompts: list[str], steps: int) -> dict:
        ok = True
        for rep in self.reports.values():
            rep.top1_agreement = rep._top1[0] / max(rep._top1[1], 1)
            rep.bits_agreement = rep._bits[0] / max(rep._bits[1], 1)
            rep.cache_bytes_equal = rep._cache[0] / rep._cache[1] if rep._cache[1] else None
            rep.free_running_top1 = rep._free[0] / rep._free[1] if rep._free[1] else None
            rep.ok = (
                rep.max_abs_logit_diff <= self.tol.max_abs_logit_diff
                and rep.top1_agreement >= self.tol.top1_agreement
                and rep.bits_agreement >= self.tol.bits_agreement
                and (rep.cache_bytes_equal is None or rep.cache_bytes_equal >= self.tol.cache_bytes_equal)
            )
            ok &= rep.ok
        return {
            "ok": ok,
            "bundle": str(self.bundle.path),
            "reference": "torch",
            "prompts": len(prompts),
            "steps": steps,
            "tolerances": asdict(self.tol),
            "warnings": self.warnings,
            "backends": {name: rep.to_dict() for name, rep in self.reports.items()},
        }


def read_prompts(path: str | Path | None) -> list[str]:
    """One prompt per line of ``path`` (blank lines skipped), or the built-in five."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} not found; pass a text file with one prompt per line")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {p} has no prompts (one per line)")
    return prompts
