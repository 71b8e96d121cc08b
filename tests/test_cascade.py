"""The whole cascade through segment(), with a tiny random model (fast, any machine)."""

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

import fastcascade
from fastcascade.api import Predictor
from fastcascade.config import Architecture, CascadeConfig, StageConfig
from fastcascade.diagnostics import SyncCounter
from fastcascade.model import UNet3D


def tiny_predictor(padding="same", tile=(32, 32, 32), seed=0, device="cpu") -> Predictor:
    torch.manual_seed(seed)
    arch = Architecture(num_classes=11, base_channels=2, levels=2, padding=padding)
    config = CascadeConfig(
        spacing=(6.0, 6.0, 6.0),
        stage1=StageConfig(window=(-1000.0, 1000.0), tile=tile, architecture=arch),
        stage2=StageConfig(window=(-200.0, 400.0), tile=tile, architecture=arch),
    )
    nets = []
    for _ in range(2):
        net = UNet3D.from_architecture(arch)
        # A last layer biased towards foreground so C2 is not empty.
        torch.nn.init.normal_(net.classifier.bias, 0.0, 2.0)
        nets.append(net)
    return Predictor(config, *nets, device=device)


@pytest.fixture(scope="module")
def phantom():
    return fastcascade.phantom.make_phantom(shape=(61, 50, 56), spacing=(6.0, 6.0, 6.0), seed=3)


@pytest.mark.parametrize("inference", ["tiles", "slabs"])
@pytest.mark.parametrize("padding,tile", [("same", (24, 24, 24)), ("valid", (28, 28, 28))])
def test_skipping_gives_the_same_labels_as_every_tile(phantom, padding, tile, inference):
    predictor = tiny_predictor(padding, tile)
    opts = {"overlap": False, "inference": inference}
    fast = predictor.segment(phantom.image, spacing=phantom.spacing, **opts)
    simple = predictor.segment(phantom.image, spacing=phantom.spacing, skip_empty=False, **opts)
    np.testing.assert_array_equal(fast.labels, simple.labels)
    assert simple.tiles["stage1"][0] == simple.tiles["stage1"][1]
    if inference == "tiles":
        assert fast.tiles["stage2"][0] < simple.tiles["stage2"][0]
    assert 0.05 < fast.c1_fraction < 0.9
    # What was skipped shows in the result: fewer voxels computed over the same grid.
    for stage in ("stage1", "stage2"):
        f, s = fast.passes[stage], simple.passes[stage]
        assert f["inference"] == s["inference"] == inference
        assert (f["passes"], f["passes_planned"]) == fast.tiles[stage]
        assert f["voxels_grid"] == s["voxels_grid"] > 0
        assert isinstance(f["memory_budget"], int) and f["memory_budget"] > 0  # "auto"
    computed = [r.passes["stage2"]["voxels_computed"] for r in (fast, simple)]
    assert computed[0] < computed[1] if inference == "tiles" else computed[0] <= computed[1]


def test_body_mask_backends_give_the_same_segmentation(phantom):
    predictor = tiny_predictor()
    results = [
        predictor.segment(phantom.image, spacing=phantom.spacing, body_mask_backend=backend)
        for backend in ("auto", "scipy", "torch")
    ]
    for other in results[1:]:
        np.testing.assert_array_equal(other.labels, results[0].labels)
        assert other.c1_fraction == results[0].c1_fraction
    with pytest.raises(ValueError, match="body_mask_backend"):
        predictor.segment(phantom.image, spacing=phantom.spacing, body_mask_backend="gpu")


def test_result_geometry_and_contents(phantom):
    result = tiny_predictor().segment(phantom.image, spacing=phantom.spacing, probabilities=True)
    assert result.labels.shape == phantom.image.shape and result.labels.dtype == np.uint8
    assert result.probabilities.shape == (11, *phantom.image.shape)
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-5)
    assert result.class_names == fastcascade.CLASS_NAMES
    assert set(result.timings) >= {"c1", "stage1", "c2", "stage2", "total"}
    assert 0.0 < result.c2_fraction <= 1.0


def test_flipped_and_permuted_copies_give_the_same_labels(phantom, tmp_path):
    """Through files with LPS and axis-permuted affines: identical organs, sides kept."""
    predictor = tiny_predictor()
    ct, _ = phantom.to_nifti()
    want = predictor.segment(ct).labels

    flipped_data = np.asarray(ct.dataobj)[::-1, ::-1, :]
    affine = ct.affine @ np.array(
        [[-1, 0, 0, ct.shape[0] - 1], [0, -1, 0, ct.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]]
    )
    lps = nib.Nifti1Image(np.ascontiguousarray(flipped_data), affine)
    got = predictor.segment(lps).labels
    np.testing.assert_array_equal(got[::-1, ::-1, :], want)

    perm = np.asarray(ct.dataobj).transpose(2, 0, 1)
    affine = ct.affine[:, [2, 0, 1, 3]]
    permuted = nib.Nifti1Image(np.ascontiguousarray(perm), affine)
    path = tmp_path / "permuted.nii.gz"
    nib.save(permuted, str(path))
    got = predictor.segment(str(path)).labels
    np.testing.assert_array_equal(got.transpose(1, 2, 0), want)


