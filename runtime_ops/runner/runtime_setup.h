// Process-wide ExecuTorch setup the runner owns: the kvq kernel library and the thread pool.
#pragma once
#include <string>

namespace kvq::runner {

// dlopen the kvq kernel library; its static initializers register kvq::*.out with the runtime.
// Throws RunnerError naming the path and how to build it.
void load_kernel_library(const std::string& path);

// Size ExecuTorch's shared pool (XNNPACK and the kvq kernels both run on it; OMP_NUM_THREADS
// does not reach it). Call before loading a program: XNNPACK keeps the pool it was built with.
void set_threads(unsigned n);
unsigned thread_count();

}  // namespace kvq::runner
