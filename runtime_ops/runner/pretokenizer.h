// The pre-tokenizer of an HF tokenizer.json: splits text into the pieces BPE merges within.
// Supported: ByteLevel (GPT-2 regex, add_prefix_space), Digits and a Sequence of those; any
// other type is rejected by name rather than approximated.
#pragma once
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace kvq::runner {

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+, matched like the
// regex (first alternative that matches, leftmost), written out because std::regex has neither
// \p{..} nor lookahead.
std::vector<std::string> split_gpt2(std::string_view text);

// Digits pre-tokenizer: numbers isolated from the rest, one piece per digit if individual.
std::vector<std::string> split_digits(std::string_view text, bool individual);

class PreTokenizer {
 public:
  PreTokenizer() = default;
  explicit PreTokenizer(const nlohmann::json& config);  // tokenizer.json's "pre_tokenizer" (may be null)
  std::vector<std::string> split(std::string_view text) const;

 private:
  struct Step {
    enum Kind { kByteLevel, kDigits } kind;
    bool flag_a = false;  // ByteLevel: add_prefix_space; Digits: individual_digits
    bool flag_b = true;   // ByteLevel: use_regex
  };
  void add(const nlohmann::json& config);
  std::vector<Step> steps_;
};

}  // namespace kvq::runner
