// kvq_test.cpp — the kernel header alone, no torch: built with AddressSanitizer + UBSan and run
// by tests/test_runtime_ops.py. Checks the fp16 conversions, the packer's invariants, and both
// attention paths (scalar reference and the SIMD path of this build) against a naive double
// precision softmax over explicitly dequantized rows, on a grid that reaches every code path:
//   pool mixes (each width absent / partial / full, all four at once) -> every source type;
//   GQA groups 1 and 3, T = 1, 5, 33        -> row tiles of 1..4 rows and the causal chunk;
//   cache fills 0, 7 (< one 8-token reduction), 100, 1100 (> kSplit) -> block tails and splits;
//   batch 1 (split over the cache) and batch 6 (not split).
// `kvq_test quick` (used under qemu) skips T = 33 and the 1100-token fills.
// Prints "N passed, N failed" and exits non-zero on any failure.
#include "../kvq_kernels.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

int g_pass = 0, g_fail = 0;

void expect(bool ok, const char* what) {
  if (ok) {
    ++g_pass;
  } else {
    ++g_fail;
    std::printf("FAIL: %s\n", what);
  }
}

// A par_for over std::threads: proves work items and the merge are independent of threading.
struct ThreadFor {
  int threads;
  template <class Fn>
  void operator()(int64_t n, Fn&& fn) const {
    std::vector<std::thread> pool;
    const int64_t step = (n + threads - 1) / threads;
    for (int64_t s = 0; s < n; s += step) pool.emplace_back([&fn, s, step, n] { fn(s, std::min(n, s + step)); });
    for (auto& t : pool) t.join();
  }
};

void test_half() {
  bool round_trip = true;
  for (uint32_t h = 0; h < 65536; ++h) {
    const bool nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
    if (!nan && kvq::float_to_half(kvq::half_to_float(uint16_t(h))) != h) round_trip = false;
  }
  expect(round_trip, "every fp16 survives half -> float -> half");
  // Ties to even at the fp16 grid: 1 + 2^-11 is halfway between 1 and 1 + 2^-10.
  expect(kvq::float_to_half(1.0f + 0x1p-11f) == 0x3c00, "tie rounds down to even");
  expect(kvq::float_to_half(1.0f + 3 * 0x1p-11f) == 0x3c02, "tie rounds up to even");
  expect(kvq::float_to_half(65519.0f) == 0x7bff && kvq::float_to_half(65520.0f) == 0x7c00, "overflow threshold");
  expect(kvq::float_to_half(0x1p-25f) == 0 && kvq::float_to_half(0x1.8p-25f) == 1, "subnormal rounding");
#if defined(KVQ_HAVE_AVX2)
  std::mt19937 rng(1);
  bool same = true;
  for (int i = 0; i < 2000000; ++i) {
    const float f = kvq::bits_to_float(rng());
    if (std::isnan(f)) continue;
    if (kvq::float_to_half(f) != _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)) same = false;
  }
  expect(same, "float_to_half matches the F16C instruction on 2M random floats");
#endif
}

void test_pack() {
  std::mt19937 rng(2);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int bits : {2, 4, 8}) {
    const int D = 64, G = 64, n = 200;
    std::vector<float> x(n * D);
    for (auto& v : x) v = nd(rng) * 3.0f;
    for (int i = 0; i < D; ++i) x[5 * D + i] = 1.25f;  // a constant row: span 0, scale 1
    std::vector<uint8_t> codes(n * D * bits / 8);
    std::vector<uint16_t> sc(n), zr(n);
    kvq::pack_rows(x.data(), n, D, G, bits, codes.data(), sc.data(), zr.data(), kvq::SerialFor{});
    // Reconstruction error is bounded by half a step, except for values the clip search cut off.
    double worst = 0.0;
    const int lane = G * bits / 8;
    for (int r = 0; r < n; ++r) {
      const float s = kvq::half_to_float(sc[r]), z = kvq::half_to_float(zr[r]);
      for (int d = 0; d < D; ++d) {
        const int code = (codes[r * lane + d % lane] >> (bits * (d / lane))) & ((1 << bits) - 1);
        const float xh = code * s + z;
        if (x[r * D + d] >= z && x[r * D + d] <= z + s * ((1 << bits) - 1)) worst = std::max(worst, double(std::fabs(xh - x[r * D + d]) / s));
      }
    }
    char what[96];
    std::snprintf(what, sizeof what, "pack %d bits: in-range values within 0.5 step (+fp16 slack), worst %.3f", bits, worst);
    expect(worst <= 0.5 + 1e-2, what);
    expect(kvq::half_to_float(sc[5]) == 1.0f && kvq::half_to_float(zr[5]) == 1.25f, "constant row: scale 1, zero = value");
  }
  expect(!kvq::check_pack_args(3, 64, 64).ok(), "bits=3 rejected");
  expect(!kvq::check_pack_args(4, 64, 48).ok(), "group not dividing head_dim rejected");
  expect(!kvq::check_pack_args(2, 64, 2).ok(), "group smaller than codes per byte rejected");
  expect(kvq::check_pack_args(4, 64, 64).ok(), "SmolLM2 layout accepted");
}

