"""Body mask, hole filling and largest component against plain-Python oracles.

The oracles below share no code with SciPy: a breadth-first flood fill from each slice's
border finds the outside (everything else that is background is a hole), and a
breadth-first labelling in C order finds the 6-connected components.
"""

from collections import deque

import numpy as np
import pytest
import torch
from scipy import ndimage

from fastcascade.diagnostics import SyncCounter
from fastcascade.ops import morphology
from fastcascade.ops._backend import BackendUnavailableError
from fastcascade.ops.morphology import (
    body_mask,
    body_mask_ref,
    fill_holes_2d,
    fill_holes_2d_ref,
    largest_component,
    largest_component_ref,
)

# --- oracles ------------------------------------------------------------------------------


def oracle_fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """Per z slice: flood the background from the x/y border (4-neighbours); the rest is body."""
    nx, ny, nz = mask.shape
    out = mask.copy()
    for k in range(nz):
        outside = np.zeros((nx, ny), dtype=bool)
        queue = deque()
        for i in range(nx):
            for j in range(ny):
                on_border = i in (0, nx - 1) or j in (0, ny - 1)
                if on_border and not mask[i, j, k]:
                    outside[i, j] = True
                    queue.append((i, j))
        while queue:
            i, j = queue.popleft()
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                a, b = i + di, j + dj
                if 0 <= a < nx and 0 <= b < ny and not mask[a, b, k] and not outside[a, b]:
                    outside[a, b] = True
                    queue.append((a, b))
        out[:, :, k] = ~outside
    return out


def oracle_components(mask: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """6-connected components, in the C order of their first voxel."""
    seen = np.zeros(mask.shape, dtype=bool)
    components = []
    for start in np.ndindex(mask.shape):
        if not mask[start] or seen[start]:
            continue
        seen[start] = True
        queue, voxels = deque([start]), []
        while queue:
            v = queue.popleft()
            voxels.append(v)
            for axis in range(3):
                for step in (-1, 1):
                    n = list(v)
                    n[axis] += step
                    n = tuple(n)
                    if 0 <= n[axis] < mask.shape[axis] and mask[n] and not seen[n]:
                        seen[n] = True
                        queue.append(n)
        components.append(voxels)
    return components


def oracle_largest_component(mask: np.ndarray) -> np.ndarray:
    out = np.zeros_like(mask)
    components = oracle_components(mask)
    if components:
        best = components[0]
        for c in components[1:]:
            if len(c) > len(best):  # strictly larger: ties keep the earlier component
                best = c
        for v in best:
            out[v] = True
    return out


def oracle_body_mask(image: np.ndarray, threshold: float) -> np.ndarray:
    return oracle_largest_component(oracle_fill_holes_2d(image > threshold))


# --- test volumes -------------------------------------------------------------------------


def random_blobs(shape, density, seed):
    rng = np.random.default_rng(seed)
    return rng.random(shape) < density


def smoothed_blobs(shape, seed):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)
    return field > 0.05


def hollow_sphere(n=11, outer=4.6, inner=2.6):
    g = np.arange(n) - n // 2
    d2 = g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2
    return (d2 <= outer**2) & (d2 > inner**2)


def body_touching_borders():
    """A trunk filling the whole z range with a lung open at the top slice, an air pocket
    open to the x border (outside, not a hole) and a sealed air pocket (a hole)."""
    m = np.zeros((12, 11, 6), dtype=bool)
    m[1:11, 1:10, :] = True
    m[3:6, 3:7, 2:] = False  # lung reaching the last slice
    m[0:4, 8, :] = False  # a notch from the x border: connected to the outside
    m[8, 4, 1:4] = False  # sealed pocket
    return m


MASKS = {
    "blobs-sparse": random_blobs((9, 8, 5), 0.3, 0),
    "blobs-dense": random_blobs((9, 8, 5), 0.6, 1),
    "blobs-odd": random_blobs((7, 5, 3), 0.5, 2),
    "smooth-blobs": smoothed_blobs((10, 9, 7), 3),
    "hollow-sphere": hollow_sphere(),
    "body-touching-borders": body_touching_borders(),
    "empty": np.zeros((5, 4, 3), dtype=bool),
    "full": np.ones((5, 4, 3), dtype=bool),
    "single-voxel": np.pad(np.ones((1, 1, 1), dtype=bool), ((2, 1), (0, 3), (1, 1))),
    "thin-slab-1x1xN": random_blobs((1, 1, 9), 0.5, 4),
    "zero-size": np.zeros((0, 3, 4), dtype=bool),
}


