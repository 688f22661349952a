"""Build the kvq kernel libraries into runtime_ops/build/ (run by `make setup`).

    python runtime_ops/build.py            # configure + build (Release, -j2)
    python runtime_ops/build.py --clean    # start from an empty build directory

Uses the CMake of this Python environment (the `cmake` wheel: executorch's CMake targets need
>= 3.28) and points it at the torch and executorch wheels installed here.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"


def cmake_binary() -> str:
    """The cmake next to this interpreter (pip's `cmake`), else one on PATH."""
    local = Path(sys.executable).parent / "cmake"
    if local.exists():
        return str(local)
    found = shutil.which("cmake")
    if not found:
        sys.exit("cmake not found: `pip install -r requirements.txt` installs it (or run `make setup`)")
    return found


def prefix_path() -> str:
    import torch.utils

    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:  # a namespace package: no __init__
        sys.exit("the executorch wheel is not installed: run `make setup`")
    return ";".join([torch.utils.cmake_prefix_path, list(spec.submodule_search_locations)[0]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clean", action="store_true", help="remove runtime_ops/build first")
    ap.add_argument("--jobs", "-j", type=int, default=2)
    args = ap.parse_args()
    if args.clean and BUILD.exists():
        shutil.rmtree(BUILD)
    cmake = cmake_binary()
    configure = [
        cmake, "-S", str(HERE), "-B", str(BUILD),
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_PREFIX_PATH={prefix_path()}",
    ]
    env = dict(os.environ)
    subprocess.run(configure, check=True, env=env)
    subprocess.run([cmake, "--build", str(BUILD), "-j", str(args.jobs)], check=True, env=env)
    print(f"kvq kernels built in {BUILD}")


if __name__ == "__main__":
    main()
