// Code point classes of the GPT-2 pre-tokenizer regex (\p{L}, \p{N}, \s), from the generated tables.
#pragma once
#include <algorithm>
#include <cstdint>
#include <iterator>

#include "unicode_tables.h"

namespace kvq::runner::unicode {

template <size_t N>
bool in_ranges(const Range (&table)[N], uint32_t cp) {
  const Range* it = std::upper_bound(std::begin(table), std::end(table), cp, [](uint32_t c, const Range& r) { return c < r.first; });
  return it != std::begin(table) && cp <= (it - 1)->last;
}

inline bool is_letter(uint32_t cp) {
  if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
  return in_ranges(kLetterRanges, cp);
}
inline bool is_number(uint32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  return in_ranges(kNumberRanges, cp);
}
inline bool is_whitespace(uint32_t cp) {
  if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0D);
  return in_ranges(kWhitespaceRanges, cp);
}

}  // namespace kvq::runner::unicode
