#include "bundle.h"

#include <sys/stat.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "error.h"

namespace kvq::runner {
namespace {

constexpr const char* kReexport = "re-export it with `kvexport export --out DIR`";

bool file_size(const std::string& path, int64_t* size) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
  *size = st.st_size;
  return true;
}

}  // namespace

BundleInfo open_bundle(const std::string& dir) {
  struct stat st {};
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    throw RunnerError("bundle folder " + dir + " does not exist; pass --bundle DIR of a bundle written by `kvexport export --out DIR`");
  const std::string manifest_path = dir + "/manifest.json";
  std::ifstream f(manifest_path);
  if (!f) throw RunnerError(dir + " has no manifest.json: not a kvexport bundle (or an interrupted copy); " + kReexport);
  nlohmann::json m;
  try {
    m = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    throw RunnerError(manifest_path + " is corrupt (" + e.what() + "); " + kReexport);
  }
  BundleInfo b;
  b.dir = dir;
  try {
    if (m.value("format", "") != "kvexport-bundle") throw RunnerError(manifest_path + " is not a kvexport-bundle manifest; " + kReexport);
    const auto& program = m.at("program");
    if (program.is_null())
      throw RunnerError(dir + " has no model.pte (exported with --formats onnx); re-export with `--formats pte,onnx`");
    b.program_path = dir + "/" + program.get<std::string>();
    b.tokenizer_path = dir + "/tokenizer.json";
    for (const auto& p : m.at("cache").at("pools")) b.bytes_per_token[p.at("bits").get<int>()] = p.at("bytes_per_token").get<int64_t>();
    b.bytes_allocated = m.at("cache").at("bytes_allocated").get<int64_t>();
    for (const std::string& name : {program.get<std::string>(), std::string("tokenizer.json")}) {
      int64_t size = 0;
      if (!file_size(dir + "/" + name, &size)) throw RunnerError("bundle file " + name + " is missing from " + dir + "; " + kReexport);
      const auto& files = m.at("files");
      if (files.contains(name) && files[name].at("bytes").get<int64_t>() != size)
        throw RunnerError("bundle file " + name + " is " + std::to_string(size) + " bytes, the manifest says " +
                          std::to_string(files[name]["bytes"].get<int64_t>()) + " (truncated or replaced); " + kReexport);
    }
  } catch (const nlohmann::json::exception& e) {
    throw RunnerError(manifest_path + " lacks a field the runner needs (" + e.what() + "); " + kReexport);
  }
  return b;
}

}  // namespace kvq::runner
