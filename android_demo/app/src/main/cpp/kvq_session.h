// One loaded bundle for the app: the runner library's bundle, tokenizer and program behind a
// handle, plus the live numbers the screen shows. No JNI here, so the host test exercises all
// of it; kvq_jni.cpp only converts types and exceptions.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bpe_tokenizer.h"
#include "bundle.h"
#include "program.h"

namespace kvq::jni {

struct SessionStats {
  int64_t prompt_tokens = 0, generated = 0;
  int64_t context_used = 0, context_max = 0;  // cached positions / get_max_context_len
  double prefill_tok_s = 0, decode_tok_s = 0, first_token_ms = 0;
  std::map<int, int64_t> kv_bytes_by_bits;    // filled at the end of a run (token_bits read back)
  int64_t kv_bytes_allocated = 0;
  std::string stopped;                        // "eos", "max_new_tokens" or "listener"
};

// Called with each generated id and the text it completes (may be empty mid-character);
// returning false stops the run after that token.
using TokenListener = std::function<bool(int64_t id, const std::string& piece)>;

class Session {
 public:
  // kernels_path: the kvq kernel library to dlopen; empty when the kernels are linked into this
  // library (Android). threads > 0 resizes ExecuTorch's pool before the program loads.
  Session(const std::string& bundle_dir, const std::string& kernels_path, int threads);

  const std::string& manifest_json() const { return manifest_json_; }
  std::string summary() const;  // "model ...\npolicy ...": what the screen shows of the manifest
  std::vector<int64_t> encode(const std::string& text) const { return tokenizer_->encode(text); }
  std::string decode(const std::vector<int64_t>& ids) const { return tokenizer_->decode(ids, /*skip_special=*/true); }

  // Restarts at position 0 (the program's cache is reset by input_pos 0) -> the generated ids.
  std::vector<int64_t> generate(const std::vector<int64_t>& prompt, int64_t max_new_tokens, float temperature, uint64_t seed,
                                const TokenListener& listener);
  const SessionStats& stats() const { return stats_; }

 private:
  runner::BundleInfo bundle_;
  std::string manifest_json_;
  std::unique_ptr<runner::BpeTokenizer> tokenizer_;
  std::unique_ptr<runner::KvqProgram> program_;
  SessionStats stats_;
};

}  // namespace kvq::jni
