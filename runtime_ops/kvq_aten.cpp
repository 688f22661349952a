// kvq_aten.cpp — PyTorch eager (CPU) kernels of the kvq ops, on the bodies in kvq_kernels.h.
//
// The schemas, fake (meta) kernels and the readable reference live in adaptive_kv/ops.py; this
// library only overrides the CPU implementation. Load it with adaptive_kv.ops.load_library().
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/Resize.h>
#include <torch/library.h>

#include <tuple>

#include "kvq_kernels.h"

namespace {

// Work is spread over torch's intra-op pool, so torch.set_num_threads governs it.
struct AtenFor {
  template <class Fn>
  void operator()(int64_t n, Fn&& fn) const {
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { fn(b, e); });
  }
};

kvq::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kvq::DType::kFloat;
    case at::kHalf: return kvq::DType::kHalf;
    case at::kByte: return kvq::DType::kByte;
    case at::kLong: return kvq::DType::kLong;
    case at::kBool: return kvq::DType::kBool;
    default: return kvq::DType::kOther;
  }
}

kvq::TensorDesc describe(const at::Tensor& t) {
  kvq::TensorDesc d;
  d.present = t.defined();
  if (!d.present) return d;
  TORCH_CHECK(t.device().is_cpu(), "kvq ops run on CPU tensors, got one on ", t.device());
  TORCH_CHECK(t.dim() <= 8, "kvq ops take tensors of at most 8 dims, got ", t.dim());
  d.dtype = dtype_of(t);
  d.dim = int(t.dim());
  for (int i = 0; i < d.dim; ++i) d.sizes[i] = t.size(i);
  d.contiguous = t.is_contiguous();
  d.data = t.data_ptr();
  return d;
}

kvq::TensorDesc describe(const std::optional<at::Tensor>& t) { return t.has_value() ? describe(*t) : kvq::TensorDesc{}; }

void check(const kvq::Error& e) { TORCH_CHECK(e.ok(), "kvq: ", e.msg); }

// ---- pack_rows --------------------------------------------------------------------------------
std::tuple<at::Tensor&, at::Tensor&, at::Tensor&> pack_rows_out(const at::Tensor& x, int64_t bits, int64_t group_size,
                                                                const std::optional<at::Tensor>& active, at::Tensor& codes,
                                                                at::Tensor& scale, at::Tensor& zero) {
  const kvq::TensorDesc xd = describe(x);
  kvq::PackArgs p;
  check(kvq::make_pack_args(xd, bits, group_size, p));
  check(kvq::expect_pack_out(describe(codes), xd, "codes", kvq::DType::kByte, int64_t(p.D) * bits / 8));
  check(kvq::expect_pack_out(describe(scale), xd, "scale", kvq::DType::kHalf, p.D / group_size));
  check(kvq::expect_pack_out(describe(zero), xd, "zero", kvq::DType::kHalf, p.D / group_size));
  bool on = true;
  check(kvq::read_pack_active(describe(active), on));
  if (!on) {
    codes.zero_(), scale.zero_(), zero.zero_();
    return {codes, scale, zero};
  }
  kvq::pack_rows(p.x, p.rows, p.D, p.G, p.bits, codes.data_ptr<uint8_t>(),
                 reinterpret_cast<uint16_t*>(scale.data_ptr<at::Half>()), reinterpret_cast<uint16_t*>(zero.data_ptr<at::Half>()), AtenFor{});
  return {codes, scale, zero};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_rows(const at::Tensor& x, int64_t bits, int64_t group_size, const std::optional<at::Tensor>& active) {
  kvq::PackArgs p;
  check(kvq::make_pack_args(describe(x), bits, group_size, p));
  auto lead = x.sizes().vec();  // [..., D] -> [..., D*bits/8] and [..., D/G]
  lead.back() = p.D * bits / 8;
  at::Tensor codes = at::empty(lead, x.options().dtype(at::kByte));
  lead.back() = p.D / group_size;
  at::Tensor scale = at::empty(lead, x.options().dtype(at::kHalf));
  at::Tensor zero = at::empty(lead, x.options().dtype(at::kHalf));
  pack_rows_out(x, bits, group_size, active, codes, scale, zero);
  return {codes, scale, zero};
}

// ---- packed_attention -------------------------------------------------------------------------
using OptT = std::optional<at::Tensor>;

std::tuple<at::Tensor&, at::Tensor&> packed_attention_out(
    const at::Tensor& q, const at::Tensor& k_chunk, const at::Tensor& v_chunk, const at::Tensor& lengths,  //
    const OptT& k2, const OptT& k2_scale, const OptT& k2_zero, const OptT& v2, const OptT& v2_scale, const OptT& v2_zero,  //
    const OptT& k4, const OptT& k4_scale, const OptT& k4_zero, const OptT& v4, const OptT& v4_scale, const OptT& v4_zero,  //
    const OptT& k8, const OptT& k8_scale, const OptT& k8_zero, const OptT& v8, const OptT& v8_scale, const OptT& v8_zero,  //
    const OptT& k16, const OptT& v16, double scale, int64_t group_size, int64_t layer, int64_t query_bits, at::Tensor& out, at::Tensor& sum_p2) {
  // The query chunk is small (T rows): make it contiguous here; the pools must already be.
  const at::Tensor qc = q.contiguous(), kc = k_chunk.contiguous(), vc = v_chunk.contiguous();
  const kvq::TensorDesc pools[kvq::kNumWidths][kvq::kPoolSlots] = {
      {describe(k2), describe(k2_scale), describe(k2_zero), describe(v2), describe(v2_scale), describe(v2_zero)},
      {describe(k4), describe(k4_scale), describe(k4_zero), describe(v4), describe(v4_scale), describe(v4_zero)},
      {describe(k8), describe(k8_scale), describe(k8_zero), describe(v8), describe(v8_scale), describe(v8_zero)},
      {describe(k16), {}, {}, describe(v16), {}, {}},
  };
  kvq::AttentionArgs a;
  check(kvq::make_attention_args(describe(qc), describe(kc), describe(vc), describe(lengths), pools, scale, group_size, layer, query_bits, a));
  const int64_t out_shape[4] = {a.batch, a.q_heads, a.chunk_len, a.head_dim};
  check(kvq::expect_tensor(describe(out), "out", kvq::DType::kFloat, 4, out_shape));
  check(kvq::expect_tensor(describe(sum_p2), "sum_p2", kvq::DType::kFloat, 3, out_shape));
  a.out = out.data_ptr<float>();
  a.sum_p2 = sum_p2.data_ptr<float>();
  kvq::packed_attention(a, kvq::current_isa(), AtenFor{});
  return {out, sum_p2};
}

std::tuple<at::Tensor, at::Tensor> packed_attention(
    const at::Tensor& q, const at::Tensor& k_chunk, const at::Tensor& v_chunk, const at::Tensor& lengths,  //
    const OptT& k2, const OptT& k2_scale, const OptT& k2_zero, const OptT& v2, const OptT& v2_scale, const OptT& v2_zero,  //
    const OptT& k4, const OptT& k4_scale, const OptT& k4_zero, const OptT& v4, const OptT& v4_scale, const OptT& v4_zero,  //
    const OptT& k8, const OptT& k8_scale, const OptT& k8_zero, const OptT& v8, const OptT& v8_scale, const OptT& v8_zero,  //
    const OptT& k16, const OptT& v16, double scale, int64_t group_size, int64_t layer, int64_t query_bits) {
  TORCH_CHECK(q.dim() == 4, "kvq: q must have 4 dims [B, Hq, T, D], got ", q.dim());
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));  // [B, Hq, T, D]
  at::Tensor sum_p2 = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));  // [B, Hq, T]
  packed_attention_out(q, k_chunk, v_chunk, lengths, k2, k2_scale, k2_zero, v2, v2_scale, v2_zero, k4, k4_scale, k4_zero, v4, v4_scale,
                       v4_zero, k8, k8_scale, k8_zero, v8, v8_scale, v8_zero, k16, v16, scale, group_size, layer, query_bits, out, sum_p2);
  return {out, sum_p2};
}

