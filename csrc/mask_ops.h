// Raw-pointer entry points of the mask generator (no ATen/c10: the binding owns tensors, checks
// and streams). Layout of every output is described in binding.cpp and ibot_fast/masking.py.
#pragma once

#include <stdint.h>

#include "mask_core.h"

namespace ibot_mask {

// masks[(c * B + b) * H * W + i * W + j] (0/1 bytes) and counts[c * B + b] for every crop c < C
// and sample b < B, from the stream (seed, epoch, sample_ids[b], c). OpenMP over the C*B masks
// with n_threads threads; the result does not depend on n_threads. Optional (may be null):
// rows [C*B, H] uint64 bit rows (input of fill_selection_cpu); rects [C*B, rect_cap, 4] int16
// accepted rectangles (top, left, h, w) and n_rects [C*B].
void generate_cpu(const Config& cfg, const int64_t* sample_ids, int64_t B, int64_t C,
                  uint64_t seed, int64_t epoch, uint8_t* masks, int32_t* counts, uint64_t* rows,
                  int n_threads, int16_t* rects, int rect_cap, int32_t* n_rects);

// Compact, padded selection of the masked tokens of a generated batch (see binding.cpp), from
// the bit rows of generate_cpu.
void fill_selection_cpu(const uint64_t* rows, const int32_t* counts, int64_t C, int64_t B,
                        int64_t H, int64_t W, int64_t max_rows, int64_t* idx, uint8_t* valid,
                        float* weight, int64_t* n_valid);

#if defined(WITH_CUDA)
// Same contracts on device pointers, enqueued on `stream` (a cudaStream_t); return a
// cudaError_t as int (0 = success) so that this header needs no CUDA include.
int generate_cuda(const Config& cfg, const int64_t* sample_ids, int64_t B, int64_t C,
                  uint64_t seed, int64_t epoch, uint8_t* masks, int32_t* counts, void* stream);
int fill_selection_cuda(const uint8_t* masks, const int32_t* counts, int64_t C, int64_t B,
                        int64_t N, int64_t max_rows, int64_t* idx, uint8_t* valid, float* weight,
                        int64_t* n_valid, void* stream);
const char* cuda_error_string(int err);
#endif

}  // namespace ibot_mask
