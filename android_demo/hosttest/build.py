"""Build the JNI bridge for this machine and compile the Java sources the app uses, plus the
host test harness (run by tests/test_android_host.py; `make android-host-test`).

    .venv/bin/python android_demo/hosttest/build.py        # -> android_demo/build/host/{libkvq_jni.so,classes/}

Needs a JDK (javac and jni.h: Debian's openjdk-17-jdk-headless) and the runner library that
`runtime_ops/build.py` (make setup) writes to runtime_ops/build/libkvq_runner.a.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent
ROOT = DEMO.parent
OUT = DEMO / "build" / "host"
CLASSES = OUT / "classes"
JNI_SOURCES = DEMO / "app" / "src" / "main" / "cpp"
JAVA_SOURCES = [*sorted((DEMO / "app" / "src" / "main" / "java" / "dev" / "kvexport").glob("*.java")),
                *sorted((HERE / "java").rglob("*.java"))]
KERNELS = ROOT / "runtime_ops" / "build" / "libkvq_executorch.so"
JDK_HINT = "install a JDK: `apt-get install openjdk-17-jdk-headless` (make setup does it as root)"


class BuildError(RuntimeError):
    pass


def java_home() -> Path:
    """The JDK holding javac (JAVA_HOME if set): FindJNI looks for jni.h under it."""
    if os.environ.get("JAVA_HOME") and (Path(os.environ["JAVA_HOME"]) / "bin" / "javac").exists():
        return Path(os.environ["JAVA_HOME"])
    javac = shutil.which("javac")
    if javac is None:
        raise BuildError(f"javac not found: {JDK_HINT}")
    return Path(javac).resolve().parent.parent


def executorch_prefix() -> Path:
    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("the executorch wheel is not installed: run `make setup`")
    return Path(list(spec.submodule_search_locations)[0])


def cmake() -> str:
    local = Path(sys.executable).parent / "cmake"
    return str(local) if local.exists() else (shutil.which("cmake") or "cmake")


def run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError(f"{' '.join(cmd[:3])} ... failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-4000:]}")


def build(jobs: int = 2) -> Path:
    """Configure + build libkvq_jni.so and javac the sources -> the output folder."""
    home = java_home()
    run([cmake(), "-S", str(JNI_SOURCES), "-B", str(OUT), "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_PREFIX_PATH={executorch_prefix()}", f"-DJAVA_HOME={home}"])
    run([cmake(), "--build", str(OUT), "-j", str(jobs)])
    CLASSES.mkdir(parents=True, exist_ok=True)
    run([str(home / "bin" / "javac"), "-Xlint:all", "-Werror", "-d", str(CLASSES), *map(str, JAVA_SOURCES)])
    return OUT


def java_command(main_class: str = "dev.kvexport.HostTest") -> list[str]:
    """How to start the harness: the built classes, the JNI library on java.library.path, a small
    heap (the leak loop reads the process RSS, which a growing Java heap would blur)."""
    return [str(java_home() / "bin" / "java"), "-Xmx64m", "-Xms64m", "-Xcheck:jni", f"-Djava.library.path={OUT}",
            "-cp", str(CLASSES), main_class]


if __name__ == "__main__":
    try:
        print(build())
    except BuildError as e:
        sys.exit(str(e))
