"""The device bundle: a folder holding ``model.pte``, the tokenizer and ``manifest.json``.

The manifest says what the program is (model config, policy and controller, KV budget, weight
scheme, cache layout with bytes per precision, methods, the kernel ops it calls, versions of the
toolchain that wrote it) and lists every other file with its size and sha256. A bundle is
written into a temporary sibling folder and renamed into place, so a reader never sees half of
one; :func:`verify` checks every listed file before anything is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata as pkg_metadata
from pathlib import Path

FORMAT = "kvexport-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRAM = "model.pte"
ONNX_MODEL = "model.onnx"  # its weights: model.onnx.data
TOKENIZER = "tokenizer.json"
REEXPORT_HINT = "re-export the bundle with `kvexport export --out DIR`"
TOOL_PACKAGES = ("kvexport", "torch", "executorch", "transformers", "torchao")


class BundleError(ValueError):
    """A bundle that cannot be written or trusted (missing, corrupt, truncated, foreign)."""


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in TOOL_PACKAGES:
        try:
            out[name] = pkg_metadata.version(name)
        except pkg_metadata.PackageNotFoundError:
            out[name] = None
    return out


def file_entries(folder: Path) -> dict[str, dict]:
    """Every file of ``folder`` but the manifest: {name: {bytes, sha256}}."""
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def cache_plan(decoder) -> dict:
    """The packed cache of an :class:`~export.graph.ExportableDecoder`, from its own buffers:
    per width the capacity in tokens, bytes per token (K and V of every layer, scales included)
    and bytes allocated."""
    pools = []
    for bits, capacity in zip(decoder.pool_bits, decoder.capacities):
        names = [n for n in decoder.pool_names if n[1:].split("_")[0] == str(bits)]
        allocated = sum(getattr(decoder, n).nbytes for n in names)
        pools.append({
            "bits": bits,
            "capacity_tokens": capacity,
            "bytes_per_token": allocated // capacity,
            "bytes_allocated": allocated,
            "bits_per_value": decoder.cache_config.row_format(bits).bits_per_value,
        })
    values_per_token = 2 * decoder.num_layers * decoder.num_kv_heads * decoder.head_dim
    return {
        "max_seq_len": decoder.max_seq_len,
        "chunk_size": decoder.chunk_size,
        "group_size": decoder.group_size,
        "hadamard": decoder.hadamard,
        "query_bits": decoder.query_bits,
        "layers": decoder.num_layers,
        "kv_heads": decoder.num_kv_heads,
        "head_dim": decoder.head_dim,
        "pools": pools,
        "bytes_allocated": sum(p["bytes_allocated"] for p in pools),
        "fp16_bytes_same_context": decoder.max_seq_len * values_per_token * 2,
    }


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: dict

    @property
    def program(self) -> Path:
        if not self.manifest.get("program"):
            raise BundleError(f"{self.path} has no {PROGRAM} (exported with --formats onnx); re-export with `--formats pte,onnx`")
        return self.path / self.manifest["program"]

    @property
    def onnx_model(self) -> Path:
        if not self.manifest.get("onnx"):
            raise BundleError(f"{self.path} has no {ONNX_MODEL} (exported with --formats pte); re-export with `--formats pte,onnx`")
        return self.path / self.manifest["onnx"]["model"]

    def bytes_per_token(self) -> dict[int, int]:
        """{bits: bytes one cached token takes at that width}."""
        return {p["bits"]: p["bytes_per_token"] for p in self.manifest["cache"]["pools"]}


def read_manifest(path: str | Path) -> dict:
    folder = Path(path)
    if not folder.is_dir():
        raise BundleError(f"{folder} is not a bundle folder; {REEXPORT_HINT}")
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{folder} has no {MANIFEST}: not a kvexport bundle (or an interrupted copy); {REEXPORT_HINT}")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath} is corrupt ({e}); {REEXPORT_HINT}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath} is not a {FORMAT} manifest; {REEXPORT_HINT}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{mpath} has format_version {manifest.get('format_version')}, this kvexport reads {FORMAT_VERSION}; {REEXPORT_HINT}")
    return manifest


def verify(path: str | Path) -> Bundle:
    """Read the manifest and check every listed file (present, size, sha256) -> Bundle."""
    folder = Path(path)
    manifest = read_manifest(folder)
    for name, entry in manifest["files"].items():
        f = folder / name
        if not f.is_file():
            raise BundleError(f"bundle file {name} is missing from {folder}; {REEXPORT_HINT}")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(f"bundle file {name} is {size} bytes, the manifest says {entry['bytes']} (truncated or replaced); {REEXPORT_HINT}")
        if sha256_of(f) != entry["sha256"]:
            raise BundleError(f"bundle file {name} fails its sha256 check (corrupt or modified); {REEXPORT_HINT}")
    onnx = manifest.get("onnx") or {}
    if not manifest.get("program") and not onnx:
        raise BundleError(f"the manifest lists neither {PROGRAM} nor {ONNX_MODEL}; {REEXPORT_HINT}")
    for needed in (manifest.get("program"), onnx.get("model"), onnx.get("data"), TOKENIZER):
        if needed and needed not in manifest["files"]:
            raise BundleError(f"the manifest lists no {needed}; {REEXPORT_HINT}")
    return Bundle(folder, manifest)


@contextlib.contextmanager
def staged(out: Path, force: bool = False) -> Iterator[Path]:
    """A temporary sibling folder to write the bundle into; renamed to ``out`` on success,
    removed on failure. An existing ``out`` is replaced only with ``force``."""
    out = Path(out)
    if out.exists() and not force:
        raise BundleError(f"{out} already exists; pass --force to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{int(time.time())}")
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Add the file list (sizes, sha256) and write manifest.json (temp name, then rename)."""
    manifest = {**manifest, "files": file_entries(folder)}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(folder / MANIFEST)
    return manifest
