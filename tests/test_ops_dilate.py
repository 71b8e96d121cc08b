"""Ball dilation: torch path and Triton kernels (interpreter; ``-m gpu`` on a GPU) == SciPy
bit for bit, SciPy == a distance-transform oracle."""

import numpy as np
import pytest
import torch
from launch_guard import record_launches
from scipy import ndimage

import fastcascade.ops.dilate as dilate_module
from fastcascade.diagnostics import SyncCounter
from fastcascade.ops import _backend
from fastcascade.ops.dilate import _dilate_triton, dilate, dilate_ref, structuring_element


def blobs(shape, density, seed):
    return np.random.default_rng(seed).random(shape) < density


def corner_voxels(shape):
    m = np.zeros(shape, dtype=bool)
    m[0, 0, 0] = m[-1, -1, -1] = m[0, -1, shape[2] // 2] = True
    return m


def border_slab(shape):
    m = np.zeros(shape, dtype=bool)
    m[:, :, 0] = True
    m[-1, :, :] = True
    return m


MASKS = {
    "sparse-13x9x11": blobs((13, 9, 11), 0.02, 0),
    "dense-12x10x8": blobs((12, 10, 8), 0.4, 1),
    "odd-7x5x3": blobs((7, 5, 3), 0.2, 2),
    "corners": corner_voxels((9, 8, 10)),
    "border-slabs": border_slab((6, 7, 8)),
    "empty": np.zeros((6, 5, 7), dtype=bool),
    "full": np.ones((6, 5, 7), dtype=bool),
    "smaller-than-element-2x3x1": np.array(
        [[[True], [False], [False]], [[False], [False], [True]]]
    ),
    "single-voxel-1x1x1": np.ones((1, 1, 1), dtype=bool),
    "line-1x1x12": np.eye(1, 12, 5, dtype=bool).reshape(1, 1, 12),
}

# (radius, spacing in mm): spacing ratios that are exact binary fractions, so the oracle's
# squared distances are exact and ties on the ellipsoid's surface are well defined.
ELEMENTS = {
    "r0": (0, (1.0, 1.0, 1.0)),
    "r1": (1, (1.0, 1.0, 1.0)),
    "r2": (2, (1.0, 1.0, 1.0)),
    "r3": (3, (1.0, 1.0, 1.0)),
    "r3-iso-1.5mm": (3, (1.5, 1.5, 1.5)),
    "r3-z2x": (3, (1.0, 1.0, 2.0)),
    "r3-x2x": (3, (2.0, 1.0, 1.0)),
    "r4-1x1.5x3": (4, (1.0, 1.5, 3.0)),
    "r3-0.8x0.8x2": (3, (0.8, 0.8, 2.0)),
    "r5": (5, (1.0, 1.0, 1.0)),
}


def oracle_dilate(mask: np.ndarray, radius: int, spacing) -> np.ndarray:
    """Dilated iff the nearest mask voxel (Euclidean, in mm) is within r·min(spacing).

    The nearest voxel comes from ``distance_transform_edt``; the distance to it is then
    recomputed in units of the finest spacing from integer offsets, so the comparison with
    r² is exact whenever the spacing ratios are binary fractions.
    """
    if not mask.any():
        return np.zeros_like(mask)
    indices = ndimage.distance_transform_edt(
        ~mask, sampling=spacing, return_distances=False, return_indices=True
    )
    ratio = np.asarray(spacing, dtype=np.float64) / min(spacing)
    grid = np.indices(mask.shape)
    d2 = sum(((indices[a] - grid[a]) * ratio[a]) ** 2 for a in range(3))
    return d2 <= radius * radius


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.copy())


@pytest.mark.parametrize("element", list(ELEMENTS))
@pytest.mark.parametrize("name", list(MASKS))
def test_torch_path_equals_scipy_equals_oracle(name, element):
    mask = MASKS[name]
    radius, spacing = ELEMENTS[element]
    expected = oracle_dilate(mask, radius, spacing)
    ref = dilate_ref(t(mask), radius, spacing)
    fast = dilate(t(mask), radius, spacing)
    assert ref.dtype == fast.dtype == torch.bool
    np.testing.assert_array_equal(ref.numpy(), expected)
    np.testing.assert_array_equal(fast.numpy(), ref.numpy())


