"""Where `kvexport bench` runs the native runner (``runtime_ops/runner``).

- ``host``: this machine's runner build, on the bundle in place.
- ``qemu-aarch64``: the aarch64 build under qemu-user. qemu models no memory system, so its
  timings only compare variants with each other.
- ``ssh:USER@HOST[:PORT]`` and ``adb[:SERIAL]``: a remote Linux machine or an Android phone.
  The runner's staged folder (the binary, its shared libraries and the glibc loader of its
  architecture) and the bundle's program files are pushed once into content-addressed folders,
  the runner is started through the pushed loader (``./lib/ld-linux-*.so.* --library-path ./lib
  ./kvq_runner``, which runs glibc programs on Android's kernel without an NDK build) and its
  JSON record comes back on stdout. ssh and adb differ only in :class:`Transport`.

Every subprocess has a timeout: an unreachable host or a missing device fails with a message
instead of hanging.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

from . import bundle as B

RUNNER = "kvq_runner"
RUNTIME_OPS = Path(__file__).resolve().parent.parent / "runtime_ops"
DIST = {"x86_64": RUNTIME_OPS / "build" / "dist", "aarch64": RUNTIME_OPS / "build" / "aarch64" / "dist"}
BUILD_HINTS = {
    "x86_64": "run `make setup` (or `.venv/bin/python runtime_ops/build.py`)",
    "aarch64": "run `make setup` with the cross tools installed (`apt-get install qemu-user g++-aarch64-linux-gnu "
               "binutils-aarch64-linux-gnu`), or `.venv/bin/python runtime_ops/build.py --target aarch64`",
}
# What the runner reads from a bundle; the ONNX model stays home.
BUNDLE_FILES = (B.MANIFEST, B.PROGRAM, B.TOKENIZER)
CONNECT_TIMEOUT_S = 10
PUSH_TIMEOUT_S = 1800  # a 650 MB program over a slow link


class TargetError(ValueError):
    """A target that cannot be reached or used; the message says what to do."""


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def runner_dist(arch: str) -> Path:
    """The staged runner folder for ``arch`` (``kvq_runner`` + ``lib/``), checked to exist."""
    if arch not in DIST:
        raise TargetError(f"no runner build for {arch!r}: kvexport builds the runner for {', '.join(DIST)}")
    d = DIST[arch]
    if not (d / RUNNER).is_file():
        raise TargetError(f"the {arch} runner is not built ({d / RUNNER} missing): {BUILD_HINTS[arch]}")
    return d


def _loader(dist: Path) -> str:
    found = sorted(p.name for p in (dist / "lib").glob("ld-linux*.so*"))
    if not found:
        raise TargetError(f"{dist}/lib holds no glibc loader (ld-linux*.so*): rebuild the runner ({BUILD_HINTS['x86_64']})")
    return found[0]


def _run(argv: list[str], timeout: float, what: str, stdin=None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=stdin)
    except FileNotFoundError:
        raise TargetError(f"{argv[0]} not found: needed to {what}") from None
    except subprocess.TimeoutExpired:
        raise TargetError(f"gave up after {timeout:.0f} s trying to {what} ({shlex.join(argv[:6])} ...)") from None


def runner_failure(res: subprocess.CompletedProcess, where: str) -> TargetError:
    tail = "\n".join((res.stderr or "").strip().splitlines()[-8:])
    return TargetError(f"the runner failed on {where} (exit {res.returncode}):\n{tail}")


def parse_record(stdout: str, where: str) -> dict:
    """The runner's JSON object (the last one on stdout: a remote shell may print banners first)."""
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("{")]
    for i in reversed(starts):
        try:
            return json.loads("\n".join(lines[i:]))
        except json.JSONDecodeError:
            continue
    raise TargetError(f"the runner on {where} printed no JSON record; its output began: {stdout[:300]!r}")


