"""The training augmentation: reproducible draws, bounds, and the warp it applies.

The applied warp is checked against an independent oracle: SciPy's rotation, SciPy's
B-spline evaluation (``map_coordinates(order=3, prefilter=False)``) and SciPy's resampling
(``map_coordinates`` order 1 / order 0, mode ``grid-constant``).
"""

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from fastcascade.train.augment import Augmenter, WarpParams

AIR = -1024.0
SHAPE = (20, 24, 16)


def volume(shape=SHAPE, seed=0):
    """A smooth HU image (so trilinear errors stay small) and labels with values {0, 2, 5, 9}."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    image = 300.0 * torch.sin(axes[0] / 3.0) * torch.cos(axes[1] / 4.0) + 2.0 * axes[2]
    image = image + 10.0 * torch.rand(shape, generator=g)
    values = torch.tensor([0, 2, 5, 9], dtype=torch.uint8)
    labels = values[torch.randint(0, 4, shape, generator=g)]
    return image[None], labels


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_result_other_seed_other_result():
    aug = Augmenter(grid_spacing=8)
    image, labels = volume()
    a = aug(image, labels, gen(1))
    b = aug(image, labels, gen(1))
    c = aug(image, labels, gen(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_resumes_from_a_saved_generator_state_and_ignores_the_global_rng():
    aug = Augmenter(grid_spacing=8)
    image, labels = volume()
    g = gen(3)
    first = aug(image, labels, g)
    state = g.get_state()
    second = aug(image, labels, g)
    assert not torch.equal(first[0], second[0])  # the stream advances

    global_state = torch.get_rng_state()
    torch.manual_seed(12345)  # must not matter
    resumed = torch.Generator()
    resumed.set_state(state)
    again = aug(image, labels, resumed)
    assert torch.equal(again[0], second[0]) and torch.equal(again[1], second[1])
    torch.manual_seed(999)
    before = torch.get_rng_state()
    aug(image, labels, gen(4))
    assert torch.equal(torch.get_rng_state(), before)  # the global generator was not used
    torch.set_rng_state(global_state)


def test_parameters_stay_within_bounds_and_fill_them():
    aug = Augmenter(
        grid_spacing=8, max_displacement=4.0, max_rotation_deg=5.0, max_translation_vox=20.0
    )
    g = gen(5)
    draws = [aug.sample_params(SHAPE, g) for _ in range(20)]
    rot = torch.stack([d.rotation_deg for d in draws])
    shift = torch.stack([d.translation_vox for d in draws])
    ctrl = torch.stack([d.control_displacements for d in draws])
    assert all(isinstance(d, WarpParams) and d.apply for d in draws)
    assert ctrl.shape == (20, 3, 6, 6, 5)  # floor((n - 1) / 8) + 4 control points per axis
    for values, bound in ((rot, 5.0), (shift, 20.0), (ctrl, 4.0)):
        assert values.dtype == torch.float32
        assert values.abs().max() <= bound
        # uniform over [-bound, bound]: both signs and close to the bound
        assert values.max() > 0.7 * bound and values.min() < -0.7 * bound


@pytest.mark.parametrize(
    "shape,spacing",
    [(SHAPE, 8), ((32, 32, 32), 32), ((9, 1, 7), 4)],
    ids=["fine-grid", "paper-grid-32cube", "single-voxel-axis"],
)
def test_warp_is_the_oracle_warp_of_the_drawn_parameters(shape, spacing):
    aug = Augmenter(grid_spacing=spacing)
    image, labels = volume(shape)
    out, out_labels = aug(image, labels, gen(6))
    params = aug.sample_params(shape, gen(6))

    # Independent sample positions: q = R (p - c) + c + t + B-spline field(p).
    rot = Rotation.from_euler("xyz", params.rotation_deg.double().numpy(), degrees=True)
    centre = (np.array(shape) - 1) / 2.0
    p = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    q = np.einsum("rc,cxyz->rxyz", rot.as_matrix(), p - centre[:, None, None, None])
    q += (centre + params.translation_vox.double().numpy())[:, None, None, None]
    t = p / spacing + 1.0
    ctrl = params.control_displacements.double().numpy()
    q += np.stack([map_coordinates(c, t, order=3, prefilter=False) for c in ctrl])

    want = map_coordinates(image[0].double().numpy(), q, order=1, mode="grid-constant", cval=AIR)
    want_labels = map_coordinates(labels.numpy(), q, order=0, mode="grid-constant", cval=0)
    assert out.shape == image.shape and out.dtype == image.dtype
    np.testing.assert_allclose(out[0].numpy(), want, rtol=0, atol=0.05)
    # float32 positions may fall on the other side of a .5 tie than float64 ones
    away = ~(np.abs(q - np.floor(q) - 0.5) < 1e-4).any(axis=0)
    assert away.mean() > 0.99
    np.testing.assert_array_equal(out_labels.numpy()[away], want_labels[away])
    # the warp did something
    assert not torch.equal(out, image)


def test_labels_stay_a_subset_of_the_input_values():
    aug = Augmenter(grid_spacing=8, label_fill=0)
    image, labels = volume()
    seen = set()
    for seed in range(3):
        _, out_labels = aug(image, labels, gen(seed))
        assert out_labels.dtype == labels.dtype
        seen |= set(out_labels.unique().tolist())
    assert seen <= {0, 2, 5, 9} and {2, 5, 9} <= seen


def test_probability_p_and_constant_consumption_of_the_stream():
    image, labels = volume()
    never = Augmenter(grid_spacing=8, p=0.0)
    g = gen(7)
    out, out_labels = never(image, labels, g)
    assert out is image and out_labels is labels
    always = Augmenter(grid_spacing=8, p=1.0)
    g_always = gen(7)
    always(image, labels, g_always)
    assert torch.equal(g.get_state(), g_always.get_state())  # same count of numbers drawn

    half = Augmenter(grid_spacing=8, p=0.5)
    g = gen(8)
    applied = [half.sample_params(SHAPE, g).apply for _ in range(40)]
    assert 5 < sum(applied) < 35


def test_zero_bounds_give_the_identity():
    aug = Augmenter(
        grid_spacing=8, max_displacement=0.0, max_rotation_deg=0.0, max_translation_vox=0.0
    )
    image, labels = volume()
    out, out_labels = aug(image, labels, gen(9))
    assert torch.equal(out, image) and torch.equal(out_labels, labels)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="p must be a probability"):
        Augmenter(p=1.5)
    with pytest.raises(ValueError, match="max_rotation_deg must be >= 0"):
        Augmenter(max_rotation_deg=-1.0)
    with pytest.raises(ValueError, match="grid_spacing must be > 0"):
        Augmenter(grid_spacing=0)
    image, labels = volume()
    with pytest.raises(TypeError, match="torch.Generator"):
        Augmenter()(image, labels, 0)
    with pytest.raises(ValueError, match=r"\(C, x, y, z\)"):
        Augmenter()(image[0], labels, gen(0))
