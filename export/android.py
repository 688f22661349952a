"""`kvexport android push DIR [--serial S]`: a bundle onto a phone for the demo app (android_demo/).

The app lists the folders under its external files dir, ``/sdcard/Android/data/<app id>/files/
bundles/<name>``, which adb can write without root. The bundle is verified first (a corrupt copy
on the phone would only fail there), only what the native runner reads is pushed (manifest,
model.pte, tokenizer.json: the ONNX model stays home), into ``<name>.partial`` renamed at the end,
so the app never lists half a bundle.
"""

from __future__ import annotations

from pathlib import Path

from . import bundle as B
from .device_targets import BUNDLE_FILES, AdbTransport, Transport, push_folder

APP_ID = "dev.kvexport.demo"  # android_demo/app/build.gradle.kts: applicationId


def app_bundles_dir(app_id: str = APP_ID) -> str:
    """Where the app looks for bundles (Context.getExternalFilesDir(null) + /bundles)."""
    return f"/sdcard/Android/data/{app_id}/files/bundles"


def push_bundle(bundle_dir: str | Path, serial: str | None = None, *, name: str | None = None, remote_root: str | None = None,
                transport: Transport | None = None) -> str:
    """Verify ``bundle_dir`` and push its runner files to ``<remote_root>/<name>`` -> that path.

    ``remote_root`` defaults to the app's bundles folder; ``name`` to the bundle folder's name.
    Raises BundleError (bad bundle, before any adb call) or TargetError (no device, push failed)."""
    folder = Path(bundle_dir)
    B.verify(folder)
    name = name or folder.resolve().name
    if not name or "/" in name or name.startswith("."):
        raise B.BundleError(f"bad bundle name {name!r}: a plain folder name is needed on the phone")
    remote = f"{(remote_root or app_bundles_dir()).rstrip('/')}/{name}"
    push_folder(transport or AdbTransport(serial), {n: folder / n for n in BUNDLE_FILES}, remote)
    return remote
