// kvq_kernels.h — compute bodies of the packed KV cache ops, free of torch and ExecuTorch.
//
// Three ops share this header (registered for PyTorch eager in kvq_aten.cpp and for the
// ExecuTorch runtime in kvq_executorch.cpp):
//   pack_rows          quantize + bit-pack rows, bit-exact with adaptive_kv.formats.quantize_rows
//   packed_attention   fused attention of a query chunk over the mixed-precision pools plus the
//                      chunk's own full-precision K/V (causal), reading the packed codes directly
//   logit_stats        entropy and max probability of softmax(logits) per row: the controller's
//                      next-token features in two passes over the vocabulary
//
// Query precision (query_bits): 32 keeps q in fp32, so every code costs fp32 FMAs and a 2-bit key
// costs what an 8-bit one does. 8 quantizes each query row (after the softmax scale) to int8,
// symmetric, one scale per row: q8 = round_half_even(q * scale / s), s = max|q * scale| / 127,
// and the op is then defined on q_hat = q8 * s for every key source. Packed keys are then scored
// with integer dot products (u8 codes x s8 query, exact int32 sums), llama.cpp's q8 activations;
// the arithmetic per key shrinks with its width. Values stay fp32 either way.
//
// Storage format (adaptive_kv/formats.py): a row of D values is cut into groups of G; each group
// has an fp16 scale and zero, x_hat = code * scale + zero. With k = 8/bits codes per byte, byte j
// of a group holds codes j, j + G/k, ..., j + (k-1)G/k at bit offsets 0, bits, ..., so 8
// consecutive dims of a group are one 8-byte load, one shift and one mask ("split halves").
//
// Why the attention never dequantizes a row: with q.x_hat = scale * (q.code) + zero * sum(q),
// scores need one FMA per code and one scalar term per group; likewise the value side
// accumulates (p * scale) * code and keeps p * zero per group in a scalar, folded in at the end.
//
// Work split: (batch, KV head, tile of 4 query rows); the G query heads of a KV head and the T
// chunk positions are the rows, so at decode (T = 1, G <= 4) each code byte is read once per
// call. When there are few such tiles (decode) the cache is also cut into 512-token parts, each
// a work item with its own softmax state, merged by log-sum-exp. The cut ignores the thread
// count, so results do not depend on it.
//
// Threading is the host's: every entry point takes a `par_for(n, fn(begin, end))` so the ATen
// build uses torch's pool and the ExecuTorch build uses the runtime's pool (the one XNNPACK and
// the optimized kernels share), instead of a second OpenMP runtime competing for the cores.
//
// Paths: AVX2+FMA+F16C and NEON (8 fp32 lanes behind one small interface, `Avx2` / `Neon`),
// AVX-512 (`Avx512`: Avx2 plus 16-lane loops for 64-dim rows, bit-identical to Avx2) and the
// scalar reference `scalar_segment`, always compiled and selectable (set_isa).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KVQ_HAVE_AVX2 1
#include <immintrin.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define KVQ_HAVE_AVX512 1
#endif
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#define KVQ_HAVE_NEON 1
#include <arm_neon.h>
#endif

namespace kvq {

constexpr int kMaxHeadDim = 256;  // bounds the per-thread stack workspace of the attention
constexpr int kNumWidths = 4;     // pools, in this order: 2, 4, 8, 16 bits
constexpr int kWidths[kNumWidths] = {2, 4, 8, 16};

// ---------------------------------------------------------------------------------------------
// fp16 <-> fp32, bit exact, round-to-nearest-even (what torch's .to(torch.float16) does)
// ---------------------------------------------------------------------------------------------
inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float mag = float(mant) * 5.9604644775390625e-08f;
    return sign ? -mag : mag;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline uint16_t float_to_half(float f) {
  uint32_t x = float_to_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal half, units of 2^-24 (scaling is exact)
    const float units = std::nearbyint(bits_to_float(ax) * 16777216.0f);
    return uint16_t(sign | uint16_t(units));  // 1024 units correctly becomes the smallest normal
  }
  const uint32_t odd = (ax >> 13) & 1u;  // ties to even
  ax += 0xc8000000u + 0xfffu + odd;      // rebias exponent 127 -> 15, add the rounding bias
  return uint16_t(sign | (ax >> 13));
}

// ---------------------------------------------------------------------------------------------
// Argument errors: a message, never an abort (the registrations turn it into an exception or a
// failed kernel context).
// ---------------------------------------------------------------------------------------------
struct Error {
  char msg[256] = {0};
  bool ok() const { return msg[0] == 0; }
};

template <class... A>
inline Error make_error(const char* fmt, A... args) {
  Error e;
  std::snprintf(e.msg, sizeof(e.msg), fmt, args...);
  if (e.msg[0] == 0) e.msg[0] = '?';
  return e;
}

// ---------------------------------------------------------------------------------------------
// pack_rows: the encoder of adaptive_kv.formats.quantize_rows (clip search on), scalar on
// purpose: it touches T rows per step, and exactness (same fp32 operation order as the Python)
// matters more than speed here.
// ---------------------------------------------------------------------------------------------
// Shrink factors of each group's range searched by the encoder (formats.CLIP_RATIOS; float
// literals round exactly like torch.tensor of the Python floats).
constexpr float kClipRatios[] = {1.0f, 0.95f, 0.9f, 0.85f, 0.8f, 0.75f, 0.7f, 0.65f, 0.6f};
constexpr int kNumClipRatios = 9;

inline Error check_pack_args(int bits, int64_t head_dim, int64_t group_size) {
  if (bits != 2 && bits != 4 && bits != 8) return make_error("bits=%d: pack_rows packs 2, 4 or 8 bits (16-bit rows are stored as fp16)", bits);
  if (group_size <= 0 || head_dim <= 0 || head_dim % group_size)
    return make_error("group_size=%lld must divide head_dim=%lld", (long long)group_size, (long long)head_dim);
  if (group_size % (8 / bits)) return make_error("group_size=%lld must be a multiple of %d at %d bits", (long long)group_size, 8 / bits, bits);
  if (head_dim > kMaxHeadDim) return make_error("head_dim=%lld exceeds the supported maximum %d", (long long)head_dim, kMaxHeadDim);
  return Error{};
}

// Sum of n fp32 values in the fixed order of adaptive_kv.formats.fold_sum: add the second half
// onto the first (an odd last value carries over) until one value is left. The clip search's
// candidates can tie to the last bit, so every encoder (this one, formats.quantize_rows, the
// ONNX translation) must add in the same order; element-wise fp32 adds are exactly rounded
// everywhere, a vectorized reduction's order is not. Overwrites e.
inline float fold_sum(float* e, int n) {
  if (n <= 0) return 0.0f;
  while (n > 1) {
    const int h = n / 2;
    for (int i = 0; i < h; ++i) e[i] += e[i + h];
    if (n & 1) e[h] = e[2 * h];
    n = h + (n & 1);
  }
  return e[0];
}