#: Backends that run on a CPU tensor: SciPy (the CPU default) and the PyTorch labelling.
CPU_BACKENDS = ["scipy", "torch"]


def as_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.copy())


# --- hole filling -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(MASKS))
def test_fill_holes_2d_matches_oracle_and_reference(name, backend):
    m = MASKS[name]
    expected = oracle_fill_holes_2d(m)
    ref = fill_holes_2d_ref(as_tensor(m))
    fast = fill_holes_2d(as_tensor(m), backend=backend)
    assert ref.dtype == fast.dtype == torch.bool
    np.testing.assert_array_equal(ref.numpy(), expected)
    np.testing.assert_array_equal(fast.numpy(), expected)


def test_fill_holes_2d_is_per_slice_where_3d_filling_is_not():
    m = body_touching_borders()
    filled = fill_holes_2d(as_tensor(m)).numpy()
    # The lung is open along z at the top of the field of view: a 3D fill leaves it out ...
    assert not ndimage.binary_fill_holes(m)[4, 4, 3]
    # ... and each axial slice closes around it.
    assert filled[3:6, 3:7, :].all()
    assert filled[8, 4, 1:4].all()  # sealed pocket
    assert not filled[0:4, 8, :].any()  # notch open to the x border stays outside
    assert not filled[0].any() and not filled[:, 0].any()


def test_fill_holes_hollow_sphere_becomes_solid():
    m = hollow_sphere()
    filled = fill_holes_2d(as_tensor(m)).numpy()
    g = np.arange(11) - 5
    d2 = g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2
    np.testing.assert_array_equal(filled, d2 <= 4.6**2)


def test_fill_holes_uses_in_plane_4_connectivity():
    # A channel from the border reaches (2, 2); (3, 3) touches it only diagonally, so with
    # 4-connectivity (3, 3) is a hole while the channel stays outside.
    m = np.ones((7, 7, 1), dtype=bool)
    m[0:3, 2, 0] = False
    m[3, 3, 0] = False
    filled = fill_holes_2d(as_tensor(m)).numpy()
    assert not filled[0:3, 2, 0].any()
    assert filled[3, 3, 0]
    np.testing.assert_array_equal(filled, oracle_fill_holes_2d(m))


# --- largest component --------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(MASKS))
def test_largest_component_matches_oracle_and_reference(name, backend):
    m = MASKS[name]
    expected = oracle_largest_component(m)
    np.testing.assert_array_equal(largest_component_ref(as_tensor(m)).numpy(), expected)
    out = largest_component(as_tensor(m), backend=backend)
    assert out.dtype == torch.bool
    np.testing.assert_array_equal(out.numpy(), expected)


def test_largest_component_uses_6_connectivity():
    m = np.zeros((4, 4, 4), dtype=bool)
    m[0, 0, 0] = m[1, 1, 0] = m[2, 2, 0] = True  # only diagonal contacts: 3 components
    m[3, 0:2, 3] = True  # 2 voxels, face-connected
    out = largest_component(as_tensor(m)).numpy()
    assert out.sum() == 2 and out[3, 0, 3] and out[3, 1, 3]


