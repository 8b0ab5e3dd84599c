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

Two extents (``SynthParams.extent``): ``block`` (a block from inside the
brain, tissue on every plane) and ``whole`` (the brain from its first cap to
its last: the tissue footprint grows from almost nothing across the first
section and shrinks to almost nothing across the last).

The observed volume is

    volume = clean * speckle * bias

with gamma speckle (mean 1) and a bias made of the parts serial-section OCT
has: a depth profile inside each section, per-section lateral shading and
tilt, a gain step per section, and a slow drift across the stack.  The depth
profile (``SynthParams.profile``; the physics and its sources are in
``docs/QUALITY.md``) is one of

``beer-lambert``
    ``exp(-mu_s * d)``: attenuation only, a straight line in log, with one
    attenuation coefficient ``mu_s`` per section (``d`` the depth below the
    section's cut surface, in mm);
``confocal``
    the confocal gate times the attenuation,
    ``exp(-mu_s * d) / (1 + ((d - f_s) / r_s) ** 2)``, with the focus depth
    ``f_s`` and the (apparent) Rayleigh range ``r_s`` drawn per section;
``tissue``
    tissue-dependent attenuation, ``exp(-mu_s * integral_0^d a(t) dt)``
    along each A-line, with ``a = 1`` in grey matter, ``white_attenuation``
    in white matter and ``agarose_attenuation`` in agarose: the decay is
    steeper under white matter;
``oct``
    ``confocal`` and ``tissue`` together.

Sections may have unequal thicknesses (``planes``), voxels may be
anisotropic (``voxel_size``: OCT's axial sampling is finer than its lateral
one), and one section may be damaged (``damaged_section``: only a disc
holding about ``damaged_keep`` of the plane area keeps its tissue).
Everything is generated slab by slab, so stacks larger than memory can be
made; the result depends only on the arguments (including ``seed``), not on
the slab size.

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

__all__ = ["SynthParams", "synth_stack", "phantom_slab", "depth_profile", "ANATOMIES", "PROFILES", "EXTENTS"]

ANATOMIES = ("phantom", "mni152")

#: Depth-profile families (see the module docstring).
PROFILES = ("beer-lambert", "confocal", "tissue", "oct")

#: How much of the brain a stack holds.
EXTENTS = ("block", "whole")

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
    profile: str = "beer-lambert"         # depth-profile family: see PROFILES
    focus_depth: tuple[float, float] = (0.2, 0.6)   # confocal focus below the cut, in mean section thicknesses
    rayleigh: tuple[float, float] = (0.25, 0.6)     # apparent Rayleigh range, in mean section thicknesses
    white_attenuation: float = 2.5        # 'tissue' / 'oct': white matter attenuates this many times grey
    agarose_attenuation: float = 0.2      # ... and agarose this many times grey
    extent: str = "block"                 # or 'whole': from the first cap to the last
    planes: tuple[int, ...] | None = None   # planes per section (unequal sections); None: n_sections equal
    damaged_section: int | None = None    # this section keeps its tissue only inside a small disc
    damaged_keep: float = 0.05            # ... of about this fraction of the plane's area

    @property
    def confocal(self) -> bool:
        return self.profile in ("confocal", "oct")

    @property
    def tissue_attenuation(self) -> bool:
        return self.profile in ("tissue", "oct")


class _Design:
    """Per-stack random choices, drawn once from the seed."""

    def __init__(self, p: SynthParams):
        rng = np.random.default_rng([p.seed, 0])
        self.p = p
        self.bounds = section_bounds(p.shape[0], n_sections=None if p.planes else p.n_sections, planes=p.planes)
        n = len(self.bounds)
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
        # drawn after the draws above, so the Beer-Lambert stacks of earlier versions are unchanged
        extra = np.random.default_rng([p.seed, 2])
        thick_mm = p.shape[0] / n * p.voxel_size[0]
        self.focus_mm = extra.uniform(*p.focus_depth, n) * thick_mm
        self.rayleigh_mm = extra.uniform(*p.rayleigh, n) * thick_mm
        self.damage_centre = extra.uniform(-0.4, 0.4, 2)
        self.mni = (_mni152_block(p) if p.extent == "block" else _mni152_whole(p)) if p.anatomy == "mni152" else None


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


def _mni152_whole(p: SynthParams):
    """(grey, white) probabilities of the whole MNI152 brain, resampled to ``p.shape``.

    The same axes as :func:`_mni152_block`; the brain's bounding box (grey +
    white > 0.1) with a margin of agarose: 1 plane before the first cap and
    after the last, 4 % of the side laterally.
    """
    from scipy.ndimage import zoom

    from .anatomy import mni152_maps

    gm, wm = mni152_maps()
    stack = [np.transpose(a, (1, 2, 0))[:, ::-1, :] for a in (gm, wm)]      # (AP, IS top-down, LR)
    tissue = (stack[0] + stack[1]) > 0.1
    box = []
    for ax in range(3):
        idx = np.nonzero(tissue.any(axis=tuple(i for i in range(3) if i != ax)))[0]
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        pad = 1 if ax == 0 else int(round(0.04 * (hi - lo)))
        box.append((lo - pad, hi + pad))
    out = []
    for a in stack:
        block = np.pad(a, [(pad, pad) for pad in (2, 8, 8)])[tuple(slice(lo + q, hi + q) for (lo, hi), q
                                                                  in zip(box, (2, 8, 8)))]
        factors = [n / s for n, s in zip(p.shape, block.shape)]
        out.append(np.clip(zoom(block, factors, order=1, grid_mode=True, mode="nearest"), 0, 1).astype(np.float32))
    return out


def _mni152_slab(design: _Design, z0: int, z1: int):
    gm, wm = (a[z0:z1] for a in design.mni)
    gm, wm = _damage(design, z0, z1, gm), _damage(design, z0, z1, wm)
    tissue = gm + wm
    labels = np.where(tissue < 0.5, 0, np.where(wm > gm, 2, 1)).astype(np.uint8)
    clean = (INTENSITY[0] * np.clip(1 - tissue, 0, 1) + INTENSITY[1] * gm + INTENSITY[2] * wm).astype(np.float32)
    relative = (design.p.agarose_attenuation * np.clip(1 - tissue, 0, 1) + gm
                + design.p.white_attenuation * wm).astype(np.float32)
    return labels, clean, relative


def _damage(design: _Design, z0: int, z1: int, a: np.ndarray) -> np.ndarray:
    """``a`` (tissue labels or probabilities) with the damaged section's tissue outside its disc removed."""
    k = design.p.damaged_section
    if k is None:
        return a
    sel = design.section_of[z0:z1] == k
    if not sel.any():
        return a
    Y, X = a.shape[1:]
    y = np.linspace(-1, 1, Y)[:, None]
    x = np.linspace(-1, 1, X)[None, :]
    radius2 = design.p.damaged_keep * 4 / np.pi            # the disc's area is damaged_keep of the plane's
    cy, cx = design.damage_centre
    lost = (y - cy) ** 2 + (x - cx) ** 2 > radius2
    a = a.copy()
    a[sel] = a[sel] * ~lost
    return a


def phantom_slab(design: _Design, z0: int, z1: int):
    """Labels, log bias of planes ``z0:z1`` (no noise): ``(labels uint8, log_bias float32)``."""
    labels, _, log_bias = _slab(design, z0, z1)
    return labels, log_bias


def _anatomy(design: _Design, z0: int, z1: int):
    """Labels, clean intensities and relative attenuation (grey = 1) of planes ``z0:z1``."""
    p = design.p
    Z, Y, X = p.shape
    if design.mni is not None:
        return _mni152_slab(design, z0, z1)
    z = np.arange(z0, z1, dtype=np.float64)[:, None, None]
    y = np.linspace(-1, 1, Y)[None, :, None]
    x = np.linspace(-1, 1, X)[None, None, :]
    labels = _damage(design, z0, z1, _phantom_labels(design, z, y, x, z1 - z0))
    relative = np.array([p.agarose_attenuation, 1.0, p.white_attenuation], np.float32)[labels]
    return labels, INTENSITY[labels], relative


def _slab(design: _Design, z0: int, z1: int):
    """Labels, clean intensities and log bias of planes ``z0:z1``."""
    p = design.p
    Z, Y, X = p.shape
    z = np.arange(z0, z1, dtype=np.float64)[:, None, None]
    y = np.linspace(-1, 1, Y)[None, :, None]
    x = np.linspace(-1, 1, X)[None, None, :]
    if p.tissue_attenuation:
        # the attenuation integral runs down each A-line from the cut: start at the top of z0's section
        top = design.bounds[design.section_of[z0]][0]
        labels, clean, relative = _anatomy(design, top, z1)
        optical = _optical_depth(design, top, relative)[z0 - top:]
        labels, clean = labels[z0 - top:], clean[z0 - top:]
    else:
        labels, clean, _ = _anatomy(design, z0, z1)
        optical = None
    log_bias = _log_bias(design, z, y, x, optical)
    return labels, clean, np.broadcast_to(log_bias, labels.shape).astype(np.float32)


def _optical_depth(design: _Design, z0: int, relative: np.ndarray) -> np.ndarray:
    """``integral_0^d a(t) dt`` (mm, grey-matter equivalent) at each voxel's centre, planes from ``z0``.

    ``relative`` holds planes ``z0, z0+1, ...`` where ``z0`` is a section's
    first plane; the integral restarts at every section's cut surface.
    """
    dz = design.p.voxel_size[0]
    out = np.empty(relative.shape, np.float64)
    sec = design.section_of[z0:z0 + relative.shape[0]]
    acc = np.zeros(relative.shape[1:], np.float64)
    for k in range(relative.shape[0]):
        if k and sec[k] != sec[k - 1]:
            acc[:] = 0
        out[k] = acc + 0.5 * dz * relative[k]
        acc += dz * relative[k]
    return out


def _phantom_labels(design: _Design, z, y, x, nz: int):
    p = design.p
    Z, Y, X = p.shape
    zn = (z + 0.5) / Z * 2 - 1                    # -1..1 through the stack
    cy, cx = design.oblique[0] * zn, design.oblique[1] * zn
    dy, dx = y - cy, x - cx
    theta = np.arctan2(dy, dx)
    r = np.sqrt((dy / 0.82) ** 2 + (dx / 0.88) ** 2)
    outline = 1.0 - 0.12 * zn ** 2
    if p.extent == "whole":      # an ellipsoid end to end: a cap at each end of the stack
        outline = np.sqrt(np.clip(1.0 - zn ** 2, 0.0, None))
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


def depth_profile(design: _Design, z) -> np.ndarray:
    """Log depth profile of planes ``z`` (1-D) in the anatomy-free families: attenuation, and the confocal gate.

    ``-mu_s d - log(1 + ((d - f_s) / r_s)^2)`` (the second term only for
    'confocal' / 'oct'); ``d`` is the depth of the plane's centre below its
    section's cut, in mm.  The 'tissue' families replace ``mu_s d`` by
    ``mu_s`` times the optical depth along each A-line.
    """
    p = design.p
    z = np.asarray(z, np.int64)
    sec = design.section_of[z]
    top = np.array([design.bounds[s][0] for s in sec], np.float64)
    d = (z - top + 0.5) * p.voxel_size[0]
    out = -design.mu[sec] * d
    if p.confocal:
        out = out - np.log1p(((d - design.focus_mm[sec]) / design.rayleigh_mm[sec]) ** 2)
    return out


def _log_bias(design: _Design, z, y, x, optical=None):
    """The bias: depth profile (attenuation, confocal gate), shading, tilt, gain, drift."""
    p = design.p
    Z = p.shape[0]
    z0, z1 = int(z[0, 0, 0]), int(z[-1, 0, 0]) + 1
    sec = design.section_of[z0:z1]
    top = np.array([design.bounds[s][0] for s in sec], np.float64)[:, None, None]
    depth_mm = (z - top + 0.5) * p.voxel_size[0]
    mu = design.mu[sec][:, None, None]
    if optical is not None:
        depth_mm = optical                 # grey-matter-equivalent depth along each A-line
    gate = 0.0
    if p.confocal:
        d = (z - top + 0.5) * p.voxel_size[0]
        gate = np.log1p(((d - design.focus_mm[sec][:, None, None]) / design.rayleigh_mm[sec][:, None, None]) ** 2)
    sc = design.shade_centre[sec]
    shade = design.shade[sec][:, None, None] * ((y - sc[:, 0, None, None]) ** 2 + (x - sc[:, 1, None, None]) ** 2)
    tilt = design.tilt[sec]
    lateral = tilt[:, 0, None, None] * y + tilt[:, 1, None, None] * x
    drift = p.drift * np.sin(np.pi * (z + 0.5) / Z + design.drift_phase)
    return -mu * depth_mm - gate - shade + lateral + design.gain[sec][:, None, None] + drift


def synth_stack(out, params: SynthParams = SynthParams(), *, overwrite: bool = False, slab: int = 8) -> Path:
    """Write a synthetic stack with its ground truth to the folder ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError("output already exists; pass --overwrite to replace it", out)
    if len(params.shape) != 3 or min(params.shape) < 2:
        raise InputError(f"shape must be three sizes >= 2 (Z, Y, X); got {params.shape}")
    if params.anatomy not in ANATOMIES:
        raise InputError(f"anatomy must be one of {ANATOMIES}; got {params.anatomy!r}")
    if params.profile not in PROFILES:
        raise InputError(f"depth profile must be one of {PROFILES}; got {params.profile!r}")
    if params.extent not in EXTENTS:
        raise InputError(f"extent must be one of {EXTENTS}; got {params.extent!r}")
    if params.planes is not None and sum(params.planes) != params.shape[0]:
        raise InputError(f"planes per section sum to {sum(params.planes)} but the stack has {params.shape[0]}")
    n = len(params.planes) if params.planes else params.n_sections
    if params.damaged_section is not None and not 0 <= params.damaged_section < n:
        raise InputError(f"damaged section {params.damaged_section} is not one of the {n} sections")
    design = _Design(params)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    meta = {"generator": "octn4.synth", "params": asdict(params),
            "sections": [list(b) for b in design.bounds],
            "gains_log": design.gain.tolist(), "attenuation_per_mm": design.mu.tolist(),
            "focus_depth_mm": design.focus_mm.tolist() if params.confocal else None,
            "rayleigh_range_mm": design.rayleigh_mm.tolist() if params.confocal else None}
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