// One group of G values -> codes (unpacked, one per value), scale and zero as fp16 bits.
inline void quantize_group(const float* x, int G, int bits, uint8_t* codes, uint16_t* scale_out, uint16_t* zero_out) {
  const float levels = float((1 << bits) - 1);
  float lo = x[0], hi = x[0];
  for (int i = 1; i < G; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  const float mid = (lo + hi) / 2.0f;
  float best_err = std::numeric_limits<float>::infinity();
  int best = -1;
  uint8_t cand[kMaxHeadDim];
  float err[kMaxHeadDim];
  for (int r = 0; r < kNumClipRatios; ++r) {
    // Each line is one fp32 tensor op of quantize_rows, rounded where torch rounds.
    const float lo_r = mid - (mid - lo) * kClipRatios[r];
    const float hi_r = mid + (hi - mid) * kClipRatios[r];
    const uint16_t z16 = float_to_half(lo_r);
    const float z = half_to_float(z16);
    const float span = hi_r - z;
    uint16_t s16 = float_to_half(span > 0.0f ? span / levels : 1.0f);
    if (!(half_to_float(s16) > 0.0f)) s16 = 0x0001;  // fp16 underflow guard: 2^-24
    const float s = half_to_float(s16);
    for (int i = 0; i < G; ++i) {
      const float d = x[i] - z;
      const float c = std::min(std::max(std::nearbyint(d / s), 0.0f), levels);  // round half even
      cand[i] = uint8_t(c);
      const float e = c * s + z - x[i];  // two roundings, no FMA (built with -ffp-contract=off)
      err[i] = e * e;
    }
    const float total = fold_sum(err, G);
    if (best < 0 || total < best_err) {  // strict: the first minimum wins, like torch.argmin
      best_err = total;
      best = r;
      std::memcpy(codes, cand, size_t(G));
      *scale_out = s16;
      *zero_out = z16;
    }
  }
}

// x: [n_rows, D] fp32 -> codes [n_rows, D*bits/8], scale / zero [n_rows, D/G] (fp16 bits).
template <class ParFor>
void pack_rows(const float* x, int64_t n_rows, int D, int G, int bits, uint8_t* codes, uint16_t* scale,
               uint16_t* zero, ParFor&& par_for) {
  const int groups = D / G, per_byte = 8 / bits, lane_bytes = G / per_byte;  // lane_bytes = G*bits/8
  const int64_t row_bytes = int64_t(D) * bits / 8;
  const uint8_t mask = uint8_t((1 << bits) - 1);
  par_for(n_rows, [&](int64_t begin, int64_t end) {
    uint8_t c[kMaxHeadDim];
    for (int64_t row = begin; row < end; ++row) {
      for (int g = 0; g < groups; ++g) {
        quantize_group(x + row * D + g * G, G, bits, c, scale + row * groups + g, zero + row * groups + g);
        uint8_t* out = codes + row * row_bytes + int64_t(g) * lane_bytes;
        for (int j = 0; j < lane_bytes; ++j) {  // split halves: byte j <- codes j, j+L, j+2L, ...
          uint32_t b = 0;
          for (int s = 0; s < per_byte; ++s) b |= uint32_t(c[j + s * lane_bytes] & mask) << (s * bits);
          out[j] = uint8_t(b);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// packed_attention: arguments
// ---------------------------------------------------------------------------------------------
enum class Isa : int { kScalar = 0, kAvx2 = 1, kNeon = 2, kAvx512 = 3 };

inline const char* isa_name(Isa i) {
  return i == Isa::kAvx2 ? "avx2" : i == Isa::kNeon ? "neon" : i == Isa::kAvx512 ? "avx512" : "scalar";
}

// The best path compiled into this build (the build enables AVX2 and AVX-512 only on hosts that
// have them).
inline Isa best_isa() {
#if defined(KVQ_HAVE_AVX512)
  return Isa::kAvx512;
#elif defined(KVQ_HAVE_AVX2)
  return Isa::kAvx2;
#elif defined(KVQ_HAVE_NEON)
  return Isa::kNeon;
#else
  return Isa::kScalar;
#endif
}

// Process-wide choice, so tests and benchmarks can run the scalar reference through the ops.
inline std::atomic<int>& isa_setting() {
  static std::atomic<int> s{int(best_isa())};
  return s;
}
inline Isa current_isa() { return Isa(isa_setting().load()); }
// Every path compiled in (an AVX-512 build also runs the AVX2 loops, so both stay testable).
inline bool isa_compiled(Isa i) {
  return i == Isa::kScalar || i == best_isa() || (i == Isa::kAvx2 && best_isa() == Isa::kAvx512);
}
// Returns the previous setting, or -1 (and changes nothing) if `isa` is not compiled in.
inline int set_isa(int isa) {
  if (isa < 0 || isa > int(Isa::kAvx512) || !isa_compiled(Isa(isa))) return -1;
  return isa_setting().exchange(isa);
}

// One precision pool of one layer, all KV heads. Packed (bits < 16): codes [Hkv, capacity,
// D*bits/8] uint8, scale / zero [Hkv, capacity, D/G] fp16. bits == 16: k / v are fp16 [Hkv,
// capacity, D] and the scale / zero pointers are unused. Slots [0, len) of every head are filled.
struct Pool {
  int bits = 0;  // 0: absent
  int64_t len = 0, capacity = 0;
  const void* k = nullptr;
  const void* v = nullptr;
  const uint16_t* k_scale = nullptr;
  const uint16_t* k_zero = nullptr;
  const uint16_t* v_scale = nullptr;
  const uint16_t* v_zero = nullptr;
};

struct AttentionArgs {
  int64_t batch = 1, q_heads = 0, kv_heads = 0, chunk_len = 0, head_dim = 0, group_size = 64;
  const float* q = nullptr;        // [B, Hq, T, D]
  const float* k_chunk = nullptr;  // [B, Hkv, T, D], attended causally
  const float* v_chunk = nullptr;  // [B, Hkv, T, D]
  Pool pools[kNumWidths];          // 2, 4, 8, 16 bits; every batch row attends the same pools
  float scale = 1.0f;              // softmax scale, usually D^-0.5
  int64_t query_bits = 32;         // 32: fp32 query; 8: int8 query rows (see the top of this file)
  float* out = nullptr;            // [B, Hq, T, D]
  float* sum_p2 = nullptr;         // [B, Hq, T]: sum_j p_j^2 of each query row
};

// Shape and range checks on the plain numbers (the registrations check dtypes and ranks).
inline Error check_attention_args(const AttentionArgs& a) {
  if (a.batch < 1 || a.chunk_len < 1 || a.q_heads < 1 || a.kv_heads < 1)
    return make_error("empty query chunk: batch=%lld, T=%lld, Hq=%lld, Hkv=%lld", (long long)a.batch, (long long)a.chunk_len,
                      (long long)a.q_heads, (long long)a.kv_heads);
  if (a.q_heads % a.kv_heads) return make_error("q heads (%lld) must be a multiple of KV heads (%lld)", (long long)a.q_heads, (long long)a.kv_heads);
  if (a.head_dim < 1 || a.head_dim > kMaxHeadDim) return make_error("head_dim=%lld outside [1, %d]", (long long)a.head_dim, kMaxHeadDim);
  if (a.query_bits != 32 && a.query_bits != 8)
    return make_error("query_bits=%lld: the query is fp32 (32) or int8 rows (8)", (long long)a.query_bits);
  for (int w = 0; w < kNumWidths; ++w) {
    const Pool& p = a.pools[w];
    if (p.len < 0 || p.len > p.capacity)
      return make_error("%d-bit pool: filled length %lld outside [0, capacity %lld]", kWidths[w], (long long)p.len, (long long)p.capacity);
    if (p.len > 0 && p.bits != kWidths[w]) return make_error("%d-bit pool has %lld filled slots but no tensors", kWidths[w], (long long)p.len);
    if (p.bits && p.bits < 16) {
      Error e = check_pack_args(p.bits, a.head_dim, a.group_size);
      if (!e.ok()) return e;
    }
  }
  return Error{};
}

// ---------------------------------------------------------------------------------------------
// Tensor arguments as plain descriptors: both registrations describe their tensors this way and
// share one validator, so eager and ExecuTorch reject the same inputs with the same message.
// ---------------------------------------------------------------------------------------------
enum class DType : int { kOther = 0, kFloat, kHalf, kByte, kLong, kBool };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat: return "float32";
    case DType::kHalf: return "float16";
    case DType::kByte: return "uint8";
    case DType::kLong: return "int64";
    case DType::kBool: return "bool";
    default: return "another dtype";
  }
}

struct TensorDesc {
  bool present = false;
  DType dtype = DType::kOther;
  int dim = 0;
  int64_t sizes[8] = {0};
  bool contiguous = true;
  const void* data = nullptr;
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < dim; ++i) n *= sizes[i];
    return n;
  }
};

// Checks dtype, rank, contiguity and the sizes given (-1: any).
inline Error expect_tensor(const TensorDesc& t, const char* name, DType dt, int dim, const int64_t* want) {
  if (!t.present) return make_error("%s is missing", name);
  if (t.dtype != dt) return make_error("%s must be %s, got %s", name, dtype_name(dt), dtype_name(t.dtype));
  if (t.dim != dim) return make_error("%s must have %d dims, got %d", name, dim, t.dim);
  for (int i = 0; i < dim; ++i)
    if (want[i] >= 0 && t.sizes[i] != want[i])
      return make_error("%s has size %lld at dim %d, expected %lld", name, (long long)t.sizes[i], i, (long long)want[i]);
  if (!t.contiguous) return make_error("%s must be contiguous", name);
  if (!t.data && t.numel() > 0) return make_error("%s has no data", name);
  return Error{};
}

struct PackArgs {
  const float* x = nullptr;
  int64_t rows = 0;
  int D = 0, G = 0, bits = 0;
};

// x: [..., D] float32 -> rows of D. Output shapes: codes [..., D*bits/8], scale/zero [..., D/G].
inline Error make_pack_args(const TensorDesc& x, int64_t bits, int64_t group_size, PackArgs& p) {
  if (!x.present || x.dim < 1) return make_error("x must be a tensor of rows [..., head_dim]");
  const int64_t any[8] = {-1, -1, -1, -1, -1, -1, -1, -1};
  Error e = expect_tensor(x, "x", DType::kFloat, x.dim, any);
  if (!e.ok()) return e;
  const int64_t D = x.sizes[x.dim - 1];
  e = check_pack_args(int(bits), D, group_size);
  if (!e.ok()) return e;
  p.x = static_cast<const float*>(x.data);
  p.rows = D ? x.numel() / D : 0;
  p.D = int(D);
  p.G = int(group_size);
  p.bits = int(bits);
  return Error{};
}

// pack_rows' optional `active` flag: absent packs; a one-element bool tensor packs when true and
// zero-fills the outputs when false (a width no token of the chunk goes to, without a cond).
inline Error read_pack_active(const TensorDesc& a, bool& active) {
  active = true;
  if (!a.present) return Error{};
  if (a.dtype != DType::kBool || a.numel() != 1 || !a.data)
    return make_error("active must be a one-element bool tensor, got %s with %lld elements", dtype_name(a.dtype), (long long)a.numel());
  active = *static_cast<const bool*>(a.data);
  return Error{};
}

// Checks an output of a pack: same leading dims as x, last dim `last`.
inline Error expect_pack_out(const TensorDesc& out, const TensorDesc& x, const char* name, DType dt, int64_t last) {
  int64_t want[8];
  for (int i = 0; i < x.dim; ++i) want[i] = x.sizes[i];
  want[x.dim - 1] = last;
  return expect_tensor(out, name, dt, x.dim, want);
}

// Pool tensor slots per width, in schema order: k, k_scale, k_zero, v, v_scale, v_zero
// (16 bits: k16 in slot 0, v16 in slot 3, the rest absent).
constexpr int kPoolSlots = 6;
constexpr const char* kSlotNames[kPoolSlots] = {"k", "k_scale", "k_zero", "v", "v_scale", "v_zero"};

inline int64_t element_size(DType d) {
  switch (d) {
    case DType::kFloat: return 4;
    case DType::kHalf: return 2;
    case DType::kByte: return 1;
    case DType::kLong: return 8;
    case DType::kBool: return 1;
    default: return 0;
  }
}

// A whole-model pool [layers, ...] -> its layer `layer` (a view: no copy). Passing the whole
// buffer plus an index lets an exported program read the cache in place, where a select in the
// graph becomes a copy of the layer's pools on every call.
inline Error select_layer(TensorDesc& t, int64_t layer) {
  if (!t.present) return Error{};
  if (t.dim < 2) return make_error("with layer=%lld the pools must be [layers, Hkv, capacity, X], got %d dims", (long long)layer, t.dim);
  if (layer >= t.sizes[0]) return make_error("layer=%lld outside the pools' %lld layers", (long long)layer, (long long)t.sizes[0]);
  if (!t.contiguous) return make_error("with layer=%lld the pools must be contiguous", (long long)layer);
  const int64_t per_layer = t.sizes[0] ? t.numel() / t.sizes[0] : 0;
  if (t.data) t.data = static_cast<const char*>(t.data) + layer * per_layer * element_size(t.dtype);
  for (int i = 1; i < t.dim; ++i) t.sizes[i - 1] = t.sizes[i];
  --t.dim;
  return Error{};
}

// Validates every input of packed_attention and fills `a` (all but the outputs).
// q: [B, Hq, T, D] f32; k_chunk, v_chunk: [B, Hkv, T, D] f32; lengths: [4] int64 (filled slots of
// the 2-, 4-, 8- and 16-bit pools); pools as documented on `Pool`, or, with layer >= 0, every
// layer's pools [layers, Hkv, capacity, X] of which `layer` is read (layer < 0: one layer given).
inline Error make_attention_args(const TensorDesc& q, const TensorDesc& k_chunk, const TensorDesc& v_chunk, const TensorDesc& lengths,
                                 const TensorDesc (&all_pools)[kNumWidths][kPoolSlots], double scale, int64_t group_size, int64_t layer,
                                 int64_t query_bits, AttentionArgs& a) {
  TensorDesc pool[kNumWidths][kPoolSlots];
  for (int w = 0; w < kNumWidths; ++w)
    for (int i = 0; i < kPoolSlots; ++i) {
      pool[w][i] = all_pools[w][i];
      if (layer >= 0) {
        Error e = select_layer(pool[w][i], layer);
        if (!e.ok()) return e;
      }
    }
  const int64_t any4[4] = {-1, -1, -1, -1};
  Error e = expect_tensor(q, "q", DType::kFloat, 4, any4);
  if (!e.ok()) return e;
  a.batch = q.sizes[0];
  a.q_heads = q.sizes[1];
  a.chunk_len = q.sizes[2];
  a.head_dim = q.sizes[3];
  const int64_t kv_shape[4] = {a.batch, -1, a.chunk_len, a.head_dim};
  if (!(e = expect_tensor(k_chunk, "k_chunk", DType::kFloat, 4, kv_shape)).ok()) return e;
  a.kv_heads = k_chunk.sizes[1];
  const int64_t v_shape[4] = {a.batch, a.kv_heads, a.chunk_len, a.head_dim};
  if (!(e = expect_tensor(v_chunk, "v_chunk", DType::kFloat, 4, v_shape)).ok()) return e;
  const int64_t len_shape[1] = {kNumWidths};
  if (!(e = expect_tensor(lengths, "lengths", DType::kLong, 1, len_shape)).ok()) return e;
  if (!(group_size > 0)) return make_error("group_size=%lld must be positive", (long long)group_size);
  if (!std::isfinite(scale)) return make_error("scale must be finite");
  a.group_size = group_size;
  a.scale = float(scale);
  a.query_bits = query_bits;  // checked with the rest by check_attention_args
  a.q = static_cast<const float*>(q.data);
  a.k_chunk = static_cast<const float*>(k_chunk.data);
  a.v_chunk = static_cast<const float*>(v_chunk.data);
  const int64_t* len = static_cast<const int64_t*>(lengths.data);
  for (int w = 0; w < kNumWidths; ++w) {
    const int bits = kWidths[w];
    const TensorDesc* t = pool[w];
    Pool& p = a.pools[w];
    p = Pool{};
    p.len = len[w];
    char name[48];
    if (bits == 16) {
      if (t[0].present != t[3].present) return make_error("k16 and v16 must be given together");
      if (!t[0].present) continue;
      const int64_t shape[3] = {a.kv_heads, -1, a.head_dim};
      if (!(e = expect_tensor(t[0], "k16", DType::kHalf, 3, shape)).ok()) return e;
      const int64_t same[3] = {a.kv_heads, t[0].sizes[1], a.head_dim};
      if (!(e = expect_tensor(t[3], "v16", DType::kHalf, 3, same)).ok()) return e;
      p.capacity = t[0].sizes[1];
    } else {
      int given = 0;
      for (int i = 0; i < kPoolSlots; ++i) given += t[i].present;
      if (given != 0 && given != kPoolSlots) return make_error("the %d-bit pool needs all six tensors (codes, scale, zero for k and v), got %d", bits, given);
      if (!given) continue;
      if (!(e = check_pack_args(bits, a.head_dim, group_size)).ok()) return e;
      const int64_t cap = t[0].sizes[1];
      const int64_t codes_shape[3] = {a.kv_heads, cap, a.head_dim * bits / 8};
      const int64_t aff_shape[3] = {a.kv_heads, cap, a.head_dim / group_size};
      for (int i = 0; i < kPoolSlots; ++i) {
        std::snprintf(name, sizeof name, "%s%d%s", i < 3 ? "k" : "v", bits, kSlotNames[i] + 1);
        const bool codes = i == 0 || i == 3;
        if (!(e = expect_tensor(t[i], name, codes ? DType::kByte : DType::kHalf, 3, codes ? codes_shape : aff_shape)).ok()) return e;
      }
      p.capacity = cap;
      p.k_scale = static_cast<const uint16_t*>(t[1].data);
      p.k_zero = static_cast<const uint16_t*>(t[2].data);
      p.v_scale = static_cast<const uint16_t*>(t[4].data);
      p.v_zero = static_cast<const uint16_t*>(t[5].data);
    }
    p.bits = bits;
    p.k = t[0].data;
    p.v = t[3].data;
  }
  return check_attention_args(a);
}

namespace detail {

constexpr int kTileRows = 4;        // query rows (of one KV head) processed together
constexpr int kBlock = 64;          // cache tokens per softmax block (32 measured ~15% slower: per-block
                                    // scalar work; 128 slower with cold caches)
constexpr int64_t kSplit = 512;     // tokens per work item when a call is split over the cache
constexpr int kMaxGroups = kMaxHeadDim / 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A contiguous run of rows of one source, for one KV head: a pool or the chunk.
struct Segment {
  int src;  // 0..3: pool index, 4: the chunk
  int64_t begin, end;
};

// Running softmax state of one tile of query rows (a work item's private workspace).
struct Tile {
  int rows = 0;          // valid rows (<= kTileRows)
  int64_t t[kTileRows];  // chunk position of each row, for the causal mask
  float qs[kTileRows][kMaxHeadDim];  // q * scale (query_bits 8: q_hat = q8 * qscale); unused rows are zero
  alignas(32) int8_t q8[kTileRows][kMaxHeadDim];  // query_bits 8: the int8 query rows (valid rows only)
  float qscale[kTileRows];                        // query_bits 8: s of each valid row
  bool q_int = false;                             // score packed keys with integer dot products
  float qsum[kTileRows][kMaxGroups]; // per-group sum of qs, multiplies the key zeros
  float m[kTileRows], l[kTileRows], l2[kTileRows];
  float acc[kTileRows][kMaxHeadDim];  // sum p * (code * scale) or p * v
  float zacc[kTileRows][kMaxGroups];  // sum p * zero, per group (packed sources only)
};

// Per-(source, head) view the loops read rows from.
struct SrcView {
  int bits;  // 2, 4, 8 packed; 16 fp16; 32 fp32 (the chunk)
  const uint8_t* k;
  const uint8_t* v;
  int64_t row_bytes;  // bytes from one token's row to the next
  const uint16_t *ks, *kz, *vs, *vz;
  int64_t groups;  // scale/zero entries per token (packed)
};

inline SrcView make_view(const AttentionArgs& a, int src, int64_t b, int64_t h) {
  SrcView s{};
  const int64_t D = a.head_dim;
  if (src == 4) {
    s.bits = 32;
    s.row_bytes = D * 4;
    const int64_t off = ((b * a.kv_heads + h) * a.chunk_len) * D;
    s.k = reinterpret_cast<const uint8_t*>(a.k_chunk + off);
    s.v = reinterpret_cast<const uint8_t*>(a.v_chunk + off);
    return s;
  }
  const Pool& p = a.pools[src];
  s.bits = p.bits;
  s.row_bytes = D * p.bits / 8;
  s.k = static_cast<const uint8_t*>(p.k) + h * p.capacity * s.row_bytes;
  s.v = static_cast<const uint8_t*>(p.v) + h * p.capacity * s.row_bytes;
  if (p.bits < 16) {
    s.groups = D / a.group_size;
    const int64_t off = h * p.capacity * s.groups;
    s.ks = p.k_scale + off;
    s.kz = p.k_zero + off;
    s.vs = p.v_scale + off;
    s.vz = p.v_zero + off;
  }
  return s;
}

// ---- the scalar reference path: one token at a time, each value dequantized explicitly -------
inline float scalar_value(const SrcView& s, const uint8_t* base, const uint16_t* sc, const uint16_t* zr, int64_t tok, int64_t d,
                          int64_t G) {
  const uint8_t* row = base + tok * s.row_bytes;
  if (s.bits == 32) return reinterpret_cast<const float*>(row)[d];
  if (s.bits == 16) return half_to_float(reinterpret_cast<const uint16_t*>(row)[d]);
  const int64_t g = d / G, dg = d % G, lane = G * s.bits / 8;
  const int code = (row[g * lane + dg % lane] >> (s.bits * (dg / lane))) & ((1 << s.bits) - 1);
  return float(code) * half_to_float(sc[tok * s.groups + g]) + half_to_float(zr[tok * s.groups + g]);
}

inline void scalar_segment(const SrcView& s, const Segment& seg, int64_t D, int64_t G, Tile& w) {
  const bool causal = seg.src == 4;
  float kv[kMaxHeadDim];
  for (int64_t tok = seg.begin; tok < seg.end; ++tok) {
    for (int64_t d = 0; d < D; ++d) kv[d] = scalar_value(s, s.k, s.ks, s.kz, tok, d, G);
    float p[kTileRows];
    for (int r = 0; r < w.rows; ++r) {
      p[r] = 0.0f;
      if (causal && tok > w.t[r]) continue;
      float sc = 0.0f;
      for (int64_t d = 0; d < D; ++d) sc += w.qs[r][d] * kv[d];
      const float m_new = std::max(w.m[r], sc);
      const float alpha = std::exp(w.m[r] - m_new);  // exp(-inf) = 0 on the first key
      p[r] = std::exp(sc - m_new);
      w.l[r] = w.l[r] * alpha + p[r];
      w.l2[r] = w.l2[r] * alpha * alpha + p[r] * p[r];
      for (int64_t d = 0; d < D; ++d) w.acc[r][d] *= alpha;
      w.m[r] = m_new;
    }
    for (int64_t d = 0; d < D; ++d) kv[d] = scalar_value(s, s.v, s.vs, s.vz, tok, d, G);
    for (int r = 0; r < w.rows; ++r)
      for (int64_t d = 0; d < D; ++d) w.acc[r][d] += p[r] * kv[d];
  }
}

// ---- SIMD backends: 8 fp32 lanes behind one small interface ---------------------------------
#if defined(KVQ_HAVE_AVX2)
struct Avx2 {
  static constexpr bool kWide = false;  // see Avx512
  using F = __m256;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static float hsum(F v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
  static float hmax(F v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }
  // [hsum(v[0]), ..., hsum(v[7])] with 6 hadds: one reduction serves 8 tokens.
  static F reduce8(const F* v) {
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  }
  // e^x, ~1 ulp on [-87, 88]; x < -87 gives exactly 0 (masked keys are -inf).
  static F exp(F x) {
    const __m256 dead = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // Cody-Waite split of ln 2
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(dead, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
  }
  // 8 codes of BITS from the 8 bytes at p, field `shift`: widen to int32 first (vpmovzxbd with
  // the load fused; the same 8 bytes feed every field, so the compiler loads them once), then
  // shift and mask (vpand runs on any vector pipe, shifts and widenings compete for two).
  template <int BITS>
  static F codes8(const uint8_t* p, int shift) {
    __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    if (shift) x = _mm256_srli_epi32(x, shift);
    if (BITS + shift < 8) x = _mm256_and_si256(x, _mm256_set1_epi32((1 << BITS) - 1));
    return _mm256_cvtepi32_ps(x);
  }
  static F half8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

  // ---- int8 query (query_bits 8), one 64-dim group per row: codes as u8, dims in order ----
  // A row's 64 codes as 4-bit-or-less u8 values: c[0] dims 0-31, c[1] dims 32-63; 8-bit codes
  // come as their low nibbles (c[0], c[1]) and high nibbles (c[2], c[3]), because vpmaddubsw
  // would saturate on 255 * 127 * 2 but not on 15 * 127 * 2.
  using I = __m256i;
  using Q = __m256i;  // 32 int8 query values
  using C = __m256i;  // 32 codes
  static constexpr int kQRegs = 2;
  static constexpr int code_regs(int bits) { return bits == 8 ? 4 : 2; }
  static void load_q(const int8_t* q, Q* out) {
    out[0] = _mm256_load_si256(reinterpret_cast<const __m256i*>(q));
    out[1] = _mm256_load_si256(reinterpret_cast<const __m256i*>(q + 32));
  }
  template <int BITS>
  static void codes64(const uint8_t* row, I* c) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    if constexpr (BITS == 2) {  // byte j: dims j, j+16, j+32, j+48 at shifts 0, 2, 4, 6
      const __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
      const __m256i m2 = _mm256_set1_epi8(0x03);
      c[0] = _mm256_and_si256(_mm256_srlv_epi32(x, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), m2);
      c[1] = _mm256_and_si256(_mm256_srlv_epi32(x, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)), m2);
    } else if constexpr (BITS == 4) {  // byte j: dims j, j+32
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      c[0] = _mm256_and_si256(x, m4);
      c[1] = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
    } else {
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32));
      c[0] = _mm256_and_si256(x0, m4);
      c[1] = _mm256_and_si256(x1, m4);
      c[2] = _mm256_and_si256(_mm256_srli_epi16(x0, 4), m4);
      c[3] = _mm256_and_si256(_mm256_srli_epi16(x1, 4), m4);
    }
  }
  // sum_d q[d] * code[d] of one row, as 8 int32 partial sums (exact: |sum| < 64 * 255 * 127).
  template <int BITS>
  static I dot64(const I* c, const Q* q) {
    I s = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(c[0], q[0]), _mm256_maddubs_epi16(c[1], q[1])), _mm256_set1_epi16(1));
    if constexpr (BITS == 8) {
      const __m256i hi = _mm256_add_epi16(_mm256_maddubs_epi16(c[2], q[0]), _mm256_maddubs_epi16(c[3], q[1]));
      s = _mm256_add_epi32(s, _mm256_madd_epi16(hi, _mm256_set1_epi16(16)));
    }
    return s;
  }
  // The sums of 4 tokens' partials, half reduced: [sums of the low 128 bits, of the high 128 bits].
  static I reduce4i(I v0, I v1, I v2, I v3) { return _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3)); }
  // Two reduce4i results -> the 8 tokens' sums as floats (exact: every sum is below 2^24).
  static F finish8i(I a, I b) {
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31)));
  }
  static float hsumi(I v) {
    __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    x = _mm_add_epi32(x, _mm_unpackhi_epi64(x, x));
    return float(_mm_cvtsi128_si32(x) + _mm_extract_epi32(x, 1));
  }
};
#endif

