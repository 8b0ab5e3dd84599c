import pytest

from octn4.errors import InputError
from octn4.sections import parse_planes, section_bounds


@pytest.mark.parametrize("depth,n", [(10, 3), (14, 7), (100, 6), (5, 1)])
def test_count_split_is_contiguous_and_near_equal(depth, n):
    b = section_bounds(depth, n_sections=n)
    assert len(b) == n and b[0][0] == 0 and b[-1][1] == depth
    assert all(a[1] == c[0] for a, c in zip(b[:-1], b[1:]))
    sizes = [z1 - z0 for z0, z1 in b]
    assert max(sizes) - min(sizes) <= 1


def test_explicit_planes():
    assert section_bounds(9, planes=[4, 3, 2]) == [(0, 4), (4, 7), (7, 9)]
    assert parse_planes("4,3,2") == [4, 3, 2]


@pytest.mark.parametrize("kwargs,msg", [
    (dict(n_sections=11), "11 sections requested but the volume has only 10"),
    (dict(n_sections=0), "positive integer"),
    (dict(planes=[4, 4]), "sum to 8 but the volume has 10"),
    (dict(planes=[5, 0, 5]), "positive integers"),
    (dict(planes=[]), "empty"),
    (dict(), "either"),
    (dict(n_sections=2, planes=[5, 5]), "either"),
    # refused here, before the mask stage, rather than after it in the section task
    (dict(n_sections=6), r"section 4 would have 1 plane; N4 needs at least 2 planes per section \(2 sections too "
                         r"thin\): give fewer sections \(at most 5 for 10 planes\)"),
    (dict(planes=[4, 1, 5]), "section 1 would have 1 plane"),
])
def test_bad_sections_are_named(kwargs, msg):
    with pytest.raises(InputError, match=msg):
        section_bounds(10, **kwargs)


def test_bad_planes_text():
    with pytest.raises(InputError, match="comma-separated integers"):
        parse_planes("4,x")
