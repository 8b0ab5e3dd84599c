"""Deterministic serial-OCT-like stacks with a known multiplicative bias.

Two anatomies (``SynthParams.anatomy``):

``phantom``
    a generated brain-like block in agarose: a white-matter core inside a
    grey-matter rim of varying thickness, a few agarose-filled clefts, the
    footprint drifting with depth (oblique cut);
``mni152``
    a block of a real brain: the grey- and white-matter probability maps of
    the MNI152 (ICBM 2009a) template (:mod:`octn4.anatomy`), cut into
    coronal sections (stack Z = anterior-posterior), resampled so that one
    stack voxel is 0.5 mm of brain, set in agarose.  The tissue intensity is
    the class intensities weighted by the probabilities (partial volumes);
    the seed also moves the block along the anterior-posterior axis.

The observed volume is

    volume = clean * speckle * bias

with gamma speckle (mean 1) and a bias made of the parts serial-section OCT
has: per-section depth attenuation, per-section lateral shading, a gain step
per section, and a slow drift across the stack.  Everything is generated
slab by slab, so stacks larger than memory can be made; the result depends
only on the arguments (including ``seed``), not on the slab size.

Written to ``OUT/``: ``volume.ome.zarr``, ``truth_bias.ome.zarr`` (the bias),
``clean.ome.zarr`` (the tissue intensities, no bias, no speckle),
``labels.ome.zarr`` (0 agarose, 1 grey, 2 white) and ``synth.json``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .io import OmeZarrWriter, replace_path
from .sections import section_bounds

__all__ = ["SynthParams", "synth_stack", "phantom_slab", "ANATOMIES"]

ANATOMIES = ("phantom", "mni152")

#: Tissue intensities (linear OCT units): agarose, grey, white.  The
#: white/grey ratio is 2.12.
INTENSITY = np.array([0.12, 1.0, 2.12], np.float32)


@dataclass(frozen=True)
class SynthParams:
    shape: tuple[int, int, int] = (96, 192, 192)
    n_sections: int = 4
    seed: int = 0
    voxel_size: tuple[float, float, float] = (0.05, 0.05, 0.05)
    speckle_looks: float = 6.0            # gamma shape of the speckle
    attenuation_per_mm: tuple[float, float] = (0.5, 1.2)   # range of per-section attenuation
    shading: tuple[float, float] = (0.15, 0.35)            # range of lateral vignetting depth (log)
    gain_sigma: float = 0.2               # log-gain step per section
    drift: float = 0.25                   # amplitude of the slow drift (log)
    anatomy: str = "phantom"              # or 'mni152'


class _Design:
    """Per-stack random choices, drawn once from the seed."""

    def __init__(self, p: SynthParams):
        rng = np.random.default_rng([p.seed, 0])
        self.p = p
        self.bounds = section_bounds(p.shape[0], n_sections=p.n_sections)
        n = p.n_sections
        self.mu = rng.uniform(*p.attenuation_per_mm, n)
        self.shade = rng.uniform(*p.shading, n)
        self.shade_centre = rng.uniform(-0.25, 0.25, (n, 2))
        self.tilt = rng.normal(0, 0.08, (n, 2))
        gains = rng.normal(0, p.gain_sigma, n)
        self.gain = gains - gains.mean()
        self.drift_phase = rng.uniform(0, 2 * np.pi)
        self.shape_harm = rng.normal(0, 0.06, (4, 2))
        self.rim_harm = rng.normal(0, 0.25, (5, 2))
        self.clefts = rng.uniform(-np.pi, np.pi, 3)
        self.oblique = rng.uniform(-0.15, 0.15, 2)
        self.section_of = np.repeat(np.arange(n), [b - a for a, b in self.bounds])
        self.mni = _mni152_block(p) if p.anatomy == "mni152" else None


def _mni152_block(p: SynthParams):
    """(grey, white) probabilities of a coronal block of the MNI152 brain, resampled to ``p.shape``.

    Stack axes: Z = anterior-posterior (MNI y), Y = superior-inferior (MNI z,
    flipped so the top of the brain is at Y = 0), X = left-right (MNI x).
    One stack voxel is 0.5 mm of template; the block spans the right
    hemisphere's upper half and the midline, with agarose around it.
    """
    from scipy.ndimage import zoom

    from .anatomy import mni152_maps

    gm, wm = mni152_maps()
    mm = [n * 0.5 for n in p.shape]                       # block size in template mm (1 mm voxels)
    y0 = int(60 + (p.seed * 17) % 60)                      # anterior-posterior start, moved by the seed
    z1 = 160                                               # just above the brain's top (template z 154)
    x0 = 98                                                # from the midline to beyond the right surface
    box = (slice(x0, x0 + int(round(mm[2]))), slice(y0, y0 + int(round(mm[0]))),
           slice(z1 - int(round(mm[1])), z1))
    out = []
    for prob in (gm, wm):
        block = np.transpose(prob[box], (1, 2, 0))[:, ::-1, :]   # (AP, IS top-down, LR)
        factors = [n / s for n, s in zip(p.shape, block.shape)]
        out.append(np.clip(zoom(block, factors, order=1, grid_mode=True, mode="nearest"), 0, 1)
                   .astype(np.float32))
    return out

def _mni152_slab(design: _Design, z0: int, z1: int):
    gm, wm = (a[z0:z1] for a in design.mni)
    tissue = gm + wm
    labels = np.where(tissue < 0.5, 0, np.where(wm > gm, 2, 1)).astype(np.uint8)
    clean = (INTENSITY[0] * np.clip(1 - tissue, 0, 1) + INTENSITY[1] * gm + INTENSITY[2] * wm).astype(np.float32)
    return labels, clean


def phantom_slab(design: _Design, z0: int, z1: int):
    """Labels, log bias of planes ``z0:z1`` (no noise): ``(labels uint8, log_bias float32)``."""
    labels, _, log_bias = _slab(design, z0, z1)
    return labels, log_bias


def _slab(design: _Design, z0: int, z1: int):
    """Labels, clean intensities and log bias of planes ``z0:z1``."""
    p = design.p
    Z, Y, X = p.shape
    z = np.arange(z0, z1, dtype=np.float64)[:, None, None]
    y = np.linspace(-1, 1, Y)[None, :, None]
    x = np.linspace(-1, 1, X)[None, None, :]
    log_bias = _log_bias(design, z, y, x)
    if design.mni is not None:
        labels, clean = _mni152_slab(design, z0, z1)
    else:
        labels = _phantom_labels(design, z, y, x, z1 - z0)
        clean = INTENSITY[labels]
    return labels, clean, np.broadcast_to(log_bias, labels.shape).astype(np.float32)


def _phantom_labels(design: _Design, z, y, x, nz: int):
    p = design.p
    Z, Y, X = p.shape
    zn = (z + 0.5) / Z * 2 - 1                    # -1..1 through the stack
    cy, cx = design.oblique[0] * zn, design.oblique[1] * zn
    dy, dx = y - cy, x - cx
    theta = np.arctan2(dy, dx)
    r = np.sqrt((dy / 0.82) ** 2 + (dx / 0.88) ** 2)
    outline = 1.0 - 0.12 * zn ** 2
    for k, (a, b) in enumerate(design.shape_harm, start=2):
        outline = outline + a * np.cos(k * theta) + b * np.sin(k * theta)
    rim = 0.28
    for k, (a, b) in enumerate(design.rim_harm, start=3):
        rim = rim + 0.05 * (a * np.cos(k * theta + 2 * zn) + b * np.sin(k * theta))
    labels = np.zeros((nz, Y, X), np.uint8)
    tissue = r < outline
    labels[tissue] = 1
    labels[tissue & (r < outline * (1 - np.clip(rim, 0.12, 0.5)))] = 2
    for c in design.clefts:   # agarose-filled sulci entering from the surface
        ang = np.abs(np.angle(np.exp(1j * (theta - c))))
        labels[(ang < 0.05 * (1 + 0.3 * zn)) & (r > outline * 0.6) & tissue] = 0
    return labels


def _log_bias(design: _Design, z, y, x):
    """The bias family (the same for every anatomy): depth attenuation, shading, tilt, gain, drift."""
    p = design.p
    Z = p.shape[0]
    z0, z1 = int(z[0, 0, 0]), int(z[-1, 0, 0]) + 1
    sec = design.section_of[z0:z1]
    top = np.array([design.bounds[s][0] for s in sec], np.float64)[:, None, None]
    depth_mm = (z - top + 0.5) * p.voxel_size[0]
    mu = design.mu[sec][:, None, None]
    sc = design.shade_centre[sec]
    shade = design.shade[sec][:, None, None] * ((y - sc[:, 0, None, None]) ** 2 + (x - sc[:, 1, None, None]) ** 2)
    tilt = design.tilt[sec]
    lateral = tilt[:, 0, None, None] * y + tilt[:, 1, None, None] * x
    drift = p.drift * np.sin(np.pi * (z + 0.5) / Z + design.drift_phase)
    return -mu * depth_mm - shade + lateral + design.gain[sec][:, None, None] + drift


def synth_stack(out, params: SynthParams = SynthParams(), *, overwrite: bool = False, slab: int = 8) -> Path:
    """Write a synthetic stack with its ground truth to the folder ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError("output already exists; pass --overwrite to replace it", out)
    if len(params.shape) != 3 or min(params.shape) < 2:
        raise InputError(f"shape must be three sizes >= 2 (Z, Y, X); got {params.shape}")
    if params.anatomy not in ANATOMIES:
        raise InputError(f"anatomy must be one of {ANATOMIES}; got {params.anatomy!r}")
    design = _Design(params)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    meta = {"generator": "octn4.synth", "params": asdict(params),
            "sections": [list(b) for b in design.bounds],
            "gains_log": design.gain.tolist(), "attenuation_per_mm": design.mu.tolist()}
    try:
        writers = {name: OmeZarrWriter(tmp / f"{name}.ome.zarr", params.shape, params.voxel_size,
                                       dtype=np.uint8 if name == "labels" else np.float32,
                                       reduce="max" if name == "labels" else "mean", attrs=meta)
                   for name in ("volume", "truth_bias", "clean", "labels")}
        for z0 in range(0, params.shape[0], slab):
            z1 = min(params.shape[0], z0 + slab)
            labels, clean, log_bias = _slab(design, z0, z1)
            speckle = np.stack([np.random.default_rng([params.seed, 1, z]).gamma(
                params.speckle_looks, 1 / params.speckle_looks, labels.shape[1:]) for z in range(z0, z1)])
            speckle = speckle.astype(np.float32)
            bias = np.exp(log_bias)
            writers["volume"].write(z0, clean * speckle * bias)
            writers["truth_bias"].write(z0, bias)
            writers["clean"].write(z0, clean)
            writers["labels"].write(z0, labels)
        for w in writers.values():
            w.commit()
        (tmp / "synth.json").write_text(json.dumps(meta, indent=2))
        replace_path(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