@pytest.mark.parametrize("radius", [1, 3, 6])
def test_larger_volume_and_noncontiguous_input(radius):
    mask = np.random.default_rng(7).random((20, 17, 24)) < 0.01
    view = t(mask).permute(2, 0, 1)  # a non-contiguous (x, y, z) view
    spacing = (1.5, 0.75, 1.5)
    np.testing.assert_array_equal(
        dilate(view, radius, spacing).numpy(),
        ndimage.binary_dilation(view.numpy(), structuring_element(radius, spacing)),
    )
    np.testing.assert_array_equal(
        dilate(view, radius, spacing, backend="scipy").numpy(),
        oracle_dilate(view.numpy(), radius, spacing),
    )


def test_radius_zero_is_identity_and_a_copy():
    mask = t(MASKS["dense-12x10x8"])
    out = dilate(mask, 0, (0.7, 0.9, 2.5))
    assert torch.equal(out, mask)
    out[0, 0, 0] = ~out[0, 0, 0]
    assert not torch.equal(out, mask)


@pytest.mark.parametrize(
    "radius, count", [(0, 1), (1, 7), (2, 33), (3, 123), (4, 257)], ids=lambda v: str(v)
)
def test_isotropic_element_counts_lattice_points_in_the_ball(radius, count):
    element = structuring_element(radius)
    assert element.shape == (2 * radius + 1,) * 3
    assert element.sum() == count
    assert np.array_equal(element, element[::-1, ::-1, ::-1])


@pytest.mark.parametrize(
    "spacing, ratio",
    [((1.0, 1.0, 2.0), (1, 1, 2)), ((3.0, 1.5, 1.5), (2, 1, 1)), ((0.5, 1.5, 1.0), (1, 3, 2))],
    ids=["z2", "x2", "1-3-2"],
)
@pytest.mark.parametrize("radius", [1, 2, 3, 5])
def test_anisotropic_element_is_the_mm_ball(radius, spacing, ratio):
    element = structuring_element(radius, spacing)
    half = [radius // q for q in ratio]
    assert element.shape == tuple(2 * h + 1 for h in half)
    i, j, k = np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij")
    d2 = (i * ratio[0]) ** 2 + (j * ratio[1]) ** 2 + (k * ratio[2]) ** 2  # exact integers
    np.testing.assert_array_equal(element, d2 <= radius**2)


def test_element_ties_on_the_surface_survive_decimal_spacings():
    # 2.1 / 0.7 is 3.0000000000000004 in binary: without the surface margin, the offsets
    # (0, 0, ±1), exactly r·min(spacing) = 2.1 mm away, would drop out.
    assert (1 * 2.1 / 0.7) ** 2 > 3**2
    element = structuring_element(3, (0.7, 0.7, 2.1))
    assert element.shape == (7, 7, 3) and element[3, 3, 0] and element[3, 3, 2]
    np.testing.assert_array_equal(element, structuring_element(3, (1, 1, 3)))
    np.testing.assert_array_equal(
        structuring_element(3, (0.7, 0.7, 1.4)), structuring_element(3, (1, 1, 2))
    )


#: What each bad input's error says (the test id → a regular expression).
BAD_INPUT_MESSAGES = {
    "float-mask": "mask must be a bool tensor",
    "2d-mask": "mask must be 3D",
    "negative-radius": "radius must be >= 0",
    "float-radius": "radius must be an int",
    "two-spacings": "spacing must have 3 entries",
    "zero-spacing": "spacing must be finite and > 0",
    "unknown-backend": "backend must be one of",
    "ref-numpy-mask": "mask must be a torch.Tensor",
}


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: dilate(torch.zeros(3, 3, 3), 1), TypeError),
        (lambda: dilate(torch.zeros(3, 3, dtype=torch.bool), 1), ValueError),
        (lambda: dilate(torch.zeros(3, 3, 3, dtype=torch.bool), -1), ValueError),
        (lambda: dilate(torch.zeros(3, 3, 3, dtype=torch.bool), 1.5), TypeError),
        (lambda: dilate(torch.zeros(3, 3, 3, dtype=torch.bool), 1, (1.0, 1.0)), ValueError),
        (lambda: dilate(torch.zeros(3, 3, 3, dtype=torch.bool), 1, (1.0, 0.0, 1.0)), ValueError),
        (lambda: dilate(torch.zeros(3, 3, 3, dtype=torch.bool), 1, backend="cupy"), ValueError),
        (lambda: dilate_ref(np.zeros((3, 3, 3), dtype=bool), 1), TypeError),
    ],
    ids=[
        "float-mask",
        "2d-mask",
        "negative-radius",
        "float-radius",
        "two-spacings",
        "zero-spacing",
        "unknown-backend",
        "ref-numpy-mask",
    ],
)
def test_bad_inputs_raise(call, error, request):
    case = request.node.callspec.id
    with pytest.raises(error, match=BAD_INPUT_MESSAGES[case]):
        call()


