// UTF-8 helpers: code point iteration, encoding, and the two questions streaming text asks
// (how much of a byte buffer is complete, and what Rust's from_utf8_lossy would make of it).
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace kvq::runner::utf8 {

// Length of the valid sequence starting at s[i], or 0 if the bytes there are not one
// (bad lead byte, bad continuation, overlong, surrogate, > U+10FFFF, or cut off).
inline size_t valid_length(std::string_view s, size_t i, uint32_t* cp_out = nullptr) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[i + k]); };
  const unsigned char c = b(0);
  size_t n;
  uint32_t cp;
  if (c < 0x80) { if (cp_out) *cp_out = c; return 1; }
  else if (c >= 0xC2 && c <= 0xDF) { n = 2; cp = c & 0x1F; }
  else if (c >= 0xE0 && c <= 0xEF) { n = 3; cp = c & 0x0F; }
  else if (c >= 0xF0 && c <= 0xF4) { n = 4; cp = c & 0x07; }
  else return 0;
  if (i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    if ((b(k) & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (b(k) & 0x3F);
  }
  if ((n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF))) return 0;
  if (cp_out) *cp_out = cp;
  return n;
}

// Length of the longest prefix of an invalid sequence at s[i] that could still be completed
// (Unicode's "maximal subpart"): from_utf8_lossy replaces that many bytes (at least 1) by one U+FFFD.
inline size_t maximal_subpart(std::string_view s, size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  unsigned char lo = 0x80, hi = 0xBF;
  size_t n;
  if (c >= 0xC2 && c <= 0xDF) n = 2;
  else if (c >= 0xE0 && c <= 0xEF) { n = 3; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
  else if (c >= 0xF0 && c <= 0xF4) { n = 4; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
  else return 1;
  size_t k = 1;
  for (; k < n && i + k < s.size(); ++k) {
    const unsigned char d = static_cast<unsigned char>(s[i + k]);
    if (d < (k == 1 ? lo : 0x80) || d > (k == 1 ? hi : 0xBF)) break;
  }
  return k;
}

inline void append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Valid UTF-8: each invalid maximal subpart becomes U+FFFD (what HF's ByteLevel decoder does).
inline std::string lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    if (size_t n = valid_length(s, i)) {
      out.append(s.substr(i, n));
      i += n;
    } else {
      append(out, 0xFFFD);
      i += maximal_subpart(s, i);
    }
  }
  return out;
}

// How many leading bytes can be shown now: everything but a trailing sequence that the next
// token may still complete (a streamed multi-byte character split across tokens).
inline size_t complete_prefix(std::string_view s) {
  for (size_t back = 1; back <= 3 && back <= s.size(); ++back) {
    const size_t i = s.size() - back;
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: look further back for its lead
    if (c >= 0xC2 && c <= 0xF4 && valid_length(s, i) == 0 && maximal_subpart(s, i) == back) return i;
    break;
  }
  return s.size();
}

}  // namespace kvq::runner::utf8
