# Cross-compile for 64-bit ARM Linux (glibc) with Debian's g++-aarch64-linux-gnu.
#   cmake -DCMAKE_TOOLCHAIN_FILE=runtime_ops/cmake/aarch64-linux-gnu.cmake ...   (build.py --target aarch64)
# The result runs under `qemu-aarch64 -L /usr/aarch64-linux-gnu` and on ARM boards / phones
# through its own glibc loader (see build.py's dist folder).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
# Programs from the host; libraries and headers from the target. Packages are found by
# <Pkg>_DIR (the unpacked aarch64 executorch wheel), which this does not reroot.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
# check_cxx_source_runs and friends cannot run target binaries on the host without this.
find_program(KVQ_QEMU_AARCH64 qemu-aarch64)
if(KVQ_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${KVQ_QEMU_AARCH64} -L /usr/aarch64-linux-gnu)
endif()
