// One generation run through a KvqProgram: prefill in chunks from position 0 (which restarts
// the program's cache), then single-token decode steps, with a callback per generated token.
// Timed with a monotonic clock; the cache's bytes per width are read back from token_bits.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "bundle.h"
#include "program.h"
#include "sampler.h"

namespace kvq::runner {

struct GenerateOptions {
  int64_t max_new_tokens = 1;
  bool ignore_eos = false;
};

struct RunStats {
  double prefill_ms = 0;      // feeding the prompt (all chunks)
  double first_token_ms = 0;  // prefill start until the first generated token is chosen
  double decode_ms = 0;       // the single-token forward calls after the first token (+ sampling)
  int64_t decode_steps = 0;   // how many: generated tokens - 1 (the last token is chosen, not fed)
  int64_t cached_tokens = 0;  // positions in the cache at the end
  std::string stopped;        // "eos" or "max_new_tokens"
  std::vector<int64_t> tokens;
};

// Throws RunnerError when the prompt is empty or prompt + max_new_tokens exceeds the context.
RunStats generate(KvqProgram& program, Sampler& sampler, const std::vector<int64_t>& prompt, const GenerateOptions& options,
                  const std::function<void(int64_t)>& on_token = nullptr);

struct KvUsage {
  std::map<int, int64_t> tokens_by_bits;  // cached positions stored at each width
  std::map<int, int64_t> bytes_by_bits;   // x the bundle's bytes per token at that width
  int64_t bytes_total = 0;
};

KvUsage kv_usage(KvqProgram& program, const BundleInfo& bundle, int64_t cached_tokens);

}  // namespace kvq::runner
