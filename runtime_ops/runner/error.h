// The runner library reports every failure as a RunnerError whose message names the problem
// and the fix; it never exits (a JNI bridge catches it and hands the message to Java).
#pragma once
#include <stdexcept>
#include <string>

namespace kvq::runner {

class RunnerError : public std::runtime_error {
 public:
  explicit RunnerError(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace kvq::runner
