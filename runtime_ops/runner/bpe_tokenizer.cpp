#include "bpe_tokenizer.h"

#include <algorithm>
#include <climits>
#include <fstream>
#include <sstream>

#include "error.h"
#include "utf8.h"

namespace kvq::runner {
namespace {

using nlohmann::json;

json read_json(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw RunnerError("cannot read " + path + ": the bundle has no tokenizer; re-export it with `kvexport export`");
  try {
    return json::parse(f);
  } catch (const json::exception& e) {
    throw RunnerError(path + " is not valid JSON (" + e.what() + "); re-export the bundle");
  }
}

// GPT-2's byte -> printable code point map: printable Latin-1 bytes stand for themselves, the
// rest take U+0100 onwards in byte order.
std::vector<uint32_t> bytes_to_unicode() {
  std::vector<uint32_t> map(256);
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    map[b] = printable ? b : next++;
  }
  return map;
}

std::vector<std::string> split_chars(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    size_t n = utf8::valid_length(s, i);
    if (n == 0) n = 1;
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

std::string merge_key(const std::string& a, const std::string& b) {
  std::string k = a;
  k += '\0';
  k += b;
  return k;
}

}  // namespace

BpeTokenizer::BpeTokenizer(const std::string& path) {
  const json j = read_json(path);
  const json& model = j.at("model");
  if (model.value("type", "") != "BPE")
    throw RunnerError(path + ": model type '" + model.value("type", "") + "' is not supported (byte-level BPE only)");
  if (!j.value("normalizer", json()).is_null())
    throw RunnerError(path + ": a normalizer is set (" + j["normalizer"].value("type", "?") + "); the native tokenizer supports none");
  const json& dec = j.value("decoder", json());
  if (!dec.is_null() && dec.value("type", "") != "ByteLevel")
    throw RunnerError(path + ": decoder type '" + dec.value("type", "") + "' is not supported (ByteLevel only)");
  pre_ = PreTokenizer(j.value("pre_tokenizer", json()));

  for (const auto& [token, id] : model.at("vocab").items()) {
    const int64_t i = id.get<int64_t>();
    vocab_[token] = i;
    if (static_cast<size_t>(i) >= id_to_token_.size()) id_to_token_.resize(i + 1);
    id_to_token_[i] = token;
  }
  int rank = 0;
  for (const auto& m : model.at("merges")) {
    std::string a, b;
    if (m.is_array()) {  // [["a", "b"], ...] (tokenizers >= 0.20)
      a = m.at(0).get<std::string>();
      b = m.at(1).get<std::string>();
    } else {  // ["a b", ...]
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    }
    merge_rank_.emplace(merge_key(a, b), rank++);
  }
  for (const auto& t : j.value("added_tokens", json::array())) {
    if (t.value("lstrip", false) || t.value("rstrip", false) || t.value("single_word", false))
      throw RunnerError(path + ": added token '" + t.at("content").get<std::string>() +
                        "' uses lstrip/rstrip/single_word, which the native tokenizer does not support");
    Added a{t.at("content").get<std::string>(), t.at("id").get<int64_t>(), t.value("special", false)};
    if (static_cast<size_t>(a.id) >= id_to_token_.size()) id_to_token_.resize(a.id + 1);
    id_to_token_[a.id] = a.content;
    added_.push_back(std::move(a));
  }
  is_special_.assign(id_to_token_.size(), false);
  for (const Added& a : added_) is_special_[a.id] = a.special;

  const std::vector<uint32_t> map = bytes_to_unicode();
  for (int b = 0; b < 256; ++b) {
    utf8::append(byte_to_char_[b], map[b]);
    char_to_byte_[map[b]] = static_cast<unsigned char>(b);
  }
}

std::vector<std::string> BpeTokenizer::bpe(const std::string& word) const {
  // Merge the lowest-ranked adjacent pair (leftmost on ties) until none is in the table:
  // the order `tokenizers` applies merges in.
  // A symbol outside the vocabulary is dropped before merging, as `tokenizers` does without
  // an unk token or byte fallback (SmolLM2 lacks a few control-byte stand-ins).
  std::vector<std::string> sym = split_chars(word);
  sym.erase(std::remove_if(sym.begin(), sym.end(), [&](const std::string& c) { return !vocab_.count(c); }), sym.end());
  while (sym.size() > 1) {
    int best = INT_MAX;
    size_t at = 0;
    for (size_t i = 0; i + 1 < sym.size(); ++i) {
      auto it = merge_rank_.find(merge_key(sym[i], sym[i + 1]));
      if (it != merge_rank_.end() && it->second < best) {
        best = it->second;
        at = i;
      }
    }
    if (best == INT_MAX) break;
    sym[at] += sym[at + 1];
    sym.erase(sym.begin() + at + 1);
  }
  return sym;
}

void BpeTokenizer::encode_piece(const std::string& piece, std::vector<int64_t>& out) const {
  auto hit = cache_.find(piece);
  if (hit == cache_.end()) {
    std::string mapped;
    for (unsigned char c : piece) mapped += byte_to_char_[c];
    std::vector<int64_t> ids;
    for (const std::string& s : bpe(mapped)) ids.push_back(vocab_.at(s));  // merges only make vocabulary tokens
    hit = cache_.emplace(piece, std::move(ids)).first;
  }
  out.insert(out.end(), hit->second.begin(), hit->second.end());
}

std::vector<int64_t> BpeTokenizer::encode(std::string_view text) const {
  std::vector<int64_t> out;
  size_t done = 0;  // text[..done) is tokenized
  const auto flush = [&](size_t end) {
    for (const std::string& p : pre_.split(text.substr(done, end - done))) encode_piece(p, out);
  };
  for (size_t i = 0; i < text.size();) {
    const Added* best = nullptr;  // leftmost, then longest
    for (const Added& a : added_)
      if (!a.content.empty() && text.compare(i, a.content.size(), a.content) == 0 &&
          (!best || a.content.size() > best->content.size()))
        best = &a;
    if (!best) {
      ++i;
      continue;
    }
    flush(i);
    out.push_back(best->id);
    i += best->content.size();
    done = i;
  }
  flush(text.size());
  return out;
}

std::string BpeTokenizer::token_bytes(int64_t id, bool skip_special) const {
  if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size())
    throw RunnerError("token id " + std::to_string(id) + " is outside the vocabulary of " + std::to_string(id_to_token_.size()));
  if (skip_special && is_special_[id]) return {};
  const std::string& tok = id_to_token_[id];
  std::string out;
  for (size_t i = 0; i < tok.size();) {
    uint32_t cp = 0;
    size_t n = utf8::valid_length(tok, i, &cp);
    if (n == 0) n = 1;
    auto it = char_to_byte_.find(cp);
    if (it != char_to_byte_.end()) out += static_cast<char>(it->second);
    else out.append(tok, i, n);  // not a stand-in (e.g. part of an added token): its own UTF-8
    i += n;
  }
  return out;
}

std::string BpeTokenizer::decode(const std::vector<int64_t>& ids, bool skip_special) const {
  std::string bytes;
  for (int64_t id : ids) bytes += token_bytes(id, skip_special);
  return utf8::lossy(bytes);
}

std::string TextStream::push(int64_t id) {
  pending_ += tok_.token_bytes(id, /*skip_special=*/true);
  const size_t n = utf8::complete_prefix(pending_);
  std::string out = utf8::lossy(std::string_view(pending_).substr(0, n));
  pending_.erase(0, n);
  return out;
}

std::string TextStream::finish() {
  std::string out = utf8::lossy(pending_);
  pending_.clear();
  return out;
}

}  // namespace kvq::runner
