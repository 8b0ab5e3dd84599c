"""Section boundaries along Z."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import InputError

__all__ = ["section_bounds", "parse_planes", "MIN_SECTION_PLANES"]

#: The fewest planes a section may have: N4 fits a B-spline along Z, which needs 2 fit planes.
MIN_SECTION_PLANES = 2


def section_bounds(depth: int, n_sections: int | None = None,
                   planes: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Half-open Z ranges ``[(z0, z1), ...]`` of the serial sections.

    Parameters
    ----------
    depth : int
        Number of Z planes of the volume.
    n_sections : int, optional
        Split ``depth`` into this many contiguous sections whose sizes differ
        by at most one plane (the larger ones first).
    planes : sequence of int, optional
        Explicit number of planes of each section, top to bottom; must sum
        to ``depth``.

    Exactly one of ``n_sections`` and ``planes`` is given.  Every section
    must have at least :data:`MIN_SECTION_PLANES` planes; a layout with a
    thinner one is refused here, before any work.
    """
    if (n_sections is None) == (planes is None):
        raise InputError("give either a number of sections or a list of planes per section, not both")
    if depth < 1:
        raise InputError(f"volume has no Z planes (depth {depth})")
    if n_sections is not None:
        n = int(n_sections)
        if n != n_sections or n < 1:
            raise InputError(f"number of sections must be a positive integer; got {n_sections!r}")
        if n > depth:
            raise InputError(f"{n} sections requested but the volume has only {depth} Z planes")
        base, extra = divmod(depth, n)
        sizes = [base + (i < extra) for i in range(n)]
    else:
        sizes = [int(p) for p in planes]
        if not sizes:
            raise InputError("the list of planes per section is empty")
        if any(s != p for s, p in zip(sizes, planes)) or any(s < 1 for s in sizes):
            raise InputError(f"planes per section must be positive integers; got {list(planes)}")
        if sum(sizes) != depth:
            raise InputError(f"planes per section sum to {sum(sizes)} but the volume has {depth} Z planes")
    if min(sizes) < MIN_SECTION_PLANES:
        thin = [i for i, n in enumerate(sizes) if n < MIN_SECTION_PLANES]
        raise InputError(f"section {thin[0]} would have {sizes[thin[0]]} plane"
                         f"{'s' if sizes[thin[0]] != 1 else ''}; N4 needs at least {MIN_SECTION_PLANES} planes per "
                         f"section ({len(thin)} section{'s' if len(thin) > 1 else ''} too thin): give fewer sections "
                         f"(at most {depth // MIN_SECTION_PLANES} for {depth} planes) or other --planes")
    bounds, z = [], 0
    for s in sizes:
        bounds.append((z, z + s))
        z += s
    return bounds


def parse_planes(text: str) -> list[int]:
    """Parse ``"30,30,28"`` into ``[30, 30, 28]`` (the CLI form of ``planes``)."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"planes per section must be comma-separated integers; got {text!r}") from None