#if defined(KVQ_HAVE_AVX512)
// AVX-512 (F, BW, VL): Avx2's 8-lane interface everywhere, plus 16-lane loops for the common
// 64-dim, one-group rows: the value pass, where a row is 4 registers instead of 8 (half the FMAs
// and code conversions per token), and with VNNI the int8-query key dots (vpdpbusd: one
// instruction per 32 codes and row, and no nibble split of 8-bit codes). Every lane accumulates
// in the order Avx2's does and the integer sums are exact, so results are bit-identical to Avx2.
struct Avx512 : Avx2 {
  static constexpr bool kWide = true;
  using W = __m512;
  // Dims [16K, 16K + 16) of a 64-dim row as floats (codes raw, as load8 gives them). In a packed
  // row of one 64-dim group, dim d sits in byte d % lane, field d / lane (lane = 8 * BITS bytes).
  template <int BITS, int K>
  static W row16(const uint8_t* row) {
    if constexpr (BITS == 32) {
      return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + 16 * K);
    } else if constexpr (BITS == 16) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * K)));
    } else {
      constexpr int lane = 8 * BITS, off = (16 * K) % lane, shift = BITS * ((16 * K) / lane);
      __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + off)));
      if constexpr (shift > 0) x = _mm512_srli_epi32(x, shift);
      if constexpr (BITS + shift < 8) x = _mm512_and_si512(x, _mm512_set1_epi32((1 << BITS) - 1));
      return _mm512_cvtepi32_ps(x);
    }
  }
  // acc[r][0..64) += sum_j wv[r][0][j] * row_j (codes raw for packed rows): n rows of row_bytes.
  // 4 * RT accumulators stay in registers (32 zmm), so one pass covers the whole row.
  template <int BITS, int RT>
  static void values64(const uint8_t* row, int64_t row_bytes, int n, const float (*wv)[kMaxGroups][kBlock], float (*acc)[kMaxHeadDim]) {
    W a[4][RT];
    for (int k = 0; k < 4; ++k)
      for (int r = 0; r < RT; ++r) a[k][r] = _mm512_loadu_ps(acc[r] + 16 * k);
    for (int j = 0; j < n; ++j, row += row_bytes) {
      W wj[RT];
      for (int r = 0; r < RT; ++r) wj[r] = _mm512_set1_ps(wv[r][0][j]);
      const W x[4] = {row16<BITS, 0>(row), row16<BITS, 1>(row), row16<BITS, 2>(row), row16<BITS, 3>(row)};
      for (int k = 0; k < 4; ++k)
        for (int r = 0; r < RT; ++r) a[k][r] = _mm512_fmadd_ps(wj[r], x[k], a[k][r]);
    }
    for (int k = 0; k < 4; ++k)
      for (int r = 0; r < RT; ++r) _mm512_storeu_ps(acc[r] + 16 * k, a[k][r]);
  }
  // Avx2::exp on 16 lanes: the same operations lane by lane, so the same bits.
  static W exp16(W x) {
    const __mmask16 dead = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const W n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    W r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    W p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps(__mmask16(~dead), p, _mm512_castsi512_ps(e));
  }
  // score[j] (+)= ks[j] * dot[j] + kz[j] * qz over a block (the Avx2 loop's operations, 16 lanes)
  static void affine_block(const float* ks, const float* dot, const float* kz, float qz, bool add, float* score) {
    const W q = _mm512_set1_ps(qz);
    for (int j = 0; j < kBlock; j += 16) {
      W sc = _mm512_fmadd_ps(_mm512_load_ps(ks + j), _mm512_load_ps(dot + j), _mm512_mul_ps(_mm512_load_ps(kz + j), q));
      if (add) sc = _mm512_add_ps(_mm512_load_ps(score + j), sc);
      _mm512_store_ps(score + j, sc);
    }
  }
  // out[j] = a[j] * b[j] over a block
  static void mul_block(const float* a, const float* b, float* out) {
    for (int j = 0; j < kBlock; j += 16) _mm512_store_ps(out + j, _mm512_mul_ps(_mm512_load_ps(a + j), _mm512_load_ps(b + j)));
  }
  // p[j] = e^(score[j] - m) for a block; the sums of p and p^2 stay with the 8-lane caller, in its order.
  static void exp_block(const float* score, float m, float* p) {
    const W mv = _mm512_set1_ps(m);
    for (int j = 0; j < kBlock; j += 16) _mm512_store_ps(p + j, exp16(_mm512_sub_ps(_mm512_load_ps(score + j), mv)));
  }
