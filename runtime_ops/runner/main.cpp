// kvq_runner: the command-line face of the runner library (see runtime_ops/README.md).
// stdout carries exactly one JSON object at the end; everything for people goes to stderr.
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bpe_tokenizer.h"
#include "bundle.h"
#include "error.h"
#include "generator.h"
#include "program.h"
#include "runtime_setup.h"

namespace {

using kvq::runner::RunnerError;
using Json = nlohmann::ordered_json;

constexpr const char* kUsage = R"(usage:
  kvq_runner --bundle DIR (--prompt TEXT | --prompt-ids 1,2,3 | --prompt-ids-file FILE) [--depth N]
             [--gen N] [--threads N] [--warmup N] [--reps N] [--ignore-eos] [--temperature T] [--seed S]
             [--kernels PATH] [--stream]
  kvq_runner (--bundle DIR | --tokenizer FILE) --encode TEXT | --encode-file FILE | --decode-ids 1,2,3 | --decode-file FILE
     --encode-file: one JSON string per line; --decode-file: one JSON array of ids per line
)";

#if defined(__aarch64__)
constexpr const char* kArch = "aarch64";
#elif defined(__x86_64__)
constexpr const char* kArch = "x86_64";
#else
constexpr const char* kArch = "unknown";
#endif

struct Args {
  std::string bundle, tokenizer, prompt, prompt_ids, prompt_ids_file, kernels;
  std::string encode, encode_file, decode_ids, decode_file;
  bool has_prompt = false, has_encode = false, ignore_eos = false, stream = false;
  int64_t depth = -1, gen = 32, threads = 0, warmup = 0, reps = 1;
  double temperature = 0;
  uint64_t seed = 0;
};

int64_t to_int(const std::string& flag, const std::string& v, int64_t lo) {
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || x < lo) throw RunnerError(flag + " takes an integer >= " + std::to_string(lo) + ", got '" + v + "'");
  return x;
}

