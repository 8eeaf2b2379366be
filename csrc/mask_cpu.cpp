// CPU side of the mask generator: OpenMP over masks, then the compact token selection.
#include "mask_ops.h"

#include <omp.h>
#include <string.h>

namespace ibot_mask {

namespace {

// kByteSpread[v] holds the 8 bits of v as 8 bytes of 0/1 (little-endian): one load and one
// store turn 8 grid cells into bool bytes.
struct ByteSpread {
  uint64_t v[256];
  ByteSpread() {
    for (int x = 0; x < 256; ++x) {
      uint64_t r = 0;
      for (int j = 0; j < 8; ++j) r |= (uint64_t)((x >> j) & 1) << (8 * j);
      v[x] = r;
    }
  }
};
const ByteSpread kByteSpread;

// Writes exactly W bytes. For W >= 8 the last group of 8 is stored at W - 8, overlapping the
// previous one with the same bytes, so every store is a fixed 8-byte one (a variable-length
// memcpy of the row was a libc call per row: ~10% of the generator's time).
inline void row_to_bytes(uint64_t row, int W, uint8_t* out) {
  if (W < 8) {
    for (int j = 0; j < W; ++j) out[j] = (uint8_t)((row >> j) & 1ull);
    return;
  }
  int j = 0;
  for (; j + 8 <= W; j += 8) {
    const uint64_t spread = kByteSpread.v[(row >> j) & 0xFF];
    memcpy(out + j, &spread, 8);
  }
  if (j < W) {
    const uint64_t spread = kByteSpread.v[(row >> (W - 8)) & 0xFF];
    memcpy(out + W - 8, &spread, 8);
  }
}

// Masks first .. last-1 of generate_cpu. On x86-64 with GCC/Clang this is compiled twice, for
// baseline x86-64 and for x86-64-v2 (hardware popcnt, SSE4.1 roundsd for rint), and the loader
// picks the one the CPU supports: 1.1-1.2x faster on the v2 machines every x86 server of the
// last decade is. v2 has no FMA, so both clones do the very same double arithmetic (same
// masks; no contraction either way).
#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define IBOT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v2", "default")))
#endif
#endif
#ifndef IBOT_CPU_CLONES
#define IBOT_CPU_CLONES
#endif

IBOT_CPU_CLONES
void generate_range(const Config& cfg, const int64_t* sample_ids, int64_t B, int64_t first,
                    int64_t last, uint64_t seed, int64_t epoch, uint8_t* masks, int32_t* counts,
                    uint64_t* rows_out, int16_t* rects, int rect_cap, int32_t* n_rects) {
  const int64_t H = cfg.height, W = cfg.width;
  for (int64_t k = first; k < last; ++k) {
    const int64_t c = k / B, b = k % B;
    uint64_t rows_local[kMaxSide];
    uint64_t* rows = rows_out ? rows_out + k * H : rows_local;
    int nr = 0;
    counts[k] = make_mask(cfg, seed, epoch, sample_ids[b], (int)c, rows,
                          rects ? rects + k * rect_cap * 4 : nullptr, rect_cap,
                          rects ? &nr : nullptr);
    if (n_rects) n_rects[k] = nr;
    uint8_t* out = masks + k * H * W;
    for (int64_t i = 0; i < H; ++i) row_to_bytes(rows[i], (int)W, out + i * W);
  }
}

}  // namespace

void generate_cpu(const Config& cfg, const int64_t* sample_ids, int64_t B, int64_t C,
                  uint64_t seed, int64_t epoch, uint8_t* masks, int32_t* counts,
                  uint64_t* rows_out, int n_threads, int16_t* rects, int rect_cap,
                  int32_t* n_rects) {
  const int64_t n_masks = B * C;
  constexpr int64_t kChunk = 16;
  if (n_threads <= 1) {  // no parallel region at all: it costs a few us even with one thread
    generate_range(cfg, sample_ids, B, 0, n_masks, seed, epoch, masks, counts, rows_out, rects,
                   rect_cap, n_rects);
    return;
  }
  // Dynamic chunks: masks cost anything from nothing (ratio 0) to a few dozen attempts.
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1)
  for (int64_t first = 0; first < n_masks; first += kChunk) {
    const int64_t last = first + kChunk < n_masks ? first + kChunk : n_masks;
    generate_range(cfg, sample_ids, B, first, last, seed, epoch, masks, counts, rows_out, rects,
                   rect_cap, n_rects);
  }
}

void fill_selection_cpu(const uint64_t* rows, const int32_t* counts, int64_t C, int64_t B,
                        int64_t H, int64_t W, int64_t max_rows, int64_t* idx, uint8_t* valid,
                        float* weight, int64_t* n_valid) {
  int64_t r = 0;
  for (int64_t k = 0; k < C * B; ++k) {
    if (counts[k] == 0) continue;
    // Computed in double, rounded once: the same float the Python path produces.
    const float w = (float)(1.0 / ((double)counts[k] * (double)B * (double)C));
    for (int64_t i = 0; i < H; ++i) {
      for (uint64_t bits = rows[k * H + i]; bits && r < max_rows; bits &= bits - 1) {
        idx[r] = (k * H + i) * W + __builtin_ctzll(bits);  // ascending token order
        valid[r] = 1;
        weight[r] = w;
        ++r;
      }
    }
  }
  *n_valid = r;
  // Padding rows point at token 0 (always a legal gather index) and weigh nothing.
  for (; r < max_rows; ++r) { idx[r] = 0; valid[r] = 0; weight[r] = 0.0f; }
}

}  // namespace ibot_mask
