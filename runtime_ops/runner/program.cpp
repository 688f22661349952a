#include "program.h"

#include <cstring>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include "error.h"

namespace kvq::runner {
namespace {

using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

std::string describe(Error e) {
  return std::string(executorch::runtime::to_string(e)) + " (code " + std::to_string(static_cast<unsigned>(e)) + ")";
}

std::string load_failure(const std::string& path, const std::string& what, Error e) {
  if (e == Error::OperatorMissing)
    return path + ": " + what + " failed: the program calls an operator no loaded kernel library provides (the runtime "
           "logged 'Missing operator: ...' above). kvq::* come from libkvq_executorch.so: build it with "
           "`.venv/bin/python runtime_ops/build.py` (make setup) or pass --kernels PATH; aten::* and "
           "quantized_decomposed::* come from the executorch kernel libraries the runner links";
  return path + ": " + what + " failed with ExecuTorch error " + describe(e) +
         ": the file is corrupt, truncated or not an ExecuTorch program; re-export the bundle with `kvexport export`";
}

}  // namespace

KvqProgram::KvqProgram(const std::string& pte_path) : path_(pte_path) {
  // mmap: weights are paged in as XNNPACK packs them, not read into a second copy first.
  // Shared arenas: forward and token_bits see the same cache buffers (the program is exported
  // with share_mutable_buffers); outputs are copied out before the next call.
  module_ = std::make_unique<Module>(pte_path, Module::LoadMode::Mmap, nullptr, nullptr, nullptr, /*share_memory_arenas=*/true);
  if (Error e = module_->load(); e != Error::Ok) throw RunnerError(load_failure(path_, "loading the program", e));
  auto names = module_->method_names();
  if (!names.ok()) throw RunnerError(load_failure(path_, "reading its methods", names.error()));
  for (const char* needed : {"forward", "token_bits", "get_max_seq_len", "get_max_context_len", "get_vocab_size", "get_eos_ids"})
    if (!names->count(needed))
      throw RunnerError(path_ + " has no method '" + needed + "': not a kvexport decoder program; re-export the bundle with `kvexport export`");
  for (const char* method : {"forward", "token_bits"})
    if (Error e = module_->load_method(method); e != Error::Ok) throw RunnerError(load_failure(path_, std::string("loading method ") + method, e));
  chunk_size_ = constants("get_max_seq_len").at(0);
  max_context_ = constants("get_max_context_len").at(0);
  vocab_size_ = constants("get_vocab_size").at(0);
  eos_ids_ = constants("get_eos_ids");
  last_logits_.resize(vocab_size_);
}

KvqProgram::~KvqProgram() = default;

std::vector<int64_t> KvqProgram::constants(const char* method) {
  auto out = module_->execute(method);
  if (!out.ok()) throw RunnerError(load_failure(path_, std::string("running ") + method, out.error()));
  std::vector<int64_t> values;
  for (const EValue& v : *out) values.push_back(v.toInt());
  if (values.empty()) throw RunnerError(path_ + ": method " + method + " returned nothing; re-export the bundle");
  return values;
}

const std::vector<float>& KvqProgram::forward(const int64_t* tokens, int64_t n, int64_t pos) {
  if (n < 1 || n > chunk_size_)
    throw RunnerError("a forward call takes 1.." + std::to_string(chunk_size_) + " tokens (the exported chunk), got " + std::to_string(n));
  if (pos + n > max_context_)
    throw RunnerError("context of " + std::to_string(pos + n) + " tokens exceeds the program's max context " + std::to_string(max_context_));
  auto ids = executorch::extension::make_tensor_ptr({1, static_cast<int32_t>(n)}, std::vector<int64_t>(tokens, tokens + n));
  auto position = executorch::extension::make_tensor_ptr({1}, std::vector<int64_t>{pos});
  auto out = module_->execute("forward", {EValue(ids), EValue(position)});
  if (!out.ok()) throw RunnerError(path_ + ": forward failed with ExecuTorch error " + describe(out.error()));
  const auto& logits = out->at(0).toTensor();  // [1, n, V]
  std::memcpy(last_logits_.data(), logits.const_data_ptr<float>() + (n - 1) * vocab_size_, vocab_size_ * sizeof(float));
  return last_logits_;
}

std::vector<int8_t> KvqProgram::token_bits() {
  auto out = module_->execute("token_bits");
  if (!out.ok()) throw RunnerError(path_ + ": token_bits failed with ExecuTorch error " + describe(out.error()));
  const auto& t = out->at(0).toTensor();
  const int8_t* p = t.const_data_ptr<int8_t>();
  return std::vector<int8_t>(p, p + t.numel());
}

}  // namespace kvq::runner
