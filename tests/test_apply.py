"""The apply stage one part per section, and the finishing step: ownership, order, concurrency, bad parts."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import octn4.io
from octn4.apply import apply_part, apply_parts, finish, owned_planes, part_tiles
from octn4.errors import InputError
from octn4.global_stage import solve_global
from octn4.io import CHUNKS, PartWriter, open_volume
from octn4.mask_stage import stage_mask
from octn4.pipeline import RunConfig
from octn4.section_stage import fit_section

pytestmark = pytest.mark.slow

PLANES = (13, 9, 3, 11, 12)      # 48 planes; boundaries 13, 22, 25, 36 fall on no 8-plane chunk row


@pytest.mark.parametrize("planes", [PLANES, (8, 8, 8), (5, 40, 3), (48,), (2, 3, 2, 41)])
def test_every_plane_is_owned_by_exactly_one_part(planes):
    bounds, z = [], 0
    for n in planes:
        bounds.append((z, z + n))
        z += n
    owned = [owned_planes(bounds, i, z) for i in range(len(bounds))]
    covered = np.zeros(z, int)
    for a, b in owned:
        assert a % CHUNKS[0] == 0 and (b % CHUNKS[0] == 0 or b == z)
        covered[a:b] += 1
    assert np.all(covered == 1)
    for (a, b), (z0, z1) in zip(owned, bounds):
        assert a == b or z0 <= a < z1                 # a part starts inside its section (or owns nothing)
    tiles = sorted(t for a, b in owned for t in part_tiles(a, b, 16))
    assert [t[0] for t in tiles[1:]] == [t[1] for t in tiles[:-1]] and tiles[0][0] == 0 and tiles[-1][1] == z
    assert all(a // 16 == (b - 1) // 16 for a, b in tiles)     # each inside one cell of the volume's tile grid


@pytest.fixture(scope="module")
def solved(tmp_path_factory):
    """A 48 x 128 x 128 stack (pyramid levels exist), its mask, section records and global solution."""
    from octn4.synth import SynthParams, synth_stack

    root = tmp_path_factory.mktemp("apply")
    synth_stack(root / "stack", SynthParams(shape=(48, 128, 128), planes=PLANES, seed=5))
    vol = open_volume(root / "stack" / "volume.ome.zarr")
    bounds = RunConfig(planes=PLANES).bounds(vol)
    config = RunConfig(planes=PLANES)
    from dataclasses import replace

    config = replace(config, section_n4=replace(config.section_n4, maximum_number_of_iterations=(10, 10)),
                     global_n4=replace(config.global_n4, maximum_number_of_iterations=(10,)))
    stage_mask(vol, bounds, root / "mask.ome.zarr", params=config.mask, attrs={})
    msk = open_volume(root / "mask.ome.zarr")
    records = [fit_section(vol.path, msk.path, bounds, i, params=config.section_n4) for i in range(len(bounds))]
    solution = solve_global(vol, msk, records, config=config, attrs={"test": True}, timings={})
    return vol, msk, json.loads(json.dumps(solution)), root


def _levels(store):
    return {p.name: zarr.open_array(str(p), mode="r")[:] for p in sorted(store.glob("s*"))}


def _finish(solved, parts, out, **kw):
    vol, msk, solution, _ = solved
    out.mkdir()
    return finish(vol, msk, solution, parts, out, **kw)


@pytest.mark.parametrize("full_bias", [False, True])
def test_parts_written_at_once_in_any_order_give_the_serial_outputs_bit_for_bit(solved, tmp_path, full_bias):
    from octn4.bias import BiasModel

    vol, msk, solution, _ = solved
    serial = apply_parts(vol, msk, solution, tmp_path / "serial", tile_mib=1, full_bias=full_bias)
    order = list(range(len(PLANES)))
    random.Random(1).shuffle(order)
    both = apply_parts(vol, msk, solution, tmp_path / "both", tile_mib=1, workers=2, order=order,
                       full_bias=full_bias)
    m1 = _finish(solved, serial, tmp_path / "o1")
    m2 = _finish(solved, list(reversed(both)), tmp_path / "o2", threads=2)     # the outputs assembled at once
    assert [json.loads((p / "part.json").read_text())["planes"] for p in serial] == \
        [[0, 16], [16, 24], [24, 32], [32, 40], [40, 48]]
    for name in ("corrected.ome.zarr", "bias.ome.zarr"):
        a, b = _levels(tmp_path / "o1" / name), _levels(tmp_path / "o2" / name)
        assert list(a) == (["s0", "s1"] if full_bias or name.startswith("corrected") else ["s1"])
        for level in a:
            np.testing.assert_array_equal(a[level], b[level])
    assert m1["profile"] == m2["profile"] and m1["sections"] == m2["sections"]
    # the outputs are the input over the recorded fields, and every plane was written
    bias = BiasModel.from_run(tmp_path / "o1").read(0, vol.shape[0])
    if full_bias:                                           # fields.json gives the stored bias, bit for bit
        np.testing.assert_array_equal(bias, _levels(tmp_path / "o1" / "bias.ome.zarr")["s0"])
    corrected = _levels(tmp_path / "o1" / "corrected.ome.zarr")["s0"]
    raw = vol.read(0, vol.shape[0])
    assert np.all(bias > 0)
    np.testing.assert_allclose(corrected * bias, raw, rtol=1e-5, atol=1e-6)
    # the shards are links to the parts' files, not copies
    shard = tmp_path / "o1" / "corrected.ome.zarr" / "s0" / "c" / "0" / "0" / "0"
    assert shard.stat().st_nlink == 2
    assert m1["files_adopted"] == (2 if full_bias else 1) * vol.shape[0] // CHUNKS[0]


def test_the_bias_stored_from_level_1_is_the_full_biass_pyramid(solved, tmp_path):
    """Without --full-bias the bias store is the full one's levels 1.. bit for bit, with their scales, and
    opens as a volume on the level-1 grid; fields.json and ``octn4 bias`` give its level 0 exactly."""
    from octn4.bias import BiasModel, write_bias
    from octn4.io import read_attrs

    vol, msk, solution, _ = solved
    outs = {}
    for full in (False, True):
        parts = apply_parts(vol, msk, solution, tmp_path / f"p{full}", tile_mib=1, full_bias=full)
        _finish(solved, parts, tmp_path / f"o{full}")
        outs[full] = tmp_path / f"o{full}" / "bias.ome.zarr"
    reduced, full = _levels(outs[False]), _levels(outs[True])
    assert list(full) == ["s0", *reduced]
    for level in reduced:
        np.testing.assert_array_equal(reduced[level], full[level])
    small, big = open_volume(outs[False]), open_volume(outs[True])
    f = [n // m for n, m in zip(big.shape, small.shape)]
    assert small.shape == full["s1"].shape and f[1:] == [2, 2]
    assert small.voxel_size == pytest.approx(tuple(v * k for v, k in zip(big.voxel_size, f)))
    ms = {k: zarr.open_group(str(outs[k]), mode="r").attrs["ome"]["multiscales"][0]["datasets"] for k in outs}
    assert ms[False] == ms[True][1:]                          # the same paths, scales and translations
    assert read_attrs(outs[False])["output"] == "bias"
    model = BiasModel.from_run(tmp_path / "oFalse")
    write_bias(model, tmp_path / "evaluated.ome.zarr", vol.voxel_size, tile_planes=5)
    ev = _levels(tmp_path / "evaluated.ome.zarr")
    for level in full:
        np.testing.assert_array_equal(ev[level], full[level])


def test_where_links_fail_the_parts_are_copied(solved, tmp_path, monkeypatch):
    vol, msk, solution, _ = solved
    parts = apply_parts(vol, msk, solution, tmp_path / "p", tile_mib=1)
    _finish(solved, parts, tmp_path / "linked")

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(octn4.io, "_hard_link", no_links)
    _finish(solved, parts, tmp_path / "copied")
    shard = tmp_path / "copied" / "corrected.ome.zarr" / "s0" / "c" / "0" / "0" / "0"
    assert shard.stat().st_nlink == 1
    for name in ("corrected.ome.zarr", "bias.ome.zarr"):
        a, b = _levels(tmp_path / "linked" / name), _levels(tmp_path / "copied" / name)
        for level in a:
            np.testing.assert_array_equal(a[level], b[level])


@pytest.mark.parametrize("full_bias", [False, True])
def test_nifti_outputs_stream_the_parts(solved, tmp_path, full_bias):
    """NIfTI has one resolution: its bias is the full one, streamed from the parts or, where they hold only
    level 1, evaluated from the solution: the same values either way."""
    from octn4.bias import BiasModel

    vol, msk, solution, _ = solved
    parts = apply_parts(vol, msk, solution, tmp_path / "p", tile_mib=1, full_bias=full_bias)
    _finish(solved, parts, tmp_path / "z")
    _finish(solved, parts, tmp_path / "n", output_format="nifti")
    want = {"corrected": _levels(tmp_path / "z" / "corrected.ome.zarr")["s0"],
            "bias": BiasModel.from_run(tmp_path / "z").read(0, vol.shape[0])}
    for name in ("corrected", "bias"):
        a = open_volume(tmp_path / "n" / f"{name}.nii.gz")
        np.testing.assert_array_equal(a.read(0, a.shape[0]), want[name])


def test_bad_parts_are_refused_by_name(solved, tmp_path):
    vol, msk, solution, _ = solved
    parts = apply_parts(vol, msk, solution, tmp_path / "p", tile_mib=1)
    with pytest.raises(InputError, match=r"parts missing for sections \[3\]"):
        _finish(solved, parts[:3] + parts[4:], tmp_path / "o1")
    with pytest.raises(InputError, match="section 2's part was given twice"):
        _finish(solved, parts + [parts[2]], tmp_path / "o2")
    # a part holding a chunk row it does not own (a stray or planted file) is an error, not an overwrite
    stray = tmp_path / "stray"
    shutil.copytree(parts[1], stray)
    src = parts[0] / "corrected.zarr" / "s0" / "c" / "0"
    shutil.copytree(src, stray / "corrected.zarr" / "s0" / "c" / "0")
    with pytest.raises(InputError, match=r"holds chunk row 0 \(planes 0\.\.8\) outside the planes 16\.\.24"):
        _finish(solved, [parts[0], stray] + parts[2:], tmp_path / "o3")
    # a part made for another layout
    with pytest.raises(InputError, match="holds planes"):
        other = json.loads(json.dumps(solution))
        other["sections"][0]["z_stop"] = other["sections"][1]["z_start"] = 18
        finish(vol, msk, other, parts, tmp_path)
    with pytest.raises(InputError, match="not an octn4 output part"):
        _finish(solved, parts[:4] + [tmp_path / "p"], tmp_path / "o4")
    with pytest.raises(InputError, match="out of range"):
        apply_part(vol, msk, solution, 9, tmp_path / "p9", tile_planes=8)
    full = apply_part(vol, msk, solution, 2, tmp_path / "full2", tile_planes=8, full_bias=True)
    assert full["planes"] == [24, 32]
    with pytest.raises(InputError, match="disagree on storing level 0"):   # parts made with and without it
        _finish(solved, parts[:2] + [tmp_path / "full2"] + parts[3:], tmp_path / "o5")
    for d in ("o1", "o2", "o3", "o4", "o5"):        # nothing was published
        assert not (tmp_path / d / "corrected.ome.zarr").exists()


def test_a_part_writes_only_its_own_rows(tmp_path):
    with pytest.raises(ValueError, match="whole chunk rows"):
        PartWriter(tmp_path / "a.zarr", (20, 16, 16), owned=(3, 8), chunks=(8, 16, 16))
    with PartWriter(tmp_path / "b.zarr", (20, 16, 16), owned=(8, 20), chunks=(8, 16, 16)) as w:
        w.write(8, np.ones((12, 16, 16), np.float32))
        with pytest.raises(ValueError, match="outside this part"):
            w.write(0, np.ones((8, 16, 16), np.float32))
        w.commit()
    assert sorted(p.name for p in (tmp_path / "b.zarr" / "s0" / "c").iterdir()) == ["1", "2"]


def test_a_file_that_is_not_a_solution_is_refused_by_name(tmp_path):
    from octn4.apply import read_solution

    bad = tmp_path / "g.json"
    bad.write_text('{"sections": []}')
    with pytest.raises(InputError, match=r"not an octn4 global solution \(no global, shape\)") as err:
        read_solution(bad)
    assert str(bad) in str(err.value)
    bad.write_text("{")
    with pytest.raises(InputError, match="not an octn4 global solution"):
        read_solution(bad)


def test_global_fit_grid_read_in_processes_equals_one_process(solved):
    """The global pass's Z blocks read by two worker processes: the same grid, so the same fitted field."""
    from dataclasses import replace

    from octn4.global_stage import fit_global

    vol, msk, solution, _ = solved
    params = replace(RunConfig(planes=PLANES).global_n4, maximum_number_of_iterations=(10,))
    one = fit_global(vol, msk, solution["sections"], params=params)
    two = fit_global(vol, msk, solution["sections"], params=params, workers=2)
    drop = ("seconds",)
    assert one.field.to_dict() == two.field.to_dict()
    assert {k: v for k, v in one.summary().items() if k not in drop} == \
        {k: v for k, v in two.summary().items() if k not in drop}


