"""The native runner (runtime_ops/runner/, binary kvq_runner) on a tiny exported bundle: same greedy
tokens as the Python runtime (export.pte_runner.PteDecoder), its JSON report, its errors, the
self-contained dist folder, and the aarch64 build under qemu when the cross tools are there."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.pte_runner import PteDecoder

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "runtime_ops" / "build"
RUNNER = BUILD / "kvq_runner"
AARCH64_DIST = BUILD / "aarch64" / "dist"
BUILD_HINT = "run `.venv/bin/python runtime_ops/build.py` (make setup)"
PROMPT = [504, 3575, 282, 4649, 314, 216, 33, 34, 35, 36, 10907, 47, 1073, 253, 2114, 30, 365, 1288, 28, 17, 455]  # 21 ids: 3 chunks of 8
TIMEOUT = 120


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Path:
    """The tiny bundle (2 layers, rule policy, context 96, chunk 8)."""
    if not RUNNER.exists():
        pytest.fail(f"{RUNNER} is not built: {BUILD_HINT}")
    return tiny_bundle


@pytest.fixture(scope="module")
def reference(bundle) -> list[int]:
    """PteDecoder's greedy tokens for PROMPT (stops at EOS like the runner)."""
    return PteDecoder(bundle / "model.pte").generate(torch.tensor(PROMPT), 12)


def run(*args: str, runner: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(runner or [str(RUNNER)]), *args], capture_output=True, text=True, timeout=TIMEOUT)


def report(*args: str, runner: list[str] | None = None) -> dict:
    res = run(*args, runner=runner)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)  # stdout is exactly one JSON object


def ids(values) -> str:
    return ",".join(map(str, values))


def test_greedy_tokens_match_pte_decoder(bundle, reference):
    out = report("--bundle", str(bundle), "--prompt-ids", ids(PROMPT), "--gen", "12")
    assert out["tokens"] == reference
    assert out["prompt_tokens"] == out["depth"] == len(PROMPT)


def test_text_prompt_uses_the_bundle_tokenizer(bundle, tokenizer):
    text = "The capital of France is"
    by_text = report("--bundle", str(bundle), "--prompt", text, "--gen", "5", "--ignore-eos")
    by_ids = report("--bundle", str(bundle), "--prompt-ids", ids(tokenizer.encode(text, add_special_tokens=False)), "--gen", "5", "--ignore-eos")
    assert by_text["tokens"] == by_ids["tokens"] and len(by_text["tokens"]) == 5
    assert by_text["text"] == tokenizer.decode(by_text["tokens"], skip_special_tokens=True)


def test_report_schema_and_kv_bytes(bundle):
    out = report("--bundle", str(bundle), "--prompt-ids", ids(PROMPT), "--gen", "6", "--ignore-eos", "--warmup", "1", "--reps", "2",
                 "--threads", "1")
    keys = {"runner", "version", "arch", "bundle", "threads", "prompt_tokens", "depth", "gen", "warmup", "reps", "load_ms", "prefill_ms",
            "prefill_ms_per_token", "first_token_ms", "decode_ms_per_token", "tokens", "text", "kv_bytes", "kv_bytes_total",
            "kv_bytes_allocated", "max_context", "peak_rss_bytes"}
    assert keys <= set(out)
    assert (out["runner"], out["version"], out["arch"], out["threads"]) == ("kvq_runner", 1, platform.machine(), 1)
    assert (out["gen"], out["warmup"], out["reps"], len(out["tokens"])) == (6, 1, 2, 6)
    for name in ("prefill_ms", "prefill_ms_per_token", "first_token_ms", "decode_ms_per_token"):
        assert len(out[name]) == 2 and all(x > 0 for x in out[name]), name
    assert all(f >= p for f, p in zip(out["first_token_ms"], out["prefill_ms"]))
    assert out["load_ms"] > 0 and out["peak_rss_bytes"] > 10_000_000 and out["max_context"] == 96

    # bytes by width = positions stored at that width (the program's token_bits) x the manifest's bytes per token
    manifest = json.loads((bundle / "manifest.json").read_text())
    per_token = {p["bits"]: p["bytes_per_token"] for p in manifest["cache"]["pools"]}
    dec = PteDecoder(bundle / "model.pte")
    dec.generate(torch.tensor(PROMPT), 6)
    assert out["cached_tokens"] == dec.seq_len == len(PROMPT) + 5  # the last token is chosen, not fed
    bits = dec.token_bits()[: dec.seq_len].tolist()
    assert set(out["kv_bytes"]) == {"2", "4", "8", "16"}
    assert out["kv_bytes"] == {str(b): bits.count(b) * per_token.get(b, 0) for b in (2, 4, 8, 16)}
    assert sum(out["kv_bytes"].values()) == out["kv_bytes_total"] > 0
    assert out["kv_bytes_allocated"] == manifest["cache"]["bytes_allocated"]