#if defined(__AVX512VNNI__)
  // int8-query key dots with vpdpbusd (u8 codes x s8 query into int32, no intermediate
  // saturation): 8-bit codes go in whole. Same contract as Avx2::codes64 / dot64 otherwise.
  static constexpr int code_regs(int) { return 2; }
  template <int BITS>
  static void codes64(const uint8_t* row, I* c) {
    if constexpr (BITS == 8) {
      c[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      c[1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32));
    } else {
      Avx2::codes64<BITS>(row, c);
    }
  }
  template <int BITS>
  static I dot64(const I* c, const Q* q) {
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), c[0], q[0]), c[1], q[1]);
  }
#endif
};
#endif

#if defined(KVQ_HAVE_NEON)
struct Neon {
  static constexpr bool kWide = false;
  struct F {
    float32x4_t a, b;
  };
  static F zero() { return {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)}; }
  static F set1(float x) { return {vdupq_n_f32(x), vdupq_n_f32(x)}; }
  static F load(const float* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
  static void store(float* p, F v) {
    vst1q_f32(p, v.a);
    vst1q_f32(p + 4, v.b);
  }
  static F fma(F a, F b, F c) { return {vfmaq_f32(c.a, a.a, b.a), vfmaq_f32(c.b, a.b, b.b)}; }
  static F mul(F a, F b) { return {vmulq_f32(a.a, b.a), vmulq_f32(a.b, b.b)}; }
  static F add(F a, F b) { return {vaddq_f32(a.a, b.a), vaddq_f32(a.b, b.b)}; }
  static F sub(F a, F b) { return {vsubq_f32(a.a, b.a), vsubq_f32(a.b, b.b)}; }
  static F max(F a, F b) { return {vmaxq_f32(a.a, b.a), vmaxq_f32(a.b, b.b)}; }
  static float hsum(F v) { return vaddvq_f32(vaddq_f32(v.a, v.b)); }
  static float hmax(F v) { return vmaxvq_f32(vmaxq_f32(v.a, v.b)); }
  static F reduce8(const F* v) {
    float32x4_t s[8];
    for (int i = 0; i < 8; ++i) s[i] = vaddq_f32(v[i].a, v[i].b);
    return {vpaddq_f32(vpaddq_f32(s[0], s[1]), vpaddq_f32(s[2], s[3])), vpaddq_f32(vpaddq_f32(s[4], s[5]), vpaddq_f32(s[6], s[7]))};
  }
  static float32x4_t exp4(float32x4_t x) {
    const uint32x4_t dead = vcltq_f32(x, vdupq_n_f32(-87.0f));
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.0f)), vdupq_n_f32(88.0f));
    const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    const float32x4_t y = vmulq_f32(p, vreinterpretq_f32_s32(e));
    return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(y), dead));
  }
  static F exp(F x) { return {exp4(x.a), exp4(x.b)}; }
  template <int BITS>
  static F codes8(const uint8_t* p, int shift) {
    uint8x8_t x = vld1_u8(p);
    if (shift) x = vshl_u8(x, vdup_n_s8(int8_t(-shift)));
    if (BITS + shift < 8) x = vand_u8(x, vdup_n_u8(uint8_t((1 << BITS) - 1)));
    const uint16x8_t w = vmovl_u8(x);
    return {vcvtq_f32_u32(vmovl_u16(vget_low_u16(w))), vcvtq_f32_u32(vmovl_high_u16(w))};
  }
  static float32x4_t half4(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  static F half8(const uint16_t* p) { return {half4(p), half4(p + 4)}; }

  // ---- int8 query (query_bits 8); the same contract as Avx2's. c[k]: dims 16k..16k+15 (8-bit:
  // c[0..3] low nibbles, c[4..7] high nibbles), as s8 (every value < 16).
  using I = int32x4_t;
  using Q = int8x16_t;
  using C = int8x16_t;
  static constexpr int kQRegs = 4;
  static constexpr int code_regs(int bits) { return bits == 8 ? 8 : 4; }
  static void load_q(const int8_t* q, Q* out) {
    for (int k = 0; k < 4; ++k) out[k] = vld1q_s8(q + 16 * k);
  }
  template <int BITS>
  static void codes64(const uint8_t* row, int8x16_t* c) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    if constexpr (BITS == 2) {  // byte j: dims j, j+16, j+32, j+48
      const uint8x16_t x = vld1q_u8(row), m2 = vdupq_n_u8(0x03);
      c[0] = vreinterpretq_s8_u8(vandq_u8(x, m2));
      c[1] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(x, 2), m2));
      c[2] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(x, 4), m2));
      c[3] = vreinterpretq_s8_u8(vshrq_n_u8(x, 6));
    } else if constexpr (BITS == 4) {  // byte j: dims j, j+32
      const uint8x16_t x0 = vld1q_u8(row), x1 = vld1q_u8(row + 16);
      c[0] = vreinterpretq_s8_u8(vandq_u8(x0, m4));
      c[1] = vreinterpretq_s8_u8(vandq_u8(x1, m4));
      c[2] = vreinterpretq_s8_u8(vshrq_n_u8(x0, 4));
      c[3] = vreinterpretq_s8_u8(vshrq_n_u8(x1, 4));
    } else {
      for (int k = 0; k < 4; ++k) {
        const uint8x16_t x = vld1q_u8(row + 16 * k);
        c[k] = vreinterpretq_s8_u8(vandq_u8(x, m4));
        c[4 + k] = vreinterpretq_s8_u8(vshrq_n_u8(x, 4));
      }
    }
  }
  static int32x4_t dot16(int32x4_t acc, int8x16_t c, int8x16_t q) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, c, q);