struct PoolData {
  int bits = 0;
  int64_t cap = 0, len = 0;
  std::vector<uint8_t> k, v;  // codes or fp16 bits
  std::vector<uint16_t> ks, kz, vs, vz;
};

// Fills a pool with random rows through the packer (or fp16), Hkv heads.
PoolData make_pool(int bits, int64_t cap, int64_t len, int Hkv, int D, int G, std::mt19937& rng) {
  PoolData p;
  p.bits = bits;
  p.cap = cap;
  p.len = len;
  if (!cap) return p;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(size_t(Hkv * cap * D));
  for (int kv = 0; kv < 2; ++kv) {
    for (auto& e : x) e = nd(rng);
    if (bits == 16) {
      std::vector<uint8_t>& dst = kv ? p.v : p.k;
      dst.resize(x.size() * 2);
      for (size_t i = 0; i < x.size(); ++i) {
        const uint16_t h = kvq::float_to_half(x[i]);
        std::memcpy(&dst[2 * i], &h, 2);
      }
      continue;
    }
    std::vector<uint8_t>& codes = kv ? p.v : p.k;
    std::vector<uint16_t>& sc = kv ? p.vs : p.ks;
    std::vector<uint16_t>& zr = kv ? p.vz : p.kz;
    codes.resize(x.size() * bits / 8);
    sc.resize(x.size() / G);
    zr.resize(x.size() / G);
    kvq::pack_rows(x.data(), Hkv * cap, D, G, bits, codes.data(), sc.data(), zr.data(), kvq::SerialFor{});
  }
  return p;
}

double dequant(const PoolData& p, bool is_v, int64_t h, int64_t tok, int d, int D, int G) {
  const std::vector<uint8_t>& c = is_v ? p.v : p.k;
  const int64_t row = h * p.cap + tok;
  if (p.bits == 16) {
    uint16_t hv;
    std::memcpy(&hv, &c[size_t(2 * (row * D + d))], 2);
    return kvq::half_to_float(hv);
  }
  const int lane = G * p.bits / 8, g = d / G, dg = d % G;
  const int code = (c[size_t(row * D * p.bits / 8 + g * lane + dg % lane)] >> (p.bits * (dg / lane))) & ((1 << p.bits) - 1);
  const std::vector<uint16_t>& sc = is_v ? p.vs : p.ks;
  const std::vector<uint16_t>& zr = is_v ? p.vz : p.kz;
  return code * double(kvq::half_to_float(sc[size_t(row * (D / G) + g)])) + kvq::half_to_float(zr[size_t(row * (D / G) + g)]);
}

struct Case {
  int B, Hq, Hkv, T, D, G;
  int64_t fill[4], cap[4];  // per width 2, 4, 8, 16
  int query_bits = 32;
};