def test_the_global_grid_from_section_summaries_is_the_volumes_block_means(solved):
    """Blocks inside one section: the block means of the volume over the section bias, bit for bit with no
    gain; blocks across a boundary, and gains, change only the order and place of float64 roundings."""
    from dataclasses import replace

    from octn4.apply import section_fields, section_log_field
    from octn4.global_summary import combined_grid, section_summary
    from octn4.params import shrink_factors
    from octn4.shrink import block_indices, block_mean_grid

    vol, msk, solution, _ = solved
    params = RunConfig(planes=PLANES).global_n4
    assert shrink_factors(vol.shape, vol.voxel_size, params)[0] == 1      # the defaults: no block across a cut
    params = replace(params, shrink_factor=(3, 4, 4))                      # 3-plane blocks, some across cuts
    s = shrink_factors(vol.shape, vol.voxel_size, params)
    blocks = block_indices(vol.shape[0], s[0])
    for gains in (False, True):
        records = [r if gains else dict(r, gain_log=0.0) for r in solution["sections"]]
        assert not gains or any(abs(r["gain_log"]) > 0.01 for r in records)
        fields = section_fields(records)
        want, want_fit = block_mean_grid(vol, msk, blocks, s, log_field=lambda zb, f=fields: section_log_field(f, zb))
        sums = [section_summary(vol, msk, r, global_params=params, gains=None) for r in records]
        got, got_fit = combined_grid(sums, [r["gain_log"] for r in records], vol.shape, s)
        np.testing.assert_array_equal(got_fit, want_fit)
        np.testing.assert_allclose(got, want, rtol=2e-6)
        inside = [j for j, zb in enumerate(blocks)
                  if any(a <= zb.min() and zb.max() < b for a, b in (r[:2] for r in fields))]
        assert 0 < len(inside) < len(blocks)                     # both kinds of block are here
        if not gains:
            np.testing.assert_array_equal(got[inside], want[inside])


