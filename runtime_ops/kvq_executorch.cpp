// kvq_executorch.cpp — ExecuTorch runtime kernels of the kvq ops (`.out` variants, the form a
// lowered program calls), on the bodies in kvq_kernels.h. Built against the executorch wheel;
// no torch dependency, so the same file links into a phone runner.
//
// Argument errors fail the kernel context (the method returns an error, the process goes on).
// Outputs are resized to the actual chunk length, so a program exported with a dynamic T runs.
//
// Registration: EXECUTORCH_LIBRARY's boxing (1.5.1) accepts exactly one trailing out tensor, and
// both ops return several, so each gets a small hand-written boxed function registered with
// register_kernel under the same "kvq::<op>.out" name.
//
// Profiling: each kernel opens an operator scope on the run's event tracer, so an ETDump
// (bench/profile_pte.py) names it "native_call_kvq::<op>.out" like a generated kernel. The scope
// is compiled in (ET_EVENT_TRACER_ENABLED, set in CMakeLists.txt) and costs a null check when the
// program runs without a tracer.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/dim_order_util.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include "kvq_kernels.h"

namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

// The runtime's shared pool (the one XNNPACK and the optimized kernels use): no second pool
// fighting them for the cores.
struct EtFor {
  template <class Fn>
  void operator()(int64_t n, Fn&& fn) const {
    if (n <= 0) return;
    executorch::extension::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { fn(b, e); });
  }
};

kvq::DType dtype_of(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return kvq::DType::kFloat;
    case ScalarType::Half: return kvq::DType::kHalf;
    case ScalarType::Byte: return kvq::DType::kByte;
    case ScalarType::Long: return kvq::DType::kLong;
    case ScalarType::Bool: return kvq::DType::kBool;
    default: return kvq::DType::kOther;
  }
}

kvq::TensorDesc describe(const Tensor& t) {
  kvq::TensorDesc d;
  d.present = true;
  d.dtype = dtype_of(t.scalar_type());
  d.dim = int(std::min<ssize_t>(t.dim(), 8));
  for (int i = 0; i < d.dim; ++i) d.sizes[i] = t.size(i);
  d.contiguous = t.dim() <= 8 && executorch::runtime::is_contiguous_dim_order(t.dim_order().data(), t.dim());
  d.data = t.const_data_ptr();
  return d;
}

kvq::TensorDesc describe(const EValue& v) { return v.isTensor() ? describe(v.toTensor()) : kvq::TensorDesc{}; }

bool resize(Tensor& t, std::initializer_list<executorch::aten::SizesType> sizes) {
  return executorch::runtime::resize_tensor(t, {sizes.begin(), sizes.size()}) == Error::Ok;
}

// Fails the context with the validator's message; returns whether the caller may go on.
bool ok_or_fail(KernelRuntimeContext& ctx, const kvq::Error& e) {
  if (e.ok()) return true;
  ET_LOG(Error, "kvq: %s", e.msg);
  ctx.fail(Error::InvalidArgument);
  return false;
}

// kvq::pack_rows.out(Tensor x, int bits, int group_size=64, Tensor? active=None, *, Tensor(a!) codes,
//                    Tensor(b!) scale, Tensor(c!) zero) -> (Tensor(a!), Tensor(b!), Tensor(c!))
// Programs exported before `active` existed call it without that slot; they still run (always
// pack), told apart by the argument count and, at 7, by what the last slot holds.
constexpr size_t kPackIn = 4, kPackOut = 3;