#else
    const int16x8_t lo = vmull_s8(vget_low_s8(c), vget_low_s8(q));
    return vpadalq_s16(vpadalq_s16(acc, lo), vmull_high_s8(c, q));
#endif
  }
  template <int BITS>
  static I dot64(const int8x16_t* c, const Q* q) {
    int32x4_t s = vdupq_n_s32(0);
    for (int k = 0; k < 4; ++k) s = dot16(s, c[k], q[k]);
    if constexpr (BITS == 8) {
      int32x4_t hi = vdupq_n_s32(0);
      for (int k = 0; k < 4; ++k) hi = dot16(hi, c[4 + k], q[k]);
      s = vmlaq_n_s32(s, hi, 16);
    }
    return s;
  }
  static I reduce4i(I v0, I v1, I v2, I v3) { return vpaddq_s32(vpaddq_s32(v0, v1), vpaddq_s32(v2, v3)); }
  static F finish8i(I a, I b) { return {vcvtq_f32_s32(a), vcvtq_f32_s32(b)}; }
  static float hsumi(I v) { return float(vaddvq_s32(v)); }
};
#endif

// ---- the SIMD path: blocks of kBlock tokens, RT rows at once --------------------------------
// Where the 8 dims [8c, 8c+8) of a row live: byte offset and bit field. A packed group of G dims
// is a "lane" of G*bits/8 bytes and its dim dg sits in byte dg % lane, field dg / lane; lanes are
// multiples of 16 bytes (simd_layout_ok), so 8 consecutive dims never straddle two fields.
struct Piece {
  int64_t off;
  int shift;
};
inline Piece piece(int bits, int64_t G, int64_t c) {
  const int64_t d0 = 8 * c;
  if (bits > 8) return {d0 * (bits / 8), 0};
  const int64_t lane = G * bits / 8, g = d0 / G, dg = d0 % G;
  return {g * lane + dg % lane, int(bits * (dg / lane))};
}

// Piece c of one row as 8 floats (raw codes for packed rows; the affine map is applied per group).
template <class V, int BITS>
inline typename V::F load8(const uint8_t* row, Piece pc) {
  if constexpr (BITS == 32)
    return V::load(reinterpret_cast<const float*>(row + pc.off));
  else if constexpr (BITS == 16)
    return V::half8(reinterpret_cast<const uint16_t*>(row + pc.off));
  else
    return V::template codes8<BITS>(row + pc.off, pc.shift);
}

// scales / zeros of tokens [tok, tok+n) for group g, as floats in out[0..n) (zero padded to kBlock)
template <class V>
inline void load_affine(const uint16_t* p, int64_t groups, int64_t tok, int n, int64_t g, float* out) {
  int j = 0;
  if (groups == 1)
    for (; j + 8 <= n; j += 8) V::store(out + j, V::half8(p + tok + j));
  for (; j < n; ++j) out[j] = half_to_float(p[(tok + j) * groups + g]);
  for (; j < kBlock; ++j) out[j] = 0.0f;
}

// Calls fn(c, h) for the pieces c in [c0, c1) (an even count), h = c % 2 as a constant; with
// FD > 0 fully unrolled with c a constant too, so offsets, shifts and register indices fold.
template <class Fn, int... I>
inline void unroll_seq(Fn&& fn, std::integer_sequence<int, I...>) {
  (fn(std::integral_constant<int, I>{}, std::integral_constant<int, I % 2>{}), ...);
}
template <int FD, class Fn>
inline void for_pieces(int64_t c0, int64_t c1, Fn&& fn) {
  if constexpr (FD > 0) {
    unroll_seq(fn, std::make_integer_sequence<int, FD / 8>{});  // c0 = 0, c1 = FD / 8 here
  } else {
    for (int64_t c = c0; c < c1; c += 2) {
      fn(c, std::integral_constant<int, 0>{});
      fn(c + 1, std::integral_constant<int, 1>{});
    }
  }
}

// Key scores of one block with the int8 query (w.q_int, so D == G == 64): dot[r][j] = qscale_r *
// sum_d q8_r[d] * code_j[d], an exact integer sum scaled once. Per key this is one load, 2-4
// bit ops and 2 vpmaddubsw + 2 adds per query row, where the fp32 query needs 8 widen-shift-
// convert steps and 24 FMAs; the scale and zero of the group are applied after, as for fp32.
template <class V, int BITS, int RT>
void q8_key_dots(const uint8_t* rows, int64_t row_bytes, int n, const Tile& w, float (*out)[kBlock]) {
  typename V::Q q[RT][V::kQRegs];
  for (int r = 0; r < RT; ++r) V::load_q(w.q8[r], q[r]);
  typename V::C c[V::code_regs(BITS)];
  using I = typename V::I;
  int j0 = 0;
  for (; j0 + 8 <= n; j0 += 8) {  // partials reduced 4 keys at a time: 4 * RT live, not 8 * RT
    I half[2][RT];
    for (int h = 0; h < 2; ++h) {
      I p[4][RT];
      for (int t = 0; t < 4; ++t) {
        V::template codes64<BITS>(rows + (j0 + 4 * h + t) * row_bytes, c);
        for (int r = 0; r < RT; ++r) p[t][r] = V::template dot64<BITS>(c, q[r]);
      }
      for (int r = 0; r < RT; ++r) half[h][r] = V::reduce4i(p[0][r], p[1][r], p[2][r], p[3][r]);
    }
    for (int r = 0; r < RT; ++r) V::store(out[r] + j0, V::mul(V::finish8i(half[0][r], half[1][r]), V::set1(w.qscale[r])));
  }
  for (; j0 < n; ++j0) {
    V::template codes64<BITS>(rows + j0 * row_bytes, c);
    for (int r = 0; r < RT; ++r) out[r][j0] = V::hsumi(V::template dot64<BITS>(c, q[r])) * w.qscale[r];
  }
}

