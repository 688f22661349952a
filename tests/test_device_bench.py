"""`kvexport bench`: targets (host, qemu, ssh against a local sshd, adb errors), records, CLI."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from export import bundle as B
from export.cli import main
from export.device_bench import (BenchConfig, check_fits, depth_prompt, make_record, parse_depths, policy_label, rounds_total,
                                 run_bench, run_rounds)
from export.device_targets import (DIST, RemoteTarget, SshTransport, TargetError, host_arch, open_target, parse_record)

HOST_RUNNER = DIST.get(host_arch(), Path("/nonexistent")) / "kvq_runner"
needs_runner = pytest.mark.skipif(not HOST_RUNNER.is_file(), reason="host runner not built (make setup)")


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle):
    return tiny_bundle


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A real sshd on 127.0.0.1 that lets this user in with a fresh key."""
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(binary).is_file() or shutil.which("ssh") is None:
        pytest.skip("no sshd/ssh: apt-get install openssh-server openssh-client (make setup does, as root)")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True, timeout=30)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = _free_port()
    (d / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {d}/host_key", f"AuthorizedKeysFile {d}/authorized_keys",
        f"PidFile {d}/sshd.pid", "StrictModes no", "UsePAM no", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", "",
    ]))
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    proc = subprocess.Popen([binary, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited: {proc.stderr.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield {"spec": f"ssh:{getpass.getuser()}@127.0.0.1:{port}", "identity": d / "client_key",
           "options": ("UserKnownHostsFile=/dev/null", "StrictHostKeyChecking=no", "LogLevel=ERROR")}
    proc.terminate()
    proc.wait(timeout=10)


# --- configuration and records -------------------------------------------------------------------

def test_depths_and_config_are_validated():
    assert parse_depths("2048, 512,512") == (512, 2048)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_depths("512;2048")
    for bad in ({"depths": (0,)}, {"gen": 1}, {"reps": 0}, {"threads": 0}, {"warmup": -1}):
        with pytest.raises(ValueError):
            BenchConfig(**bad)


def test_a_depth_beyond_the_bundle_names_the_fix(bundle_dir):
    b = B.verify(bundle_dir)
    with pytest.raises(B.BundleError, match=r"holds 96 tokens.*--max-seq-len 164"):
        check_fits(b, BenchConfig(depths=(100,), gen=64))
    check_fits(b, BenchConfig(depths=(32,), gen=64))


def test_depth_prompt_is_real_text_of_the_asked_length(bundle_dir):
    b = B.verify(bundle_dir)
    ids = depth_prompt(b, 300)
    assert len(ids) == 300 and len(set(ids)) > 50  # text, not one repeated token
    assert policy_label(b.manifest) == "rule@4 q8"  # packed policies default to an int8 query


class _Clock:
    """An engine that logs when it runs; holds contexts up to ``cap`` tokens."""

    def __init__(self, label: str, cap: int, log: list):
        self.label, self.cap, self.log = label, cap, log

    def fits(self, depth: int) -> bool:
        return depth <= self.cap

    def rep(self, depth: int) -> dict:
        self.log.append((self.label, depth))
        return {"ms": len(self.log)}

    def record(self, depth: int, reps: list[dict]) -> dict:
        return {"label": self.label, "depth": depth, "runs": [r["ms"] for r in reps]}


def test_rounds_take_turns_alternate_and_skip_depths_that_do_not_fit():
    log: list = []
    engines = [_Clock("a", 100, log), _Clock("b", 10, log), _Clock("c", 100, log)]
    cfg = BenchConfig(depths=(10, 100), gen=2, reps=3, warmup=1)
    seen: list[str] = []
    recs = run_rounds(engines, cfg, on_rep=seen.append)
    assert log[:3] == [("a", 10), ("b", 10), ("c", 10)]  # warm-ups at the smallest depth
    assert [x for x, _ in log[3:12]] == list("abc" "cba" "abc")  # depth 10: turns alternate by round
    assert [x for x, _ in log[12:]] == list("ac" "ca" "ac")  # b holds 10 tokens: not run at 100
    assert [(r["label"], r["depth"]) for r in recs] == [("a", 10), ("b", 10), ("c", 10), ("a", 100), ("c", 100)]
    assert recs[1]["runs"] == [5, 8, 11]  # b's three repetitions, one per round
    assert len(seen) == len(log) == rounds_total(engines, cfg)


class _Named:  # what make_record reads of a target
    name, relative = "host", False


def test_record_aggregates_repetitions(bundle_dir):
    b = B.verify(bundle_dir)
    raw = {"arch": "x86_64", "prefill_ms_per_token": [1.0, 3.0], "decode_ms_per_token": [2.0, 4.0], "first_token_ms": [10.0, 20.0],
           "kv_bytes": {"2": 100, "4": 300, "8": 0, "16": 0}, "kv_bytes_total": 400, "kv_bytes_allocated": 1000, "peak_rss_bytes": 5, "cached_tokens": 63}
    rec = make_record(raw, b, _Named(), BenchConfig(depths=(60,), gen=4, reps=2), 60)
    assert rec["decode_ms_per_token"] == 3.0 and rec["decode_ms_std"] == pytest.approx(2 ** 0.5)
    assert rec["prefill_ms_per_token"] == 2.0 and rec["first_token_ms"] == 15.0
    assert rec["decode_ms_reps"] == [2.0, 4.0] and rec["prefill_ms_reps"] == [1.0, 3.0] and rec["decode_ms_median"] == 3.0
    kv_read = 400 * 61.5 / 63  # the cache at the middle of the decode
    m = b.manifest["model"]
    weights = b.manifest["files"]["model.pte"]["bytes"] - 4 * m["vocab_size"] * m["hidden_size"]  # less the embedding
    assert rec["weights_bytes"] == weights > 0
    assert rec["gb_per_s"] == pytest.approx((weights + kv_read) / 3e-3 / 1e9)
    assert rec["kv_bytes_by_bits"] == {2: 100, 4: 300, 8: 0, 16: 0}


def test_parse_record_skips_banners():
    assert parse_record('Welcome!\n{"a": 1,\n "b": [2]}\n', "x") == {"a": 1, "b": [2]}
    with pytest.raises(TargetError, match="no JSON record"):
        parse_record("Segmentation fault\n", "x")


# --- unreachable places fail fast and say why ----------------------------------------------------

def test_unknown_target_is_a_usage_error(bundle_dir):
    with pytest.raises(TargetError, match="unknown target 'phone'"):
        open_target("phone")
    with pytest.raises(TargetError, match="USER@HOST"):
        open_target("ssh:@")
    with pytest.raises(TargetError, match="port"):
        open_target("ssh:me@host:x")


def test_unreachable_ssh_host_fails_within_the_connect_timeout():
    t0 = time.monotonic()
    with pytest.raises(TargetError, match="cannot reach ssh:nobody@127.0.0.1"):
        open_target(f"ssh:nobody@127.0.0.1:{_free_port()}")  # nothing listens there
    assert time.monotonic() - t0 < 30


def test_missing_android_device_is_a_clear_error():
    t0 = time.monotonic()
    with pytest.raises(TargetError, match="adb not found|no usable Android device"):
        open_target("adb:no-such-serial")
    assert time.monotonic() - t0 < 30
    if shutil.which("adb"):
        subprocess.run(["adb", "kill-server"], capture_output=True, timeout=30)


def test_cli_reports_a_bad_bundle_without_a_traceback(tmp_path):
    (tmp_path / "b").mkdir()
    res = invoke("bench", str(tmp_path / "b"), "--depth", "8")
    assert res.exit_code == 2 and "no manifest.json" in res.output


# --- ssh transport against a real sshd -----------------------------------------------------------

def test_ssh_transport_runs_commands_and_pushes_files(sshd, tmp_path):
    t = SshTransport(sshd["spec"][4:], sshd["identity"], sshd["options"])
    assert t.check("echo $((6*7))", 30, "compute").strip() == "42"
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(bytes(range(256)))
    remote = tmp_path / "remote"
    remote.mkdir()
    t.push({"a.txt": tmp_path / "a.txt", "lib/b.bin": tmp_path / "sub" / "b.bin"}, str(remote), 60)
    assert (remote / "a.txt").read_text() == "alpha" and (remote / "lib" / "b.bin").read_bytes() == bytes(range(256))
    assert t.shell("exit 3", 30).returncode == 3  # the command's status, not ssh's


@needs_runner
def test_ssh_target_round_trip_matches_the_host(sshd, bundle_dir, tmp_path):
    """Push the runner and the bundle over ssh, run, pull the record back: same tokens as locally."""
    cfg = BenchConfig(depths=(24,), gen=6, reps=1, warmup=0, threads=1)
    b = B.verify(bundle_dir)
    host = run_bench([b], open_target("host"), cfg)
    remote = open_target(sshd["spec"], sshd["identity"], sshd["options"], str(tmp_path / "remote"))
    assert isinstance(remote, RemoteTarget) and remote.describe()["arch"] == host_arch()
    over_ssh = run_bench([b], remote, cfg)
    assert over_ssh[0]["target"] == sshd["spec"] and over_ssh[0]["kv_bytes"] == host[0]["kv_bytes"]
    pushed = sorted(p.name for p in (tmp_path / "remote" / "bundles").iterdir())
    assert len(pushed) == 1 and not any(p.endswith(".partial") for p in pushed)
    assert sorted(p.name for p in (tmp_path / "remote" / "bundles" / pushed[0]).iterdir()) == \
        [".complete", "manifest.json", "model.pte", "tokenizer.json"]  # the ONNX model stays home
    mtime = (tmp_path / "remote" / "bundles" / pushed[0] / "model.pte").stat().st_mtime
    run_bench([b], remote, cfg)  # a second run reuses what is there
    assert (tmp_path / "remote" / "bundles" / pushed[0] / "model.pte").stat().st_mtime == mtime


@needs_runner
def test_ssh_target_tokens_equal_the_host_runner(sshd, bundle_dir, tmp_path):
    b = B.verify(bundle_dir)
    ids = " ".join(map(str, depth_prompt(b, 20)))
    args = ["--gen", "8", "--reps", "1", "--warmup", "0", "--threads", "1", "--ignore-eos"]
    local = open_target("host").run(bundle_dir, args, {"--prompt-ids-file": ids}, 120)
    remote = open_target(sshd["spec"], sshd["identity"], sshd["options"], str(tmp_path / "r"))
    remote.prepare([bundle_dir])
    assert remote.run(bundle_dir, args, {"--prompt-ids-file": ids}, 120)["tokens"] == local["tokens"]


# --- the CLI end to end on the host --------------------------------------------------------------

@needs_runner
def test_cli_bench_on_host_prints_records_and_a_plot(bundle_dir, tmp_path):
    res = invoke("bench", str(bundle_dir), "--depth", "16,48", "--gen", "4", "--reps", "2", "--warmup", "1",
                 "--threads", "1", "--json", "--plot", str(tmp_path / "p.png"))
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [r["depth"] for r in out["results"]] == [16, 48]
    for r in out["results"]:
        assert r["decode_ms_per_token"] > 0 and r["prefill_ms_per_token"] > 0 and r["gb_per_s"] > 0
        assert r["kv_bytes"] == sum(r["kv_bytes_by_bits"].values()) > 0
    assert out["results"][1]["kv_bytes"] > out["results"][0]["kv_bytes"]  # more context, more cache
    assert out["hardware"]["arch"] == host_arch() and out["versions"]["executorch"]
    assert (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.skipif(shutil.which("qemu-aarch64") is None or not (DIST["aarch64"] / "kvq_runner").is_file(),
                    reason="qemu-aarch64 or the aarch64 runner build missing")
def test_qemu_target_gives_the_host_tokens_and_says_timings_are_relative(bundle_dir):
    b = B.verify(bundle_dir)
    ids = " ".join(map(str, depth_prompt(b, 20)))
    args = ["--gen", "6", "--reps", "1", "--warmup", "0", "--threads", "1", "--ignore-eos"]
    qemu = open_target("qemu-aarch64")
    assert qemu.relative
    emulated = qemu.run(bundle_dir, args, {"--prompt-ids-file": ids}, 600)
    assert emulated["arch"] == "aarch64"
    if HOST_RUNNER.is_file():
        assert emulated["tokens"] == open_target("host").run(bundle_dir, args, {"--prompt-ids-file": ids}, 120)["tokens"]
