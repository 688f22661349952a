"""The Android app's native layer on the host: android_demo's JNI bridge (kvq_jni.cpp over the
runner library) built for this machine and driven from a JVM through the app's own Java API
(dev.kvexport.KvqSession), by the plain-Java harness android_demo/hosttest (no JUnit, no Gradle).
Checks greedy tokens against export.pte_runner.PteDecoder, streaming and stop, Java exceptions for
every error, and RSS over 100 open/generate/close cycles. `make android-host-test` runs this file."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from export.pte_runner import PteDecoder

ROOT = Path(__file__).resolve().parents[1]
# android_demo/hosttest/build.py, by path: "build" would clash with the PyPI package of that name
_spec = importlib.util.spec_from_file_location("android_host_build", ROOT / "android_demo" / "hosttest" / "build.py")
host_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_build)

PROMPT = [504, 3575, 282, 4649, 314, 216, 33, 34, 35, 36, 10907, 47, 1073, 253, 2114, 30, 365, 1288, 28, 17, 455]  # 3 chunks of 8
MAX_NEW = 12
TEXT = "The capital of France is"
LEAK_CYCLES = 100
LEAK_BOUND_KIB = 8192  # one leaked session (packed weights, arenas, tokenizer) is tens of MiB on this bundle
TIMEOUT = 600


@pytest.fixture(scope="module")
def harness() -> list[str]:
    if shutil.which("javac") is None:
        pytest.skip(f"no JDK: {host_build.JDK_HINT}")
    if not host_build.KERNELS.exists():
        pytest.fail(f"{host_build.KERNELS} is not built: run `.venv/bin/python runtime_ops/build.py` (make setup)")
    try:
        host_build.build()
    except host_build.BuildError as e:
        pytest.fail(str(e))
    return host_build.java_command()


@pytest.fixture(scope="module")
def reference(tiny_bundle) -> list[int]:
    return PteDecoder(tiny_bundle / "model.pte").generate(torch.tensor(PROMPT), MAX_NEW)


def run_case(harness, bundle: Path, expect: list[int], case: str, *extra: str) -> str:
    csv = lambda ids: ",".join(map(str, ids))  # noqa: E731
    res = subprocess.run([*harness, case, "--bundle", str(bundle), "--kernels", str(host_build.KERNELS), "--prompt", csv(PROMPT),
                          "--expect", csv(expect), "--max-new", str(MAX_NEW), *extra],
                         capture_output=True, text=True, timeout=TIMEOUT)
    checks = "\n".join(line for line in res.stdout.splitlines() if line.startswith(("ok:", "rss_kib")))
    assert res.returncode == 0, f"{case} failed (exit {res.returncode}):\n{checks}\n{res.stderr[-3000:]}"
    assert re.search(r"^\d+ passed, 0 failed$", res.stdout, re.M), res.stdout[-2000:]
    return res.stdout


def test_tokens_text_and_stats(harness, tiny_bundle, reference, tokenizer):
    run_case(harness, tiny_bundle, reference, "tokens", "--text", TEXT,
             "--text-ids", ",".join(map(str, tokenizer.encode(TEXT, add_special_tokens=False))))


def test_stop_from_the_listener(harness, tiny_bundle, reference):
    if len(reference) < 4:
        pytest.skip("the reference stops at EOS within 3 tokens: nothing to stop")
    run_case(harness, tiny_bundle, reference, "stop")


def test_errors_become_java_exceptions(harness, tiny_bundle, reference):
    out = run_case(harness, tiny_bundle, reference, "errors")
    for fragment in ("does not exist", "cannot load the kvq kernel library", "corrupt", "max context of 96", "outside the vocabulary"):
        assert fragment in out


def test_no_leak_over_open_generate_close_cycles(harness, tiny_bundle, reference):
    out = run_case(harness, tiny_bundle, reference, "leak", "--cycles", str(LEAK_CYCLES), "--bound-kib", str(LEAK_BOUND_KIB))
    line = next(line for line in out.splitlines() if line.startswith("rss_kib"))
    print(line)  # pytest -s shows the numbers: warm-up RSS, end RSS, growth, every 20 cycles
    growth = int(re.search(r"growth=(-?\d+)", line).group(1))
    assert growth <= LEAK_BOUND_KIB, line


# ---- kvexport android push (export/android.py) through a local stand-in for adb ----------------
class LocalTransport:
    """Runs the 'remote' shell here and copies files: the push logic without a phone."""

    where = "local"

    def __init__(self):
        self.commands: list[str] = []

    def shell(self, command: str, timeout: float) -> subprocess.CompletedProcess:
        self.commands.append(command)
        return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=timeout)

    def check(self, command: str, timeout: float, what: str) -> str:
        res = self.shell(command, timeout)
        assert res.returncode == 0, f"{what}: {res.stderr}"
        return res.stdout

    def push(self, files: dict[str, Path], remote_dir: str, timeout: float) -> None:
        for name, path in files.items():
            shutil.copyfile(path, Path(remote_dir) / name)


def test_android_push_verifies_and_renames_into_place(tiny_bundle, tmp_path):
    from export.android import app_bundles_dir, push_bundle

    t = LocalTransport()
    remote = push_bundle(tiny_bundle, transport=t, remote_root=str(tmp_path / "bundles"), name="tiny")
    assert remote == str(tmp_path / "bundles" / "tiny")
    assert sorted(p.name for p in Path(remote).iterdir()) == ["manifest.json", "model.pte", "tokenizer.json"]
    assert (Path(remote) / "model.pte").stat().st_size == (tiny_bundle / "model.pte").stat().st_size
    assert not (tmp_path / "bundles" / "tiny.partial").exists()
    push_bundle(tiny_bundle, transport=t, remote_root=str(tmp_path / "bundles"), name="tiny")  # a second push replaces it
    assert app_bundles_dir() == "/sdcard/Android/data/dev.kvexport.demo/files/bundles"


def test_android_push_rejects_a_bad_bundle_before_adb(tiny_bundle, tmp_path):
    from export.android import push_bundle
    from export.bundle import BundleError

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("manifest.json", "tokenizer.json"):
        shutil.copyfile(tiny_bundle / f, bad / f)
    t = LocalTransport()
    with pytest.raises(BundleError, match="missing"):
        push_bundle(bad, transport=t, remote_root=str(tmp_path / "bundles"))
    assert t.commands == []
