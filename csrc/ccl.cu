// Connected-component labelling of a 3D boolean volume on the GPU: block-based union-find.
//
// The algorithm of Oliveira & Lotufo (2010) and Playne & Hawick (2018, "A new algorithm for
// parallel connected-component labelling on GPUs", IEEE TPDS 29(6)): one CUDA block per tile
// of the volume, three kernels, no host synchronisation in between.
//
//   1. ccl_local:    each block labels its tile in shared memory (union-find with atomicMin,
//                    each voxel joined to its preceding face neighbours inside the tile), then
//                    writes every voxel's global label: the C-order index + 1 of its tile
//                    root;
//   2. ccl_merge:    every voxel on a tile's lower face joins, in global memory, its face
//                    neighbour in the previous tile;
//   3. ccl_compress: every voxel's label becomes the label of its tree's root.
//
// Union always hangs the larger root under the smaller one, so a parent's index is never
// larger than its child's and each root is the smallest C-order index of its tree. The result
// is therefore canonical, whatever order the threads ran in: 1 + the smallest C-order index of
// the voxel's component, 0 outside the mask (fastcascade's PyTorch labelling returns the same
// numbers). Reads race with atomicMin on purpose: a stale parent is still an ancestor.
//
// Layout: a C-contiguous (nx, ny, nz) uint8 mask (a bool tensor's bytes), z the fastest axis;
// int32 labels of the same shape, so fewer than 2^31 - 1 voxels. connect: bit 0 joins x
// neighbours, bit 1 y, bit 2 z (7: 6-connectivity in 3D; 3: 4-connectivity inside each z slice).
// invert: label the zero voxels instead (the background, for hole filling).
//
// This file includes no torch header: it compiles on its own (nvcc -arch=sm_90 -cubin), and
// the per-thread steps are __host__ __device__ so that a CPU test can run them in a loop.
// ccl_binding.cpp binds fc_ccl_label to Python; fastcascade/ops/ccl.py builds both on first use.

#include <cstdint>

#include <cuda_runtime.h>

