"""Real brain anatomy for generated stacks: the MNI152 (ICBM 2009a) tissue maps.

The grey- and white-matter probability maps of the ICBM 2009a nonlinear
symmetric template ship inside the ``nilearn`` wheel on PyPI.  They are
fetched once (``pip download``, no install) into a cache folder, checked by
sha256, and load offline from then on with nibabel.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = ["mni152_maps", "data_dir", "MNI152_FILES"]

WHEEL = "nilearn==0.14.1"
MNI152_FILES = {
    "gm": ("nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
           "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed"),
    "wm": ("nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
           "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db"),
}


def data_dir() -> Path:
    """``$OCTN4_DATA``, else ``~/.cache/octn4``."""
    return Path(os.environ.get("OCTN4_DATA", Path.home() / ".cache" / "octn4"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fetch(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", tmp],
                           capture_output=True, text=True)
        if r.returncode:
            raise InputError(f"cannot download {WHEEL} for the MNI152 maps: {r.stderr.strip()[-300:]}")
        wheel = next(Path(tmp).glob("nilearn-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for member, _ in MNI152_FILES.values():
                (folder / Path(member).name).write_bytes(z.read(member))


def mni152_maps(folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grey- and white-matter probabilities (0..1, float32, MNI voxel order x, y, z at 1 mm)."""
    import nibabel as nib

    folder = Path(folder) if folder is not None else data_dir() / "mni152"
    paths = {k: folder / Path(m).name for k, (m, _) in MNI152_FILES.items()}
    if not all(p.exists() for p in paths.values()):
        _fetch(folder)
    out = []
    for key, (_, digest) in MNI152_FILES.items():
        if _sha256(paths[key]) != digest:
            raise InputError(f"checksum mismatch (expected the ICBM 2009a map from {WHEEL})", paths[key])
        out.append(np.asarray(nib.load(str(paths[key])).dataobj, dtype=np.float32) / np.float32(255))
    return out[0], out[1]