def folder_key(files: list[Path]) -> str:
    """12 hex digits naming these files' contents (names, sizes, bytes): a pushed folder is reused
    only when nothing in it changed."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        h.update(B.sha256_of(f).encode())
    return h.hexdigest()[:12]


def write_inputs(inputs: dict[str, str], folder: Path) -> dict[str, Path]:
    """{flag: text} -> {flag: file in ``folder``}: the runner reads prompt ids from a file."""
    out = {}
    for flag, content in inputs.items():
        out[flag] = Path(folder) / f"{flag.strip('-')}.txt"
        out[flag].write_text(content)
    return out


class Target(ABC):
    """One place to run the runner: ``prepare`` pushes what it needs, ``run`` returns its record."""

    name: str
    relative = False  # timings only comparable among themselves (emulation)

    @abstractmethod
    def prepare(self, bundles: list[Path]) -> None: ...

    @abstractmethod
    def run(self, bundle: Path, runner_args: list[str], inputs: dict[str, str], timeout: float) -> dict:
        """Run the runner on ``bundle`` with ``runner_args``; ``inputs`` are small text files
        ({flag: content}) passed as ``flag PATH`` (prompt ids), written where the runner sees them."""

    @abstractmethod
    def describe(self) -> dict:
        """Hardware and OS of the target: arch, cpu, cores, os."""


class _LocalTarget(Target):
    """The runner started here, on the bundle in place."""

    @abstractmethod
    def _command(self) -> list[str]:
        """The argv that starts the runner."""

    def prepare(self, bundles: list[Path]) -> None:
        pass

    def run(self, bundle: Path, runner_args: list[str], inputs: dict[str, str], timeout: float) -> dict:
        with tempfile.TemporaryDirectory(prefix="kvexport-bench-") as tmp:
            extra = [a for flag, path in write_inputs(inputs, Path(tmp)).items() for a in (flag, str(path))]
            res = _run([*self._command(), "--bundle", str(Path(bundle).resolve()), *runner_args, *extra],
                       timeout, f"run the benchmark on {self.name}")
        if res.returncode != 0:
            raise runner_failure(res, self.name)
        return parse_record(res.stdout, self.name)


class HostTarget(_LocalTarget):
    name = "host"

    def __init__(self) -> None:
        self.dist = runner_dist(host_arch())

    def _command(self) -> list[str]:
        return [str(self.dist / RUNNER)]

    def describe(self) -> dict:
        return local_hardware()


class QemuTarget(_LocalTarget):
    """The aarch64 runner under qemu-user, through its own loader and libraries (as on a phone)."""

    name = "qemu-aarch64"
    relative = True

    def __init__(self) -> None:
        self.qemu = shutil.which("qemu-aarch64")
        if self.qemu is None:
            raise TargetError("qemu-aarch64 not found: `apt-get install qemu-user` (or run `make setup` as root)")
        self.dist = runner_dist("aarch64")

    def _command(self) -> list[str]:
        lib = self.dist / "lib"
        return [self.qemu, str(lib / _loader(self.dist)), "--library-path", str(lib), str(self.dist / RUNNER)]

    def describe(self) -> dict:
        return {**local_hardware(), "arch": "aarch64", "emulated_by": f"qemu-user on {host_arch()}"}


def local_hardware() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"arch": host_arch(), "cpu": cpu or platform.processor(), "cores": os.cpu_count(), "os": platform.platform()}


class Transport(ABC):
    """How commands and files reach a remote machine."""

    where: str

    @abstractmethod
    def shell(self, command: str, timeout: float) -> subprocess.CompletedProcess:
        """Run one POSIX shell command line remotely."""

    @abstractmethod
    def push(self, files: dict[str, Path], remote_dir: str, timeout: float) -> None:
        """Copy {name: local file} into the existing folder ``remote_dir``."""

    def check(self, command: str, timeout: float, what: str) -> str:
        res = self.shell(command, timeout)
        if res.returncode != 0:
            raise TargetError(f"could not {what} on {self.where} (exit {res.returncode}): {(res.stderr or res.stdout).strip()[-400:]}")
        return res.stdout


def push_folder(transport: Transport, files: dict[str, Path], remote: str, mark_complete: bool = False) -> None:
    """Push ``files`` into ``remote`` through ``remote.partial``, renamed at the end, so nobody
    sees half a folder under its name; ``mark_complete`` also leaves a ``.complete`` file in it."""
    q = shlex.quote
    partial = f"{remote}.partial"
    transport.check(f"rm -rf {q(partial)} && mkdir -p {q(partial)}", CONNECT_TIMEOUT_S * 3, f"create {partial}")
    transport.push(files, partial, PUSH_TIMEOUT_S)
    mark = f"touch {q(partial)}/.complete && " if mark_complete else ""
    transport.check(f"{mark}rm -rf {q(remote)} && mv {q(partial)} {q(remote)}", CONNECT_TIMEOUT_S * 3, f"finish {remote}")


class SshTransport(Transport):
    def __init__(self, spec: str, identity: Path | None = None, options: tuple[str, ...] = ()):
        dest = spec
        port = None
        if ":" in dest:
            dest, port = dest.rsplit(":", 1)
            if not port.isdigit():
                raise TargetError(f"bad ssh target 'ssh:{spec}': the port after ':' must be a number (ssh:USER@HOST[:PORT])")
        if not dest or dest.startswith("@") or dest.endswith("@"):
            raise TargetError(f"bad ssh target 'ssh:{spec}': write ssh:USER@HOST[:PORT]")
        self.where = f"ssh:{spec}"
        base = ["ssh"]
        for opt in options:  # ssh keeps the first value of an option: the user's come before ours
            base += ["-o", opt]
        base += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
                 "-o", "StrictHostKeyChecking=accept-new", "-o", "ServerAliveInterval=15"]
        if port:
            base += ["-p", port]
        if identity:
            base += ["-i", str(identity)]
        self.base, self.dest = base, dest

    def shell(self, command: str, timeout: float) -> subprocess.CompletedProcess:
        res = _run([*self.base, self.dest, command], timeout, f"reach {self.where}")
        if res.returncode == 255:  # ssh's own failure (connection, auth), not the command's
            raise TargetError(f"cannot reach {self.where}: {res.stderr.strip()[-400:]} "
                              "(check the address, that sshd runs there and that key login works: ssh -o BatchMode=yes)")
        return res

    def push(self, files: dict[str, Path], remote_dir: str, timeout: float) -> None:
        # one tar stream: no scp/rsync needed on the remote side, symlinks and modes kept
        with tempfile.TemporaryFile() as tar_file:
            with tarfile.open(fileobj=tar_file, mode="w") as tar:
                for name, path in files.items():
                    tar.add(str(path), arcname=name)
            tar_file.seek(0)
            try:
                res = subprocess.run([*self.base, self.dest, f"tar -C {shlex.quote(remote_dir)} -xf -"],
                                     stdin=tar_file, capture_output=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise TargetError(f"gave up pushing to {self.where} after {timeout:.0f} s") from None
        if res.returncode != 0:
            raise TargetError(f"pushing to {self.where}:{remote_dir} failed: {res.stderr.decode(errors='replace').strip()[-400:]}")


class AdbTransport(Transport):
    def __init__(self, serial: str | None):
        if shutil.which("adb") is None:
            raise TargetError("adb not found: `apt-get install adb` (Debian) or add the Android SDK's platform-tools to PATH")
        self.base = ["adb", *(["-s", serial] if serial else [])]
        self.where = f"adb:{serial}" if serial else "adb"
        res = _run([*self.base, "get-state"], CONNECT_TIMEOUT_S, f"find the device ({self.where})")
        if res.returncode != 0 or res.stdout.strip() != "device":
            state = (res.stderr or res.stdout).strip() or "no device"
            raise TargetError(f"no usable Android device for {self.where}: {state} "
                              "(connect one with USB debugging on and check `adb devices`; pass adb:SERIAL when several are attached)")

    def shell(self, command: str, timeout: float) -> subprocess.CompletedProcess:
        # adb's shell protocol v2 returns the command's exit status and keeps stderr apart
        return _run([*self.base, "shell", command], timeout, f"reach {self.where}")

    def push(self, files: dict[str, Path], remote_dir: str, timeout: float) -> None:
        with tempfile.TemporaryDirectory(prefix="kvexport-push-") as tmp:
            for name, path in files.items():  # adb push copies a folder's contents: stage the names
                dst = Path(tmp) / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:  # adb may push a symlink as a link: hand it the bytes (a hard link, else a copy)
                    os.link(path.resolve(), dst)
                except OSError:
                    shutil.copy2(path, dst)
            res = _run([*self.base, "push", f"{tmp}/.", remote_dir], timeout, f"push to {self.where}")
        if res.returncode != 0:
            raise TargetError(f"adb push to {self.where}:{remote_dir} failed: {(res.stderr or res.stdout).strip()[-400:]}")


class RemoteTarget(Target):
    """Push once (content-addressed folders under ``root``), run through the pushed loader."""

    def __init__(self, transport: Transport, root: str):
        self.transport, self.root, self.name = transport, root.rstrip("/"), transport.where
        self.arch = self.transport.check("uname -m", CONNECT_TIMEOUT_S * 3, "read the architecture").strip()
        self.dist = runner_dist(self.arch)
        self._bundle_dirs: dict[Path, str] = {}
        self._runner_dir: str | None = None

    def _push_folder(self, files: dict[str, Path], remote: str) -> None:
        """Into ``remote`` unless a complete copy is there already."""
        done = self.transport.shell(f"test -f {shlex.quote(remote)}/.complete", CONNECT_TIMEOUT_S * 3)
        if done.returncode != 0:
            push_folder(self.transport, files, remote, mark_complete=True)

    def prepare(self, bundles: list[Path]) -> None:
        dist_files = {str(p.relative_to(self.dist)): p for p in sorted(self.dist.rglob("*")) if p.is_file()}
        self._runner_dir = f"{self.root}/runner-{self.arch}-{folder_key(list(dist_files.values()))}"
        self._push_folder(dist_files, self._runner_dir)
        q = shlex.quote
        self.transport.check(f"chmod +x {q(self._runner_dir)}/{RUNNER} {q(self._runner_dir)}/lib/ld-linux* && "
                             f"mkdir -p {q(self._runner_dir)}/inputs", CONNECT_TIMEOUT_S * 3, "make the runner executable")
        for b in bundles:
            files = {n: Path(b) / n for n in BUNDLE_FILES}
            # the manifest holds every file's sha256: its own bytes name the bundle's contents
            remote = f"{self.root}/bundles/{Path(b).resolve().name}-{folder_key([files[B.MANIFEST]])}"
            self._push_folder(files, remote)
            self._bundle_dirs[Path(b)] = remote

    def run(self, bundle: Path, runner_args: list[str], inputs: dict[str, str], timeout: float) -> dict:
        if self._runner_dir is None or Path(bundle) not in self._bundle_dirs:
            raise RuntimeError("prepare() the target with this bundle first")
        q = shlex.quote
        with tempfile.TemporaryDirectory(prefix="kvexport-inputs-") as tmp:
            files = write_inputs(inputs, Path(tmp))
            if files:
                self.transport.push({p.name: p for p in files.values()}, f"{self._runner_dir}/inputs", PUSH_TIMEOUT_S)
        extra = [a for flag, path in files.items() for a in (flag, f"inputs/{path.name}")]
        argv = [f"./lib/{_loader(self.dist)}", "--library-path", "./lib", f"./{RUNNER}",
                "--bundle", self._bundle_dirs[Path(bundle)], *runner_args, *extra]
        res = self.transport.shell(f"cd {q(self._runner_dir)} && {shlex.join(argv)}", timeout)
        if res.returncode != 0:
            raise runner_failure(res, self.name)
        return parse_record(res.stdout, self.name)

    def describe(self) -> dict:
        out = self.transport.shell("grep -m1 -iE '^(model name|hardware|cpu model)' /proc/cpuinfo; nproc; uname -sr", CONNECT_TIMEOUT_S * 3)
        lines = out.stdout.strip().splitlines()
        cpu = lines[0].split(":", 1)[1].strip() if lines and ":" in lines[0] else ""
        cores = int(lines[-2]) if len(lines) >= 2 and lines[-2].strip().isdigit() else None
        return {"arch": self.arch, "cpu": cpu, "cores": cores, "os": lines[-1] if lines else ""}


def open_target(spec: str, ssh_identity: Path | None = None, ssh_options: tuple[str, ...] = (),
                remote_dir: str | None = None) -> Target:
    """``host``, ``qemu-aarch64``, ``ssh:USER@HOST[:PORT]`` or ``adb[:SERIAL]`` -> a ready Target."""
    if spec == "host":
        return HostTarget()
    if spec == "qemu-aarch64":
        return QemuTarget()
    if spec.startswith("ssh:"):
        return RemoteTarget(SshTransport(spec[4:], ssh_identity, ssh_options), remote_dir or "/tmp/kvexport")
    if spec == "adb" or spec.startswith("adb:"):
        serial = spec[4:] or None
        return RemoteTarget(AdbTransport(serial), remote_dir or "/data/local/tmp/kvexport")
    raise TargetError(f"unknown target {spec!r}: choose host, qemu-aarch64, ssh:USER@HOST[:PORT] or adb[:SERIAL]")
