import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest
import zarr

from octn4.errors import InputError
from octn4.io import NiftiWriter, OmeZarrWriter, open_volume, read_attrs

VS = (0.02, 0.0105, 0.0105)


def _write_ome(path, data, vs=VS, **kw):
    with OmeZarrWriter(path, data.shape, vs, attrs={"k": "v"}, chunks=(4, 64, 64), **kw) as w:
        for z0 in range(0, data.shape[0], 5):
            w.write(z0, data[z0:z0 + 5])
        w.commit()


def test_ome_zarr_round_trip_voxel_size_exact_at_every_level(tmp_path):
    data = np.random.default_rng(0).random((12, 200, 260), dtype=np.float32)
    p = tmp_path / "v.ome.zarr"
    _write_ome(p, data)
    vol = open_volume(p)
    assert vol.voxel_size == VS and vol.shape == data.shape
    np.testing.assert_array_equal(vol.read(0, 12), data)
    ms = dict(zarr.open_group(str(p), mode="r").attrs)["ome"]["multiscales"][0]
    assert [a["unit"] for a in ms["axes"]] == ["millimeter"] * 3
    assert len(ms["datasets"]) >= 2
    g = zarr.open_group(str(p), mode="r")
    for ds in ms["datasets"]:
        scale = ds["coordinateTransformations"][0]["scale"]
        factor = [a / b for a, b in zip(data.shape, g[ds["path"]].shape)]
        assert scale == [v * round(f) for v, f in zip(VS, factor)]   # exact: base * integer factor
    # level 1 is the block mean of level 0
    s1 = np.asarray(g[ms["datasets"][1]["path"]])
    np.testing.assert_allclose(s1[0, 0, 0], data[:, :2, :2].reshape(-1, 2, 2, 2)[0].mean()
                               if s1.shape[0] < 12 else data[0, :2, :2].mean(), rtol=1e-6)
    assert read_attrs(p) == {"k": "v"}


def test_output_validates_against_ngff_models(tmp_path):
    from ome_zarr_models.v05.image import Image

    _write_ome(tmp_path / "v.ome.zarr", np.ones((4, 140, 140), np.float32))
    Image.from_zarr(zarr.open_group(str(tmp_path / "v.ome.zarr"), mode="r"))


def test_reads_ome_zarr_written_by_ome_zarr_py_with_units(tmp_path):
    from ome_zarr.writer import write_image

    data = np.arange(6 * 8 * 10, dtype=np.uint16).reshape(6, 8, 10)
    g = zarr.open_group(str(tmp_path / "o.ome.zarr"), mode="w")
    write_image(data, g, axes="zyx", scale={"z": 20.0, "y": 5.0, "x": 5.0},
                axes_units={"z": "micrometer", "y": "micrometer", "x": "micrometer"},
                scale_factors=[])
    vol = open_volume(tmp_path / "o.ome.zarr")
    np.testing.assert_allclose(vol.voxel_size, (0.02, 0.005, 0.005))
    out = vol.read(2, 4)
    assert out.dtype == np.float32   # integer input converted
    np.testing.assert_array_equal(out, data[2:4])


def test_z_range_reads_only_its_chunks(tmp_path):
    data = np.random.default_rng(1).random((16, 32, 32), dtype=np.float32)
    p = tmp_path / "v.ome.zarr"
    _write_ome(p, data)   # chunks of 4 planes
    # corrupt every level-0 chunk (shard of one chunk row) outside planes 4..7: reading them would fail
    for f in (p / "s0" / "c").glob("*/*/*"):
        if f.parts[-3] != "1":
            f.write_bytes(b"garbage")
    np.testing.assert_array_equal(open_volume(p).read(4, 8), data[4:8])
    with pytest.raises((RuntimeError, ValueError)):   # the corruption is real: touching planes 0..3 fails
        # (a shard's index fails its checksum: ValueError; an unsharded chunk fails to decode: RuntimeError)
        open_volume(p).read(0, 4)


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_nifti_round_trip(tmp_path, name):
    data = np.random.default_rng(2).random((7, 9, 11), dtype=np.float32)
    p = tmp_path / name
    with NiftiWriter(p, data.shape, VS, attrs={"k": 1}) as w:
        w.write(0, data[:3])
        w.write(3, data[3:])
        w.commit()
    img = nib.load(str(p))
    np.testing.assert_array_equal(np.asarray(img.dataobj).T, data)   # NIfTI is (X, Y, Z)
    np.testing.assert_allclose(img.header.get_zooms(), VS[::-1])
    vol = open_volume(p)
    assert vol.voxel_size == pytest.approx(VS) and vol.shape == data.shape
    np.testing.assert_array_equal(vol.read(2, 5), data[2:5])
    assert read_attrs(p) == {"k": 1}


