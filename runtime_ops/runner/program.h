// A kvexport decoder program (model.pte) through ExecuTorch's Module API. The program keeps
// the packed cache: forward(tokens [1, T], input_pos [1]) -> logits [1, T, V] with
// 1 <= T <= chunk_size, input_pos = tokens already cached (0 restarts the sequence).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace executorch::extension::module {
class Module;
}

namespace kvq::runner {

class KvqProgram {
 public:
  // Loads the program and its methods; throws RunnerError (corrupt file, missing operator, ...).
  explicit KvqProgram(const std::string& pte_path);
  ~KvqProgram();

  int64_t chunk_size() const { return chunk_size_; }     // get_max_seq_len: most tokens per forward call
  int64_t max_context() const { return max_context_; }   // get_max_context_len: cache capacity
  int64_t vocab_size() const { return vocab_size_; }
  const std::vector<int64_t>& eos_ids() const { return eos_ids_; }

  // tokens[0..n) at position pos -> logits of the last one [vocab_size] (valid until the next call).
  const std::vector<float>& forward(const int64_t* tokens, int64_t n, int64_t pos);
  // Width in bits (2/4/8/16) each cached position is stored at; entries >= the sequence length are stale.
  std::vector<int8_t> token_bits();

 private:
  std::vector<int64_t> constants(const char* method);
  std::string path_;
  std::unique_ptr<executorch::extension::module::Module> module_;
  int64_t chunk_size_ = 0, max_context_ = 0, vocab_size_ = 0;
  std::vector<int64_t> eos_ids_;
  std::vector<float> last_logits_;
};

}  // namespace kvq::runner