def test_peak_rss_is_the_runners_own_not_its_parents(bundle):
    """Started by exec from a process holding 1 GiB (as a Python harness does), the runner reports its own peak."""
    parent = ("import os, sys; ballast = bytearray(1 << 30); ballast[::4096] = b'x' * len(ballast[::4096]); "
              "os.execv(sys.argv[1], sys.argv[1:])")
    res = subprocess.run([sys.executable, "-c", parent, str(RUNNER), "--bundle", str(bundle), "--prompt-ids", ids(PROMPT), "--gen", "2"],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 10_000_000 < json.loads(res.stdout)["peak_rss_bytes"] < 512 * 2**20


def test_depth_takes_the_first_ids(bundle):
    out = report("--bundle", str(bundle), "--prompt-ids", ids(PROMPT), "--depth", "10", "--gen", "4")
    assert (out["prompt_tokens"], out["depth"]) == (len(PROMPT), 10)
    assert out["tokens"] == PteDecoder(bundle / "model.pte").generate(torch.tensor(PROMPT[:10]), 4)


def test_ids_file_stream_and_sampling(bundle, tmp_path):
    f = tmp_path / "ids.txt"
    f.write_text(ids(PROMPT).replace(",", "\n"))
    res = run("--bundle", str(bundle), "--prompt-ids-file", str(f), "--gen", "5", "--ignore-eos", "--stream", "--temperature", "0.8", "--seed", "3")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["text"] and out["text"] in res.stderr  # streamed to stderr, stdout holds only the JSON
    again = report("--bundle", str(bundle), "--prompt-ids-file", str(f), "--gen", "5", "--ignore-eos", "--temperature", "0.8", "--seed", "3")
    assert again["tokens"] == out["tokens"]  # seeded


# ---- errors: nonzero exit, a message naming problem and fix, nothing on stdout -----------------
def partial_copy(bundle: Path, dest: Path, skip: str) -> Path:
    """The bundle's files as symlinks, except `skip` (left for the test to write or omit)."""
    dest.mkdir()
    for f in bundle.iterdir():
        if f.name != skip:
            (dest / f.name).symlink_to(f)
    return dest


def assert_fails(res: subprocess.CompletedProcess, *phrases: str) -> None:
    assert res.returncode != 0 and res.stdout == "", res.stdout[-500:]
    for p in phrases:
        assert p in res.stderr, f"{p!r} not in: {res.stderr[-1500:]}"


def test_missing_bundle(tmp_path):
    assert_fails(run("--bundle", str(tmp_path / "nope"), "--prompt-ids", "1,2"), "does not exist", "kvexport export")


def test_missing_and_truncated_files(bundle, tmp_path):
    d = partial_copy(bundle, tmp_path / "no-tok", "tokenizer.json")
    assert_fails(run("--bundle", str(d), "--prompt-ids", "1,2"), "tokenizer.json is missing", "re-export")
    d = partial_copy(bundle, tmp_path / "no-pte", "model.pte")
    assert_fails(run("--bundle", str(d), "--prompt-ids", "1,2"), "model.pte is missing")
    d = partial_copy(bundle, tmp_path / "truncated", "model.pte")
    (d / "model.pte").write_bytes((bundle / "model.pte").read_bytes()[: 1 << 20])
    assert_fails(run("--bundle", str(d), "--prompt-ids", "1,2"), "truncated", "re-export")


def test_corrupt_program_of_the_right_size(bundle, tmp_path):
    d = partial_copy(bundle, tmp_path / "corrupt", "model.pte")
    with (d / "model.pte").open("wb") as f:  # zeros, sparse: passes the size check, not the loader
        f.truncate((bundle / "model.pte").stat().st_size)
    assert_fails(run("--bundle", str(d), "--prompt-ids", "1,2"), "corrupt", "re-export")


def test_missing_kernel_library(bundle, tmp_path):
    assert_fails(run("--bundle", str(bundle), "--prompt-ids", "1,2", "--kernels", str(tmp_path / "libkvq_executorch.so")),
                 "kvq kernel library", "runtime_ops/build.py")
    # a library that loads but registers no kvq op: the program's load names the missing operator
    other = Path(__import__("executorch").__path__[0]) / "lib" / "libexecutorch_threadpool.so"
    assert_fails(run("--bundle", str(bundle), "--prompt-ids", "1,2", "--kernels", str(other)),
                 "Missing operator", "libkvq_executorch.so", "runtime_ops/build.py")


def test_context_and_depth_limits(bundle):
    assert_fails(run("--bundle", str(bundle), "--prompt-ids", ids(range(1, 91)), "--gen", "10"), "100", "max context of 96")
    assert_fails(run("--bundle", str(bundle), "--prompt-ids", ids(PROMPT), "--depth", "30"), "--depth 30", "has 21")
    assert_fails(run("--bundle", str(bundle), "--prompt-ids", "1,2", "--gen", "x"), "--gen")


# ---- the dist folder: copied elsewhere, run through its own loader -----------------------------
def loader_command(dist: Path) -> list[str]:
    loader = next((dist / "lib").glob("ld-linux-*"))
    return [str(loader), "--library-path", str(dist / "lib"), str(dist / "kvq_runner")]


def test_host_dist_runs_anywhere_through_its_loader(bundle, reference, tmp_path):
    dist = shutil.copytree(BUILD / "dist", tmp_path / "dist", symlinks=True)
    env_free = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    for cmd in (loader_command(dist), [str(dist / "kvq_runner")]):
        res = subprocess.run([*cmd, "--bundle", str(bundle), "--prompt-ids", ids(PROMPT), "--gen", "12"],
                             capture_output=True, text=True, timeout=TIMEOUT, env=env_free)
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(res.stdout)["tokens"] == reference


def test_aarch64_under_qemu_matches_host(bundle):
    qemu = shutil.which("qemu-aarch64")
    if not (qemu and (AARCH64_DIST / "kvq_runner").exists()):
        pytest.skip("no qemu-aarch64 or no aarch64 dist (apt-get install qemu-user g++-aarch64-linux-gnu "
                    "binutils-aarch64-linux-gnu; python runtime_ops/build.py --target aarch64)")
    args = ["--bundle", str(bundle), "--prompt-ids", ids(PROMPT[:8]), "--gen", "3", "--ignore-eos"]  # one chunk: qemu is slow
    host = report(*args)["tokens"]
    via_sysroot = report(*args, runner=[qemu, "-L", "/usr/aarch64-linux-gnu", str(AARCH64_DIST / "kvq_runner")])
    assert via_sysroot["arch"] == "aarch64" and via_sysroot["tokens"] == host
    assert report(*args, runner=[qemu, *loader_command(AARCH64_DIST)])["tokens"] == host