def test_nifti_units_and_scaling(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(6, 5, 4)   # (X, Y, Z) as on disk
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_zooms((10.0, 10.0, 20.0))
    hdr.set_xyzt_units("micron")
    hdr["scl_slope"], hdr["scl_inter"], hdr["vox_offset"] = 2.0, 1.0, 352
    with gzip.open(tmp_path / "u.nii.gz", "wb") as f:   # nibabel's save would recompute the scaling
        f.write(hdr.binaryblock + b"\x00" * 4 + data.tobytes(order="F"))
    assert np.array_equal(nib.load(str(tmp_path / "u.nii.gz")).get_fdata(), data * 2.0 + 1)
    vol = open_volume(tmp_path / "u.nii.gz")
    assert vol.voxel_size == pytest.approx((0.02, 0.01, 0.01))
    np.testing.assert_array_equal(vol.read(0, 4), data.T.astype(np.float32) * 2 + 1)


def test_failed_write_leaves_nothing_and_existing_output_is_refused(tmp_path):
    p = tmp_path / "v.ome.zarr"
    with pytest.raises(RuntimeError):
        with OmeZarrWriter(p, (4, 8, 8), VS) as w:
            w.write(0, np.ones((2, 8, 8)))
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    _write_ome(p, np.ones((4, 8, 8), np.float32))
    with pytest.raises(InputError, match="already exists"):
        OmeZarrWriter(p, (4, 8, 8), VS)
    _write_ome(p, np.zeros((4, 8, 8), np.float32), overwrite=True)
    assert open_volume(p).read(0, 4).max() == 0
    assert sorted(os.listdir(tmp_path)) == ["v.ome.zarr"]


def test_voxel_size_override_and_bare_zarr(tmp_path):
    zarr.create_array(str(tmp_path / "a.zarr"), shape=(4, 5, 6), dtype="f4", fill_value=1)
    with pytest.raises(InputError, match="voxel size missing"):
        open_volume(tmp_path / "a.zarr")
    assert open_volume(tmp_path / "a.zarr", voxel_size=(1, 2, 3)).voxel_size == (1, 2, 3)


def _volume_counting_reads(tmp_path, monkeypatch):
    """A 40-plane volume in 8-plane chunks, its data, and the list each ``Volume.read`` call appends to."""
    from octn4.io import Volume

    data = np.random.default_rng(0).random((40, 12, 10), dtype=np.float32) + 0.5
    path = tmp_path / "v.ome.zarr"
    with OmeZarrWriter(path, data.shape, (0.05, 0.05, 0.05), chunks=(8, 12, 10)) as w:
        w.write(0, data)
        w.commit()
    vol = open_volume(path)
    calls = []
    original = Volume.read
    monkeypatch.setattr(Volume, "read", lambda self, z0, z1, ys=slice(None), xs=slice(None):
                        calls.append((z0, z1)) or original(self, z0, z1, ys, xs))
    return vol, data, calls


def test_read_planes_decompresses_each_z_chunk_once(tmp_path, monkeypatch):
    """Planes sharing a Z chunk come from one read of their span; values equal plane-by-plane reads."""
    vol, data, calls = _volume_counting_reads(tmp_path, monkeypatch)
    zs = [1, 3, 5, 9, 17, 21, 39]
    got = vol.read_planes(zs, slice(0, None, 2), slice(1, None, 3))
    np.testing.assert_array_equal(got, data[zs][:, ::2, 1::3])
    assert calls == [(1, 6), (9, 10), (17, 22), (39, 40)]     # one read per Z chunk touched


def test_forward_reads_of_unaligned_blocks_decompress_each_chunk_row_once(tmp_path, monkeypatch):
    """Blocks of 6 planes (clipped, with repeats) over 8-plane chunks, read forward: the values of
    read_planes, and each chunk row read once; a read that moves back is still served."""
    from octn4.io import ForwardReader
    from octn4.shrink import block_indices

    vol, data, calls = _volume_counting_reads(tmp_path, monkeypatch)
    reader = ForwardReader(vol)
    for zb in block_indices(40, 6):
        np.testing.assert_array_equal(reader.read_planes(zb), data[zb])
    rows = sorted({z // 8 for a, b in calls for z in range(a, b)})
    assert rows == list(range(5)) and sum(b - a for a, b in calls) == 40      # every row once, no plane twice
    np.testing.assert_array_equal(reader.read(3, 19), data[3:19])                # backwards: read again
    np.testing.assert_array_equal(reader.read(38, 45), data[38:40])


@pytest.mark.parametrize("dtype,step", [(np.float32, 8), (np.float32, 3), (np.uint8, 5)])
def test_outputs_are_whole_plane_shards_with_the_measured_codecs(tmp_path, dtype, step):
    """Each level is one file per chunk row of Z (shards of whole planes), float outputs use Blosc LZ4 with
    shuffle and masks zarr's zstd; writes that do not cover whole shards (step 3, 5) still give the data."""
    import zarr
    from zarr.codecs import BloscCodec

    rng = np.random.default_rng(3)
    data = (rng.random((20, 300, 270)) * (100 if dtype == np.uint8 else 1)).astype(dtype)
    p = tmp_path / "o.ome.zarr"
    with OmeZarrWriter(p, data.shape, VS, dtype=dtype, chunks=(8, 128, 128),
                       reduce="max" if dtype == np.uint8 else "mean") as w:
        for z in range(0, 20, step):
            w.write(z, data[z:z + step])
        w.commit()
    np.testing.assert_array_equal(open_volume(p).read(0, 20), data)
    s0 = zarr.open_group(str(p))["s0"]
    assert s0.chunks == (8, 128, 128) and s0.shards == (8, 384, 384)
    assert sorted(f.relative_to(p / "s0" / "c").parts for f in (p / "s0" / "c").rglob("*") if f.is_file()) == \
        [("0", "0", "0"), ("1", "0", "0"), ("2", "0", "0")]                 # one file per chunk row of Z
    codec = s0.compressors[0]
    if dtype == np.float32:
        assert isinstance(codec, BloscCodec) and codec.cname.value == "lz4" and codec.shuffle.value == "shuffle"
    else:
        assert type(codec).__name__ == "ZstdCodec"


@pytest.mark.parametrize("dtype,reduce", [(np.float32, "mean"), (np.uint8, "max")])
def test_pyramid_from_blocks_in_memory_equals_the_pyramid_rebuilt_from_level_0(tmp_path, dtype, reduce):
    """Blocks written in Z order build the coarser levels from memory; out of order, commit rebuilds them from
    level 0 as stored.  Both give the same voxels on every level (uneven blocks, a depth no factor divides)."""
    import zarr

    rng = np.random.default_rng(4)
    data = (rng.random((45, 260, 300)) * 200).astype(dtype)
    vs = (0.004, 0.01, 0.01)                        # Z finer than Y/X: Z halves too at the first levels
    levels = {}
    for order in ("in", "out"):
        p = tmp_path / f"{order}.ome.zarr"
        starts = list(range(0, 45, 7))
        if order == "out":
            starts = starts[::-1]
        with OmeZarrWriter(p, data.shape, vs, dtype=dtype, chunks=(8, 64, 64), reduce=reduce) as w:
            for z in starts:
                w.write(z, data[z:z + 7])
            w.commit()
        g = zarr.open_group(str(p))
        levels[order] = [np.asarray(g[k][...]) for k in sorted(g.array_keys())]
    assert len(levels["in"]) >= 3 and levels["in"][1].shape[0] == 22        # Z was halved
    for a, b in zip(levels["in"], levels["out"]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(levels["in"][0], data)


def test_pyramid_means_equal_numpys_float64_mean():
    """The member-by-member float64 sum of a level's groups is numpy's mean over the group axes, bit for bit."""
    from octn4.io import _downsample

    rng = np.random.default_rng(8)
    block = rng.gamma(1.0, 2.0, (9, 37, 50)).astype(np.float32)
    block[rng.random(block.shape) < 0.2] = 0
    for f in ((1, 2, 2), (2, 2, 2), (2, 1, 2)):
        z, y, x = (s // k * k for s, k in zip(block.shape, f))
        want = block[:z, :y, :x].reshape(z // f[0], f[0], y // f[1], f[1], x // f[2], f[2]).mean(
            axis=(1, 3, 5), dtype=np.float64).astype(np.float32)
        got = _downsample(block, f, "mean")
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_pyramid_maxima_equal_numpys_group_max():
    """A mask level's maxima, taken axis by axis over strided views, are the 6-d group max, on any uint8
    values (not only 0/1) and any factors, with the ragged edge dropped."""
    from octn4.io import _downsample

    rng = np.random.default_rng(9)
    for dtype in (np.uint8, np.float32):
        block = (rng.integers(0, 256, (9, 37, 50)) if dtype == np.uint8 else rng.normal(size=(9, 37, 50)))
        block = block.astype(dtype)
        for f in ((1, 2, 2), (2, 2, 2), (2, 1, 2), (1, 1, 1), (4, 2, 2)):
            z, y, x = (s // k * k for s, k in zip(block.shape, f))
            want = block[:z, :y, :x].reshape(z // f[0], f[0], y // f[1], f[1], x // f[2], f[2]).max(axis=(1, 3, 5))
            got = _downsample(block, f, "max")
            assert got.dtype == dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
            assert not np.shares_memory(got, block)


def test_crc32_combine_equals_the_crc_of_the_concatenation():
    import zlib

    from octn4.io import crc32_combine

    rng = np.random.default_rng(4)
    for la, lb in [(0, 0), (1, 0), (0, 5), (3, 1), (100, 4096), (7, 100_003)]:
        a, b = rng.bytes(la), rng.bytes(lb)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), lb) == zlib.crc32(a + b)
    start = zlib.crc32(b"(4, 5, 6)")          # chained from a start value, as scan_volume's digest is
    a, b = rng.bytes(1000), rng.bytes(333)
    assert crc32_combine(crc32_combine(start, zlib.crc32(a), 1000), zlib.crc32(b), 333) == zlib.crc32(a + b, start)


def test_volume_scanned_in_parallel_equals_one_process(small_stack):
    """Runs of slabs scanned by worker processes give the one-process result, digest included (the CRC-32 of
    the shape and every value), whatever the split."""
    import zlib

    from octn4.io import scan_volume

    vol = open_volume(small_stack / "volume.ome.zarr")
    one = scan_volume(vol, slab=16)
    assert scan_volume(vol, slab=16, workers=2) == one
    data = np.ascontiguousarray(vol.read(0, vol.shape[0]))
    assert one.digest == f"crc32:{zlib.crc32(data, zlib.crc32(repr(tuple(vol.shape)).encode())):08x}"
    assert one.n_positive == int((data > 0).sum()) and one.maximum == float(data.max())


def test_sections_scanned_apart_and_combined_equal_the_whole_scan(small_stack):
    """Each section scans the slabs that start in it (the mask's thresholds tasks do) and the scans, written
    as JSON and an array and read back, combine in Z order into the whole volume's scan, digest and samples
    included, on sections that do not start on slab edges and one inside a single slab (it scans nothing)."""
    from octn4.io import combine_scan, scan_part_dict, scan_part_from, scan_rows, scan_volume

    vol = open_volume(small_stack / "volume.ome.zarr")
    whole = scan_volume(vol, slab=16)
    depth = vol.shape[0]
    bounds = [(0, 13), (13, 15), (15, 37), (37, depth)]
    parts = []
    for z0, z1 in bounds:
        part = scan_rows(vol, z0, z1)
        picks = np.concatenate(part.picks) if part.picks else np.zeros(0, np.float32)
        parts.append(scan_part_from(json.loads(json.dumps(scan_part_dict(part))), picks))
    assert parts[1].nbytes == 0
    assert combine_scan(vol, parts) == whole
    assert combine_scan(vol, parts[::-1]).digest != whole.digest          # the digest knows the order


def _same_part(a, b):
    assert (a.crc, a.nbytes, a.minimum, a.maximum, a.nonfinite, a.negative, a.positive) == \
        (b.crc, b.nbytes, b.minimum, b.maximum, b.nonfinite, b.negative, b.positive)
    assert len(a.picks) == len(b.picks)
    for x, y in zip(a.picks, b.picks):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("halo,step", [(8, 16), (0, 5), (3, 7)])
def test_a_scan_fed_by_a_forward_readers_reads_equals_scan_rows(small_stack, halo, step):
    """A section's share of the scan, taken from the planes a pass reads with halos through a ForwardReader
    (the mask's smoothing), equals scan_rows of the section, samples included: whatever the slabs and halos,
    when the pass stops short of the section's last slab (the rest is read), and after a gap."""
    from octn4.io import ForwardReader, RowScan, scan_rows

    vol = open_volume(small_stack / "volume.ome.zarr")
    depth = vol.shape[0]
    for z0, z1 in [(0, 13), (13, 15), (15, 37), (37, depth), (0, depth)]:
        want = scan_rows(vol, z0, z1)
        rows = RowScan(vol, z0, z1)
        reader = ForwardReader(vol, rows.feed)
        for c0 in range(z0, z1, step):
            reader.read(c0 - halo, min(z1, c0 + step) + halo)
        _same_part(rows.result(), want)
        short = RowScan(vol, z0, z1)                      # the pass reads only its first planes
        ForwardReader(vol, short.feed).read(max(0, z0 - halo), min(z1, z0 + 3))
        _same_part(short.result(), want)
        gap = RowScan(vol, z0, z1)
        gap.feed(z0 + 17, vol.read(z0 + 17, z1))           # a run past a gap is not taken
        _same_part(gap.result(), want)
        runs = RowScan(vol, z0, z1)                        # overlapping runs that split slabs into pieces
        for a in range(max(0, z0 - 2), z1 + 16, step):
            runs.feed(a, vol.read(a, min(depth, a + step + 2)))
        _same_part(runs.result(), want)


@pytest.mark.parametrize("voxel_size", [(0.05, 0.05, 0.05), (0.1, 0.05, 0.05)])
def test_pyramid_from_the_parts_level1_equals_the_rebuild_from_level_0(tmp_path, voxel_size):
    """Parts keep the first pyramid level of their planes; the output takes level 1 from them (in Z order)
    and streams the coarser levels: every level equals a pyramid rebuilt from level 0, with Z factors 2
    and 1, a depth the Z factor does not divide, and a part that owns no plane."""
    from octn4.io import PartWriter, _pyramid_factors

    shape = (41, 300, 300)
    assert len(_pyramid_factors(shape, voxel_size)) == 2
    data = np.random.default_rng(3).gamma(1.0, 1.0, shape).astype(np.float32)
    parts = []
    for i, (a, b) in enumerate([(0, 16), (16, 16), (16, 41)]):
        with PartWriter(tmp_path / f"p{i}.zarr", shape, owned=(a, b), chunks=(8, 128, 128),
                        voxel_size=voxel_size) as w:
            for z in range(a, b, 5):                      # tiles that do not fall on Z groups or chunk rows
                w.write(z, data[z:min(b, z + 5)])
            w.commit()
        parts.append(tmp_path / f"p{i}.zarr")
    with OmeZarrWriter(tmp_path / "linked.ome.zarr", shape, voxel_size, chunks=(8, 128, 128)) as w:
        for p in parts:
            w.adopt(p)
        assert all(w.take_level1(p) for p in parts)
        w.commit()
    with OmeZarrWriter(tmp_path / "rebuilt.ome.zarr", shape, voxel_size, chunks=(8, 128, 128)) as w:
        for z in reversed(range(0, 41, 8)):               # out of order: commit rebuilds from level 0
            w.write(z, data[z:z + 8])
        w.commit()
    levels = sorted(p.name for p in (tmp_path / "rebuilt.ome.zarr").glob("s*"))
    assert levels == ["s0", "s1", "s2"]
    for level in levels:
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "linked.ome.zarr" / level), mode="r")[:],
                                      zarr.open_array(str(tmp_path / "rebuilt.ome.zarr" / level), mode="r")[:])


def test_level1_of_parts_out_of_z_order_is_refused(tmp_path):
    from octn4.io import PartWriter

    shape, vs = (32, 256, 256), (0.05, 0.05, 0.05)
    data = np.ones(shape, np.float32)
    parts = []
    for i, (a, b) in enumerate([(0, 16), (16, 32)]):
        with PartWriter(tmp_path / f"p{i}.zarr", shape, owned=(a, b), chunks=(16, 128, 128), voxel_size=vs) as w:
            w.write(a, data[a:b])
            w.commit()
        parts.append(tmp_path / f"p{i}.zarr")
    with OmeZarrWriter(tmp_path / "o.ome.zarr", shape, vs, chunks=(16, 128, 128)) as w:
        with pytest.raises(InputError, match="do not follow"):
            w.take_level1(parts[1])
    with PartWriter(tmp_path / "q.zarr", shape, owned=(0, 16), chunks=(16, 128, 128), voxel_size=vs) as w:
        with pytest.raises(ValueError, match="Z order"):
            w.write(8, data[8:16])