// The loop nests are shaped by the FMA count: at decode every code feeds RT (= 3 for SmolLM2)
// FMAs on each side, so the aim is that nothing else (loads, index math, horizontal sums, FMA
// latency) costs more than those FMAs. Codes are widened straight from memory 8 at a time.
template <class V, int BITS, int RT, int FD>
void simd_segment(const SrcView& s, const Segment& seg, int64_t D_, int64_t G_, Tile& w) {
  // FD > 0: head_dim == group_size == FD at compile time (SmolLM2: 64), so piece offsets and
  // shifts fold into immediates and the piece loops unroll.
  const int64_t D = FD > 0 ? FD : D_, G = FD > 0 ? FD : G_;
  using F = typename V::F;
  constexpr bool kAffine = BITS <= 8;
  const bool causal = seg.src == 4;
  const int64_t groups = kAffine ? D / G : 1, gpieces = (kAffine ? G : D) / 8, pieces = D / 8;  // gpieces is even
  Piece pcs[kMaxHeadDim / 8];
  for (int64_t c = 0; c < pieces; ++c) pcs[c] = piece(BITS, G, c);
  auto at = [&](int64_t c) { return FD > 0 ? piece(BITS, FD, c) : pcs[c]; };
  alignas(64) float score[RT][kBlock], dot[RT][kBlock], p[RT][kBlock];
  alignas(64) float wv[RT][kMaxGroups][kBlock];  // p * value scale, per group
  alignas(64) float ks[kBlock], kz[kBlock], vs[kBlock], vz[kBlock];
  alignas(32) float part[RT][8][8];
  // Keys per step: the TK rows share each q load; 2*RT*TK accumulators (even / odd pieces: two
  // short FMA chains per dot instead of one long one). More keys per step measured slower at
  // RT >= 2: the extra accumulators crowd out the temporaries and spill.
  constexpr int TK = RT == 1 ? 2 : 1;
  // Value pieces per pass: RT*NV accumulators in registers, each broadcast weight serves NV pieces.
  // (RT = 3: 9 accumulators + 3 weights + 2 temporaries; 12 accumulators would spill one to the
  // stack, putting a store-load round trip into the chain.)
  constexpr int NV = RT == 1 ? 8 : RT == 2 ? 4 : RT == 3 ? 3 : 2;

  for (int64_t t0 = seg.begin; t0 < seg.end; t0 += kBlock) {
    const int n = int(std::min<int64_t>(kBlock, seg.end - t0));
    // 1) scores[r][j] = q_r . k_j, group by group (for packed rows: scale * (q . code) + zero * sum q)
    if (n < kBlock)  // the tail's unused lanes must hold finite values (they get -inf below)
      for (int r = 0; r < RT; ++r) std::fill(dot[r] + n, dot[r] + kBlock, 0.0f);
    for (int64_t g = 0; g < groups; ++g) {
      bool int_keys = false;
      if constexpr (FD == 64 && kAffine) {
        if ((int_keys = w.q_int)) q8_key_dots<V, BITS, RT>(s.k + t0 * s.row_bytes, s.row_bytes, n, w, dot);
      }
      for (int j0 = 0; j0 < n && !int_keys; j0 += 8) {
        const int cnt = std::min(8, n - j0);
        auto dots = [&](auto tk_tag, int jj) {  // part[r][jj + t] = 8 partial sums of q_r . k_(j0+jj+t)
          constexpr int K = decltype(tk_tag)::value;
          F a[RT][K][2];
          for (int r = 0; r < RT; ++r)
            for (int t = 0; t < K; ++t) a[r][t][0] = a[r][t][1] = V::zero();
          const uint8_t* row = s.k + (t0 + j0 + jj) * s.row_bytes;
          for_pieces<FD>(g * gpieces, (g + 1) * gpieces, [&](auto c, auto h) {
            const Piece pc = at(c);
            for (int t = 0; t < K; ++t) {
              const F x = load8<V, BITS>(row + t * s.row_bytes, pc);
              for (int r = 0; r < RT; ++r) a[r][t][h] = V::fma(V::load(w.qs[r] + 8 * c), x, a[r][t][h]);
            }
          });
          for (int r = 0; r < RT; ++r)
            for (int t = 0; t < K; ++t) V::store(part[r][jj + t], V::add(a[r][t][0], a[r][t][1]));
        };
        int jj = 0;
        for (; jj + TK <= cnt; jj += TK) dots(std::integral_constant<int, TK>{}, jj);
        for (; jj < cnt; ++jj) dots(std::integral_constant<int, 1>{}, jj);
        for (int r = 0; r < RT; ++r) {
          if (cnt == 8) {
            F tmp[8];
            for (int i = 0; i < 8; ++i) tmp[i] = V::load(part[r][i]);
            V::store(dot[r] + j0, V::reduce8(tmp));
          } else {
            for (jj = 0; jj < cnt; ++jj) dot[r][j0 + jj] = V::hsum(V::load(part[r][jj]));
          }
        }
      }
      if constexpr (kAffine) {
        load_affine<V>(s.ks, groups, t0, n, g, ks);
        load_affine<V>(s.kz, groups, t0, n, g, kz);
        for (int r = 0; r < RT; ++r) {
          if constexpr (V::kWide) {
            V::affine_block(ks, dot[r], kz, w.qsum[r][g], g > 0, score[r]);
            continue;
          }
          const F qz = V::set1(w.qsum[r][g]);
          for (int j = 0; j < kBlock; j += 8) {
            F sc = V::fma(V::load(ks + j), V::load(dot[r] + j), V::mul(V::load(kz + j), qz));
            if (g > 0) sc = V::add(V::load(score[r] + j), sc);  // (no zeroing pass over score)
            V::store(score[r] + j, sc);
          }
        }
      } else {
        for (int r = 0; r < RT; ++r)
          for (int j = 0; j < kBlock; j += 8) V::store(score[r] + j, V::load(dot[r] + j));
      }
    }
    // 2) online softmax over the block, per row; masked keys (causal, padding) are -inf
    for (int r = 0; r < RT; ++r) {
      const int64_t visible = causal ? std::min<int64_t>(n, w.t[r] - t0 + 1) : n;
      for (int j = int(std::max<int64_t>(visible, 0)); j < kBlock; ++j) score[r][j] = kNegInf;
      F mx = V::load(score[r]);
      for (int j = 8; j < kBlock; j += 8) mx = V::max(mx, V::load(score[r] + j));
      const float m_new = std::max(w.m[r], V::hmax(mx));
      if (m_new == kNegInf) {  // nothing visible to this row yet
        for (int j = 0; j < kBlock; ++j) p[r][j] = 0.0f;
        continue;
      }
      const float alpha = std::exp(w.m[r] - m_new);
      const F mv = V::set1(m_new);
      F ps = V::zero(), ps2 = V::zero();
      if constexpr (V::kWide) {  // exp 16 lanes at a time, the sums as below (same order, same bits)
        V::exp_block(score[r], m_new, p[r]);
        for (int j = 0; j < kBlock; j += 8) {
          const F e = V::load(p[r] + j);
          ps = V::add(ps, e);
          ps2 = V::fma(e, e, ps2);
        }
      } else {
        for (int j = 0; j < kBlock; j += 8) {
          const F e = V::exp(V::sub(V::load(score[r] + j), mv));
          V::store(p[r] + j, e);
          ps = V::add(ps, e);
          ps2 = V::fma(e, e, ps2);
        }
      }
      w.l[r] = w.l[r] * alpha + V::hsum(ps);
      w.l2[r] = w.l2[r] * alpha * alpha + V::hsum(ps2);
      w.m[r] = m_new;
      if (alpha != 1.0f) {
        const F av = V::set1(alpha);
        for (int64_t d = 0; d < D; d += 8) V::store(w.acc[r] + d, V::mul(V::load(w.acc[r] + d), av));
        for (int64_t g = 0; g < groups; ++g) w.zacc[r][g] *= alpha;
      }
    }
    // 3) values: acc += (p * scale) * code, zacc += p * zero (packed); acc += p * v (fp16/fp32)
    for (int64_t g = 0; g < groups; ++g) {
      if constexpr (kAffine) {
        load_affine<V>(s.vs, groups, t0, n, g, vs);
        load_affine<V>(s.vz, groups, t0, n, g, vz);
        for (int r = 0; r < RT; ++r) {
          F zs = V::zero();
          if constexpr (V::kWide) {
            V::mul_block(p[r], vs, wv[r][g]);
            for (int j = 0; j < kBlock; j += 8) zs = V::fma(V::load(p[r] + j), V::load(vz + j), zs);
          } else {
            for (int j = 0; j < kBlock; j += 8) {
              V::store(wv[r][g] + j, V::mul(V::load(p[r] + j), V::load(vs + j)));
              zs = V::fma(V::load(p[r] + j), V::load(vz + j), zs);
            }
          }
          w.zacc[r][g] += V::hsum(zs);
        }
      } else {
        for (int r = 0; r < RT; ++r)
          for (int j = 0; j < kBlock; ++j) wv[r][g][j] = p[r][j];
      }
    }
    // NV pieces per pass over the block; a pass stays inside one group (one weight per token).
    auto pass = [&](auto nv_tag, int64_t c0) {
      constexpr int C = decltype(nv_tag)::value;
      const int64_t g = kAffine ? c0 / gpieces : 0;
      F a[C][RT];
      for (int k = 0; k < C; ++k)
        for (int r = 0; r < RT; ++r) a[k][r] = V::load(w.acc[r] + (c0 + k) * 8);
      const uint8_t* row = s.v + t0 * s.row_bytes;
      for (int j = 0; j < n; ++j, row += s.row_bytes) {
        F wj[RT];
        for (int r = 0; r < RT; ++r) wj[r] = V::set1(wv[r][g][j]);
        for (int k = 0; k < C; ++k) {
          const F x = load8<V, BITS>(row, at(c0 + k));
          for (int r = 0; r < RT; ++r) a[k][r] = V::fma(wj[r], x, a[k][r]);
        }
      }
      for (int k = 0; k < C; ++k)
        for (int r = 0; r < RT; ++r) V::store(w.acc[r] + (c0 + k) * 8, a[k][r]);
    };
    if constexpr (V::kWide && FD == 64) {  // one 16-lane pass over the whole row
      V::template values64<BITS, RT>(s.v + t0 * s.row_bytes, s.row_bytes, n, wv, w.acc);
      continue;
    }
    int64_t c0 = 0;
    for (; c0 + NV <= pieces; c0 += NV) {
      if (!kAffine || c0 / gpieces == (c0 + NV - 1) / gpieces)
        pass(std::integral_constant<int, NV>{}, c0);
      else
        for (int64_t k = 0; k < NV; ++k) pass(std::integral_constant<int, 1>{}, c0 + k);
    }
    for (; c0 + 2 <= pieces; c0 += 2) pass(std::integral_constant<int, 2>{}, c0);  // (gpieces is even)
    if (c0 < pieces) pass(std::integral_constant<int, 1>{}, c0);
  }
}