namespace fc_ccl {

struct Grid {
  int64_t nx, ny, nz;        // volume size in voxels, z contiguous
  int tx, ty, tz;            // tile size = one CUDA block's threads (threadIdx.x runs along z)
  int64_t tiles_y, tiles_z;  // tiles along y and z
  int connect;               // bit 0: x neighbours, bit 1: y, bit 2: z
  int invert;                // 1: label the zero voxels
};

struct Voxel {
  int64_t x, y, z;  // position in the volume
  int64_t i;        // C-order index
  int lx, ly, lz;   // position in the tile
  int l;            // index in the tile, (lx, ly, lz) in C order
  bool inside;      // inside the volume (edge tiles overhang it)
};

__host__ __device__ inline Voxel voxel_at(const Grid& g, int64_t block, int lx, int ly, int lz) {
  Voxel v;
  const int64_t bz = block % g.tiles_z;
  const int64_t by = (block / g.tiles_z) % g.tiles_y;
  const int64_t bx = block / (g.tiles_z * g.tiles_y);
  v.lx = lx;
  v.ly = ly;
  v.lz = lz;
  v.l = (lx * g.ty + ly) * g.tz + lz;
  v.x = bx * g.tx + lx;
  v.y = by * g.ty + ly;
  v.z = bz * g.tz + lz;
  v.inside = v.x < g.nx && v.y < g.ny && v.z < g.nz;
  v.i = (v.x * g.ny + v.y) * g.nz + v.z;
  return v;
}

__host__ __device__ inline bool is_foreground(const Grid& g, const uint8_t* mask, const Voxel& v) {
  return v.inside && ((mask[v.i] != 0) != (g.invert != 0));
}

// A read that the compiler may not cache: other threads lower these values meanwhile.
__host__ __device__ inline int32_t load(const int32_t* p) {
  return *reinterpret_cast<const volatile int32_t*>(p);
}

__host__ __device__ inline int32_t atomic_min(int32_t* p, int32_t value) {
#ifdef __CUDA_ARCH__
  return atomicMin(p, value);
#else
  const int32_t old = *p;  // the host loop runs one thread at a time
  if (value < old) *p = value;
  return old;
#endif
}

// The root of a's tree. parent[a - base] is a's parent; a root is its own parent. base is 0
// for the tile (local indices) and 1 for the volume (labels = index + 1, 0 = background).
__host__ __device__ inline int32_t find_root(const int32_t* parent, int32_t a, int base) {
  while (true) {
    const int32_t p = load(parent + (a - base));
    if (p == a) return a;
    a = p;
  }
}

// Join the trees of a and b: the larger root is hung under the smaller one.
__host__ __device__ inline void unite(int32_t* parent, int32_t a, int32_t b, int base) {
  while (true) {
    a = find_root(parent, a, base);
    b = find_root(parent, b, base);
    if (a == b) return;
    if (a > b) {
      const int32_t t = a;
      a = b;
      b = t;
    }
    const int32_t old = atomic_min(parent + (b - base), a);
    if (old == b) return;  // b was still a root: it now hangs under a
    b = old;  // b was hung elsewhere meanwhile: join a with b's new parent instead
  }
}

// -- kernel 1: ccl_local, three steps separated by barriers ----------------------------------

// Step 1: each foreground voxel is its own root in the tile; -1 marks the background.
__host__ __device__ inline void local_init(const Grid& g, const uint8_t* mask, const Voxel& v,
                                           int32_t* tile) {
  tile[v.l] = is_foreground(g, mask, v) ? v.l : -1;
}

// Step 2: join the preceding face neighbours inside the tile. A tile entry is negative exactly
// for the background, whatever unions run meanwhile (roots are never negative).
__host__ __device__ inline void local_union(const Grid& g, const Voxel& v, int32_t* tile) {
  if (load(tile + v.l) < 0) return;
  const int sx = g.ty * g.tz, sy = g.tz;
  if ((g.connect & 1) && v.lx > 0 && load(tile + v.l - sx) >= 0) unite(tile, v.l, v.l - sx, 0);
  if ((g.connect & 2) && v.ly > 0 && load(tile + v.l - sy) >= 0) unite(tile, v.l, v.l - sy, 0);
  if ((g.connect & 4) && v.lz > 0 && load(tile + v.l - 1) >= 0) unite(tile, v.l, v.l - 1, 0);
}

// Step 3: the voxel's global label, the C-order index + 1 of its tile root (in C order within
// a tile is in C order within the volume, so the root is still the smallest index).
__host__ __device__ inline void local_write(const Grid& g, const Voxel& v, const int32_t* tile,
                                            int32_t* labels) {
  if (!v.inside) return;
  if (tile[v.l] < 0) {
    labels[v.i] = 0;
    return;
  }
  const int32_t r = find_root(tile, v.l, 0);
  const int rx = r / (g.ty * g.tz), ry = (r / g.tz) % g.ty, rz = r % g.tz;
  const int64_t root = ((v.x - v.lx + rx) * g.ny + (v.y - v.ly + ry)) * g.nz + (v.z - v.lz + rz);
  labels[v.i] = static_cast<int32_t>(root + 1);
}

// -- kernel 2: ccl_merge ------------------------------------------------------------------------

// A voxel on a tile's lower face joins its face neighbour in the previous tile. Labels are
// nonzero exactly for the foreground, whatever unions run meanwhile.
__host__ __device__ inline void merge_faces(const Grid& g, const Voxel& v, int32_t* labels) {
  if (!v.inside || load(labels + v.i) == 0) return;
  const int32_t a = static_cast<int32_t>(v.i + 1);
  if ((g.connect & 1) && v.lx == 0 && v.x > 0) {
    const int64_t n = v.i - g.ny * g.nz;
    if (load(labels + n) != 0) unite(labels, a, static_cast<int32_t>(n + 1), 1);
  }
  if ((g.connect & 2) && v.ly == 0 && v.y > 0) {
    const int64_t n = v.i - g.nz;
    if (load(labels + n) != 0) unite(labels, a, static_cast<int32_t>(n + 1), 1);
  }
  if ((g.connect & 4) && v.lz == 0 && v.z > 0) {
    const int64_t n = v.i - 1;
    if (load(labels + n) != 0) unite(labels, a, static_cast<int32_t>(n + 1), 1);
  }
}

// -- kernel 3: ccl_compress ---------------------------------------------------------------------

// The voxel's label becomes its root. Other threads may read this entry meanwhile and see
// either its old parent or the root: both are ancestors.
__host__ __device__ inline void compress(int64_t i, int32_t* labels) {
  if (load(labels + i) != 0) labels[i] = find_root(labels, static_cast<int32_t>(i + 1), 1);
}

__host__ __device__ inline Grid make_grid(int64_t nx, int64_t ny, int64_t nz, int connect,
                                          int invert, int tx, int ty, int tz) {
  Grid g;
  g.nx = nx;
  g.ny = ny;
  g.nz = nz;
  g.tx = tx;
  g.ty = ty;
  g.tz = tz;
  g.tiles_y = (ny + ty - 1) / ty;
  g.tiles_z = (nz + tz - 1) / tz;
  g.connect = connect;
  g.invert = invert;
  return g;
}

__global__ void ccl_local(Grid g, const uint8_t* __restrict__ mask, int32_t* __restrict__ labels) {
  extern __shared__ int32_t tile[];
  const Voxel v = voxel_at(g, blockIdx.x, threadIdx.z, threadIdx.y, threadIdx.x);
  local_init(g, mask, v, tile);
  __syncthreads();
  local_union(g, v, tile);
  __syncthreads();
  local_write(g, v, tile, labels);
}

__global__ void ccl_merge(Grid g, int32_t* labels) {
  const Voxel v = voxel_at(g, blockIdx.x, threadIdx.z, threadIdx.y, threadIdx.x);
  merge_faces(g, v, labels);
}

__global__ void ccl_compress(int64_t n, int32_t* labels) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) compress(i, labels);
}

}  // namespace fc_ccl

