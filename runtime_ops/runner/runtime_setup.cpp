#include "runtime_setup.h"

#include <dlfcn.h>

#include <cstdint>
#include <cstddef>

#include "error.h"

// The wheel ships libexecutorch_threadpool.so but not its header (only threadpool_guard.h), so
// the three entry points used here are declared as that library defines them.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace kvq::runner {

namespace tp = executorch::extension::threadpool;

void load_kernel_library(const std::string& path) {
  if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    const char* why = dlerror();
    throw RunnerError("cannot load the kvq kernel library " + path + " (" + (why ? why : "unknown error") +
                      "): build it with `.venv/bin/python runtime_ops/build.py` (make setup), or pass --kernels PATH to libkvq_executorch.so");
  }
}

void set_threads(unsigned n) {
  tp::ThreadPool* pool = tp::get_threadpool();
  if (pool == nullptr || !pool->_unsafe_reset_threadpool(n))
    throw RunnerError("could not resize ExecuTorch's thread pool to " + std::to_string(n) + " threads");
}

unsigned thread_count() {
  tp::ThreadPool* pool = tp::get_threadpool();
  return pool ? static_cast<unsigned>(pool->get_thread_count()) : 1;
}

}  // namespace kvq::runner
