"""Sub-volume sampling: crops against np.pad, centre distribution, valid-padding output box."""

import numpy as np
import pytest
import torch

from fastcascade.config import AIR_HU
from fastcascade.model.unet3d import UNet3D
from fastcascade.train.loss import weighted_cross_entropy
from fastcascade.train.sampling import (
    NO_CUT,
    SubvolumeSampler,
    crop,
    cut_border_mask,
    cut_distance,
    cut_faces,
)


def _np_crop(volume, start, size, fill):
    """Oracle: pad generously with np.pad, then slice."""
    p = max(max(size), max(abs(s) for s in start)) + max(volume.shape)
    padded = np.pad(volume, p, mode="constant", constant_values=fill)
    return padded[tuple(slice(s + p, s + p + n) for s, n in zip(start, size, strict=True))]


@pytest.mark.parametrize(
    "start, size",
    [
        ((0, 0, 0), (3, 4, 5)),
        ((2, 1, 3), (4, 4, 2)),
        ((-2, -1, -3), (5, 4, 6)),
        ((4, 5, 3), (6, 6, 6)),
        ((-3, -3, -3), (12, 13, 11)),
        ((7, 0, 0), (3, 3, 3)),
        ((-5, 0, 0), (3, 3, 3)),
    ],
    ids=[
        "inside",
        "inside_odd",
        "negative",
        "beyond_end",
        "larger_than_volume",
        "fully_outside_high",
        "fully_outside_low",
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.bool], ids=str)
def test_crop_matches_np_pad(start, size, dtype):
    g = torch.Generator().manual_seed(0)
    vol = (torch.rand(7, 6, 5, generator=g) * 200).to(dtype)
    fill = {torch.float32: AIR_HU, torch.uint8: 0, torch.bool: False}[dtype]
    got = crop(vol, start, size, fill)
    want = _np_crop(vol.numpy(), start, size, fill)
    assert got.dtype == dtype and got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), want)


def test_crop_keeps_leading_channels():
    vol = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).view(2, 4, 4, 4)
    got = crop(vol, (-1, 1, 2), (3, 3, 3), fill=-7.0)
    for c in range(2):
        np.testing.assert_array_equal(
            got[c].numpy(), _np_crop(vol[c].numpy(), (-1, 1, 2), (3, 3, 3), -7.0)
        )


def test_centres_are_uniform_over_mask_voxels():
    mask = torch.zeros(5, 6, 7, dtype=torch.bool)
    voxels = [(0, 0, 0), (4, 5, 6), (2, 3, 1), (1, 5, 0)]
    for v in voxels:
        mask[v] = True
    s = SubvolumeSampler((2, 2, 2), seed=3)
    n = 4000
    counts = {v: 0 for v in voxels}
    for _ in range(n):
        counts[s.draw_centre(mask)] += 1
    assert set(counts) == set(voxels) and s.drawn == n
    # each voxel has p = 1/4: 5 standard deviations is ±0.034
    for c in counts.values():
        assert abs(c / n - 0.25) < 0.035


def test_centre_is_the_drawn_index_of_the_mask():
    """Oracle: the k-th True voxel in C order, k from a generator with the same seed."""
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(6, 5, 4, generator=g) < 0.3
    s = SubvolumeSampler((2, 2, 2), seed=11)
    oracle = torch.Generator().manual_seed(11)
    coords = np.argwhere(mask.numpy())
    for _ in range(20):
        k = int(torch.randint(len(coords), (1,), generator=oracle))
        assert s.draw_centre(mask) == tuple(int(c) for c in coords[k])