// ---- logit_stats ------------------------------------------------------------------------------
std::tuple<at::Tensor&, at::Tensor&> logit_stats_out(const at::Tensor& logits, at::Tensor& entropy, at::Tensor& confidence) {
  TORCH_CHECK(logits.dim() >= 1 && logits.scalar_type() == at::kFloat, "kvq: logits must be float32 [..., vocab], got ", logits.scalar_type(), " ",
              logits.sizes());
  const at::Tensor z = logits.contiguous();
  const int64_t vocab = z.size(-1), rows = vocab > 0 ? z.numel() / vocab : 0;
  check(kvq::check_logit_args(rows, vocab));
  const auto lead = z.sizes().slice(0, z.dim() - 1);
  for (at::Tensor* t : {&entropy, &confidence}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "kvq: logit_stats outputs must be contiguous float32");
    at::native::resize_output(*t, lead);
  }
  kvq::logit_stats(z.data_ptr<float>(), rows, vocab, entropy.data_ptr<float>(), confidence.data_ptr<float>(), kvq::current_isa(), AtenFor{});
  return {entropy, confidence};
}

std::tuple<at::Tensor, at::Tensor> logit_stats(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() >= 1, "kvq: logits must be float32 [..., vocab], got a 0-dim tensor");
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  at::Tensor entropy = at::empty(lead, logits.options().dtype(at::kFloat)), confidence = at::empty(lead, logits.options().dtype(at::kFloat));
  logit_stats_out(logits, entropy, confidence);
  return {entropy, confidence};
}

}  // namespace

TORCH_LIBRARY_IMPL(kvq, CPU, m) {
  m.impl("logit_stats", &logit_stats);
  m.impl("logit_stats.out", &logit_stats_out);
  m.impl("pack_rows", &pack_rows);
  m.impl("pack_rows.out", &pack_rows_out);
  m.impl("packed_attention", &packed_attention);
  m.impl("packed_attention.out", &packed_attention_out);
}

// Test and benchmark hooks, reached through ctypes (adaptive_kv.ops.set_kernel_isa).
extern "C" {
__attribute__((visibility("default"))) int kvq_set_isa(int isa) { return kvq::set_isa(isa); }
__attribute__((visibility("default"))) int kvq_best_isa() { return int(kvq::best_isa()); }
}
