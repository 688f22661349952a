"""Build the kvq kernel libraries and the native runner (run by `make setup`).

    python runtime_ops/build.py                    # host: runtime_ops/build/ (+ build/dist/)
    python runtime_ops/build.py --target aarch64   # cross: runtime_ops/build/aarch64/ (+ dist/)
    python runtime_ops/build.py --clean            # start from an empty build directory

Uses the CMake of this Python environment (the `cmake` wheel: executorch's CMake targets need
>= 3.28) and points it at the torch and executorch wheels installed here. The aarch64 build
downloads the executorch wheel of the same version for manylinux aarch64 (pip download, cached
in build/aarch64/wheel/) and cross-compiles with Debian's g++-aarch64-linux-gnu; it builds the
ExecuTorch kernel library, kvq_test (unsanitized) and the runner, not the PyTorch library.

Both builds stage a dist/ folder (build/dist, build/aarch64/dist): kvq_runner plus lib/ with every shared library it loads (executorch's,
libkvq_executorch.so, libstdc++, libgcc_s, glibc and its loader), so the folder can be copied
to another machine of that architecture and run as
    ./lib/ld-linux-<arch>.so.<n> --library-path ./lib ./kvq_runner ...
(no system library used: how a phone is reached over adb without the NDK) or as ./kvq_runner
on a machine with the same glibc (its RUNPATH is $ORIGIN/lib, so it takes the staged libc too).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
AARCH64 = BUILD / "aarch64"  # wheel/, the unpacked wheel, build/ (CMake tree), dist/
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")
CROSS_TOOLS_HINT = "apt-get install -y --no-install-recommends g++-aarch64-linux-gnu binutils-aarch64-linux-gnu qemu-user"
DIST_PROGRAMS = ("kvq_runner",)
DIST_PLUGINS = ("libkvq_executorch.so",)  # dlopened, so no NEEDED entry points at it


def cmake_binary() -> str:
    """The cmake next to this interpreter (pip's `cmake`), else one on PATH."""
    local = Path(sys.executable).parent / "cmake"
    if local.exists():
        return str(local)
    found = shutil.which("cmake")
    if not found:
        sys.exit("cmake not found: `pip install -r requirements.txt` installs it (or run `make setup`)")
    return found


def executorch_package() -> Path:
    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:  # a namespace package: no __init__
        sys.exit("the executorch wheel is not installed: run `make setup`")
    return Path(list(spec.submodule_search_locations)[0])


def json_include_dir() -> Path:
    """A folder holding nlohmann/json.hpp: the `nlohmann-json` pip package, else Debian's."""
    spec = importlib.util.find_spec("nlohmann_json")
    candidates = [Path(list(spec.submodule_search_locations)[0]) / "include"] if spec and spec.submodule_search_locations else []
    candidates.append(Path("/usr/include"))
    for c in candidates:
        if (c / "nlohmann" / "json.hpp").exists():
            return c
    sys.exit("the runner needs nlohmann/json.hpp: `pip install nlohmann-json==3.12.0` (or apt-get install nlohmann-json3-dev)")


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, env=dict(os.environ))


def build(build_dir: Path, extra: list[str], jobs: int) -> None:
    cmake = cmake_binary()
    run([cmake, "-S", str(HERE), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
         f"-DKVQ_JSON_INCLUDE_DIR={json_include_dir()}", *extra])
    run([cmake, "--build", str(build_dir), "-j", str(jobs)])


# ---- aarch64: wheel + cross toolchain ---------------------------------------------------------
def aarch64_executorch() -> Path:
    """The aarch64 executorch wheel of the installed version, unpacked -> its package folder."""
    version = metadata.version("executorch")
    wheels, unpacked = AARCH64 / "wheel", AARCH64 / f"executorch-{version}"
    package = unpacked / "executorch"
    if (package / "lib" / "libexecutorch.so").exists():
        return package
    found = sorted(wheels.glob(f"executorch-{version}-*aarch64*.whl"))
    if not found:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform", "manylinux_2_28_aarch64",
             "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}", f"executorch=={version}", "-d", str(wheels)])
        found = sorted(wheels.glob(f"executorch-{version}-*aarch64*.whl"))
    if not found:
        sys.exit(f"pip download did not produce an aarch64 executorch {version} wheel in {wheels}")
    with zipfile.ZipFile(found[-1]) as z:  # only what a C++ build needs: headers, libraries, CMake package
        members = [m for m in z.namelist() if m.startswith(("executorch/include/", "executorch/lib/", "executorch/share/"))]
        z.extractall(unpacked, members)
    return package


