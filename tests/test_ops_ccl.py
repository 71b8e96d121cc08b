"""fastcascade's CUDA labelling (``csrc/ccl.cu``, ``fastcascade/ops/ccl.py``) and the
``"cuda"`` backend of the body-mask ops.

Without a GPU this proves what a CPU can:

- every ``csrc/*.cu`` compiles for sm_90 with nvcc, without spills, and the binding
  compiles against PyTorch's headers (``compile`` mark: the separate compile run);
- the kernels' own per-thread C++, built for the host and run thread by thread in shuffled
  orders (``tests/csrc/ccl_host.cu``), and a Python model of the same kernels run with
  interleaved threads (``tests/ccl_model.py``), both number SciPy's components exactly, in
  3D and per slice, with the kernels' tiles and with tiny ones;
- with the model standing in for the compiled extension, the ``"cuda"`` backend's hole
  filling, largest component and body mask are bit-exact against the plain-Python oracles,
  read nothing back from the device, and the ``torch.library`` op passes ``opcheck``;
- asking for ``"cuda"`` where it cannot run says what it needs; ``"auto"`` never takes it.

The tests marked ``gpu`` build the extension and compare it with SciPy, CuPy and the
PyTorch labelling at full size.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from ccl_model import label_model
from scipy import ndimage
from test_ops_morphology import (
    IMAGES,
    MASKS,
    oracle_body_mask,
    oracle_fill_holes_2d,
    oracle_largest_component,
    random_ct,
    serpentine,
)

from fastcascade.diagnostics import SyncCounter
from fastcascade.ops import _backend, ccl, morphology
from fastcascade.ops._backend import BackendUnavailableError
from fastcascade.ops.morphology import body_mask, fill_holes_2d, largest_component

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
HOST_DRIVER = Path(__file__).resolve().parent / "csrc" / "ccl_host.cu"

# The kernels' tiles, then tiny ones so that the small test volumes span many tiles.
TILE_CASES = {
    "kernel-tile": None,  # ccl.TILES of the mode
    "tile-2x3x4": (2, 3, 4),
    "tile-1x1x1": (1, 1, 1),
    "tile-3x1x5": (3, 1, 5),
}
MODES = {  # id: (in_plane, invert)
    "3d": (False, False),
    "3d-inverted": (False, True),
    "in-plane": (True, False),
    "in-plane-inverted": (True, True),  # what hole filling labels
}

_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[:, :, 1] = ndimage.generate_binary_structure(2, 1)


def checkerboard(shape):
    """Every True voxel alone under face connectivity: as many components as can be."""
    x, y, z = np.indices(shape)
    return (x + y + z) % 2 == 0


def stripes_across_tiles(shape=(9, 13, 40)):
    """Bars along z longer than a kernel tile, joined by one plane: merges across tiles."""
    m = np.zeros(shape, dtype=bool)
    m[::2, ::3, :] = True
    m[:, :, 33] = True
    m[4, :, 5:9] = True
    return m


CCL_MASKS = dict(MASKS) | {
    "checkerboard": checkerboard((7, 6, 5)),
    "serpentine": serpentine(),
    "stripes-across-tiles": stripes_across_tiles(),
    "random-13x17x35": np.random.default_rng(11).random((13, 17, 35)) < 0.55,
}


def expected_labels(mask: np.ndarray, in_plane: bool, invert: bool) -> np.ndarray:
    """SciPy's components numbered as the kernels number them: 1 + the smallest C-order
    index of each component, 0 elsewhere."""
    target = ~mask if invert else mask
    labels, count = ndimage.label(target, structure=_IN_PLANE if in_plane else None)
    flat = labels.reshape(-1)
    values, first = np.unique(flat, return_index=True)  # each label's first voxel
    number = np.zeros(count + 1, dtype=np.int64)
    number[values] = first + 1
    number[0] = 0
    return number[flat].reshape(mask.shape).astype(np.int32)


def tile_for(case: str, in_plane: bool) -> tuple[int, int, int]:
    return TILE_CASES[case] or ccl.TILES[in_plane]


# --- (a) nvcc ----------------------------------------------------------------------------------


def nvcc_or_skip() -> str:
    found = shutil.which("nvcc")
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if found is None and Path(home, "bin", "nvcc").is_file():
        found = str(Path(home, "bin", "nvcc"))
    if found is None:
        pytest.skip(
            "nvcc not found (CUDA toolkit; PATH or CUDA_HOME): the .cu files are then "
            "compiled only on a GPU machine, at first use"
        )
    return found


def test_csrc_holds_the_sources_the_loader_builds():
    assert CU_FILES, "csrc/ has no .cu file"
    for name in ccl.SOURCES:
        assert (CSRC / name).is_file(), name
    assert _backend.csrc_dir() == CSRC


@pytest.mark.parametrize("std", ["c++17", "c++20"])
@pytest.mark.parametrize("source", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cu_compiles_for_sm90_without_spills(source, std, tmp_path):
    nvcc = nvcc_or_skip()
    cmd = [nvcc, "-arch=sm_90", "-cubin", f"-std={std}", "-Werror", "all-warnings"]
    cmd += ["-Xptxas", "-v", "-o", str(tmp_path / "out.cubin"), str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.cubin").stat().st_size > 0
    kernels = re.findall(r"Compiling entry function '(\w+)'", done.stderr)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    assert kernels and len(spills) == len(kernels), done.stderr
    assert all(s == ("0", "0") for s in spills), done.stderr
    if source.name == "ccl.cu":
        assert {"ccl_local", "ccl_merge", "ccl_compress"} <= {
            name
            for k in kernels
            for name in ("ccl_local", "ccl_merge", "ccl_compress")
            if name in k
        }


def _cuda_include_or_skip(nvcc: str) -> Path:
    """The CUDA toolkit's headers (nvcc may be a wrapper script outside the toolkit)."""
    homes = [os.environ.get("CUDA_HOME"), Path(nvcc).resolve().parents[1], "/usr/local/cuda"]
    for home in homes:
        if home and Path(home, "include", "cuda_runtime.h").is_file():
            return Path(home, "include")
    pytest.skip("cuda_runtime.h not found (set CUDA_HOME to the CUDA toolkit)")


