"""The mixed-precision packed KV cache: one dense pool per precision.

Design (why pools): every token's K/V is stored at its own bit-width, yet shapes must stay
static for export and memory must really shrink. A single buffer of fp16-sized slots would
hold small codes in big slots; variable-length rows would need dynamic shapes. Instead each
precision b in {2, 4, 8, 16} owns a preallocated homogeneous buffer whose capacity (in token
slots) comes from the layout. Because keys carry RoPE already, attention is invariant to key
order, so attention runs pool by pool, block by block, merged with log-sum-exp
(``attention.py``). Allocated bytes = sum_b capacity_b * bytes_per_token_b exactly.

What happens when a pool is full is part of the layout:
- fallback: the token goes to the nearest precision with room (ties go to fewer bits, which
  keeps the memory promise);
- demotion (``demote=(from_bits, to_bits)``, used by sink-recent): the oldest non-pinned
  token of the ``from`` pool is re-quantized into the ``to`` pool, and its slot is reused
  (a ring over slots ``pinned .. capacity-1``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .formats import BIT_WIDTHS, QUERY_BITS, RowFormat, dequantize_rows, quantize_rows
from .hadamard import rotate


class CacheError(ValueError):
    """Bad cache configuration or use (overflow, mismatched shapes)."""


class ContextOverflowError(CacheError):
    """More tokens than the cache was built for."""


@dataclass(frozen=True)
class CacheLayout:
    """Token-slot capacity of each precision pool, and the overflow rule."""

    max_seq_len: int
    capacities: tuple[tuple[int, int], ...]  # ((bits, slots), ...) in increasing bits
    demote: tuple[int, int] | None = None  # (from_bits, to_bits): ring-evict instead of fallback
    pinned: int = 0  # slots at the start of the demote pool that are never evicted (sinks)

    def __post_init__(self) -> None:
        if self.max_seq_len <= 0:
            raise CacheError(f"max_seq_len must be positive, got {self.max_seq_len}")
        bits = [b for b, _ in self.capacities]
        if len(set(bits)) != len(bits) or any(b not in BIT_WIDTHS for b in bits):
            raise CacheError(f"capacities {self.capacities} must name each of {BIT_WIDTHS} at most once")
        if any(c < 0 for _, c in self.capacities):
            raise CacheError(f"negative capacity in {self.capacities}")
        if sum(c for _, c in self.capacities) < self.max_seq_len:
            raise CacheError(
                f"pool capacities {dict(self.capacities)} hold fewer than max_seq_len={self.max_seq_len} tokens; "
                "raise a capacity or lower max_seq_len"
            )
        if self.demote is not None:
            src, dst = self.demote
            if self.capacity(src) <= self.pinned or self.capacity(dst) == 0 or src == dst:
                raise CacheError(f"demote={self.demote} needs a {src}-bit pool larger than pinned={self.pinned} and a {dst}-bit pool")

    def capacity(self, bits: int) -> int:
        return dict(self.capacities).get(bits, 0)

    @property
    def pool_bits(self) -> tuple[int, ...]:
        return tuple(b for b, c in sorted(self.capacities) if c > 0)

    @classmethod
    def uniform(cls, max_seq_len: int, bits: int) -> CacheLayout:
        return cls(max_seq_len, ((bits, max_seq_len),))

    @classmethod
    def from_fractions(cls, max_seq_len: int, fractions: dict[int, float]) -> CacheLayout:
        """Capacities proportional to ``fractions`` (normalized), summing to max_seq_len exactly."""
        total = sum(fractions.values())
        if total <= 0:
            raise CacheError(f"fractions {fractions} must have a positive sum")
        caps = {b: math.floor(max_seq_len * f / total) for b, f in fractions.items()}
        # Hand the rounding remainder to the largest fractional parts.
        rest = max_seq_len - sum(caps.values())
        for b in sorted(fractions, key=lambda b: max_seq_len * fractions[b] / total - caps[b], reverse=True)[:rest]:
            caps[b] += 1
        return cls(max_seq_len, tuple(sorted(caps.items())))

    @classmethod
    def from_budget(cls, max_seq_len: int, budget_bits: float, fractions: dict[int, float], cost: dict[int, float]) -> CacheLayout:
        """Capacities whose bytes match ``budget_bits`` per value (``cost``: bits per value of each
        width, scales included), keeping the shape of the preferred mix ``fractions``: the mix is
        blended with all-cheapest (budget below its average) or all-dearest (above) until its
        average cost equals the budget."""
        widths = sorted(cost)
        lo_b, hi_b = widths[0], widths[-1]
        if not cost[lo_b] <= budget_bits <= cost[hi_b]:
            raise CacheError(f"a KV budget of {budget_bits} bits/value is outside [{cost[lo_b]}, {cost[hi_b]}], what {widths} bits can store")
        total = sum(fractions.values())
        mix = {b: fractions.get(b, 0.0) / total for b in widths}
        avg = sum(mix[b] * cost[b] for b in widths)
        end = lo_b if budget_bits < avg else hi_b
        lam = 1.0 if avg == cost[end] else (budget_bits - cost[end]) / (avg - cost[end])  # weight of the mix
        blended = {b: lam * mix[b] + (1 - lam) * (b == end) for b in widths}
        return cls.from_fractions(max_seq_len, {b: f for b, f in blended.items() if f > 0})

    @classmethod
    def sink_recent(cls, max_seq_len: int, sinks: int, window: int, bits: int = 4) -> CacheLayout:
        """First ``sinks`` tokens and the last ``window`` at fp16, the rest demoted to ``bits``."""
        hot = min(sinks + window, max_seq_len)
        cold = max(max_seq_len - hot, 1)
        return cls(max_seq_len, tuple(sorted({16: hot, bits: cold}.items())), demote=(16, bits), pinned=min(sinks, hot - 1))


@dataclass(frozen=True)
class CacheConfig:
    """Model dimensions the cache serves, plus its layout and storage format."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    layout: CacheLayout
    group_size: int = 64
    hadamard: bool = True  # K/V are stored in the Hadamard-rotated basis
    query_bits: int = 32  # how attention reads the cache: fp32 query, or int8 query rows (formats.quantize_query)

    def __post_init__(self) -> None:
        if self.query_bits not in QUERY_BITS:
            raise ValueError(f"query_bits={self.query_bits}: the attention's query is fp32 (32) or int8 rows (8)")
        for b in self.layout.pool_bits:
            RowFormat(b, self.head_dim, self.group_size)  # validates group_size against head_dim

    def row_format(self, bits: int) -> RowFormat:
        return RowFormat(bits, self.head_dim, self.group_size)

    @property
    def values_per_token(self) -> int:
        """K and V values one token stores across all layers (SmolLM2-135M: 11,520)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def bytes_per_token(self, bits: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.row_format(bits).row_bytes


@dataclass
class _Plan:
    """Where each token of one commit ends up, and which older tokens get demoted."""

    placement: list[tuple[int, int]] = field(default_factory=list)  # per new token: (bits, slot)
    demotions: list[tuple[int, int, int]] = field(default_factory=list)  # (src_slot, dst_bits, dst_slot)
    via_ring: list[int] = field(default_factory=list)  # new tokens demoted within this same commit
    lengths: dict[int, int] = field(default_factory=dict)  # pool fill levels after the commit
    new_owners: dict[int, dict[int, int]] = field(default_factory=dict)  # bits -> {slot: position} written
    ring_next: int = 0


class PackedKVCache(nn.Module):
    """Preallocated per-precision pools; ``commit`` packs tokens, ``blocks`` streams them back.

    Buffers, per pool of b < 16 bits (C = capacity, cb = head_dim*b/8, g = head_dim/group):
      ``k{b}``, ``v{b}``: uint8 [layers, Hkv, C, cb]; ``k{b}_scale``, ``k{b}_zero``, ``v{b}_scale``,
      ``v{b}_zero``: fp16 [layers, Hkv, C, g]. The 16-bit pool: ``k16``, ``v16``: fp16 [layers, Hkv, C, D].
    ``token_bits``: int8 [max_seq_len], the precision each committed position is stored at now.
    With ``config.hadamard`` the stored rows (and what ``blocks`` yields) are in the rotated basis.
    """

    def __init__(self, config: CacheConfig):
        super().__init__()
        self.config = config
        lay, shape = config.layout, (config.num_layers, config.num_kv_heads)
        for b in lay.pool_bits:
            cap, fmt = lay.capacity(b), config.row_format(b)
            if b == 16:
                self.register_buffer(f"k{b}", torch.zeros(*shape, cap, fmt.head_dim, dtype=torch.float16))
                self.register_buffer(f"v{b}", torch.zeros(*shape, cap, fmt.head_dim, dtype=torch.float16))
                continue
            for kv in "kv":
                self.register_buffer(f"{kv}{b}", torch.zeros(*shape, cap, fmt.code_bytes, dtype=torch.uint8))
                self.register_buffer(f"{kv}{b}_scale", torch.zeros(*shape, cap, fmt.groups, dtype=torch.float16))
                self.register_buffer(f"{kv}{b}_zero", torch.zeros(*shape, cap, fmt.groups, dtype=torch.float16))
        self.register_buffer("token_bits", torch.zeros(lay.max_seq_len, dtype=torch.int8))
        self.reset()

    # ---- bookkeeping -------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all tokens (buffers are reused, not reallocated)."""
        self.seq_len = 0
        self.lengths = {b: 0 for b in self.config.layout.pool_bits}
        self.slot_pos: dict[int, list[int]] = {b: [] for b in self.config.layout.pool_bits}
        self.ring_next = self.config.layout.pinned
        self.token_bits.zero_()

    @property
    def max_seq_len(self) -> int:
        return self.config.layout.max_seq_len

    def nbytes(self) -> int:
        """Bytes allocated for K/V storage (codes, scales, zeros, fp16 rows)."""
        return sum(t.numel() * t.element_size() for n, t in self.named_buffers() if n != "token_bits")

    def stored_bits(self) -> torch.Tensor:
        """[seq_len] int, the bit-width each committed position is stored at."""
        return self.token_bits[: self.seq_len].long()

    def spent_bits(self) -> float:
        """Storage bits per K/V value summed over committed tokens, scale overhead included."""
        cost = torch.zeros(17, dtype=torch.float64)
        for b in BIT_WIDTHS:
            cost[b] = self.config.row_format(b).bits_per_value
        return float(cost[self.stored_bits()].sum())

    def bits_per_value(self) -> float:
        """Average storage bits per K/V value over committed tokens, scale overhead included."""
        return self.spent_bits() / self.seq_len if self.seq_len else 0.0

    def used_bytes_by_bits(self) -> dict[int, int]:
        """Bytes of K/V currently holding tokens, per precision."""
        return {b: n * self.config.bytes_per_token(b) for b, n in self.lengths.items()}

    # ---- commit ------------------------------------------------------------------------
    def _has_room(self, b: int, lengths: dict[int, int]) -> bool:
        return b in lengths and lengths[b] < self.config.layout.capacity(b)

    def _candidates(self, want: int) -> list[int]:
        return sorted(self.config.layout.pool_bits, key=lambda b: (abs(b - want), b))

    def _plan(self, want: list[int], start: int) -> _Plan:
        lay, plan = self.config.layout, _Plan()
        lengths = dict(self.lengths)
        owners = self.slot_pos  # slot -> position; updated in place once the plan is final
        new: dict[int, dict[int, int]] = {b: {} for b in lengths}  # bits -> {slot: position} this commit
        ring = self.ring_next
        placed: dict[int, tuple[int, int]] = {}  # position -> (bits, slot) for this commit
        for i, w in enumerate(want):
            pos = start + i
            for b in self._candidates(w):
                if self._has_room(b, lengths):
                    slot = lengths[b]
                    lengths[b] += 1
                    break
                if lay.demote is not None and b == lay.demote[0]:
                    dst = next((d for d in self._candidates(lay.demote[1]) if d != b and self._has_room(d, lengths)), None)
                    if dst is None:
                        continue
                    slot = ring
                    victim = new[b].get(slot, owners[b][slot] if slot < len(owners[b]) else None)
                    dst_slot = lengths[dst]
                    lengths[dst] += 1
                    new[dst][dst_slot] = victim
                    if victim >= start:  # packed straight to its final place, from its fp16 value
                        placed[victim] = (dst, dst_slot)
                        plan.via_ring.append(victim - start)
                    else:
                        plan.demotions.append((slot, dst, dst_slot))
                    ring = lay.pinned + (ring + 1 - lay.pinned) % (lay.capacity(b) - lay.pinned)
                    break
            else:
                raise ContextOverflowError(f"no pool has room for position {pos} (capacities {dict(lay.capacities)})")
            placed[pos] = (b, slot)
            new[b][slot] = pos
        plan.placement = [placed[start + i] for i in range(len(want))]
        plan.lengths, plan.new_owners, plan.ring_next = lengths, new, ring
        return plan

    def _write(self, bits: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k/v: [layers, Hkv, n, D] full precision -> pool ``bits`` at ``slots`` [n]."""
        if bits == 16:
            getattr(self, "k16")[:, :, slots] = k.to(torch.float16)
            getattr(self, "v16")[:, :, slots] = v.to(torch.float16)
            return
        fmt = self.config.row_format(bits)
        for kv, x in (("k", k), ("v", v)):
            codes, scale, zero = quantize_rows(x, fmt)
            getattr(self, f"{kv}{bits}")[:, :, slots] = codes
            getattr(self, f"{kv}{bits}_scale")[:, :, slots] = scale
            getattr(self, f"{kv}{bits}_zero")[:, :, slots] = zero

    def commit(self, k: torch.Tensor, v: torch.Tensor, bits: torch.Tensor | list[int]) -> torch.Tensor:
        """Pack T new tokens. k/v: [layers, Hkv, T, D]; bits: [T] requested widths.

        Returns [T] the widths actually used (they differ from the request only on pool overflow).
        """
        cfg = self.config
        want = [int(b) for b in (bits.tolist() if isinstance(bits, torch.Tensor) else bits)]
        t = k.shape[2]
        if k.shape != v.shape or k.shape[:2] != (cfg.num_layers, cfg.num_kv_heads) or k.shape[3] != cfg.head_dim:
            raise CacheError(f"commit expects k/v of shape [{cfg.num_layers}, {cfg.num_kv_heads}, T, {cfg.head_dim}], got {tuple(k.shape)} / {tuple(v.shape)}")
        if len(want) != t:
            raise CacheError(f"{len(want)} bit-widths for {t} tokens")
        if bad := sorted(set(want) - set(BIT_WIDTHS)):
            raise CacheError(f"bit-widths {bad} are not in {BIT_WIDTHS}")
        if self.seq_len + t > self.max_seq_len:
            raise ContextOverflowError(
                f"context of {self.seq_len + t} tokens exceeds the cache's max_seq_len={self.max_seq_len}; "
                "build the cache (or export) with a larger max sequence length, or shorten the input"
            )
        if cfg.hadamard:  # stored in the rotated basis (see hadamard.py)
            k, v = rotate(k), rotate(v)
        plan = self._plan(want, self.seq_len)
        if plan.demotions:  # read the old fp16 rows before new tokens may overwrite their slots
            src = torch.tensor([s for s, _, _ in plan.demotions])
            ok, ov = self.k16[:, :, src].float(), self.v16[:, :, src].float()
            for dst in {d for _, d, _ in plan.demotions}:
                sel = [i for i, (_, d, _) in enumerate(plan.demotions) if d == dst]
                slots = torch.tensor([plan.demotions[i][2] for i in sel])
                self._write(dst, slots, ok[:, :, sel], ov[:, :, sel])
        if plan.via_ring:  # same stored bytes however the tokens were chunked
            idx = torch.tensor(plan.via_ring)
            k, v = k.clone(), v.clone()
            k[:, :, idx], v[:, :, idx] = k[:, :, idx].half().float(), v[:, :, idx].half().float()
        for b in {b for b, _ in plan.placement}:
            sel = [i for i, (pb, _) in enumerate(plan.placement) if pb == b]
            slots = torch.tensor([plan.placement[i][1] for i in sel])
            self._write(b, slots, k[:, :, sel], v[:, :, sel])
        self.lengths, self.ring_next = plan.lengths, plan.ring_next
        for b, slots in plan.new_owners.items():
            owners = self.slot_pos[b]
            for slot, pos in sorted(slots.items()):
                if slot < len(owners):
                    owners[slot] = pos
                else:
                    owners.append(pos)
            if slots:
                self.token_bits[torch.tensor(list(slots.values()))] = b
        self.seq_len += t
        return torch.tensor([b for b, _ in plan.placement])

    # ---- read --------------------------------------------------------------------------
    def _read(self, layer: int, bits: int, s: int, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots s..e-1 of one pool, dequantized: (k, v) [Hkv, e-s, D]."""
        if bits == 16:
            return self.k16[layer, :, s:e].to(dtype), self.v16[layer, :, s:e].to(dtype)
        fmt = self.config.row_format(bits)
        k, v = (
            dequantize_rows(
                getattr(self, f"{kv}{bits}")[layer, :, s:e],
                getattr(self, f"{kv}{bits}_scale")[layer, :, s:e],
                getattr(self, f"{kv}{bits}_zero")[layer, :, s:e],
                fmt,
                dtype,
            )
            for kv in "kv"
        )
        return k, v

    def blocks(self, layer: int, block_size: int = 1024, dtype: torch.dtype = torch.float32):
        """Yield (k, v): [Hkv, n, D] dequantized, one block of one pool at a time."""
        for b in self.config.layout.pool_bits:
            for s in range(0, self.lengths[b], block_size):
                yield self._read(layer, b, s, min(s + block_size, self.lengths[b]), dtype)

    def dequantized(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reference view for tests: (k, v) [Hkv, seq_len, D] in position order and the model's
        (unrotated) basis, and the positions."""
        cfg = self.config
        ks = [torch.zeros(cfg.num_kv_heads, 0, cfg.head_dim)]
        vs, pos = list(ks), []
        for b in cfg.layout.pool_bits:
            if n := self.lengths[b]:
                k, v = self._read(layer, b, 0, n, torch.float32)
                ks.append(k), vs.append(v), pos.extend(self.slot_pos[b][:n])
        order = torch.tensor(pos, dtype=torch.long).argsort()
        k, v = torch.cat(ks, 1)[:, order], torch.cat(vs, 1)[:, order]
        if cfg.hadamard:
            k, v = rotate(k), rotate(v)
        return k, v, torch.tensor(pos, dtype=torch.long)[order]

    # ---- save / load -------------------------------------------------------------------
    def meta_state(self) -> dict:
        return {
            "config": asdict(self.config),
            "seq_len": self.seq_len,
            "lengths": {str(b): n for b, n in self.lengths.items()},
            "slot_pos": {str(b): p for b, p in self.slot_pos.items()},
            "ring_next": self.ring_next,
        }

    def save(self, path: str | Path) -> None:
        """Write buffers + metadata to one safetensors file (temp name, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {n: t.contiguous() for n, t in self.named_buffers()}
        save_file(tensors, str(tmp), metadata={"kvexport_cache": json.dumps(self.meta_state())})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> PackedKVCache:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("kvexport_cache", "null") or "null")
            if meta is None:
                raise CacheError(f"{path} is not a kvexport cache file (no 'kvexport_cache' metadata)")
            c = dict(meta["config"])
            lay = dict(c.pop("layout"))
            lay["capacities"] = tuple(tuple(x) for x in lay["capacities"])
            lay["demote"] = tuple(lay["demote"]) if lay["demote"] else None
            cache = cls(CacheConfig(layout=CacheLayout(**lay), **c))
            for name, buf in cache.named_buffers():
                buf.copy_(f.get_tensor(name))
        cache.seq_len = meta["seq_len"]
        cache.lengths = {int(b): n for b, n in meta["lengths"].items()}
        cache.slot_pos = {int(b): list(p) for b, p in meta["slot_pos"].items()}
        cache.ring_next = meta["ring_next"]
        return cache