void run_case(const Case& c, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<PoolData> pools;
  for (int w = 0; w < 4; ++w) pools.push_back(make_pool(kvq::kWidths[w], c.cap[w], c.fill[w], c.Hkv, c.D, c.G, rng));
  std::vector<float> q(size_t(c.B * c.Hq * c.T * c.D)), kc(size_t(c.B * c.Hkv * c.T * c.D)), vc(kc.size());
  for (auto& e : q) e = nd(rng) * 2.0f;  // sharp-ish softmax
  for (auto& e : kc) e = nd(rng);
  for (auto& e : vc) e = nd(rng);
  kvq::AttentionArgs a;
  a.batch = c.B;
  a.q_heads = c.Hq;
  a.kv_heads = c.Hkv;
  a.chunk_len = c.T;
  a.head_dim = c.D;
  a.group_size = c.G;
  a.q = q.data();
  a.k_chunk = kc.data();
  a.v_chunk = vc.data();
  a.scale = 1.0f / std::sqrt(float(c.D));
  a.query_bits = c.query_bits;
  // The reference's query: q * scale, or with query_bits 8 its int8 rows dequantized (q_hat).
  std::vector<float> qref(q.size());
  for (size_t i = 0; i < q.size(); ++i) qref[i] = q[i] * a.scale;
  if (c.query_bits == 8) {
    std::vector<int8_t> q8(size_t(c.D));
    float s = 0;
    for (size_t r = 0; r < q.size() / size_t(c.D); ++r) kvq::detail::quantize_query(&qref[r * size_t(c.D)], c.D, q8.data(), s);
  }
  for (int w = 0; w < 4; ++w) {
    const PoolData& p = pools[w];
    if (!p.cap) continue;
    a.pools[w] = {p.bits, p.len, p.cap, p.k.data(), p.v.data(), p.ks.data(), p.kz.data(), p.vs.data(), p.vz.data()};
  }
  expect(kvq::check_attention_args(a).ok(), "grid case passes the argument check");

  // Naive reference in double: every key of every pool, then the chunk causally.
  const int G = c.Hq / c.Hkv;
  std::vector<double> ref(q.size()), ref_p2(size_t(c.B * c.Hq * c.T));
  for (int b = 0; b < c.B; ++b)
    for (int hq = 0; hq < c.Hq; ++hq)
      for (int t = 0; t < c.T; ++t) {
        const int h = hq / G;
        const float* qr = &qref[size_t(((b * c.Hq + hq) * c.T + t) * c.D)];
        std::vector<double> s;
        std::vector<std::vector<double>> vals;
        for (const PoolData& p : pools)
          for (int64_t j = 0; j < p.len; ++j) {
            double dot = 0;
            std::vector<double> v(size_t(c.D));
            for (int d = 0; d < c.D; ++d) {
              dot += double(qr[d]) * dequant(p, false, h, j, d, c.D, c.G);
              v[size_t(d)] = dequant(p, true, h, j, d, c.D, c.G);
            }
            s.push_back(dot);
            vals.push_back(v);
          }
        for (int j = 0; j <= t; ++j) {
          double dot = 0;
          std::vector<double> v(size_t(c.D));
          for (int d = 0; d < c.D; ++d) {
            dot += double(qr[d]) * kc[size_t(((b * c.Hkv + h) * c.T + j) * c.D + d)];
            v[size_t(d)] = vc[size_t(((b * c.Hkv + h) * c.T + j) * c.D + d)];
          }
          s.push_back(dot);
          vals.push_back(v);
        }
        const double m = *std::max_element(s.begin(), s.end());
        double l = 0, l2 = 0;
        for (double& e : s) l += (e = std::exp(e - m));
        const size_t o = size_t((b * c.Hq + hq) * c.T + t);
        for (size_t j = 0; j < s.size(); ++j) {
          const double pj = s[j] / l;
          l2 += pj * pj;
          for (int d = 0; d < c.D; ++d) ref[o * c.D + d] += pj * vals[j][size_t(d)];
        }
        ref_p2[o] = l2;
      }

  std::vector<kvq::Isa> isas;
  for (kvq::Isa isa : {kvq::Isa::kScalar, kvq::Isa::kAvx2, kvq::Isa::kNeon, kvq::Isa::kAvx512})
    if (kvq::isa_compiled(isa)) isas.push_back(isa);
  for (kvq::Isa isa : isas)
    for (int threads : {1, 3}) {
      std::vector<float> out(q.size(), std::nanf("")), p2(ref_p2.size(), std::nanf(""));
      a.out = out.data();
      a.sum_p2 = p2.data();
      if (threads == 1)
        kvq::packed_attention(a, isa, kvq::SerialFor{});
      else
        kvq::packed_attention(a, isa, ThreadFor{threads});
      double err = 0, err2 = 0;
      for (size_t i = 0; i < out.size(); ++i) err = std::max(err, std::fabs(out[i] - ref[i]));
      for (size_t i = 0; i < p2.size(); ++i) err2 = std::max(err2, std::fabs(p2[i] - ref_p2[i]));
      char what[200];
      std::snprintf(what, sizeof what, "%s x%d q%d B=%d Hq=%d Hkv=%d T=%d fill=(%lld,%lld,%lld,%lld): max err out %.2e, sum_p2 %.2e",
                    kvq::isa_name(isa), threads, c.query_bits, c.B, c.Hq, c.Hkv, c.T, (long long)c.fill[0], (long long)c.fill[1], (long long)c.fill[2],
                    (long long)c.fill[3], err, err2);
      expect(err <= 1e-4 && err2 <= 1e-4, what);
    }
}