@pytest.mark.compile
@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FASTCASCADE_TEST_COMPILE") != "1",
    reason="compiles against PyTorch's headers (~20 s of CPU): with FASTCASCADE_TEST_COMPILE=1",
)
def test_binding_compiles_against_torch_headers(tmp_path):
    """``csrc/ccl_binding.cpp`` with PyTorch's headers, syntax only (a CPU build of
    PyTorch cannot link CUDA code). A CPU wheel lacks one generated header of c10/cuda,
    which a one-line stand-in replaces."""
    nvcc = nvcc_or_skip()
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler (c++, or CXX)")
    import sysconfig

    from torch.utils import cpp_extension

    includes = list(cpp_extension.include_paths())
    macros = Path(includes[0], "c10", "cuda", "impl", "cuda_cmake_macros.h")
    if not macros.exists():
        stub = tmp_path / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        includes.append(str(tmp_path))
    includes += [str(_cuda_include_or_skip(nvcc)), sysconfig.get_paths()["include"]]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror=return-type"]
    cmd += ["-DTORCH_EXTENSION_NAME=fastcascade_ccl", *(f"-I{p}" for p in includes)]
    done = subprocess.run(
        [*cmd, str(CSRC / "ccl_binding.cpp")], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]


# --- (b) the kernels' C++ on the host, and the interleaved model ---------------------------------