void pack_rows_out_boxed(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  executorch::runtime::internal::EventTracerProfileOpScope prof(ctx.internal_event_tracer(), "native_call_kvq::pack_rows.out");
  // The emitter may append one list aggregating the outputs; it duplicates them and is ignored.
  ET_KERNEL_CHECK_MSG(ctx, stack.size() >= kPackIn - 1 + kPackOut && stack.size() <= kPackIn + kPackOut + 1, InvalidProgram, ,
                      "kvq::pack_rows.out: %zu arguments", stack.size());
  const bool has_active = stack.size() == kPackIn + kPackOut + 1 || (stack.size() == kPackIn + kPackOut && stack[stack.size() - 1]->isTensor());
  const size_t o = has_active ? kPackIn : kPackIn - 1;  // codes, scale, zero
  const EValue& x = *stack[0];
  ET_KERNEL_CHECK_MSG(ctx, x.isTensor() && stack[1]->isInt() && stack[2]->isInt() && stack[o]->isTensor() && stack[o + 1]->isTensor() && stack[o + 2]->isTensor(),
                      InvalidArgument, , "kvq::pack_rows.out: expected (Tensor, int, int, Tensor?, *, Tensor, Tensor, Tensor)");
  Tensor& codes = stack[o]->toTensor();
  Tensor& scale = stack[o + 1]->toTensor();
  Tensor& zero = stack[o + 2]->toTensor();
  bool active = true;
  if (has_active && !ok_or_fail(ctx, kvq::read_pack_active(describe(*stack[3]), active))) return;
  const int64_t bits = stack[1]->toInt(), group_size = stack[2]->toInt();
  const kvq::TensorDesc xd = describe(x);
  kvq::PackArgs p;
  if (!ok_or_fail(ctx, kvq::make_pack_args(xd, bits, group_size, p))) return;
  // Resize the outputs to x's leading dims (dynamic shapes), then check them like eager does.
  executorch::aten::SizesType lead[8];
  for (int i = 0; i < xd.dim; ++i) lead[i] = executorch::aten::SizesType(xd.sizes[i]);
  lead[xd.dim - 1] = executorch::aten::SizesType(p.D * bits / 8);
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(codes, {lead, size_t(xd.dim)}) == Error::Ok, InvalidArgument, );
  lead[xd.dim - 1] = executorch::aten::SizesType(p.D / group_size);
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(scale, {lead, size_t(xd.dim)}) == Error::Ok, InvalidArgument, );
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(zero, {lead, size_t(xd.dim)}) == Error::Ok, InvalidArgument, );
  if (!ok_or_fail(ctx, kvq::expect_pack_out(describe(codes), xd, "codes", kvq::DType::kByte, int64_t(p.D) * bits / 8))) return;
  if (!ok_or_fail(ctx, kvq::expect_pack_out(describe(scale), xd, "scale", kvq::DType::kHalf, p.D / group_size))) return;
  if (!ok_or_fail(ctx, kvq::expect_pack_out(describe(zero), xd, "zero", kvq::DType::kHalf, p.D / group_size))) return;
  if (!active) {
    for (Tensor* t : {&codes, &scale, &zero}) std::memset(t->mutable_data_ptr(), 0, t->nbytes());
    return;
  }
  kvq::pack_rows(p.x, p.rows, p.D, p.G, p.bits, codes.mutable_data_ptr<uint8_t>(),
                 static_cast<uint16_t*>(scale.mutable_data_ptr()), static_cast<uint16_t*>(zero.mutable_data_ptr()), EtFor{});
}

// kvq::packed_attention.out(Tensor q, Tensor k_chunk, Tensor v_chunk, Tensor lengths,
//     Tensor? k2, Tensor? k2_scale, Tensor? k2_zero, Tensor? v2, Tensor? v2_scale, Tensor? v2_zero,
//     (the same six for 4 and 8 bits), Tensor? k16, Tensor? v16, float scale, int group_size=64,
//     int layer=-1, int query_bits=32, *, Tensor(a!) out, Tensor(b!) sum_p2) -> (Tensor(a!), Tensor(b!))
// Programs exported before query_bits existed call it with the outputs one slot earlier; they
// still run (fp32 query), told apart by the type in that slot.
constexpr size_t kAttnPools = 20, kAttnIn = 4 + kAttnPools + 4, kAttnOut = 2;