def check_cross_tools() -> None:
    missing = [t for t in ("aarch64-linux-gnu-g++", "aarch64-linux-gnu-gcc") if not shutil.which(t)]
    if missing or not (AARCH64_SYSROOT / "lib").is_dir():
        print(f"cannot cross-build for aarch64: {', '.join(missing) or AARCH64_SYSROOT} not found; install the cross "
              f"toolchain with `{CROSS_TOOLS_HINT}`", file=sys.stderr)
        sys.exit(2)


# ---- dist: the runner and every library it loads ----------------------------------------------
def readelf() -> str:
    for tool in ("readelf", "aarch64-linux-gnu-readelf"):
        if path := shutil.which(tool):
            return path  # binutils' readelf reads any ELF class/machine
    sys.exit("readelf not found (binutils)")


def needed(path: Path) -> list[str]:
    out = subprocess.run([readelf(), "-d", str(path)], check=True, capture_output=True, text=True).stdout
    return [line.split("[", 1)[1].split("]", 1)[0] for line in out.splitlines() if "(NEEDED)" in line]


def interpreter(path: Path) -> str:
    out = subprocess.run([readelf(), "-l", str(path)], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "program interpreter:" in line:
            return Path(line.split(":", 1)[1].strip(" ]")).name
    sys.exit(f"{path} has no program interpreter")


def host_lib_dirs() -> list[Path]:
    cxx = os.environ.get("CXX", "c++")
    triple = subprocess.run([cxx, "-print-multiarch"], capture_output=True, text=True).stdout.strip() or "x86_64-linux-gnu"
    stdcxx = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True).stdout.strip()
    dirs = [Path(stdcxx).parent] if stdcxx else []
    return dirs + [Path(f"/lib/{triple}"), Path(f"/usr/lib/{triple}"), Path("/lib64"), Path("/lib")]


def stage_dist(build_dir: Path, dist: Path, lib_dirs: list[Path]) -> None:
    """dist: the programs of build_dir, and lib/ with the transitive NEEDED closure + plugins + loader."""
    if dist.exists():
        shutil.rmtree(dist)
    (dist / "lib").mkdir(parents=True)
    todo: list[Path] = []
    for name in DIST_PROGRAMS:
        shutil.copy2(build_dir / name, dist / name)
        todo.append(dist / name)
    for name in DIST_PLUGINS:
        shutil.copy2(build_dir / name, dist / "lib" / name)
        todo.append(dist / "lib" / name)
    loader = interpreter(dist / DIST_PROGRAMS[0])
    wanted = {loader}
    while todo:
        for name in needed(todo.pop()):
            if name in wanted or (dist / "lib" / name).exists():
                continue
            wanted.add(name)
            src = next((d / name for d in lib_dirs if (d / name).exists()), None)
            if src is None:
                sys.exit(f"{name} (needed by the runner) is in none of {', '.join(map(str, lib_dirs))}")
            shutil.copyfile(src.resolve(), dist / "lib" / name)  # the real file under the NEEDED name
            todo.append(dist / "lib" / name)
    src = next((d / loader for d in lib_dirs if (d / loader).exists()), None)
    if src is None:
        sys.exit(f"the loader {loader} is in none of {', '.join(map(str, lib_dirs))}")
    shutil.copyfile(src.resolve(), dist / "lib" / loader)
    for f in (dist / "lib").iterdir():
        f.chmod(0o755)
    print(f"dist staged in {dist}: run as ./lib/{loader} --library-path ./lib ./kvq_runner ...")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=["host", "aarch64"], default="host")
    ap.add_argument("--clean", action="store_true", help="remove the build directory first (host: all of build/; aarch64: its tree, not the wheel)")
    ap.add_argument("--jobs", "-j", type=int, default=2)
    args = ap.parse_args()
    if args.target == "aarch64":
        check_cross_tools()
        out = AARCH64 / "build"
        if args.clean:
            for d in (out, AARCH64 / "dist"):
                shutil.rmtree(d, ignore_errors=True)
        package = aarch64_executorch()
        build(out, [f"-DCMAKE_TOOLCHAIN_FILE={HERE / 'cmake' / 'aarch64-linux-gnu.cmake'}", "-DKVQ_BUILD_ATEN=OFF",
                    "-DKVQ_SANITIZE_TEST=OFF", f"-Dexecutorch_DIR={package / 'lib' / 'cmake' / 'executorch'}"], args.jobs)
        stage_dist(out, AARCH64 / "dist", [package / "lib", AARCH64_SYSROOT / "lib"])
    else:
        if args.clean and BUILD.exists():
            shutil.rmtree(BUILD)
        import torch.utils

        build(BUILD, [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{executorch_package()}"], args.jobs)
        stage_dist(BUILD, BUILD / "dist", [executorch_package() / "lib", *host_lib_dirs()])
        out = BUILD
    print(f"kvq kernels and runner built in {out}")


if __name__ == "__main__":
    main()