double to_double(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !(x >= 0)) throw RunnerError(flag + " takes a number >= 0, got '" + v + "'");
  return x;
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw RunnerError(f + " needs a value\n" + kUsage);
      return argv[++i];
    };
    if (f == "--bundle") a.bundle = value();
    else if (f == "--tokenizer") a.tokenizer = value();
    else if (f == "--prompt") { a.prompt = value(); a.has_prompt = true; }
    else if (f == "--prompt-ids") a.prompt_ids = value();
    else if (f == "--prompt-ids-file") a.prompt_ids_file = value();
    else if (f == "--depth") a.depth = to_int(f, value(), 1);
    else if (f == "--gen") a.gen = to_int(f, value(), 1);
    else if (f == "--threads") a.threads = to_int(f, value(), 1);
    else if (f == "--warmup") a.warmup = to_int(f, value(), 0);
    else if (f == "--reps") a.reps = to_int(f, value(), 1);
    else if (f == "--seed") a.seed = static_cast<uint64_t>(to_int(f, value(), 0));
    else if (f == "--temperature") a.temperature = to_double(f, value());
    else if (f == "--kernels") a.kernels = value();
    else if (f == "--ignore-eos") a.ignore_eos = true;
    else if (f == "--stream") a.stream = true;
    else if (f == "--encode") { a.encode = value(); a.has_encode = true; }
    else if (f == "--encode-file") a.encode_file = value();
    else if (f == "--decode-ids") a.decode_ids = value();
    else if (f == "--decode-file") a.decode_file = value();
    else if (f == "--help" || f == "-h") { std::cerr << kUsage; std::exit(0); }
    else throw RunnerError("unknown option " + f + "\n" + kUsage);
  }
  return a;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw RunnerError("cannot read " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::vector<int64_t> parse_ids(const std::string& text, const std::string& where) {
  std::vector<int64_t> ids;
  std::string tok;
  for (size_t i = 0; i <= text.size(); ++i) {
    const char c = i < text.size() ? text[i] : ',';
    if (c == ',' || c == ' ' || c == '\n' || c == '\t' || c == '\r') {
      if (!tok.empty()) ids.push_back(to_int(where, tok, 0));
      tok.clear();
    } else {
      tok += c;
    }
  }
  return ids;
}

std::vector<std::string> lines_of(const std::string& path) {
  std::vector<std::string> out;
  std::ifstream f(path, std::ios::binary);
  if (!f) throw RunnerError("cannot read " + path);
  for (std::string line; std::getline(f, line);)
    if (!line.empty()) out.push_back(line);
  return out;
}

void print_json(const Json& j) {
  std::cout << j.dump(-1, ' ', false, Json::error_handler_t::replace) << std::endl;
}

// --encode / --decode modes: the tokenizer alone (tests compare it with HF tokenizers).
int tokenizer_mode(const Args& a) {
  const std::string path = !a.tokenizer.empty() ? a.tokenizer : a.bundle + "/tokenizer.json";
  if (a.tokenizer.empty() && a.bundle.empty()) throw RunnerError("the tokenizer modes need --bundle DIR or --tokenizer FILE");
  const kvq::runner::BpeTokenizer tok(path);
  Json out;
  if (a.has_encode) {
    out["ids"] = tok.encode(a.encode);
  } else if (!a.encode_file.empty()) {
    Json all = Json::array();
    for (const std::string& line : lines_of(a.encode_file)) all.push_back(tok.encode(Json::parse(line).get<std::string>()));
    out["ids"] = std::move(all);
  } else if (!a.decode_ids.empty()) {
    out["text"] = tok.decode(parse_ids(a.decode_ids, "--decode-ids"));
  } else {
    Json all = Json::array();
    for (const std::string& line : lines_of(a.decode_file)) all.push_back(tok.decode(Json::parse(line).get<std::vector<int64_t>>()));
    out["texts"] = std::move(all);
  }
  print_json(out);
  return 0;
}

std::string exe_dir() {
  char buf[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return ".";
  std::string p(buf, n);
  return p.substr(0, p.rfind('/'));
}

// --kernels, else beside the binary (build tree) or in its lib/ (dist). Started through the
// glibc loader, /proc/self/exe is the loader, hence argv[0] as well.
std::string kernel_library(const Args& a, const std::string& argv0) {
  if (!a.kernels.empty()) return a.kernels;
  const size_t slash = argv0.rfind('/');
  const std::string dir = exe_dir(), argv_dir = slash == std::string::npos ? "." : argv0.substr(0, slash);
  for (const std::string& d : {argv_dir, dir})
    for (const std::string& p : {d + "/libkvq_executorch.so", d + "/lib/libkvq_executorch.so"})
      if (access(p.c_str(), R_OK) == 0) return p;
  throw RunnerError("the kvq kernel library libkvq_executorch.so is not beside " + argv0 + " nor in its lib/: "
                    "build it with `.venv/bin/python runtime_ops/build.py` (make setup), or pass --kernels PATH");
}

std::vector<int64_t> prompt_ids(const Args& a, const kvq::runner::BpeTokenizer& tok) {
  const int given = a.has_prompt + !a.prompt_ids.empty() + !a.prompt_ids_file.empty();
  if (given != 1) throw RunnerError("give exactly one of --prompt TEXT, --prompt-ids 1,2,3, --prompt-ids-file FILE\n" + std::string(kUsage));
  if (a.has_prompt) return tok.encode(a.prompt);
  if (!a.prompt_ids.empty()) return parse_ids(a.prompt_ids, "--prompt-ids");
  return parse_ids(read_file(a.prompt_ids_file), "--prompt-ids-file");
}

// This process's own peak RSS. Linux carries getrusage's ru_maxrss across execve, so a runner
// started by a large parent (a Python harness) would report the parent's peak; VmHWM belongs to
// the address space exec made.
int64_t peak_rss_bytes() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmHWM:", 0) == 0) return std::strtoll(line.c_str() + 6, nullptr, 10) * 1024;  // "VmHWM:  1234 kB"
  }
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;  // Linux reports KiB
}