@pytest.mark.parametrize(
    "first_voxels",
    [((0, 0, 0), (3, 3, 3)), ((0, 3, 0), (0, 0, 3)), ((2, 0, 0), (0, 3, 3))],
    ids=["x-order", "y-before-z", "x-before-y"],
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_largest_component_tie_goes_to_first_in_c_order(first_voxels, backend):
    m = np.zeros((4, 4, 4), dtype=bool)
    for x, y, z in first_voxels:
        # a 2-voxel bar along x starting at (x, y, z)
        m[x, y, z] = True
        m[x + 1 if x < 3 else x - 1, y, z] = True
    assert [len(c) for c in oracle_components(m)] == [2, 2]
    winner = tuple(np.argwhere(m)[0])  # the first True voxel in C order
    out = largest_component(as_tensor(m), backend=backend).numpy()
    assert out.sum() == 2
    assert out[winner]
    np.testing.assert_array_equal(out, oracle_largest_component(m))


def test_largest_component_empty_and_full():
    empty = torch.zeros(3, 4, 5, dtype=torch.bool)
    full = torch.ones(3, 4, 5, dtype=torch.bool)
    assert not largest_component(empty).any()
    assert largest_component(full).all()


# --- body mask ----------------------------------------------------------------------------


def random_ct(shape, seed):
    """Air (-1000 HU) with smooth soft-tissue blobs and noise."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 1.2)
    return np.where(field > 0.02, 40.0, -1000.0) + rng.normal(0, 200, shape)


IMAGES = {
    "random-ct-a": random_ct((10, 9, 6), 0),
    "random-ct-b": random_ct((7, 11, 5), 1),
    "body-touching-borders": np.where(body_touching_borders(), 50.0, -950.0),
    "hollow-sphere": np.where(hollow_sphere(), 300.0, -1000.0),
    "all-air": np.full((4, 5, 3), -1000.0),
    "all-tissue": np.full((4, 5, 3), 40.0),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(IMAGES))
def test_body_mask_matches_oracle_and_reference(name, backend):
    image = IMAGES[name].astype(np.float32)
    expected = oracle_body_mask(image, -300.0)
    ref = body_mask_ref(torch.from_numpy(image))
    fast = body_mask(torch.from_numpy(image), backend=backend)
    assert fast.dtype == torch.bool and fast.shape == image.shape
    np.testing.assert_array_equal(ref.numpy(), expected)
    np.testing.assert_array_equal(fast.numpy(), expected)


def test_body_mask_threshold_is_strict_and_nan_is_outside():
    image = torch.full((3, 3, 3), -1000.0)
    image[1, 1, 1] = -300.0
    assert not body_mask(image).any()
    image[1, 1, 1] = -299.5
    assert body_mask(image).sum() == 1
    image[1, 1, 1] = float("nan")
    assert not body_mask(image).any()
    assert not body_mask_ref(image).any()


def test_body_mask_accepts_integer_hu_and_other_thresholds():
    image = np.where(body_touching_borders(), 50, -950).astype(np.int16)
    for threshold in (-300.0, 0.0, 60.0):
        expected = oracle_body_mask(image, threshold)
        np.testing.assert_array_equal(body_mask(torch.from_numpy(image), threshold), expected)


def test_body_mask_on_case_a(case_a_paths):
    nib = pytest.importorskip("nibabel")
    ct_path, seg_path = case_a_paths
    ct = nib.as_closest_canonical(nib.load(ct_path))
    seg = nib.as_closest_canonical(nib.load(seg_path))
    image = torch.from_numpy(np.asarray(ct.dataobj, dtype=np.float32))
    mask = body_mask(image)
    np.testing.assert_array_equal(mask.numpy(), body_mask_ref(image).numpy())
    organs = np.asarray(seg.dataobj) > 0
    # Every labelled structure lies inside the body, and the body is neither empty nor
    # the whole field of view.
    assert organs.any()
    assert mask.numpy()[organs].mean() > 0.999
    assert 0.05 < mask.float().mean().item() < 0.95


# --- the device backends: PyTorch labelling and CuPy -------------------------------------


def serpentine(nx=9, ny=13, nz=3):
    """One path that turns at every other row (in-plane) and climbs in z: labels must
    travel far, through many labelling rounds."""
    m = np.zeros((nx, ny, nz), dtype=bool)
    for k in range(nz):
        for j in range(0, ny, 2):
            m[:, j, k] = True
            if j + 1 < ny:
                m[(nx - 1) if (j // 2) % 2 == 0 else 0, j + 1, k] = True
        if k + 1 < nz:
            m[0 if (ny // 2) % 2 else nx - 1, ny - 1, k] = True
    m[:, :, 1] = m[:, :, 1][::-1]  # the middle slice runs backwards: one long 3D path
    return m


@pytest.mark.parametrize("rounds_per_check", [1, 4])
def test_torch_labelling_converges_on_long_paths(monkeypatch, rounds_per_check):
    monkeypatch.setattr(morphology, "ROUNDS_PER_CHECK", rounds_per_check)
    m = serpentine()
    other = np.zeros_like(m)
    other[4, 1::2, 0] = ~m[4, 1::2, 0]  # isolated pockets between the rows
    for mask in (m, m | other, ~m):
        t = as_tensor(mask)
        np.testing.assert_array_equal(
            largest_component(t, backend="torch").numpy(), oracle_largest_component(mask)
        )
        np.testing.assert_array_equal(
            fill_holes_2d(t, backend="torch").numpy(), oracle_fill_holes_2d(mask)
        )


def test_torch_labels_are_the_smallest_index_of_each_component():
    m = smoothed_blobs((12, 10, 8), 7)
    labels = morphology._label_torch(as_tensor(m), (0, 1, 2)).numpy()
    scipy_labels, count = ndimage.label(m)
    assert count > 1
    for c in range(1, count + 1):
        voxels = scipy_labels == c
        first = int(np.flatnonzero(voxels.ravel())[0])
        assert (labels[voxels] == first + 1).all()
    assert (labels[~m] == 0).all()


@pytest.mark.parametrize("name", ["blobs-sparse", "smooth-blobs", "body-touching-borders"])
def test_device_steps_accept_labels_in_any_numbering(name):
    """CuPy numbers components its own way: the steps after labelling must not care."""
    m = MASKS[name]
    rng = np.random.default_rng(0)
    for mask, structure, finish, oracle in (
        (m, None, morphology._largest_from_labels, oracle_largest_component),
        (~m, morphology._IN_PLANE, morphology._fill_from_labels, oracle_fill_holes_2d),
    ):
        labels, count = ndimage.label(mask, structure=structure)
        shuffled = np.concatenate([[0], rng.permutation(count) + 1])[labels].astype(np.int32)
        out = finish(as_tensor(m), torch.from_numpy(shuffled))
        np.testing.assert_array_equal(out.numpy(), oracle(m))


@pytest.mark.parametrize("seed", range(4))
def test_torch_backend_matches_scipy_on_random_volumes(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(3, 17, size=3))
    image = random_ct(shape, seed).astype(np.float32)
    t = torch.from_numpy(image)
    for threshold in (-300.0, 0.0):
        np.testing.assert_array_equal(
            body_mask(t, threshold, backend="torch").numpy(),
            body_mask(t, threshold, backend="scipy").numpy(),
        )


def test_torch_backend_on_case_a_syncs_per_check_only(case_a_paths):
    nib = pytest.importorskip("nibabel")
    ct = nib.as_closest_canonical(nib.load(case_a_paths[0]))
    image = torch.from_numpy(np.asarray(ct.dataobj, dtype=np.float32))
    with SyncCounter() as counter:
        mask = body_mask(image, backend="torch")
    np.testing.assert_array_equal(mask.numpy(), body_mask_ref(image).numpy())
    # Two labellings, each ending after a few groups of rounds: one scalar read per group.
    assert set(counter.by_op) <= {"item"}
    assert 2 <= counter.syncs <= 4, counter.by_op


def test_auto_backend_is_scipy_on_the_cpu_and_cupy_needs_a_gpu():
    m = torch.ones(3, 3, 3, dtype=torch.bool)
    assert morphology.resolve_backend("auto", m) == "scipy"
    assert morphology.resolve_backend("torch", m) == "torch"
    with pytest.raises(BackendUnavailableError, match="CUDA tensor"):
        largest_component(m, backend="cupy")


def test_cupy_glue_with_a_stand_in_for_cupy(monkeypatch):
    """The code around CuPy (DLPack both ways, the structure, int32 labels, the steps
    after labelling), run on the CPU with SciPy standing in for ``cupyx.scipy.ndimage``.
    CuPy itself runs in the GPU test below."""
    import contextlib
    import sys
    import types

    calls = []

    def label(image, structure=None):
        assert image.dtype == np.uint8  # the bool mask, viewed as bytes
        calls.append(None if structure is None else structure.copy())
        labels, count = ndimage.label(image, structure=structure)
        return labels.astype(np.int32), count

    cuda = types.SimpleNamespace(
        Device=lambda index: contextlib.nullcontext(),
        ExternalStream=lambda pointer: contextlib.nullcontext(),
    )
    cupy = types.SimpleNamespace(from_dlpack=np.from_dlpack, cuda=cuda)
    cupyx_ndimage = types.SimpleNamespace(label=label)
    cupyx_scipy = types.SimpleNamespace(ndimage=cupyx_ndimage)
    for name, module in {
        "cupy": cupy,
        "cupyx": types.SimpleNamespace(scipy=cupyx_scipy),
        "cupyx.scipy": cupyx_scipy,
        "cupyx.scipy.ndimage": cupyx_ndimage,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda device: types.SimpleNamespace(cuda_stream=0)
    )
    for name in ("body-touching-borders", "smooth-blobs", "hollow-sphere", "empty"):
        m = MASKS[name]
        filled = morphology._fill_holes_device(as_tensor(m), "cupy")
        np.testing.assert_array_equal(filled.numpy(), oracle_fill_holes_2d(m), name)
        largest = morphology._largest_component_device(as_tensor(m), "cupy")
        np.testing.assert_array_equal(largest.numpy(), oracle_largest_component(m), name)
    # Hole filling labels in-plane, the component step with SciPy's default (6-connected).
    np.testing.assert_array_equal(calls[0], morphology._IN_PLANE)
    assert calls[1] is None


def _cuda_or_skip() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch", "cupy", "cuda"])
def test_device_backends_match_scipy_on_the_gpu(backend):
    device = _cuda_or_skip()
    if backend == "cupy" and not morphology._backend.cupy_available():
        pytest.skip("CuPy is not installed (fastcascade[gpu])")
    if backend == "cuda" and morphology._backend.cuda_extension_missing():
        pytest.skip(f"csrc/ cannot be built: {morphology._backend.cuda_extension_missing()}")
    for name, m in MASKS.items():
        t = as_tensor(m).to(device)
        np.testing.assert_array_equal(
            fill_holes_2d(t, backend=backend).cpu().numpy(), oracle_fill_holes_2d(m), name
        )
        np.testing.assert_array_equal(
            largest_component(t, backend=backend).cpu().numpy(),
            oracle_largest_component(m),
            name,
        )
    for seed in range(3):
        image = torch.from_numpy(random_ct((40, 37, 23), seed).astype(np.float32))
        expected = body_mask_ref(image).numpy()
        image = image.to(device)
        with SyncCounter() as counter:
            out = body_mask(image, backend=backend)
        assert out.device.type == "cuda"
        assert counter.transfers == [], "the body mask must stay on the GPU"
        np.testing.assert_array_equal(out.cpu().numpy(), expected)


# --- validation ---------------------------------------------------------------------------


#: What each bad input's error says (the test id → a regular expression).
BAD_INPUT_MESSAGES = {
    "fill-float-mask": "fill_holes_2d: mask must be a bool tensor",
    "fill-2d": "fill_holes_2d: mask must be 3D",
    "largest-numpy": "largest_component: mask must be a torch.Tensor",
    "largest-4d": "largest_component: mask must be 3D",
    "body-bool-image": "body_mask: image_hu must hold real HU values",
    "body-2d": "body_mask: image_hu must be 3D",
    "body-unknown-backend": "body_mask: backend must be one of",
    "fill-unknown-backend": "fill_holes_2d: backend must be one of",
}


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: fill_holes_2d(torch.zeros(3, 3, 3)), TypeError),
        (lambda: fill_holes_2d(torch.zeros(3, 3, dtype=torch.bool)), ValueError),
        (lambda: largest_component(np.zeros((3, 3, 3), dtype=bool)), TypeError),
        (lambda: largest_component(torch.zeros(1, 3, 3, 3, dtype=torch.bool)), ValueError),
        (lambda: body_mask(torch.zeros(3, 3, 3, dtype=torch.bool)), TypeError),
        (lambda: body_mask(torch.zeros(3, 3)), ValueError),
        (lambda: body_mask(torch.zeros(3, 3, 3), backend="numpy"), ValueError),
        (
            lambda: fill_holes_2d(torch.zeros(3, 3, 3, dtype=torch.bool), backend="opencv"),
            ValueError,
        ),
    ],
    ids=[
        "fill-float-mask",
        "fill-2d",
        "largest-numpy",
        "largest-4d",
        "body-bool-image",
        "body-2d",
        "body-unknown-backend",
        "fill-unknown-backend",
    ],
)
def test_bad_inputs_raise(call, error, request):
    case = request.node.callspec.id
    with pytest.raises(error, match=BAD_INPUT_MESSAGES[case]):
        call()
