// csrc/ccl.cu's kernels run on the host, for tests on a machine without a GPU.
//
// Builds with nvcc -shared (tests/test_ops_ccl.py) and calls the kernels' own per-thread steps
// (local_init, local_union, local_write, merge_faces, compress): each launch runs its blocks
// one after another in a shuffled order, and each step between two barriers runs the block's
// threads one after another in a shuffled order, as a GPU may. Threads do not interleave
// inside a step here (the Python model in tests/ccl_model.py does that).

#include "ccl.cu"

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

extern "C" int fc_ccl_label_host(const uint8_t* mask, int32_t* labels, int64_t nx, int64_t ny,
                                 int64_t nz, int connect, int invert, int tile_x, int tile_y,
                                 int tile_z, uint64_t seed) {
  using namespace fc_ccl;
  const int64_t n = nx * ny * nz;
  if (n == 0) return 0;
  if (n >= INT32_MAX || tile_x < 1 || tile_y < 1 || tile_z < 1) return 1;
  const Grid g = make_grid(nx, ny, nz, connect, invert, tile_x, tile_y, tile_z);
  const int64_t blocks = ((nx + tile_x - 1) / tile_x) * g.tiles_y * g.tiles_z;
  const int threads = tile_x * tile_y * tile_z;
  std::mt19937_64 rng(seed);
  std::vector<int64_t> block_order(blocks);
  std::iota(block_order.begin(), block_order.end(), int64_t{0});
  std::vector<int> thread_order(threads);
  std::iota(thread_order.begin(), thread_order.end(), 0);
  std::vector<int32_t> tile(threads);
  // Thread t of a block: threadIdx.x = lz (fastest), threadIdx.y = ly, threadIdx.z = lx.
  auto voxel = [&](int64_t block, int t) {
    return voxel_at(g, block, t / (tile_z * tile_y), (t / tile_z) % tile_y, t % tile_z);
  };
  auto each_thread = [&](auto&& step) {
    std::shuffle(thread_order.begin(), thread_order.end(), rng);
    for (int t : thread_order) step(t);
  };

  std::shuffle(block_order.begin(), block_order.end(), rng);  // ccl_local
  for (int64_t b : block_order) {
    each_thread([&](int t) { local_init(g, mask, voxel(b, t), tile.data()); });
    each_thread([&](int t) { local_union(g, voxel(b, t), tile.data()); });
    each_thread([&](int t) { local_write(g, voxel(b, t), tile.data(), labels); });
  }
  std::shuffle(block_order.begin(), block_order.end(), rng);  // ccl_merge
  for (int64_t b : block_order) each_thread([&](int t) { merge_faces(g, voxel(b, t), labels); });
  std::vector<int64_t> order(n);  // ccl_compress
  std::iota(order.begin(), order.end(), int64_t{0});
  std::shuffle(order.begin(), order.end(), rng);
  for (int64_t i : order) compress(i, labels);
  return 0;
}
