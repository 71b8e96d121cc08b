// Python binding of ccl.cu's fc_ccl_label (pybind11, through torch's extension headers).
//
// fastcascade/ops/ccl.py compiles this file and ccl.cu on first use
// (torch.utils.cpp_extension.load) and registers label() as the torch.library custom op
// fastcascade::label_components, with a fake function for torch.compile.

// ATen and PyTorch's pybind11 casters rather than <torch/extension.h>, whose C++ frontend
// (nn, optim, ...) this file does not use and which triples its compile time.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <limits>

extern "C" cudaError_t fc_ccl_label(const uint8_t* mask, int32_t* labels, int64_t nx, int64_t ny,
                                    int64_t nz, int connect, int invert, int tile_x, int tile_y,
                                    int tile_z, cudaStream_t stream);

namespace {

// int32 labels of the components of mask (see ccl.cu): 1 + the smallest C-order index of the
// voxel's component, 0 outside it. in_plane joins x and y neighbours only (each z slice on its
// own); invert labels the False voxels. tile: the voxels one CUDA block labels, (x, y, z).
at::Tensor label(const at::Tensor& mask, bool in_plane, bool invert, int64_t tile_x,
                    int64_t tile_y, int64_t tile_z) {
  TORCH_CHECK(mask.is_cuda(), "label_components: mask must be a CUDA tensor, got one on ",
              mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "label_components: mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.dim() == 3, "label_components: mask must be 3D (x, y, z), got shape ",
              mask.sizes());
  TORCH_CHECK(mask.is_contiguous(), "label_components: mask must be C-contiguous, got strides ",
              mask.strides());
  TORCH_CHECK(mask.numel() < std::numeric_limits<int32_t>::max(),
              "label_components: mask must have fewer than 2^31 - 1 voxels (int32 labels), got ",
              mask.numel());
  TORCH_CHECK(tile_x >= 1 && tile_y >= 1 && tile_z >= 1 && tile_x <= 64 &&
                  tile_x * tile_y * tile_z <= 1024,
              "label_components: a tile must hold 1 to 1024 voxels with tile_x <= 64, got (",
              tile_x, ", ", tile_y, ", ", tile_z, ")");
  const c10::cuda::CUDAGuard guard(mask.device());
  at::Tensor labels = at::empty(mask.sizes(), mask.options().dtype(at::kInt));
  const int connect = in_plane ? 3 : 7;
  const cudaError_t err = fc_ccl_label(
      reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()), labels.data_ptr<int32_t>(),
      mask.size(0), mask.size(1), mask.size(2), connect, invert ? 1 : 0, static_cast<int>(tile_x),
      static_cast<int>(tile_y), static_cast<int>(tile_z),
      c10::cuda::getCurrentCUDAStream(mask.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "label_components: CUDA error ", cudaGetErrorString(err));
  return labels;
}

}  // namespace

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcascade's connected-component labelling on the GPU (csrc/ccl.cu)";
  m.def("label", &label, "int32 labels of a bool CUDA volume's components", py::arg("mask"),
        py::arg("in_plane"), py::arg("invert"), py::arg("tile_x"), py::arg("tile_y"),
        py::arg("tile_z"));
}