def test_torch_path_reads_nothing_back_from_the_device():
    mask = t(MASKS["dense-12x10x8"])
    with SyncCounter() as reads:
        dilate(mask, 3, (1.0, 1.0, 2.0))
    assert reads.syncs == 0


# -- Triton kernels in the interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) -------------
needs_interpreter = pytest.mark.skipif(
    not (_backend.triton_available() and _backend.interpreter_on()),
    reason="needs Triton with TRITON_INTERPRET=1 (set by tests/conftest.py)",
)


def word_edges(shape):
    """Voxels on both sides of the packed words' boundaries (z = 31 | 32, 63 | 64)."""
    m = np.zeros(shape, dtype=bool)
    m[1, 2, 31] = m[0, 0, 32] = m[2, 3, 63] = m[2, 1, 64] = m[1, 1, shape[2] - 1] = True
    return m


def labels_map(shape, seed):
    """uint8 labels 0..5, a third of the voxels foreground."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(shape) < 0.1, rng.integers(1, 6, shape), 0).astype(np.uint8)


# (mask, radius, spacing): each kernel call costs ~0.1-0.4 s in the interpreter, so these pick
# the awkward cases rather than the full cross product above. Ids name mask and element.
TRITON_CASES = {
    "sparse-13x9x11-r3": (MASKS["sparse-13x9x11"], 3, (1.0, 1.0, 1.0)),
    "sparse-13x9x11-r3-z2x": (MASKS["sparse-13x9x11"], 3, (1.0, 1.0, 2.0)),
    "dense-12x10x8-r0": (MASKS["dense-12x10x8"], 0, (1.0, 1.0, 1.0)),
    "dense-12x10x8-r2": (MASKS["dense-12x10x8"], 2, (1.0, 1.0, 1.0)),
    "odd-7x5x3-r1": (MASKS["odd-7x5x3"], 1, (1.0, 1.0, 1.0)),
    "odd-7x5x3-r4-1x1.5x3": (MASKS["odd-7x5x3"], 4, (1.0, 1.5, 3.0)),
    "corners-r3": (MASKS["corners"], 3, (1.0, 1.0, 1.0)),
    "corners-r3-x2x": (MASKS["corners"], 3, (2.0, 1.0, 1.0)),
    "border-slabs-r2": (MASKS["border-slabs"], 2, (1.0, 1.0, 1.0)),
    "border-slabs-r3-0.8x0.8x2": (MASKS["border-slabs"], 3, (0.8, 0.8, 2.0)),
    "empty-r3": (MASKS["empty"], 3, (1.0, 1.0, 1.0)),
    "full-r1": (MASKS["full"], 1, (1.0, 1.0, 1.0)),
    "full-r3": (MASKS["full"], 3, (1.0, 1.0, 1.0)),
    "smaller-than-element-2x3x1-r3": (MASKS["smaller-than-element-2x3x1"], 3, (1.0, 1.0, 1.0)),
    "single-voxel-1x1x1-r2": (MASKS["single-voxel-1x1x1"], 2, (1.0, 1.0, 1.0)),
    "line-1x1x12-r3": (MASKS["line-1x1x12"], 3, (1.0, 1.0, 1.0)),
    # z rows of several packed words: carries across word boundaries, a partial last word
    "word-edges-3x4x70-r3": (word_edges((3, 4, 70)), 3, (1.0, 1.0, 1.0)),
    "word-edges-3x4x65-r3-z-fine": (word_edges((3, 4, 65)), 3, (3.0, 3.0, 1.0)),
    "blobs-4x5x97-r9-halo16": (blobs((4, 5, 97), 0.02, 3), 9, (4.0, 4.0, 1.0)),
    "word-edges-3x4x70-r31-halo32": (word_edges((3, 4, 70)), 31, (40.0, 40.0, 1.0)),
}


def poisoned_run(mask: np.ndarray, radius, spacing, source=None):
    """The kernels' output and its check: output bytes and the packed workspace start as
    poison (0x5A, all bits set), so a voxel or a word the kernels forgot fails."""
    out = torch.full(mask.shape, 0x5A, dtype=torch.uint8)
    words = (radius + 1) * mask.shape[0] * mask.shape[1] * -(-mask.shape[2] // 32)
    workspace = torch.full((words,), -1, dtype=torch.int32)
    _dilate_triton(t(mask) if source is None else source, radius, spacing, out, workspace)
    assert set(np.unique(out.numpy())) <= {0, 1}, "a voxel was left unwritten"
    return out.numpy().astype(bool)


@needs_interpreter
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_kernels_equal_scipy(case):
    mask, radius, spacing = TRITON_CASES[case]
    expected = ndimage.binary_dilation(mask, structuring_element(radius, spacing))
    np.testing.assert_array_equal(poisoned_run(mask, radius, spacing), expected)


@needs_interpreter
def test_triton_public_path_labels_and_bool_agree_with_scipy():
    labels = labels_map((9, 7, 40), 4)
    spacing = (1.0, 1.0, 2.0)
    expected = ndimage.binary_dilation(labels > 0, structuring_element(3, spacing))
    from_bool = dilate(t(labels > 0), 3, spacing, backend="triton")
    from_labels = dilate(t(labels), 3, spacing, backend="triton")
    assert from_bool.dtype == from_labels.dtype == torch.bool
    np.testing.assert_array_equal(from_bool.numpy(), expected)
    np.testing.assert_array_equal(from_labels.numpy(), expected)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_triton_signed_labels_count_only_positive_as_foreground(dtype):
    rng = np.random.default_rng(5)
    labels = rng.integers(-3, 4, (6, 5, 9)) * (rng.random((6, 5, 9)) < 0.15)
    out = poisoned_run(labels, 1, (1.0, 1.0, 1.0), source=torch.from_numpy(labels).to(dtype))
    expected = ndimage.binary_dilation(labels > 0, structuring_element(1))
    np.testing.assert_array_equal(out, expected)


@needs_interpreter
def test_triton_blocks_smaller_than_the_volume(monkeypatch):
    # Tiles split x, rows and a row's words across programs (5 words per row, 8 per tile).
    monkeypatch.setitem(dilate_module.INTERPRETER_BLOCKS, "pack", (2, 8, 4))
    monkeypatch.setitem(dilate_module.INTERPRETER_BLOCKS, "columns", (2, 8, 4))
    mask = blobs((5, 3, 150), 0.03, 6)
    mask[:, :, 127:129] = True
    expected = ndimage.binary_dilation(mask, structuring_element(2, (1.0, 1.0, 1.0)))
    np.testing.assert_array_equal(poisoned_run(mask, 2, (1.0, 1.0, 1.0)), expected)


@needs_interpreter
def test_triton_noncontiguous_input_and_radius_zero_copy():
    mask = blobs((8, 6, 10), 0.1, 8)
    view = t(mask).permute(2, 0, 1)  # (10, 8, 6), not contiguous
    expected = ndimage.binary_dilation(view.numpy(), structuring_element(2))
    np.testing.assert_array_equal(dilate(view, 2, backend="triton").numpy(), expected)
    same = dilate(t(mask), 0, (0.7, 0.9, 2.5), backend="triton")
    np.testing.assert_array_equal(same.numpy(), mask)


@needs_interpreter
def test_triton_zero_sized_volume():
    out = dilate(torch.zeros(0, 4, 5, dtype=torch.bool), 2, backend="triton")
    assert out.shape == (0, 4, 5) and out.dtype == torch.bool


@needs_interpreter
def test_triton_rejects_an_element_longer_than_its_words_along_z():
    mask = torch.zeros(2, 2, 70, dtype=torch.bool)
    assert structuring_element(32, (40.0, 40.0, 1.0)).shape == (1, 1, 65)
    with pytest.raises(ValueError, match="z half-widths up to 31"):
        dilate(mask, 32, (40.0, 40.0, 1.0), backend="triton")


def test_auto_takes_triton_for_cuda_tensors_within_its_words(monkeypatch):
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    calls = []

    def fake_resolve(backend, tensor, candidates):
        calls.append((backend, candidates))
        return "triton"

    monkeypatch.setattr(_backend, "resolve", fake_resolve)
    assert dilate_module._choose("auto", mask, 31) == "triton"
    assert dilate_module._choose("auto", mask, 32) == "torch"  # quietly, beyond 31
    assert dilate_module._choose("triton", mask, 32) == "triton"  # then raises, above
    assert calls[0] == ("auto", ("triton", "torch"))


def test_auto_on_the_cpu_is_the_torch_path():
    assert dilate_module._choose("auto", torch.zeros(2, 2, 2, dtype=torch.bool), 3) == "torch"


def test_named_triton_without_gpu_or_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setattr(_backend, "interpreter_on", lambda: False)
    with pytest.raises(_backend.BackendUnavailableError, match="CUDA tensor"):
        dilate(torch.zeros(3, 3, 3, dtype=torch.bool), 1, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "scipy"])
def test_torch_and_scipy_paths_take_labels(backend):
    labels = labels_map((9, 8, 7), 9)
    labels[0, 0, 0] = 255  # uint8's largest label is foreground too
    out = dilate(t(labels), 2, (1.0, 1.0, 2.0), backend=backend)
    expected = ndimage.binary_dilation(labels > 0, structuring_element(2, (1.0, 1.0, 2.0)))
    assert out.dtype == torch.bool
    np.testing.assert_array_equal(out.numpy(), expected)


def test_triton_tables_describe_the_element():
    element = structuring_element(3)
    slot_of_w, columns = dilate_module._tables(element)
    assert slot_of_w.tolist() == [0, 1, 2, 3]  # half-widths 0..3 all occur at r = 3
    rebuilt = np.zeros_like(element)
    for i, j, slot in columns:
        w = int(np.flatnonzero(slot_of_w == slot)[0])
        rebuilt[i + 3, j + 3, 3 - w : 3 + w + 1] = True
    np.testing.assert_array_equal(rebuilt, element)
    assert len(columns) == 29


# -- GPU (opt-in: pytest -m gpu, with TRITON_INTERPRET=0) ------------------------------------------
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if _backend.interpreter_on():
        pytest.skip("run GPU tests with TRITON_INTERPRET=0 (the interpreter is on)")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape, radius, spacing",
    [
        ((64, 64, 64), 3, (1.0, 1.0, 1.0)),
        ((122, 101, 112), 3, (1.0, 1.0, 1.0)),
        ((97, 45, 33), 4, (1.0, 1.5, 3.0)),
        ((40, 41, 130), 9, (4.0, 4.0, 1.0)),
    ],
    ids=["64cube-r3", "caseA-r3", "odd-r4-aniso", "z-fine-r9"],
)
def test_gpu_triton_equals_scipy(shape, radius, spacing):
    _needs_cuda()
    labels = labels_map(shape, 10)
    expected = ndimage.binary_dilation(labels > 0, structuring_element(radius, spacing))
    gpu = torch.from_numpy(labels).cuda()
    for source in (gpu, gpu > 0):
        out = torch.full(shape, 0x5A, dtype=torch.uint8, device="cuda")
        _dilate_triton(source, radius, spacing, out)
        assert set(out.unique().tolist()) <= {0, 1}
        np.testing.assert_array_equal(out.bool().cpu().numpy(), expected)
    auto = dilate(gpu > 0, radius, spacing)  # "auto" on a CUDA tensor: the kernels
    np.testing.assert_array_equal(auto.cpu().numpy(), expected)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_int64_offsets_past_two_to_the_31():
    _needs_cuda()
    free, _ = torch.cuda.mem_get_info()
    if free < 8 * 2**30:
        pytest.skip("needs 8 GiB of free GPU memory")
    shape = (1100, 1100, 1800)  # 2.18e9 voxels
    mask = torch.zeros(shape, dtype=torch.bool, device="cuda")
    mask[-1, -1, -1] = mask[-5, -3, -40] = True
    out = dilate(mask, 3, backend="triton")
    # Both balls lie inside the last 12 x 12 x 48 voxels, whose far faces are the volume's.
    tail = mask[-12:, -12:, -48:].cpu().numpy()
    expected = ndimage.binary_dilation(tail, structuring_element(3))
    np.testing.assert_array_equal(out[-12:, -12:, -48:].cpu().numpy(), expected)
    assert int(out.sum()) == int(expected.sum())  # and nothing anywhere else


@needs_interpreter
def test_kernels_launch_inside_the_masks_device_guard(monkeypatch):
    launches = record_launches(monkeypatch, dilate_module, "_pack_z_kernel", "_or_columns_kernel")
    mask = t(MASKS["sparse-13x9x11"])
    got = dilate(mask, 2, backend="triton")
    assert [len(held) for held in launches] == [1, 1]
    assert all(held[-1].shape == mask.shape for held in launches)
    np.testing.assert_array_equal(got.numpy(), dilate_ref(mask, 2).numpy())
