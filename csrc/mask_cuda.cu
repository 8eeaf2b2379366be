// CUDA side of the mask generator: one thread per mask, then one block for the compact token
// selection. Only <cuda_runtime.h> and the plain-C++ core: no ATen/c10 headers, so
// `nvcc -arch=sm_90 -c csrc/mask_cuda.cu` checks this file on a machine without a GPU.
//
// Built with --fmad=false (setup.py): without FMA contraction the double arithmetic is the
// CPU's (sqrt is correctly rounded on both; exp(+-t/2) is mask_core.h's own polynomial for the
// default aspect range), so CPU and GPU masks for the same (seed, epoch, id, crop) should be
// bit-identical; only an aspect range outside the polynomial's calls libm/CUDA exp(), which may
// differ by an ulp right at a rounding tie of h or w (tests/test_mask_ext.py measures it).
#include <cuda_runtime.h>
#include <stdint.h>

#include "mask_ops.h"

namespace ibot_mask {

namespace {

constexpr int kGenThreads = 128;
constexpr int kFillThreads = 1024;

__global__ void generate_kernel(Config cfg, const int64_t* __restrict__ sample_ids, int64_t B,
                                int64_t C, uint64_t seed, int64_t epoch,
                                uint8_t* __restrict__ masks, int32_t* __restrict__ counts) {
  const int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= B * C) return;
  const int64_t c = k / B, b = k % B;
  uint64_t rows[kMaxSide];
  counts[k] = make_mask(cfg, seed, epoch, sample_ids[b], (int)c, rows, nullptr, 0, nullptr);
  const int H = cfg.height, W = cfg.width;
  uint8_t* out = masks + k * H * W;
  for (int i = 0; i < H; ++i)
    for (int j = 0; j < W; ++j) out[i * W + j] = (uint8_t)((rows[i] >> j) & 1ull);
}

// One block: running exclusive scan of the per-image counts (chunks of kFillThreads images),
// each thread writes the masked tokens of its image at its offset, then the padding.
__global__ void fill_kernel(const uint8_t* __restrict__ masks, const int32_t* __restrict__ counts,
                            int64_t C, int64_t B, int64_t N, int64_t max_rows,
                            int64_t* __restrict__ idx, uint8_t* __restrict__ valid,
                            float* __restrict__ weight, int64_t* __restrict__ n_valid) {
  __shared__ int64_t scan[kFillThreads];
  const int tid = threadIdx.x;
  const int64_t n_img = C * B;
  int64_t base = 0;
  for (int64_t start = 0; start < n_img; start += kFillThreads) {
    const int64_t k = start + tid;
    const int64_t cnt = k < n_img ? counts[k] : 0;
    scan[tid] = cnt;
    __syncthreads();
    for (int off = 1; off < kFillThreads; off <<= 1) {  // Hillis-Steele inclusive scan
      const int64_t add = tid >= off ? scan[tid - off] : 0;
      __syncthreads();
      scan[tid] += add;
      __syncthreads();
    }
    if (cnt > 0) {
      int64_t r = base + scan[tid] - cnt;
      const float w = (float)(1.0 / ((double)cnt * (double)B * (double)C));
      const uint8_t* m = masks + k * N;
      for (int64_t t = 0; t < N && r < max_rows; ++t) {
        if (m[t]) { idx[r] = k * N + t; valid[r] = 1; weight[r] = w; ++r; }
      }
    }
    base += scan[kFillThreads - 1];
    __syncthreads();  // scan[] is rewritten by the next chunk
  }
  if (base > max_rows) base = max_rows;  // unreachable when max_rows bounds every image
  for (int64_t r = base + tid; r < max_rows; r += kFillThreads) {
    idx[r] = 0; valid[r] = 0; weight[r] = 0.0f;
  }
  if (tid == 0) *n_valid = base;
}

}  // namespace

int generate_cuda(const Config& cfg, const int64_t* sample_ids, int64_t B, int64_t C,
                  uint64_t seed, int64_t epoch, uint8_t* masks, int32_t* counts, void* stream) {
  const int64_t n = B * C;
  if (n == 0) return 0;
  const unsigned blocks = (unsigned)((n + kGenThreads - 1) / kGenThreads);
  generate_kernel<<<blocks, kGenThreads, 0, (cudaStream_t)stream>>>(cfg, sample_ids, B, C, seed,
                                                                     epoch, masks, counts);
  return (int)cudaGetLastError();
}

int fill_selection_cuda(const uint8_t* masks, const int32_t* counts, int64_t C, int64_t B,
                        int64_t N, int64_t max_rows, int64_t* idx, uint8_t* valid, float* weight,
                        int64_t* n_valid, void* stream) {
  fill_kernel<<<1, kFillThreads, 0, (cudaStream_t)stream>>>(masks, counts, C, B, N, max_rows, idx,
                                                            valid, weight, n_valid);
  return (int)cudaGetLastError();
}

const char* cuda_error_string(int err) { return cudaGetErrorString((cudaError_t)err); }

}  // namespace ibot_mask
