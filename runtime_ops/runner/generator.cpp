#include "generator.h"

#include <algorithm>
#include <chrono>

#include "error.h"

namespace kvq::runner {
namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

}  // namespace

RunStats generate(KvqProgram& program, Sampler& sampler, const std::vector<int64_t>& prompt, const GenerateOptions& options,
                  const std::function<void(int64_t)>& on_token) {
  const int64_t p = static_cast<int64_t>(prompt.size()), g = options.max_new_tokens;
  if (p == 0) throw RunnerError("the prompt is empty: give --prompt TEXT or --prompt-ids with at least one id");
  if (g < 1) throw RunnerError("--gen must be >= 1, got " + std::to_string(g));
  if (p + g > program.max_context())
    throw RunnerError("prompt (" + std::to_string(p) + " tokens) + gen (" + std::to_string(g) + ") = " + std::to_string(p + g) +
                      " exceeds the program's max context of " + std::to_string(program.max_context()) +
                      " tokens: shorten the prompt / --depth / --gen, or re-export with a larger --max-seq-len");
  const auto& eos = program.eos_ids();
  RunStats s;
  const auto t0 = Clock::now();
  const std::vector<float>* logits = nullptr;
  for (int64_t pos = 0; pos < p; pos += program.chunk_size())
    logits = &program.forward(prompt.data() + pos, std::min(program.chunk_size(), p - pos), pos);
  s.prefill_ms = ms_since(t0);
  int64_t tok = sampler.pick(*logits);
  s.first_token_ms = ms_since(t0);
  s.tokens.push_back(tok);
  if (on_token) on_token(tok);
  int64_t pos = p;
  const auto t1 = Clock::now();
  while (static_cast<int64_t>(s.tokens.size()) < g) {
    if (!options.ignore_eos && std::find(eos.begin(), eos.end(), tok) != eos.end()) break;
    tok = sampler.pick(program.forward(&tok, 1, pos++));
    s.tokens.push_back(tok);
    if (on_token) on_token(tok);
  }
  s.decode_ms = ms_since(t1);
  s.decode_steps = pos - p;
  s.cached_tokens = pos;
  const bool at_eos = std::find(eos.begin(), eos.end(), tok) != eos.end();
  s.stopped = at_eos && !options.ignore_eos ? "eos" : "max_new_tokens";
  return s;
}

KvUsage kv_usage(KvqProgram& program, const BundleInfo& bundle, int64_t cached_tokens) {
  const std::vector<int8_t> bits = program.token_bits();
  KvUsage u;
  for (const auto& [b, per_token] : bundle.bytes_per_token) u.tokens_by_bits[b] = 0;
  for (int64_t i = 0; i < cached_tokens && i < static_cast<int64_t>(bits.size()); ++i) {
    auto it = bundle.bytes_per_token.find(bits[i]);
    if (it == bundle.bytes_per_token.end())
      throw RunnerError("position " + std::to_string(i) + " is stored at " + std::to_string(bits[i]) +
                        " bits, a width manifest.json lists no pool for; the bundle's manifest and program disagree, re-export it");
    ++u.tokens_by_bits[bits[i]];
  }
  for (const auto& [b, n] : u.tokens_by_bits) {
    u.bytes_by_bits[b] = n * bundle.bytes_per_token.at(b);
    u.bytes_total += u.bytes_by_bits[b];
  }
  return u;
}

}  // namespace kvq::runner
