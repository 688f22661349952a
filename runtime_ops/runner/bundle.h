// A kvexport bundle folder as the runner needs it: where model.pte and tokenizer.json are, and
// what manifest.json says about the packed cache. Checks files are present and of the size the
// manifest lists (a truncated copy is named before ExecuTorch sees it); sha256 is left to
// `kvexport inspect` on the host.
#pragma once
#include <cstdint>
#include <map>
#include <string>

namespace kvq::runner {

struct BundleInfo {
  std::string dir;
  std::string program_path;    // model.pte
  std::string tokenizer_path;  // tokenizer.json
  std::map<int, int64_t> bytes_per_token;  // width in bits -> bytes one cached token takes (K and V, all layers)
  int64_t bytes_allocated = 0;             // all pools
};

// Throws RunnerError naming the missing / truncated file and the fix.
BundleInfo open_bundle(const std::string& dir);

}  // namespace kvq::runner
