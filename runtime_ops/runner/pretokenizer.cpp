#include "pretokenizer.h"

#include <cstdint>

#include "error.h"
#include "unicode_class.h"
#include "utf8.h"

namespace kvq::runner {
namespace {

struct CodePoints {
  std::vector<uint32_t> cp;
  std::vector<size_t> offset;  // byte offset of each code point, plus the end
};

CodePoints code_points(std::string_view s) {
  CodePoints out;
  for (size_t i = 0; i < s.size();) {
    uint32_t cp = 0xFFFD;  // an invalid byte is one "other" code point; its bytes pass through
    size_t n = utf8::valid_length(s, i, &cp);
    out.cp.push_back(n ? cp : 0xFFFD);
    out.offset.push_back(i);
    i += n ? n : 1;
  }
  out.offset.push_back(s.size());
  return out;
}

enum class Cls { kLetter, kNumber, kSpace, kOther };

Cls classify(uint32_t cp) {
  if (unicode::is_letter(cp)) return Cls::kLetter;
  if (unicode::is_number(cp)) return Cls::kNumber;
  if (unicode::is_whitespace(cp)) return Cls::kSpace;
  return Cls::kOther;
}

// Length (in code points) of the GPT-2 regex match starting at k.
size_t gpt2_match(const std::vector<uint32_t>& cp, const std::vector<Cls>& cls, size_t k) {
  const size_t n = cp.size();
  if (cp[k] == '\'' && k + 1 < n) {  // contractions, lowercase only (as the regex)
    const uint32_t a = cp[k + 1], b = k + 2 < n ? cp[k + 2] : 0;
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  }
  size_t start = k;
  if (cp[k] == ' ' && k + 1 < n && cls[k + 1] != Cls::kSpace) start = k + 1;  // the optional leading space
  if (cls[start] != Cls::kSpace) {
    size_t j = start;
    while (j < n && cls[j] == cls[start]) ++j;
    return j - k;
  }
  size_t j = k;
  while (j < n && cls[j] == Cls::kSpace) ++j;
  if (j == n || j - k == 1) return j - k;  // \s+ to the end, or a lone space before a word (\s+)
  return j - k - 1;                        // \s+(?!\S): leave the last space to the next word
}

}  // namespace

std::vector<std::string> split_gpt2(std::string_view text) {
  const CodePoints cps = code_points(text);
  std::vector<Cls> cls(cps.cp.size());
  for (size_t i = 0; i < cls.size(); ++i) cls[i] = classify(cps.cp[i]);
  std::vector<std::string> out;
  for (size_t k = 0; k < cps.cp.size();) {
    const size_t len = gpt2_match(cps.cp, cls, k);
    out.emplace_back(text.substr(cps.offset[k], cps.offset[k + len] - cps.offset[k]));
    k += len;
  }
  return out;
}

std::vector<std::string> split_digits(std::string_view text, bool individual) {
  const CodePoints cps = code_points(text);
  std::vector<std::string> out;
  size_t k = 0;
  while (k < cps.cp.size()) {
    const bool digit = unicode::is_number(cps.cp[k]);
    size_t j = k + 1;
    if (!digit || !individual)
      while (j < cps.cp.size() && unicode::is_number(cps.cp[j]) == digit) ++j;
    out.emplace_back(text.substr(cps.offset[k], cps.offset[j] - cps.offset[k]));
    k = j;
  }
  return out;
}

PreTokenizer::PreTokenizer(const nlohmann::json& config) {
  if (!config.is_null()) add(config);
}

void PreTokenizer::add(const nlohmann::json& c) {
  const std::string type = c.value("type", "");
  if (type == "Sequence") {
    for (const auto& sub : c.at("pretokenizers")) add(sub);
  } else if (type == "ByteLevel") {
    steps_.push_back({Step::kByteLevel, c.value("add_prefix_space", false), c.value("use_regex", true)});
  } else if (type == "Digits") {
    steps_.push_back({Step::kDigits, c.value("individual_digits", false), true});
  } else {
    throw RunnerError("tokenizer.json: pre_tokenizer type '" + type +
                      "' is not supported by the native tokenizer (ByteLevel, Digits, Sequence are)");
  }
}

std::vector<std::string> PreTokenizer::split(std::string_view text) const {
  std::vector<std::string> pieces{std::string(text)};
  for (const Step& step : steps_) {
    std::vector<std::string> next;
    for (std::string& p : pieces) {
      if (step.kind == Step::kByteLevel && step.flag_a && (p.empty() || p[0] != ' ')) p.insert(p.begin(), ' ');
      std::vector<std::string> parts = step.kind == Step::kDigits ? split_digits(p, step.flag_a)
                                       : step.flag_b              ? split_gpt2(p)
                                                                  : std::vector<std::string>{p};
      for (auto& s : parts) next.push_back(std::move(s));
    }
    pieces = std::move(next);
  }
  return pieces;
}

}  // namespace kvq::runner