def test_the_global_task_reads_the_summaries_not_the_volume(solved, tmp_path):
    """octn4_global.py --summaries on a volume and mask stripped of every chunk (their metadata kept):
    the same solution as the one made reading them."""
    from octn4.global_stage import stage_global_files
    from octn4.io import write_json
    from octn4.section_stage import assemble_sections

    vol, msk, solution, root = solved
    config = RunConfig(planes=PLANES)
    from dataclasses import replace

    config = replace(config, global_n4=replace(config.global_n4, maximum_number_of_iterations=(10,)))
    records = [{k: v for k, v in r.items() if k not in ("gain_log", "gain_anchor_log")}
               for r in solution["sections"]]
    write_json({"sections": assemble_sections(records)}, tmp_path / "sections.json")
    from octn4.global_summary import section_summary, write_summary

    paths = [write_summary(section_summary(vol, msk, r, global_params=config.global_n4, gains=config.gains),
                           tmp_path / f"summary_{r['index']}") for r in records]
    bare = {}
    for name, src in (("volume", vol.path), ("mask", msk.path)):
        bare[name] = tmp_path / f"{name}.ome.zarr"
        shutil.copytree(src, bare[name])
        chunks = [p for p in bare[name].rglob("c") if p.is_dir()]
        assert chunks
        for c in chunks:
            shutil.rmtree(c)
    full = stage_global_files(vol.path, msk.path, tmp_path / "sections.json", tmp_path / "full.json", config=config,
                              summaries=None)
    thin = stage_global_files(bare["volume"], bare["mask"], tmp_path / "sections.json", tmp_path / "thin.json",
                              config=config, summaries=paths)
    assert thin["global"] == full["global"] == solution["global"]
    assert [r["gain_log"] for r in thin["sections"]] == [r["gain_log"] for r in solution["sections"]]
    assert thin["gain_boundaries"] == solution["gain_boundaries"]
    # a summary made for another global grid, or missing, is refused, naming it
    other = replace(config.global_n4, shrink_factor=(1, 2, 2))
    bad = write_summary(section_summary(vol, msk, records[1], global_params=other, gains=config.gains),
                        tmp_path / "bad_1")
    with pytest.raises(InputError, match="another stack or global grid") as err:
        stage_global_files(vol.path, msk.path, tmp_path / "sections.json", tmp_path / "x.json", config=config,
                           summaries=[paths[0], bad, *paths[2:]])
    assert "bad_1" in str(err.value)
    blurred = write_summary(section_summary(vol, msk, records[2], global_params=config.global_n4,
                                            gains=config.gains, mask_sigma=config.mask.smoothing_sigma + 1),
                            tmp_path / "blurred_2")
    with pytest.raises(InputError, match="end-plane tissue smoothed by"):
        stage_global_files(vol.path, msk.path, tmp_path / "sections.json", tmp_path / "x.json", config=config,
                           summaries=[*paths[:2], blurred, *paths[3:]])
    with pytest.raises(InputError, match="no summary of section 3"):
        stage_global_files(vol.path, msk.path, tmp_path / "sections.json", tmp_path / "x.json", config=config,
                           summaries=paths[:3] + paths[4:])