int generate_mode(const Args& a, const std::string& argv0) {
  namespace kr = kvq::runner;
  using Clock = std::chrono::steady_clock;
  if (a.bundle.empty()) throw RunnerError("--bundle DIR is required\n" + std::string(kUsage));
  const kr::BundleInfo bundle = kr::open_bundle(a.bundle);
  const kr::BpeTokenizer tok(bundle.tokenizer_path);
  std::vector<int64_t> ids = prompt_ids(a, tok);
  const int64_t prompt_tokens = static_cast<int64_t>(ids.size());
  if (a.depth > prompt_tokens)
    throw RunnerError("--depth " + std::to_string(a.depth) + " needs at least " + std::to_string(a.depth) +
                      " prompt ids, the prompt has " + std::to_string(prompt_tokens) + ": give a longer prompt or a smaller --depth");
  if (a.depth > 0) ids.resize(a.depth);

  kr::load_kernel_library(kernel_library(a, argv0));
  if (a.threads > 0) kr::set_threads(static_cast<unsigned>(a.threads));  // before loading: XNNPACK keeps its pool
  const auto t_load = Clock::now();
  kr::KvqProgram program(bundle.program_path);
  const double load_ms = std::chrono::duration<double, std::milli>(Clock::now() - t_load).count();
  for (int64_t id : ids)
    if (id < 0 || id >= program.vocab_size())
      throw RunnerError("prompt id " + std::to_string(id) + " is outside the vocabulary of " + std::to_string(program.vocab_size()));

  // Untimed warm-up runs, then timed ones; each restarts the sequence at position 0.
  Json prefill = Json::array(), prefill_tok = Json::array(), first = Json::array(), decode = Json::array();
  kr::RunStats last;
  for (int64_t r = 0; r < a.warmup + a.reps; ++r) {
    kr::Sampler sampler(static_cast<float>(a.temperature), a.seed);  // same seed every run: same tokens
    const bool show = a.stream && r == a.warmup + a.reps - 1;
    kr::TextStream text(tok);
    last = kr::generate(program, sampler, ids, {a.gen, a.ignore_eos}, [&](int64_t id) {
      if (show) std::cerr << text.push(id) << std::flush;
    });
    if (show) std::cerr << text.finish() << std::endl;
    if (r < a.warmup) continue;
    prefill.push_back(last.prefill_ms);
    prefill_tok.push_back(last.prefill_ms / static_cast<double>(ids.size()));
    first.push_back(last.first_token_ms);
    decode.push_back(last.decode_steps ? Json(last.decode_ms / last.decode_steps) : Json(nullptr));
  }
  const kr::KvUsage kv = kr::kv_usage(program, bundle, last.cached_tokens);
  Json kv_bytes;
  for (int b : {2, 4, 8, 16}) kv_bytes[std::to_string(b)] = kv.bytes_by_bits.count(b) ? kv.bytes_by_bits.at(b) : 0;

  Json out;  // the contract the Python side reads (runtime_ops/README.md)
  out["runner"] = "kvq_runner";
  out["version"] = 1;
  out["arch"] = kArch;
  out["bundle"] = a.bundle;
  out["threads"] = kr::thread_count();
  out["prompt_tokens"] = prompt_tokens;
  out["depth"] = ids.size();
  out["gen"] = a.gen;
  out["warmup"] = a.warmup;
  out["reps"] = a.reps;
  out["load_ms"] = load_ms;
  out["prefill_ms"] = prefill;
  out["prefill_ms_per_token"] = prefill_tok;
  out["first_token_ms"] = first;
  out["decode_ms_per_token"] = decode;
  out["decode_steps"] = last.decode_steps;
  out["stopped"] = last.stopped;
  out["tokens"] = last.tokens;
  out["text"] = tok.decode(last.tokens, /*skip_special=*/true);
  out["kv_bytes"] = kv_bytes;
  out["kv_bytes_total"] = kv.bytes_total;
  out["kv_bytes_allocated"] = bundle.bytes_allocated;
  out["cached_tokens"] = last.cached_tokens;
  out["max_context"] = program.max_context();
  out["peak_rss_bytes"] = peak_rss_bytes();
  print_json(out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args a = parse(argc, argv);
    const bool tokenizer_only = a.has_encode || !a.encode_file.empty() || !a.decode_ids.empty() || !a.decode_file.empty();
    return tokenizer_only ? tokenizer_mode(a) : generate_mode(a, argv[0]);
  } catch (const RunnerError& e) {
    std::cerr << "kvq_runner: error: " << e.what() << std::endl;
  } catch (const std::exception& e) {  // JSON / allocation failures inside the library
    std::cerr << "kvq_runner: error: " << e.what() << std::endl;
  }
  return 1;
}