template <class V, int RT, int FD>
void simd_segment_any(const SrcView& s, const Segment& seg, int64_t D, int64_t G, Tile& w) {
  switch (s.bits) {
    case 2: return simd_segment<V, 2, RT, FD>(s, seg, D, G, w);
    case 4: return simd_segment<V, 4, RT, FD>(s, seg, D, G, w);
    case 8: return simd_segment<V, 8, RT, FD>(s, seg, D, G, w);
    case 16: return simd_segment<V, 16, RT, FD>(s, seg, D, G, w);
    default: return simd_segment<V, 32, RT, FD>(s, seg, D, G, w);
  }
}

template <class V>
void simd_segment_rows(const SrcView& s, const Segment& seg, int64_t D, int64_t G, Tile& w) {
  const bool fixed64 = D == 64 && G == 64;  // the common layout gets its own compiled loops
  switch (w.rows * 2 + fixed64) {
    case 2: return simd_segment_any<V, 1, 0>(s, seg, D, G, w);
    case 3: return simd_segment_any<V, 1, 64>(s, seg, D, G, w);
    case 4: return simd_segment_any<V, 2, 0>(s, seg, D, G, w);
    case 5: return simd_segment_any<V, 2, 64>(s, seg, D, G, w);
    case 6: return simd_segment_any<V, 3, 0>(s, seg, D, G, w);
    case 7: return simd_segment_any<V, 3, 64>(s, seg, D, G, w);
    case 9: return simd_segment_any<V, 4, 64>(s, seg, D, G, w);
    default: return simd_segment_any<V, 4, 0>(s, seg, D, G, w);
  }
}

// The SIMD loops need whole 16-dim chunks inside one group and one shift lane.
inline bool simd_layout_ok(const AttentionArgs& a) {
  if (a.head_dim % 16) return false;
  for (const Pool& p : a.pools)
    if (p.bits && p.bits < 16 && (a.group_size % 16 || (a.group_size * p.bits / 8) % 16)) return false;
  return true;
}

// How the call is cut into work items: (batch, KV head, row tile, part), part = a run of segments.
struct Plan {
  int64_t groups_q = 0, rows = 0, tiles = 0;
  std::vector<Segment> segments;
  std::vector<std::pair<int, int>> parts;  // [first, last) into segments
  int64_t items() const { return tiles * int64_t(parts.size()); }
};

inline Plan make_plan(const AttentionArgs& a) {
  Plan pl;
  pl.groups_q = a.q_heads / a.kv_heads;
  pl.rows = pl.groups_q * a.chunk_len;  // row g*T + t: query head h*G + g at chunk position t
  pl.tiles = (pl.rows + kTileRows - 1) / kTileRows;
  // Few (batch, head, tile) triples, as in decoding: also split the cache so every core works
  // (partial softmax states merged by log-sum-exp). The rule ignores the thread count, so a
  // result does not depend on it.
  const bool split = a.batch * a.kv_heads * pl.tiles < 16;
  for (int w = 0; w < kNumWidths; ++w) {
    const int64_t n = a.pools[w].len;
    const int64_t step = split ? kSplit : std::max<int64_t>(n, 1);
    for (int64_t s = 0; s < n; s += step) pl.segments.push_back({w, s, std::min(n, s + step)});
  }
  pl.segments.push_back({4, 0, a.chunk_len});
  const int ns = int(pl.segments.size());
  if (split)
    for (int i = 0; i < ns; ++i) pl.parts.push_back({i, i + 1});
  else
    pl.parts.push_back({0, ns});
  return pl;
}

// Partial state layout in the scratch buffer, per item: kTileRows x (m, l, l2, acc[D]).
inline int64_t state_floats(int64_t D) { return kTileRows * (3 + D); }

// Largest key(x[i]) of n values (init if n == 0) with 16 independent chains: one chain would be a
// latency-bound loop, paid for every row of every work item or vocabulary (exact in any order;
// the compiler vectorizes the chains).
template <class Key>
inline float max16(const float* x, int64_t n, float init, Key key) {
  float acc[16];
  std::fill(acc, acc + 16, init);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] = std::max(acc[k], key(x[i + k]));
  for (; i < n; ++i) acc[0] = std::max(acc[0], key(x[i]));
  for (int k = 1; k < 16; ++k) acc[0] = std::max(acc[0], acc[k]);
  return acc[0];
}
inline float amax16(const float* x, int64_t n) {
  return max16(x, n, 0.0f, [](float v) { return std::fabs(v); });
}

// An int8 query row (query_bits 8), in place: qs becomes q_hat = q8 * s. The same fp32 steps as
// adaptive_kv.formats.quantize_query and the ONNX translation (a differently rounded s or quotient
// would move a q8 value by one); every step is exactly rounded, so the vector loop (run for each
// work item, so it must be cheap) and the scalar tail agree bit for bit.
inline void quantize_query(float* qs, int64_t D, int8_t* q8, float& s) {
  s = amax16(qs, D) / 127.0f;
  if (!(s > 0.0f)) {  // an all-zero row
    std::fill(q8, q8 + D, int8_t(0));
    std::fill(qs, qs + D, 0.0f);
    return;
  }
  int64_t d = 0;
#if defined(KVQ_HAVE_AVX2)
  const __m256 sv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  alignas(32) int32_t c32[8];
  for (; d + 8 <= D; d += 8) {
    __m256 c = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(qs + d), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    c = _mm256_min_ps(hi, _mm256_max_ps(lo, c));
    _mm256_storeu_ps(qs + d, _mm256_mul_ps(c, sv));
    _mm256_store_si256(reinterpret_cast<__m256i*>(c32), _mm256_cvtps_epi32(c));
    for (int k = 0; k < 8; ++k) q8[d + k] = int8_t(c32[k]);
  }
#elif defined(KVQ_HAVE_NEON)
  const float32x4_t sv = vdupq_n_f32(s), lo = vdupq_n_f32(-127.0f), hi = vdupq_n_f32(127.0f);
  for (; d + 4 <= D; d += 4) {
    const float32x4_t c = vminq_f32(hi, vmaxq_f32(lo, vrndnq_f32(vdivq_f32(vld1q_f32(qs + d), sv))));
    vst1q_f32(qs + d, vmulq_f32(c, sv));
    int32_t c32[4];
    vst1q_s32(c32, vcvtq_s32_f32(c));
    for (int k = 0; k < 4; ++k) q8[d + k] = int8_t(c32[k]);
  }
#endif
  for (; d < D; ++d) {
    const float c = std::min(127.0f, std::max(-127.0f, std::nearbyint(qs[d] / s)));
    q8[d] = int8_t(c);
    qs[d] = c * s;
  }
}

// A tile's starting state: its query rows (scaled; for query_bits 8 also quantized) with their
// per-group sums, and an empty softmax state.
inline void prepare_tile(const AttentionArgs& a, const Plan& pl, int64_t bh, int64_t tile, Tile& w) {
  const int64_t D = a.head_dim, G = a.group_size, T = a.chunk_len;
  const int64_t b = bh / a.kv_heads, h = bh % a.kv_heads;
  w.q_int = a.query_bits == 8 && D == 64 && G == 64;  // the integer key loops are written for one 64-dim group
  const int64_t r0 = tile * kTileRows;
  w.rows = int(std::min<int64_t>(kTileRows, pl.rows - r0));
  for (int r = 0; r < kTileRows; ++r) {
    w.m[r] = kNegInf;
    w.l[r] = w.l2[r] = 0.0f;
    std::fill(w.acc[r], w.acc[r] + D, 0.0f);
    std::fill(w.zacc[r], w.zacc[r] + kMaxGroups, 0.0f);
    std::fill(w.qs[r], w.qs[r] + D, 0.0f);
    std::fill(w.qsum[r], w.qsum[r] + kMaxGroups, 0.0f);
    w.t[r] = -1;
    if (r >= w.rows) continue;
    const int64_t row = r0 + r, g = row / T, t = row % T;
    w.t[r] = t;
    const float* q = a.q + ((b * a.q_heads + h * pl.groups_q + g) * T + t) * D;
    for (int64_t d = 0; d < D; ++d) w.qs[r][d] = q[d] * a.scale;
    if (a.query_bits == 8) quantize_query(w.qs[r], D, w.q8[r], w.qscale[r]);
    if (G % 16 == 0 && D % G == 0)  // the SIMD path's zero term (G % 16 == 0: <= kMaxGroups groups)
      for (int64_t g0 = 0; g0 < D / G; ++g0)  // in order, as always: 8da4w activation rounding turns last-bit changes into 1e-2 logits
        for (int64_t d = g0 * G; d < (g0 + 1) * G; ++d) w.qsum[r][g0] += w.qs[r][d];
  }
}