def test_a_section_task_summarises_from_the_planes_its_fit_read(solved, tmp_path, monkeypatch):
    """fit_section(summary=): the same record as without, and the summary one made from the volume afterwards
    gives, array for array and bit for bit; the summary's reads are served from the kept planes (the
    volume is read for the fit only), and the kept files are gone."""
    from octn4 import io as octn4_io
    from octn4.global_summary import Summary, section_summary

    vol, msk, solution, _ = solved
    config = RunConfig(planes=PLANES)
    from dataclasses import replace

    params = replace(config.section_n4, maximum_number_of_iterations=(10, 10))
    bounds = [(r["z_start"], r["z_stop"]) for r in solution["sections"]]
    assert any(a % vol.chunk_planes for a, _ in bounds)          # sections that start inside a chunk row
    reads = []
    real_read = octn4_io.Volume._read_stored                      # under read and read_tissue

    def counted(self, z0, z1, *args, **kw):
        reads.append((Path(self.path).name, int(z0), int(z1)))
        return real_read(self, z0, z1, *args, **kw)

    for i in (0, 1):
        plain = fit_section(vol.path, msk.path, bounds, i, params=params)
        monkeypatch.setattr(octn4_io.Volume, "_read_stored", counted)
        reads.clear()
        rec = fit_section(vol.path, msk.path, bounds, i, params=params, summary=tmp_path / f"s{i}",
                          global_params=config.global_n4, gains=config.gains)
        monkeypatch.setattr(octn4_io.Volume, "_read_stored", real_read)
        for r in (rec, plain):
            del r["fit"]["seconds"]
        assert rec == plain
        for v in (vol, msk):                                       # each chunk row of the section read once
            cz = v.chunk_planes
            rows = (bounds[i][0] // cz * cz, min(v.shape[0], -(-bounds[i][1] // cz) * cz))
            got = sorted((a, b) for n, a, b in reads if n == Path(v.path).name)
            assert got[0][0] == rows[0] and got[-1][1] == rows[1]
            assert all(b0 <= a1 for (_, b0), (a1, _) in zip(got, got[1:]))
        want = section_summary(vol, msk, rec, global_params=config.global_n4, gains=config.gains)
        got = Summary(tmp_path / f"s{i}")
        assert got.meta == want["meta"]
        for name in ("grid_blocks", "grid_sums", "grid_counts", "head", "tail", "head_tissue", "tail_tissue"):
            np.testing.assert_array_equal(got[name], want[name])


def test_kept_planes_serve_what_the_volume_reads(solved, tmp_path):
    from octn4.io import KeptPlanes

    vol, msk, _, _ = solved
    for v, tissue in ((vol, False), (msk, True)):
        kept = KeptPlanes(v, 5, 20, tmp_path / f"{Path(v.path).name}.npy", tissue=tissue)
        cz = v.chunk_planes
        assert cz > 1 and (kept.z0, kept.z1) == (5 // cz * cz, -(-20 // cz) * cz)     # whole chunk rows
        for a, b in ((0, 16), (16, 32), (3, 9), (30, 40), (20, 20)):     # kept, inside, outside the rows, empty
            for _ in range(2):                                           # read, then served from the file
                got = kept.read(a, b)
                assert got.dtype == np.float32
                np.testing.assert_array_equal(got, v.read(a, b))
                np.testing.assert_array_equal(kept.read_tissue(a, b), v.read(a, b) > 0)
        assert kept._kept[:16].all()                                    # the read of planes 0..16 was kept
        np.testing.assert_array_equal(kept.read_planes([2, 2, 7, 31]), v.read_planes([2, 2, 7, 31]))
        np.testing.assert_array_equal(kept.read(0, 9, slice(None, None, 3)), v.read(0, 9, slice(None, None, 3)))
        assert kept.shape == v.shape and kept.voxel_size == v.voxel_size
        kept.remove()
        assert not kept.file.exists()
    assert msk.read_tissue(0, 48).dtype == bool
    np.testing.assert_array_equal(msk.read_tissue(0, 48), msk.read(0, 48) > 0)