def _coded_volume(shape):
    """A volume whose value tells the voxel: x·10000 + y·100 + z (exact in float32)."""
    x, y, z = torch.meshgrid(*(torch.arange(n) for n in shape), indexing="ij")
    return (x * 10000 + y * 100 + z).float()


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_label_box_is_the_network_output_region(padding):
    net = UNet3D(num_classes=2, base_channels=2, levels=2, padding=padding)
    tile = (20, 20, 20)
    out = net.output_size(tile)
    shape = (30, 26, 24)
    coded = _coded_volume(shape)
    labels = (torch.arange(np.prod(shape)) % 251).to(torch.uint8).view(shape)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[3:27, 2:24, 5:20] = True
    s = SubvolumeSampler(tile, out, seed=0)
    for _ in range(10):
        p = s.sample(coded, labels, mask)
        assert tuple(p.image_hu.shape) == tile and tuple(p.labels.shape) == out
        assert p.labels.dtype == torch.uint8 and p.region.dtype == torch.bool
        c = p.centre
        assert mask[c]
        start = [ci - t // 2 for ci, t in zip(c, tile, strict=True)]
        np.testing.assert_array_equal(
            p.image_hu.numpy(), _np_crop(coded.numpy(), start, tile, AIR_HU)
        )
        m = [(t - o) // 2 for t, o in zip(tile, out, strict=True)]
        out_start = [s0 + mi for s0, mi in zip(start, m, strict=True)]
        np.testing.assert_array_equal(p.labels.numpy(), _np_crop(labels.numpy(), out_start, out, 0))
        np.testing.assert_array_equal(
            p.region.numpy(), _np_crop(mask.numpy(), out_start, out, False)
        )
        # the label box is the central part of the image box
        inner = p.image_hu[m[0] : m[0] + out[0], m[1] : m[1] + out[1], m[2] : m[2] + out[2]]
        np.testing.assert_array_equal(
            inner.numpy(), _np_crop(coded.numpy(), out_start, out, AIR_HU)
        )


def test_padding_outside_the_volume():
    shape = (6, 6, 6)
    image = torch.full(shape, 50.0)
    labels = torch.full(shape, 3, dtype=torch.uint8)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[0, 0, 0] = True
    p = SubvolumeSampler((8, 8, 8), seed=0).sample(image, labels, mask)
    assert p.centre == (0, 0, 0)
    inside = torch.zeros(8, 8, 8, dtype=torch.bool)
    inside[4:, 4:, 4:] = True
    assert (p.image_hu[inside] == 50).all() and (p.image_hu[~inside] == AIR_HU).all()
    assert (p.labels[inside] == 3).all() and (p.labels[~inside] == 0).all()
    assert p.region.sum() == 1 and p.region[4, 4, 4]


def test_state_dict_resumes_the_same_draws():
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(9, 8, 7, generator=g) < 0.5
    a = SubvolumeSampler((4, 4, 4), seed=5)
    for _ in range(3):
        a.draw_centre(mask)
    state = a.state_dict()
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    rest = [a.draw_centre(mask) for _ in range(5)]
    b = SubvolumeSampler((4, 4, 4), seed=99)
    b.load_state_dict(state)
    assert b.drawn == 3
    assert [b.draw_centre(mask) for _ in range(5)] == rest
    assert b.drawn == a.drawn == 8


def test_identity_transform_gives_the_plain_crop():
    shape = (20, 18, 16)
    g = torch.Generator().manual_seed(4)
    image = torch.randn(shape, generator=g) * 100
    labels = torch.randint(0, 5, shape, generator=g).to(torch.uint8)
    mask = torch.rand(shape, generator=g) < 0.4
    seen = []

    def identity(img, lab):
        seen.append((tuple(img.shape), img.dtype, lab.dtype))
        return img, lab

    plain = SubvolumeSampler((8, 8, 8), (4, 4, 4), seed=1).sample(image, labels, mask)
    ctx = SubvolumeSampler((8, 8, 8), (4, 4, 4), seed=1, context=3)
    warped = ctx.sample(image, labels, mask, transform=identity)
    assert seen == [((2, 14, 14, 14), torch.float32, torch.uint8)]
    assert plain.centre == warped.centre
    for a, b in zip(plain[:3], warped[:3], strict=True):
        assert torch.equal(a, b)


def test_transform_moves_region_with_image():
    shape = (12, 12, 12)
    image = _coded_volume(shape)
    labels = torch.zeros(shape, dtype=torch.uint8)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[6, 6, 6] = True
    labels[6, 6, 6] = 4

    def flip_x(img, lab):
        return img.flip(-3), lab.flip(-3)

    p = SubvolumeSampler((4, 4, 4), seed=0, context=2).sample(image, labels, mask, transform=flip_x)
    # the 8-voxel context crop spans x = 2..9; after the flip x' = 11 - x
    assert p.region.sum() == 1 and p.labels.sum() == 4
    where = tuple(int(i) for i in p.region.nonzero()[0])
    assert p.labels[where] == 4
    assert p.image_hu[where] == 60606.0


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        SubvolumeSampler((2, 2, 2)).draw_centre(torch.zeros(3, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        SubvolumeSampler((2, 2, 2)).draw_centre(torch.ones(3, 3, 3))
    with pytest.raises(ValueError, match="centred"):
        SubvolumeSampler((8, 8, 8), (5, 8, 8))
    with pytest.raises(ValueError, match="three"):
        SubvolumeSampler((8, 8))
    with pytest.raises(ValueError, match="share one shape"):
        SubvolumeSampler((2, 2, 2)).sample(
            torch.zeros(3, 3, 3),
            torch.zeros(3, 3, 4, dtype=torch.uint8),
            torch.ones(3, 3, 3, dtype=torch.bool),
        )


# -- fields of view that cut organs ---------------------------------------------------------
def _cut_at_bottom(shape=(10, 9, 12)):
    """An organ touching the bottom face (z = 0) and one wholly inside."""
    labels = torch.zeros(shape, dtype=torch.uint8)
    labels[3:7, 2:6, 0:5] = 3  # runs out of the scan at z = 0
    labels[2:5, 5:8, 7:10] = 1
    return labels


def test_cut_faces_and_distance_against_a_loop():
    labels = _cut_at_bottom()
    labels[9, 4, 6] = 2  # and one voxel on the +x face
    assert cut_faces(labels) == ((0, 1), (2, 0))
    d = cut_distance(labels)
    want = np.full(labels.shape, NO_CUT, np.float32)
    for i, j, k in np.ndindex(*labels.shape):
        want[i, j, k] = min(9 - i, k)
    np.testing.assert_array_equal(d.numpy(), want)
    none = torch.zeros(4, 4, 4, dtype=torch.uint8)
    none[1:3, 1:3, 1:3] = 1
    assert cut_faces(none) == () and bool((cut_distance(none) == NO_CUT).all())


@pytest.mark.parametrize("margin", [0, 1, 3])
def test_the_loss_ignores_the_margin_at_a_cut_face_and_nowhere_else(margin):
    labels = _cut_at_bottom()
    valid = cut_border_mask(cut_distance(labels), margin)
    assert bool((~valid[..., :margin]).all()) and bool(valid[..., margin:].all())
    with pytest.raises(ValueError, match="margin"):
        cut_border_mask(cut_distance(labels), -1)
    # The loss: logits changed inside the margin change nothing, elsewhere they do.
    region = torch.ones_like(valid)[None] & valid[None]
    target = labels.long()[None]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 4, *labels.shape, generator=g)
    base = weighted_cross_entropy(logits, target, region)
    inside = logits.clone()
    inside[..., :margin] += 5 * torch.randn(inside[..., :margin].shape, generator=g)
    assert torch.equal(weighted_cross_entropy(inside, target, region), base)
    elsewhere = logits.clone()
    elsewhere[..., margin : margin + 1] += 5.0 * torch.randn(1, 4, 10, 9, 1, generator=g)
    assert not torch.equal(weighted_cross_entropy(elsewhere, target, region), base)


def test_the_cut_margin_travels_with_the_sampled_patch():
    """The loss region of a patch is the margin-free part of the mask, also when a
    transform moves the content (the region is a channel of the warp)."""
    labels = _cut_at_bottom((12, 12, 12))
    image = torch.where(labels > 0, 60.0, 0.0)
    mask = torch.ones(labels.shape, dtype=torch.bool)
    valid = cut_border_mask(cut_distance(labels), 3)
    s = SubvolumeSampler((6, 6, 6), seed=1)
    for _ in range(20):
        p = s.sample(image, labels, mask, region=mask & valid)
        z0 = p.centre[2] - 3  # the patch's first slice in the volume
        z = torch.arange(z0, z0 + 6).view(1, 1, 6).expand(6, 6, 6)
        assert torch.equal(p.region, (z >= 3) & (z < 12) & _inside_xy(p.centre, 12))

    def flip_z(img, lab):
        return img.flip(-1), lab.flip(-1)

    s = SubvolumeSampler((6, 6, 6), seed=1, context=2)
    for _ in range(10):
        p = s.sample(image, labels, mask, region=mask & valid, transform=flip_z)
        lo = p.centre[2] - 3 - 2  # the context crop's first slice, now at its end
        z = (lo + 9 - torch.arange(6) - 2).view(1, 1, 6).expand(6, 6, 6)
        assert torch.equal(p.region, (z >= 3) & (z < 12) & _inside_xy(p.centre, 12))


def _inside_xy(centre, n):
    x = torch.arange(centre[0] - 3, centre[0] + 3).view(6, 1, 1)
    y = torch.arange(centre[1] - 3, centre[1] + 3).view(1, 6, 1)
    return ((x >= 0) & (x < n) & (y >= 0) & (y < n)).expand(6, 6, 6)