// A prepared tile's state into a work item's own Tile: only the D dims in use (a whole Tile is
// ~10 KB, mostly the kMaxHeadDim tails; copying it was ~3% of an 8192-token decode call).
inline void copy_prepared(const Tile& from, int64_t D, Tile& to) {
  to.rows = from.rows;
  to.q_int = from.q_int;
  for (int r = 0; r < kTileRows; ++r) {
    to.t[r] = from.t[r];
    if (r < from.rows && from.q_int) {  // (prepare_tile leaves the int8 rows of unused rows unset)
      to.qscale[r] = from.qscale[r];
      std::copy(from.q8[r], from.q8[r] + D, to.q8[r]);
    }
    to.m[r] = from.m[r];
    to.l[r] = from.l[r];
    to.l2[r] = from.l2[r];
    std::copy(from.qs[r], from.qs[r] + D, to.qs[r]);
    std::copy(from.qsum[r], from.qsum[r] + kMaxGroups, to.qsum[r]);
    std::copy(from.acc[r], from.acc[r] + D, to.acc[r]);
    std::copy(from.zacc[r], from.zacc[r] + kMaxGroups, to.zacc[r]);
  }
}

// One work item. `start`: the tile's prepared state when the call was split over the cache (the
// parts of a tile share it: preparing it in each of the 16 parts of an 8192-token int8-query
// decode call was ~4% of the call with hot caches), else null.
inline void run_item(const AttentionArgs& a, const Plan& pl, Isa isa, int64_t bh, int64_t tile, int part, const Tile* start, float* state) {
  const int64_t D = a.head_dim, G = a.group_size;
  const int64_t b = bh / a.kv_heads, h = bh % a.kv_heads;
  Tile w;
  if (start)
    copy_prepared(*start, D, w);
  else
    prepare_tile(a, pl, bh, tile, w);
  const bool simd = isa != Isa::kScalar && simd_layout_ok(a);
  for (int i = pl.parts[part].first; i < pl.parts[part].second; ++i) {
    const Segment& seg = pl.segments[i];
    const SrcView s = make_view(a, seg.src, b, h);
    if (!simd) {
      scalar_segment(s, seg, D, G, w);
      continue;
    }
#if defined(KVQ_HAVE_AVX512)
    if (isa == Isa::kAvx512) simd_segment_rows<Avx512>(s, seg, D, G, w);
#endif
#if defined(KVQ_HAVE_AVX2)
    if (isa == Isa::kAvx2) simd_segment_rows<Avx2>(s, seg, D, G, w);
#endif
#if defined(KVQ_HAVE_NEON)
    if (isa == Isa::kNeon) simd_segment_rows<Neon>(s, seg, D, G, w);
#endif
  }
  for (int r = 0; r < kTileRows; ++r) {  // fold the per-group zero terms into the value sums
    float* st = state + r * (3 + D);
    st[0] = w.m[r];
    st[1] = w.l[r];
    st[2] = w.l2[r];
    for (int64_t d = 0; d < D; ++d) st[3 + d] = w.acc[r][d];
    if (G % 16 == 0 && D % G == 0)
      for (int64_t g0 = 0; g0 < D / G; ++g0)
        for (int64_t d = g0 * G; d < (g0 + 1) * G; ++d) st[3 + d] += w.zacc[r][g0];
  }
}


// Merges the parts of one (batch, head, tile) with log-sum-exp and writes its normalized rows.
inline void merge_tile(const AttentionArgs& a, const Plan& pl, int64_t ht, const float* base) {
  const int64_t D = a.head_dim, T = a.chunk_len, nparts = int64_t(pl.parts.size()), per_item = state_floats(D);
  const int64_t bh = ht / pl.tiles, tile = ht % pl.tiles, b = bh / a.kv_heads, h = bh % a.kv_heads;
  float acc[kMaxHeadDim];
  for (int r = 0; r < kTileRows && tile * kTileRows + r < pl.rows; ++r) {
    float m = kNegInf;
    for (int64_t p = 0; p < nparts; ++p) m = std::max(m, base[p * per_item + r * (3 + D)]);
    float l = 0.0f, l2 = 0.0f;
    std::fill(acc, acc + D, 0.0f);
    for (int64_t p = 0; p < nparts; ++p) {
      const float* st = base + p * per_item + r * (3 + D);
      if (st[0] == kNegInf) continue;  // this part saw no key of this row
      const float c = std::exp(st[0] - m);
      l += st[1] * c;
      l2 += st[2] * c * c;
      for (int64_t d = 0; d < D; ++d) acc[d] += st[3 + d] * c;
    }
    const int64_t row = tile * kTileRows + r, g = row / T, t = row % T;
    const int64_t oq = (b * a.q_heads + h * pl.groups_q + g) * T + t;
    const float inv = 1.0f / l;
    for (int64_t d = 0; d < D; ++d) a.out[oq * D + d] = acc[d] * inv;
    if (a.sum_p2) a.sum_p2[oq] = l2 * inv * inv;
  }
}

}  // namespace detail

// The fused attention. `par_for(n, fn)` must call fn(begin, end) over a cover of [0, n).
// One parallel region: whichever thread finishes the last part of a (batch, head, tile) merges
// it, so a call pays one fork-join (a second one costs a scheduler slice on a busy machine).
template <class ParFor>
void packed_attention(const AttentionArgs& a, Isa isa, ParFor&& par_for) {
  using namespace detail;
  const Plan pl = make_plan(a);
  const int64_t nparts = int64_t(pl.parts.size()), per_item = state_floats(a.head_dim);
  const int64_t heads = a.batch * a.kv_heads, tiles = heads * pl.tiles;
  std::vector<float> states(size_t(heads * pl.items() * per_item));
  std::vector<std::atomic<int>> done(static_cast<size_t>(tiles));
  for (auto& d : done) d.store(0, std::memory_order_relaxed);
  // Split calls (decode: few tiles, many parts) prepare each tile once, before the fork; the
  // unsplit ones (prefill: many tiles, one part each) prepare inside their only item.
  std::vector<Tile> starts(nparts > 1 ? size_t(tiles) : 0);
  for (int64_t ht = 0; ht < int64_t(starts.size()); ++ht) prepare_tile(a, pl, ht / pl.tiles, ht % pl.tiles, starts[size_t(ht)]);
  par_for(heads * pl.items(), [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t bh = it / pl.items(), rest = it % pl.items(), ht = bh * pl.tiles + rest / nparts;
      const Tile* start = starts.empty() ? nullptr : &starts[size_t(ht)];
      run_item(a, pl, isa, bh, rest / nparts, int(rest % nparts), start, states.data() + it * per_item);
      // acq_rel: the last finisher sees every other part's state before merging
      if (done[size_t(ht)].fetch_add(1, std::memory_order_acq_rel) + 1 == nparts)
        merge_tile(a, pl, ht, states.data() + ht * nparts * per_item);
    }
  });
}

// A par_for that runs everything on the calling thread.
struct SerialFor {
  template <class Fn>
  void operator()(int64_t n, Fn&& fn) const {
    if (n > 0) fn(int64_t(0), n);
  }
};

// ---------------------------------------------------------------------------------------------
// logit_stats: for each row z of logits [rows, V], with m = max z, s = sum e^(z - m) and
// t = sum e^(z - m) (z - m): entropy = -sum p log p = log s - t / s (nats), confidence =
// max p = 1 / s. In the exported graph the same features were log_softmax, exp, mul, sum and
// amax over the 49152-entry vocabulary, five passes and ~0.3 ms of every decode step.
// ---------------------------------------------------------------------------------------------
inline Error check_logit_args(int64_t rows, int64_t vocab) {
  if (rows < 0 || vocab < 1) return make_error("logits need a last (vocabulary) dim of at least 1, got %lld", (long long)vocab);
  return Error{};
}

namespace detail {
// (s, t) of one row, 16 values per step in two chains; exponents below -87 give 0 (and no 0 * -inf).
template <class V>
inline void logit_sums(const float* z, int64_t n, float m, float& s, float& t) {
  using F = typename V::F;
  const F mv = V::set1(m), lo = V::set1(-87.0f);
  F s0 = V::zero(), s1 = V::zero(), t0 = V::zero(), t1 = V::zero();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const F x0 = V::max(V::sub(V::load(z + i), mv), lo), x1 = V::max(V::sub(V::load(z + i + 8), mv), lo);
    const F e0 = V::exp(x0), e1 = V::exp(x1);
    s0 = V::add(s0, e0);
    s1 = V::add(s1, e1);
    t0 = V::fma(e0, x0, t0);
    t1 = V::fma(e1, x1, t1);
  }
  s = V::hsum(V::add(s0, s1));
  t = V::hsum(V::add(t0, t1));
  for (; i < n; ++i) {
    const float x = std::max(z[i] - m, -87.0f), e = std::exp(x);
    s += e;
    t += e * x;
  }
}

// The same sums in 16 chains, as the SIMD paths keep them (one chain loses ~1e-5 over 49152 terms).
inline void logit_sums_scalar(const float* z, int64_t n, float m, float& s, float& t) {
  float sc[16] = {}, tc[16] = {};
  for (int64_t i = 0; i < n; ++i) {
    const float x = std::max(z[i] - m, -87.0f), e = std::exp(x);
    sc[i % 16] += e;
    tc[i % 16] += e * x;
  }
  s = t = 0.0f;
  for (int k = 0; k < 16; ++k) {
    s += sc[k];
    t += tc[k];
  }
}
}  // namespace detail

// z: [rows, vocab] fp32 (finite) -> entropy [rows], confidence [rows].
template <class ParFor>
void logit_stats(const float* z, int64_t rows, int64_t vocab, float* entropy, float* confidence, Isa isa, ParFor&& par_for) {
  par_for(rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* x = z + r * vocab;
      const float m = detail::max16(x, vocab, detail::kNegInf, [](float v) { return v; });
      float s = 0.0f, t = 0.0f;
      switch (isa) {
#if defined(KVQ_HAVE_AVX2)
        case Isa::kAvx512:
        case Isa::kAvx2: detail::logit_sums<detail::Avx2>(x, vocab, m, s, t); break;
#endif
#if defined(KVQ_HAVE_NEON)
        case Isa::kNeon: detail::logit_sums<detail::Neon>(x, vocab, m, s, t); break;
#endif
        default: detail::logit_sums_scalar(x, vocab, m, s, t);
      }
      entropy[r] = std::log(s) - t / s;
      confidence[r] = 1.0f / s;
    }
  });
}

}  // namespace kvq