@pytest.fixture(scope="session")
def host_build(tmp_path_factory):
    """``fc_ccl_label_host`` of ``tests/csrc/ccl_host.cu`` (ccl.cu's steps run on the CPU)."""
    nvcc = nvcc_or_skip()
    lib = tmp_path_factory.mktemp("ccl_host") / "libccl_host.so"
    cmd = [nvcc, "-shared", "-arch=sm_90", "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror"]
    cmd += ["-Werror", "all-warnings", f"-I{CSRC}", "-o", str(lib), str(HOST_DRIVER)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    fn = ctypes.CDLL(str(lib)).fc_ccl_label_host
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 5
    fn.argtypes += [ctypes.c_uint64]

    def label(mask, in_plane, invert, tile, seed):
        mask = np.ascontiguousarray(mask, dtype=np.uint8)
        labels = np.full(mask.shape, -7, dtype=np.int32)  # an unwritten voxel shows up
        connect = 3 if in_plane else 7
        args = (mask.ctypes.data, labels.ctypes.data, *mask.shape, connect, int(invert))
        assert fn(*args, *tile, seed) == 0
        return labels

    return label


@pytest.mark.parametrize("tile_case", list(TILE_CASES))
@pytest.mark.parametrize("mode", list(MODES))
def test_host_build_of_the_kernels_matches_scipy(host_build, mode, tile_case):
    in_plane, invert = MODES[mode]
    tile = tile_for(tile_case, in_plane)
    for name, mask in CCL_MASKS.items():
        expected = expected_labels(mask, in_plane, invert)
        for seed in (0, 1):
            got = host_build(mask, in_plane, invert, tile, seed)
            np.testing.assert_array_equal(got, expected, f"{name} seed {seed}")


def test_host_build_on_random_volumes(host_build):
    rng = np.random.default_rng(5)
    for trial in range(40):
        shape = tuple(int(n) for n in rng.integers(1, 24, size=3))
        mask = rng.random(shape) < rng.uniform(0.2, 0.8)
        in_plane, invert = list(MODES.values())[trial % 4]
        tile = ccl.TILES[in_plane] if trial % 2 else tuple(int(t) for t in rng.integers(1, 6, 3))
        got = host_build(mask, in_plane, invert, tile, trial)
        np.testing.assert_array_equal(got, expected_labels(mask, in_plane, invert), str(shape))


MODEL_MASKS = [
    "blobs-dense",
    "blobs-odd",
    "smooth-blobs",
    "body-touching-borders",
    "empty",
    "full",
    "single-voxel",
    "thin-slab-1x1xN",
    "zero-size",
    "checkerboard",
    "serpentine",
]


@pytest.mark.parametrize("tile_case", ["kernel-tile", "tile-2x3x4"])
@pytest.mark.parametrize("mode", ["3d", "in-plane-inverted"])
def test_model_with_interleaved_threads_matches_scipy(mode, tile_case):
    in_plane, invert = MODES[mode]
    tile = tile_for(tile_case, in_plane)
    for seed, name in enumerate(MODEL_MASKS):
        mask = CCL_MASKS[name]
        got = label_model(mask, in_plane, invert, tile, seed=seed)
        np.testing.assert_array_equal(got, expected_labels(mask, in_plane, invert), name)


def test_model_across_kernel_tiles_in_any_order():
    mask = stripes_across_tiles()
    for seed in range(2):
        got = label_model(mask, False, False, ccl.TILES[False], seed=seed)
        np.testing.assert_array_equal(got, expected_labels(mask, False, False), str(seed))


def test_the_tests_need_the_merge_across_tiles():
    """Without ``ccl_merge`` the components split at tile faces: the volumes above cross
    tiles, so a broken merge would fail them."""
    for name in ("stripes-across-tiles", "smooth-blobs"):
        mask = CCL_MASKS[name]
        tile = ccl.TILES[False] if name.startswith("stripes") else (2, 3, 4)
        split = label_model(mask, False, False, tile, merge=False)
        whole = expected_labels(mask, False, False)
        assert len(np.unique(split)) > len(np.unique(whole)), name


def test_the_model_catches_a_union_without_atomics(monkeypatch):
    """The interleaving is adversarial enough to matter: the same union with a plain read
    and a later write in place of atomicMin loses links under some schedules."""
    import ccl_model

    def racy_unite(parent, a, b, base):
        while True:
            a = yield from ccl_model.find_root(parent, a, base)
            b = yield from ccl_model.find_root(parent, b, base)
            if a == b:
                return
            a, b = min(a, b), max(a, b)
            old = yield from ccl_model.load(parent, b - base)
            yield
            parent[b - base] = min(old, a)
            if old == b:
                return
            b = old

    monkeypatch.setattr(ccl_model, "unite", racy_unite)
    mask = np.random.default_rng(3).random((8, 8, 8)) < 0.6
    expected = expected_labels(mask, False, False)
    wrong = [
        s
        for s in range(8)
        if not np.array_equal(label_model(mask, False, False, ccl.TILES[False], seed=s), expected)
    ]
    assert wrong, "no schedule exposed the lost update"


# --- (b) the "cuda" backend with a stand-in for the compiled kernels ------------------------------


@pytest.fixture(params=["model", "host-build"])
def stand_in(request, monkeypatch):
    """The interleaved model, or the host build of the kernels' C++, stands in for the
    compiled module, and ``"cuda"`` counts as available for CPU tensors: the code around
    the kernels runs as it would on a GPU. Returns the kind and the op's calls to the
    module, ``(in_plane, invert, tile)``."""
    if request.param == "model":
        labeller = label_model
    else:
        labeller = request.getfixturevalue("host_build")
    calls = []

    def label(mask, in_plane, invert, tile_x, tile_y, tile_z):
        assert mask.dtype == torch.bool and mask.dim() == 3 and mask.is_contiguous()
        tile = (tile_x, tile_y, tile_z)
        calls.append((in_plane, invert, tile))
        return torch.from_numpy(labeller(mask.numpy(), in_plane, invert, tile, len(calls)))

    available = _backend.available
    monkeypatch.setattr(ccl, "extension", lambda: types.SimpleNamespace(label=label))
    monkeypatch.setattr(_backend, "available", lambda b, t: b == "cuda" or available(b, t))
    return types.SimpleNamespace(kind=request.param, calls=calls)


#: The model is slow (Python threads): a few volumes; the host build takes them all.
STAND_IN_MASKS = {
    "model": ["body-touching-borders", "checkerboard", "zero-size"],
    "host-build": list(CCL_MASKS),
}
STAND_IN_IMAGES = {
    "model": ["random-ct-b", "all-tissue"],
    "host-build": list(IMAGES),
}


def test_cuda_backend_with_a_stand_in_matches_the_oracles(stand_in):
    for name in STAND_IN_MASKS[stand_in.kind]:
        m = CCL_MASKS[name]
        t = torch.from_numpy(m.copy())
        with SyncCounter() as counter:
            filled = fill_holes_2d(t, backend="cuda")
            largest = largest_component(t, backend="cuda")
        np.testing.assert_array_equal(filled.numpy(), oracle_fill_holes_2d(m), name)
        np.testing.assert_array_equal(largest.numpy(), oracle_largest_component(m), name)
        assert counter.syncs == 0 and counter.transfers == [], (name, counter.by_op)
    # Hole filling labels the background per slice, the component step the mask in 3D,
    # each with its mode's tile.
    assert stand_in.calls[:2] == [(True, True, ccl.TILES[True]), (False, False, ccl.TILES[False])]


def test_cuda_backend_body_mask_with_a_stand_in(stand_in):
    for name in STAND_IN_IMAGES[stand_in.kind]:
        image = IMAGES[name].astype(np.float32)
        with SyncCounter() as counter:
            out = body_mask(torch.from_numpy(image), backend="cuda")
        np.testing.assert_array_equal(out.numpy(), oracle_body_mask(image, -300.0), name)
        assert counter.syncs == 0 and counter.transfers == []
    if stand_in.kind == "model":
        return
    for seed in range(4):
        image = random_ct((13, 11, 9 + seed), seed).astype(np.float32)
        for threshold in (-300.0, 0.0):
            np.testing.assert_array_equal(
                body_mask(torch.from_numpy(image), threshold, backend="cuda").numpy(),
                body_mask(torch.from_numpy(image), threshold, backend="scipy").numpy(),
            )


def test_custom_op_passes_opcheck_with_a_stand_in(stand_in):
    mask = torch.from_numpy(CCL_MASKS["blobs-odd"].copy())
    for in_plane, invert in (MODES["3d"], MODES["in-plane-inverted"]):
        torch.library.opcheck(ccl.label_components, (mask, in_plane, invert))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = ccl.label_components(mode.from_tensor(mask), False, False)
    assert fake.dtype == torch.int32 and fake.shape == mask.shape
    out = ccl.label_components(mask, False, False)
    np.testing.assert_array_equal(out.numpy(), expected_labels(mask.numpy(), False, False))


# --- (c) dispatch --------------------------------------------------------------------------------


NEEDS = r"needs a CUDA tensor \(an NVIDIA GPU\), got one on cpu.*nvcc.*ninja"


def test_cuda_backend_on_a_cpu_tensor_says_what_it_needs():
    m = torch.ones(3, 4, 5, dtype=torch.bool)
    for call in (
        lambda: fill_holes_2d(m, backend="cuda"),
        lambda: largest_component(m, backend="cuda"),
        lambda: body_mask(torch.zeros(3, 4, 5), backend="cuda"),
        lambda: ccl.label(m),
    ):
        with pytest.raises(BackendUnavailableError, match=NEEDS):
            call()


@pytest.fixture
def fresh_probe():
    _backend.cuda_extension_missing.cache_clear()
    yield
    _backend.cuda_extension_missing.cache_clear()


@pytest.mark.parametrize(
    "missing, needs",
    [
        ("cuda-torch", "a CUDA build of PyTorch"),
        ("sources", r"the CUDA sources \(csrc/ccl.cu\)"),
        ("nvcc", "the CUDA toolkit's nvcc"),
        ("ninja", r"ninja \(pip install 'fastcascade\[cuda\]', or pip install ninja\)"),
    ],
)
def test_cuda_backend_names_the_missing_piece(monkeypatch, fresh_probe, missing, needs):
    """On a GPU (``on_cuda`` pretended) where one piece of the build is missing."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(_backend, "on_cuda", lambda tensor: True)
    monkeypatch.setattr(torch.version, "cuda", None if missing == "cuda-torch" else "13.0")
    if missing == "sources":
        monkeypatch.setattr(_backend, "csrc_dir", lambda: None)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None if missing == "nvcc" else "/cuda")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: missing != "ninja")
    m = torch.ones(2, 2, 2, dtype=torch.bool)
    with pytest.raises(
        BackendUnavailableError, match=f"compiles csrc/ on first use and needs {needs}"
    ):
        morphology.resolve_backend("cuda", m)
    with pytest.raises(BackendUnavailableError, match=f"compiling csrc/ needs {needs}"):
        ccl.extension.__wrapped__()
    assert morphology.resolve_backend("auto", m) in ("cupy", "torch")


def test_cuda_backend_counts_as_available_when_every_piece_is_there(monkeypatch, fresh_probe):
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/cuda")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    assert _backend.cuda_extension_missing() is None
    assert _backend.summary()["cuda_ext"] is True
    m = torch.ones(2, 2, 2, dtype=torch.bool)
    assert not _backend.available("cuda", m)  # still a CPU tensor
    monkeypatch.setattr(_backend, "on_cuda", lambda tensor: True)
    assert _backend.available("cuda", m)
    assert morphology.resolve_backend("cuda", m) == "cuda"


def test_auto_never_picks_cuda(monkeypatch):
    m = torch.ones(2, 2, 2, dtype=torch.bool)
    assert morphology.resolve_backend("auto", m) == "scipy"
    # Even on a GPU where every backend could run, "cuda" is asked for by name only.
    monkeypatch.setattr(_backend, "on_cuda", lambda tensor: True)
    monkeypatch.setattr(_backend, "available", lambda backend, tensor: True)
    assert morphology.resolve_backend("auto", m) == "cupy"
    monkeypatch.setattr(_backend, "available", lambda backend, tensor: backend != "cupy")
    assert morphology.resolve_backend("auto", m) == "torch"


def test_label_checks_its_input():
    with pytest.raises(TypeError, match="label: mask must be a bool tensor"):
        ccl.label(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="label: mask must be 3D"):
        ccl.label(torch.zeros(2, 2, dtype=torch.bool))


def test_a_built_package_carries_the_sources(tmp_path):
    """``setup.py``'s build step copies ``csrc/`` into the package, where
    ``_backend.csrc_dir`` looks when there is no source checkout."""
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)]
        + ["build_py", "--build-lib", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    for name in ccl.SOURCES:
        assert (tmp_path / "fastcascade" / "csrc" / name).read_bytes() == (CSRC / name).read_bytes()


# --- on a GPU ------------------------------------------------------------------------------------


def _cuda_backend_or_skip() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    missing = _backend.cuda_extension_missing()
    if missing is not None:
        pytest.skip(f"the CUDA extension cannot be built here: needs {missing}")
    return torch.device("cuda")


def _smooth_mask(shape, seed, device, level=0.0):
    """Smoothed noise above ``level``: large, tangled components at full size."""
    g = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn((1, 1, *shape), generator=g, device=device)
    for _ in range(2):
        noise = torch.nn.functional.avg_pool3d(noise, 5, stride=1, padding=2)
    return (noise[0, 0] > level).contiguous()


def _canonical(labels: torch.Tensor) -> torch.Tensor:
    """Any labelling renumbered as 1 + the smallest C-order index of each component."""
    flat = labels.reshape(-1).long()
    first = torch.full((int(flat.max()) + 1,), flat.numel(), device=flat.device)
    first.scatter_reduce_(0, flat, torch.arange(flat.numel(), device=flat.device), "amin")
    first[0] = -1
    return (first[flat] + 1).view(labels.shape).int()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["3d", "in-plane-inverted"])
def test_cuda_labels_match_scipy_cupy_and_torch_at_full_size(mode):
    device = _cuda_backend_or_skip()
    in_plane, invert = MODES[mode]
    for seed, shape in enumerate([(256, 256, 150), (131, 97, 203)]):
        mask = _smooth_mask(shape, seed, device)
        labels = ccl.label(mask, in_plane=in_plane, invert=invert)
        assert labels.dtype == torch.int32 and labels.device == mask.device
        host = mask.cpu().numpy()
        np.testing.assert_array_equal(
            labels.cpu().numpy(), expected_labels(host, in_plane, invert), f"SciPy {shape}"
        )
        target = ~mask if invert else mask
        axes = morphology._IN_PLANE_AXES if in_plane else morphology._ALL_AXES
        assert torch.equal(labels.long(), morphology._label_torch(target, axes)), "PyTorch"
        if _backend.cupy_available():
            structure = morphology._IN_PLANE if in_plane else None
            assert torch.equal(labels, _canonical(morphology._label_cupy(target, structure)))
        again = ccl.label(mask, in_plane=in_plane, invert=invert)
        assert torch.equal(labels, again), "the numbering does not depend on the schedule"


@pytest.mark.gpu
def test_cuda_body_mask_matches_scipy_at_full_size_without_syncs():
    device = _cuda_backend_or_skip()
    for seed, shape in enumerate([(256, 256, 150), (122, 101, 112)]):
        image = torch.from_numpy(random_ct(shape, seed).astype(np.float32))
        expected = body_mask(image, backend="scipy").numpy()
        image = image.to(device)
        body_mask(image, backend="cuda")  # the first call builds the extension
        with SyncCounter() as counter:
            out = body_mask(image, backend="cuda")
        assert counter.syncs == 0 and counter.transfers == [], counter.by_op
        np.testing.assert_array_equal(out.cpu().numpy(), expected, str(shape))
        above = image > -300.0
        for op in (fill_holes_2d, largest_component):
            np.testing.assert_array_equal(
                op(above, backend="cuda").cpu().numpy(),
                op(above.cpu(), backend="scipy").numpy(),
                op.__name__,
            )


@pytest.mark.gpu
def test_cuda_backend_small_volumes_and_torch_compile():
    device = _cuda_backend_or_skip()
    for name, m in CCL_MASKS.items():
        t = torch.from_numpy(m.copy()).to(device)
        for in_plane, invert in MODES.values():
            np.testing.assert_array_equal(
                ccl.label(t, in_plane, invert).cpu().numpy(),
                expected_labels(m, in_plane, invert),
                name,
            )
        np.testing.assert_array_equal(
            fill_holes_2d(t, backend="cuda").cpu().numpy(), oracle_fill_holes_2d(m), name
        )
    mask = _smooth_mask((40, 37, 23), 9, device)
    compiled = torch.compile(lambda m: ccl.label_components(m, False, False) * 2, fullgraph=True)
    assert torch.equal(compiled(mask), ccl.label(mask) * 2)
