#include "kvq_session.h"

#include <chrono>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "error.h"
#include "generator.h"
#include "runtime_setup.h"
#include "sampler.h"

namespace kvq::jni {
namespace {

using Clock = std::chrono::steady_clock;
using runner::RunnerError;

// Thrown through runner::generate by the listener wrapper: its on_token callback cannot ask for
// a stop, so unwinding is the way out (the program restarts at position 0 on the next run).
struct StopRequested {};

double ms_between(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); }

double per_second(int64_t n, double ms) { return ms > 0 ? 1000.0 * static_cast<double>(n) / ms : 0.0; }

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw RunnerError("cannot read " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace

Session::Session(const std::string& bundle_dir, const std::string& kernels_path, int threads) {
  bundle_ = runner::open_bundle(bundle_dir);  // names a missing / truncated file before ExecuTorch sees it
  manifest_json_ = read_text(bundle_dir + "/manifest.json");
  tokenizer_ = std::make_unique<runner::BpeTokenizer>(bundle_.tokenizer_path);
  if (!kernels_path.empty()) runner::load_kernel_library(kernels_path);  // dlopen of a loaded library is a refcount bump
  // Only on change: resizing tears the pool down, and XNNPACK keeps the pool it was built with.
  if (threads > 0 && runner::thread_count() != static_cast<unsigned>(threads)) runner::set_threads(static_cast<unsigned>(threads));
  program_ = std::make_unique<runner::KvqProgram>(bundle_.program_path);
  stats_.context_max = program_->max_context();
  stats_.kv_bytes_allocated = bundle_.bytes_allocated;
}

std::string Session::summary() const {
  const auto m = nlohmann::json::parse(manifest_json_);
  const auto& policy = m.at("policy");
  std::ostringstream s;
  s << "model: " << m.at("model").value("id", "?") << "\n";
  s << "policy: " << policy.value("name", "?");
  if (policy.contains("kv_budget_bits") && policy["kv_budget_bits"].is_number())
    s << " @ " << policy["kv_budget_bits"].get<double>() << " bits/value";
  s << "\nweights: " << m.at("weights").value("scheme", "?") << "\n";
  s << "context: " << program_->max_context() << " tokens (chunk " << program_->chunk_size() << ")\n";
  s << "KV pools: " << bundle_.bytes_allocated << " bytes allocated";
  return s.str();
}

std::vector<int64_t> Session::generate(const std::vector<int64_t>& prompt, int64_t max_new_tokens, float temperature, uint64_t seed,
                                       const TokenListener& listener) {
  for (int64_t id : prompt)  // an out-of-range id would index past the embedding table
    if (id < 0 || id >= program_->vocab_size())
      throw RunnerError("prompt id " + std::to_string(id) + " is outside the vocabulary of " + std::to_string(program_->vocab_size()));
  runner::Sampler sampler(temperature, seed);
  runner::TextStream text(*tokenizer_);
  stats_ = SessionStats{};
  stats_.prompt_tokens = static_cast<int64_t>(prompt.size());
  stats_.context_max = program_->max_context();
  stats_.kv_bytes_allocated = bundle_.bytes_allocated;

  // Live numbers from the callback's clock (the screen updates per token); a finished run then
  // takes the generator's own timings.
  std::vector<int64_t> out;
  const auto t0 = Clock::now();
  Clock::time_point t_first;
  auto on_token = [&](int64_t id) {
    const auto now = Clock::now();
    out.push_back(id);
    const int64_t n = static_cast<int64_t>(out.size());
    if (n == 1) {
      t_first = now;
      stats_.first_token_ms = ms_between(t0, now);
      stats_.prefill_tok_s = per_second(stats_.prompt_tokens, stats_.first_token_ms);
    } else {
      stats_.decode_tok_s = per_second(n - 1, ms_between(t_first, now));
    }
    stats_.generated = n;
    stats_.context_used = stats_.prompt_tokens + n - 1;  // the newest token is chosen, not yet fed
    if (listener && !listener(id, text.push(id))) throw StopRequested{};
  };
  try {
    const runner::RunStats run = runner::generate(*program_, sampler, prompt, {max_new_tokens, false}, on_token);
    stats_.prefill_tok_s = per_second(stats_.prompt_tokens, run.prefill_ms);
    stats_.decode_tok_s = per_second(run.decode_steps, run.decode_ms);
    stats_.first_token_ms = run.first_token_ms;
    stats_.context_used = run.cached_tokens;
    stats_.stopped = run.stopped;
  } catch (const StopRequested&) {
    stats_.stopped = "listener";
  }
  if (listener) {
    const std::string rest = text.finish();  // a character cut off by the stop or the last token
    if (!rest.empty()) listener(-1, rest);
  }
  stats_.kv_bytes_by_bits = runner::kv_usage(*program_, bundle_, stats_.context_used).bytes_by_bits;
  return out;
}

}  // namespace kvq::jni