// Labels the components of mask into labels (both device pointers, (nx, ny, nz) C-contiguous)
// on stream, with tiles of tile_x * tile_y * tile_z voxels (at most 1024, tile_x at most 64).
// Returns cudaErrorInvalidValue for sizes it cannot label, else the launches' error.
extern "C" cudaError_t fc_ccl_label(const uint8_t* mask, int32_t* labels, int64_t nx, int64_t ny,
                                    int64_t nz, int connect, int invert, int tile_x, int tile_y,
                                    int tile_z, cudaStream_t stream) {
  using namespace fc_ccl;
  if (nx < 0 || ny < 0 || nz < 0 || tile_x < 1 || tile_y < 1 || tile_z < 1 || tile_x > 64 ||
      tile_x * tile_y * tile_z > 1024 || connect < 0 || connect > 7)
    return cudaErrorInvalidValue;
  const int64_t n = nx * ny * nz;
  if (n == 0) return cudaSuccess;
  if (n >= INT32_MAX) return cudaErrorInvalidValue;
  const Grid g = make_grid(nx, ny, nz, connect, invert, tile_x, tile_y, tile_z);
  const int64_t blocks = ((nx + tile_x - 1) / tile_x) * g.tiles_y * g.tiles_z;
  const dim3 threads(tile_z, tile_y, tile_x);
  const size_t shared = sizeof(int32_t) * tile_x * tile_y * tile_z;
  ccl_local<<<static_cast<unsigned>(blocks), threads, shared, stream>>>(g, mask, labels);
  ccl_merge<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(g, labels);
  const int per_block = 256;
  ccl_compress<<<static_cast<unsigned>((n + per_block - 1) / per_block), per_block, 0, stream>>>(
      n, labels);
  return cudaGetLastError();
}
