// Byte-level BPE, as HF `tokenizers` runs a tokenizer.json of GPT-2 lineage (SmolLM2's):
// added/special tokens are cut out first (leftmost-longest), the rest is pre-tokenized, each
// piece's bytes are mapped to GPT-2's printable stand-ins and merged by rank.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "pretokenizer.h"

namespace kvq::runner {

class BpeTokenizer {
 public:
  explicit BpeTokenizer(const std::string& tokenizer_json_path);

  std::vector<int64_t> encode(std::string_view text) const;
  // HF decode: tokens joined, stand-ins mapped back to bytes, invalid UTF-8 replaced by U+FFFD.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special = false) const;
  // The raw bytes of one token (a UTF-8 character may span tokens: see TextStream).
  std::string token_bytes(int64_t id, bool skip_special = false) const;
  size_t vocab_size() const { return id_to_token_.size(); }

 private:
  struct Added {
    std::string content;
    int64_t id;
    bool special;
  };
  void encode_piece(const std::string& piece, std::vector<int64_t>& out) const;
  std::vector<std::string> bpe(const std::string& word) const;

  std::unordered_map<std::string, int64_t> vocab_;  // the BPE model's (added tokens are matched separately)
  std::vector<std::string> id_to_token_;
  std::vector<bool> is_special_;
  std::unordered_map<std::string, int> merge_rank_;  // key: left + '\0' + right
  std::vector<Added> added_;
  PreTokenizer pre_;
  std::string byte_to_char_[256];  // GPT-2 bytes_to_unicode, as UTF-8
  std::unordered_map<uint32_t, unsigned char> char_to_byte_;
  // piece -> ids; makes encode() cheap on repeated words and not thread-safe (one tokenizer per thread)
  mutable std::unordered_map<std::string, std::vector<int64_t>> cache_;
};

// Incremental decoding for streaming: hands out text only once its UTF-8 is complete.
class TextStream {
 public:
  explicit TextStream(const BpeTokenizer& tok) : tok_(tok) {}
  std::string push(int64_t id);  // the newly printable text
  std::string finish();          // whatever is left (lossy)

 private:
  const BpeTokenizer& tok_;
  std::string pending_;
};

}  // namespace kvq::runner