def test_moving_a_predictor_to_its_own_device_keeps_its_compiled_networks():
    predictor = tiny_predictor()
    predictor.compile = True
    compiled = predictor._networks()
    predictor.to("cpu")
    predictor.to(torch.device("cpu"))
    assert predictor._networks() is compiled


def test_tensor_in_tensor_out(phantom):
    predictor = tiny_predictor()
    want = predictor.segment(phantom.image, spacing=phantom.spacing).labels
    got = predictor.segment(torch.from_numpy(phantom.image), spacing=phantom.spacing).labels
    assert isinstance(got, torch.Tensor) and got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), want)


#: Scalar host syncs per scan (see README, "Host syncs"): one per stage (the tile count
#: with tiles, the mask's projections that place the slabs with slabs), the C1 and C2
#: fractions reported in the result, and the value checks of the input (finite, not a
#: label map) which may read up to 4 scalars.
SYNC_BOUND = 8


@pytest.mark.parametrize("inference", ["tiles", "slabs"])
def test_host_syncs_within_bound(phantom, inference):
    predictor = tiny_predictor()
    with SyncCounter() as counter:
        predictor.segment(phantom.image, spacing=phantom.spacing, inference=inference)
    assert counter.syncs <= SYNC_BOUND, counter.by_op
    if inference == "tiles":
        assert counter.by_op["bool_index"] == 2  # one tile selection per stage
    else:
        assert counter.by_op["bool_index"] == 0  # slabs are placed from three projections


@pytest.mark.gpu
def test_gpu_scan_moves_one_volume_each_way(phantom):
    """On a GPU: one upload of the scan, one download of the labels, the same labels as
    the CPU (up to convolution rounding), and the body mask adds at most a few reads."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    want = tiny_predictor().segment(phantom.image, spacing=phantom.spacing).labels
    predictor = tiny_predictor(device="cuda")
    predictor.segment(phantom.image, spacing=phantom.spacing)  # warm-up
    with SyncCounter() as counter:
        got = predictor.segment(phantom.image, spacing=phantom.spacing).labels
    assert (np.asarray(got) == want).mean() > 0.999
    voxels = phantom.image.size
    big = [(src, dst) for src, dst, nbytes in counter.transfers if nbytes >= voxels]
    assert sorted(big) == [("cpu", "cuda:0"), ("cuda:0", "cpu")], counter.transfers
    assert counter.syncs <= SYNC_BOUND + 4, counter.by_op


def test_all_air_scan_gives_background_with_a_warning():
    air = np.full((30, 30, 20), -1000.0, dtype=np.float32)
    with pytest.warns(UserWarning, match="no body"):
        result = tiny_predictor().segment(air, spacing=(6.0, 6.0, 6.0))
    assert not result.labels.any()
    assert result.tiles["stage1"][0] == 0 and result.tiles["stage2"][0] == 0


def test_scan_smaller_than_one_tile():
    small = np.full((5, 4, 3), -1000.0, dtype=np.float32)
    small[1:4, 1:3, :] = 40.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = tiny_predictor().segment(small, spacing=(6.0, 6.0, 6.0))
    assert result.labels.shape == (5, 4, 3)
    assert result.tiles["stage1"] == (1, 1)


@pytest.mark.parametrize(
    "volume,kwargs,error",
    [
        (np.zeros((10, 10)), {"spacing": (1, 1, 1)}, ValueError),
        (np.full((8, 8, 8), np.nan), {"spacing": (1, 1, 1)}, ValueError),
        (np.zeros((8, 8, 8)), {"spacing": (0, 1, 1)}, ValueError),
        (np.zeros((8, 8, 8)), {}, ValueError),
        ("no/such/file.nii.gz", {}, FileNotFoundError),
        ([[1, 2]], {"spacing": (1, 1, 1)}, TypeError),
    ],
    ids=["2d", "nan", "zero-spacing", "no-spacing", "missing-file", "list"],
)
def test_bad_input_is_refused(volume, kwargs, error):
    with pytest.raises(error):
        tiny_predictor().segment(volume, **kwargs)


def test_result_save_never_overwrites_the_input_scan(phantom, tmp_path):
    ct, _ = phantom.to_nifti()
    path = tmp_path / "ct.nii.gz"
    nib.save(ct, str(path))
    before = path.read_bytes()
    result = tiny_predictor().segment(str(path), probabilities=True)
    assert result.source == path
    with pytest.raises(ValueError, match="input"):
        result.save(path)
    with pytest.raises(ValueError, match="input"):
        result.save(tmp_path / "seg.nii.gz", probabilities_path=path)
    assert path.read_bytes() == before
    result.save(tmp_path / "seg.nii.gz", probabilities_path=tmp_path / "probs.nii.gz")
    assert (tmp_path / "seg.json").exists() and (tmp_path / "probs.json").exists()


def test_case_a_geometry(case_a_paths, tmp_path):
    ct_path, _ = case_a_paths
    result = tiny_predictor().segment(str(ct_path))
    img = nib.load(str(ct_path))
    assert result.labels.shape == img.shape and result.labels.dtype == np.uint8
    out = tmp_path / "seg.nii.gz"
    result.save(out)
    seg = nib.load(str(out))
    np.testing.assert_array_equal(seg.affine, img.affine)
    assert seg.get_data_dtype() == np.uint8
    assert (tmp_path / "seg.json").exists()