void test_attention_grid(bool quick) {
  std::mt19937 rng(3);
  const int64_t fills[] = {0, 7, 100, 1100};
  int n = 0;
  for (int gqa : {1, 3})
    for (int T : {1, 5, 33}) {
      if (quick && T == 33) continue;
      // one width at a time (empty / partial / full), then all four at once
      for (int w = 0; w < 4; ++w)
        for (int64_t f : fills) {
          if ((T == 33 || quick) && f == 1100) continue;  // keep the sanitized run short; 1100 is covered at T <= 5
          for (int qb : {32, 8}) {  // the int8 query's integer key loops exist for the packed widths
            if (qb == 8 && (w == 3 || f == 0)) continue;
            Case c{1, 3 * gqa, 3, T, 64, 64, {0, 0, 0, 0}, {0, 0, 0, 0}, qb};
            c.fill[w] = f;
            c.cap[w] = f == 100 ? 160 : f;  // 100: partially filled pool; others: full
            run_case(c, rng);
            ++n;
          }
        }
      for (int qb : {32, 8}) {
        Case all{1, 3 * gqa, 3, T, 64, 64, {33, 40, 9, 17}, {50, 40, 16, 17}, qb};
        run_case(all, rng);
        ++n;
      }
    }
  // batch > 1 (no cache split), and head_dim 128 with two groups per row
  run_case({6, 6, 2, 2, 64, 64, {20, 30, 0, 5}, {20, 31, 0, 9}}, rng);
  run_case({1, 4, 2, 3, 128, 64, {10, 600, 12, 30}, {10, 600, 12, 30}}, rng);
  run_case({1, 4, 2, 3, 128, 64, {10, 600, 12, 30}, {10, 600, 12, 30}, 8}, rng);  // int8 query, fp32 key loops
  // a group of 32 at 2 bits has an 8-byte shift lane: the SIMD path must fall back to scalar
  run_case({1, 3, 1, 2, 64, 32, {40, 40, 0, 0}, {40, 40, 0, 0}}, rng);
  std::printf("attention grid: %d pool/shape cases\n", n + 4);
}

void test_rejections() {
  kvq::AttentionArgs a;
  a.q_heads = 9;
  a.kv_heads = 3;
  a.chunk_len = 1;
  a.head_dim = 64;
  expect(kvq::check_attention_args(a).ok(), "minimal args accepted");
  a.pools[1].bits = 4;
  a.pools[1].capacity = 10;
  a.pools[1].len = 11;
  expect(!kvq::check_attention_args(a).ok(), "length beyond capacity rejected");
  a.pools[1].len = -1;
  expect(!kvq::check_attention_args(a).ok(), "negative length rejected");
  a.pools[1] = kvq::Pool{};
  a.pools[2].len = 3;
  expect(!kvq::check_attention_args(a).ok(), "filled pool without tensors rejected");
  a.pools[2] = kvq::Pool{};
  a.kv_heads = 2;
  expect(!kvq::check_attention_args(a).ok(), "Hq not a multiple of Hkv rejected");
  a.kv_heads = 3;
  a.head_dim = 512;
  expect(!kvq::check_attention_args(a).ok(), "head_dim over the maximum rejected");
  a.head_dim = 64;
  a.chunk_len = 0;
  expect(!kvq::check_attention_args(a).ok(), "empty chunk rejected");
}

// logit_stats vs a double-precision softmax, every compiled path, vocabularies off the SIMD width.
void test_logit_stats() {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (int vocab : {1, 7, 16, 1000, 49152}) {
    const int rows = 3;
    std::vector<float> z(size_t(rows * vocab));
    for (auto& x : z) x = nd(rng);
    z[0] += 25.0f;                       // a confident row
    if (vocab > 3) z[size_t(vocab) + 1] = -1e4f;  // an exponent below fp32's range
    for (kvq::Isa isa : {kvq::Isa::kScalar, kvq::Isa::kAvx2, kvq::Isa::kNeon, kvq::Isa::kAvx512}) {
      if (!kvq::isa_compiled(isa)) continue;
      std::vector<float> h(rows, std::nanf("")), c(rows, std::nanf(""));
      kvq::logit_stats(z.data(), rows, vocab, h.data(), c.data(), isa, ThreadFor{2});
      double err_h = 0, err_c = 0;
      for (int r = 0; r < rows; ++r) {
        const float* x = &z[size_t(r * vocab)];
        const double m = *std::max_element(x, x + vocab);
        double s = 0, t = 0;
        for (int i = 0; i < vocab; ++i) s += std::exp(double(x[i]) - m);
        for (int i = 0; i < vocab; ++i) {
          const double p = std::exp(double(x[i]) - m) / s;
          if (p > 0) t -= p * std::log(p);
        }
        err_h = std::max(err_h, std::fabs(h[size_t(r)] - t) / std::max(1.0, t));
        err_c = std::max(err_c, std::fabs(c[size_t(r)] - 1.0 / s));
      }
      char what[160];
      std::snprintf(what, sizeof what, "logit_stats %s vocab=%d: err entropy (relative) %.2e, confidence %.2e", kvq::isa_name(isa), vocab, err_h, err_c);
      expect(err_h <= 2e-5 && err_c <= 1e-5, what);
    }
  }
  expect(!kvq::check_logit_args(2, 0).ok(), "empty vocabulary rejected");
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  std::printf("kvq_test: best isa %s\n", kvq::isa_name(kvq::best_isa()));
  test_half();
  test_pack();
  test_rejections();
  test_logit_stats();
  test_attention_grid(quick);
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