void packed_attention_out_boxed(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  executorch::runtime::internal::EventTracerProfileOpScope prof(ctx.internal_event_tracer(), "native_call_kvq::packed_attention.out");
  ET_KERNEL_CHECK_MSG(ctx, stack.size() >= kAttnIn - 1 + kAttnOut && stack.size() <= kAttnIn + kAttnOut + 1, InvalidProgram, ,
                      "kvq::packed_attention.out: %zu arguments, expected %zu", stack.size(), kAttnIn + kAttnOut);
  const bool has_query_bits = !stack[27]->isTensor();
  const size_t o = has_query_bits ? 28 : 27;  // out, then sum_p2
  ET_KERNEL_CHECK_MSG(ctx, stack.size() >= o + kAttnOut, InvalidProgram, , "kvq::packed_attention.out: %zu arguments", stack.size());
  ET_KERNEL_CHECK_MSG(ctx, stack[24]->isDouble() && stack[25]->isInt() && stack[26]->isInt() && (!has_query_bits || stack[27]->isInt()),
                      InvalidArgument, , "kvq::packed_attention.out: scale must be a float, group_size, layer and query_bits ints");
  ET_KERNEL_CHECK_MSG(ctx, stack[o]->isTensor() && stack[o + 1]->isTensor(), InvalidArgument, ,
                      "kvq::packed_attention.out: out and sum_p2 must be tensors");
  kvq::TensorDesc pools[kvq::kNumWidths][kvq::kPoolSlots];
  for (int w = 0; w < 3; ++w)
    for (int i = 0; i < kvq::kPoolSlots; ++i) pools[w][i] = describe(*stack[4 + w * kvq::kPoolSlots + i]);
  pools[3][0] = describe(*stack[22]);  // k16
  pools[3][3] = describe(*stack[23]);  // v16
  kvq::AttentionArgs a;
  if (!ok_or_fail(ctx, kvq::make_attention_args(describe(*stack[0]), describe(*stack[1]), describe(*stack[2]), describe(*stack[3]), pools,
                                                 stack[24]->toDouble(), stack[25]->toInt(), stack[26]->toInt(),
                                                 has_query_bits ? stack[27]->toInt() : 32, a)))
    return;
  Tensor& out = stack[o]->toTensor();
  Tensor& sum_p2 = stack[o + 1]->toTensor();
  using S = executorch::aten::SizesType;
  ET_KERNEL_CHECK(ctx, resize(out, {S(a.batch), S(a.q_heads), S(a.chunk_len), S(a.head_dim)}), InvalidArgument, );
  ET_KERNEL_CHECK(ctx, resize(sum_p2, {S(a.batch), S(a.q_heads), S(a.chunk_len)}), InvalidArgument, );
  const int64_t out_shape[4] = {a.batch, a.q_heads, a.chunk_len, a.head_dim};
  if (!ok_or_fail(ctx, kvq::expect_tensor(describe(out), "out", kvq::DType::kFloat, 4, out_shape))) return;
  if (!ok_or_fail(ctx, kvq::expect_tensor(describe(sum_p2), "sum_p2", kvq::DType::kFloat, 3, out_shape))) return;
  a.out = out.mutable_data_ptr<float>();
  a.sum_p2 = sum_p2.mutable_data_ptr<float>();
  kvq::packed_attention(a, kvq::current_isa(), EtFor{});
}

// kvq::logit_stats.out(Tensor logits, *, Tensor(a!) entropy, Tensor(b!) confidence) -> (Tensor(a!), Tensor(b!))
void logit_stats_out_boxed(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  executorch::runtime::internal::EventTracerProfileOpScope prof(ctx.internal_event_tracer(), "native_call_kvq::logit_stats.out");
  ET_KERNEL_CHECK_MSG(ctx, stack.size() == 3 || stack.size() == 4, InvalidProgram, , "kvq::logit_stats.out: %zu arguments", stack.size());
  ET_KERNEL_CHECK_MSG(ctx, stack[0]->isTensor() && stack[1]->isTensor() && stack[2]->isTensor(), InvalidArgument, ,
                      "kvq::logit_stats.out: expected (Tensor, *, Tensor, Tensor)");
  const kvq::TensorDesc zd = describe(*stack[0]);
  if (!ok_or_fail(ctx, zd.dim >= 1 && zd.dtype == kvq::DType::kFloat && zd.contiguous
                           ? kvq::Error{}
                           : kvq::make_error("logit_stats: logits must be contiguous float32 [..., vocab]")))
    return;
  const int64_t vocab = zd.sizes[zd.dim - 1];
  int64_t rows = 1;
  executorch::aten::SizesType lead[8];
  for (int i = 0; i + 1 < zd.dim; ++i) {
    lead[i] = executorch::aten::SizesType(zd.sizes[i]);
    rows *= zd.sizes[i];
  }
  if (!ok_or_fail(ctx, kvq::check_logit_args(rows, vocab))) return;
  Tensor& entropy = stack[1]->toTensor();
  Tensor& confidence = stack[2]->toTensor();
  for (Tensor* t : {&entropy, &confidence}) {
    ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(*t, {lead, size_t(zd.dim - 1)}) == Error::Ok, InvalidArgument, );
    ET_KERNEL_CHECK_MSG(ctx, t->scalar_type() == ScalarType::Float, InvalidArgument, , "kvq::logit_stats.out: outputs must be float32");
  }
  kvq::logit_stats(static_cast<const float*>(zd.data), rows, vocab, entropy.mutable_data_ptr<float>(), confidence.mutable_data_ptr<float>(),
                   kvq::current_isa(), EtFor{});
}

const auto kPackRegistration = executorch::runtime::register_kernel(executorch::runtime::Kernel("kvq::pack_rows.out", pack_rows_out_boxed));
const auto kAttentionRegistration =
    executorch::runtime::register_kernel(executorch::runtime::Kernel("kvq::packed_attention.out", packed_attention_out_boxed));
const auto kLogitStatsRegistration =
    executorch::runtime::register_kernel(executorch::runtime::Kernel("kvq::logit_stats.out", logit_stats_out_boxed));

}  // namespace

extern "C" {
__attribute__((visibility("default"))) int kvq_set_isa(int isa) { return kvq::set_isa(isa); }
__attribute__((visibility("default"))) int kvq_best_isa() { return int(kvq::best_isa()); }
}
