// iBOT block / random masks: one mask from one counter-based random stream.
//
// Shared by the C++ generator (mask_cpu.cpp, OpenMP over masks) and the CUDA kernel
// (mask_cuda.cu, one thread per mask). Plain C++ with <math.h> only: no ATen, no c10, no STL, so
// nvcc can compile it on a machine without a GPU and both sides run the very same arithmetic.
//
// The algorithm is the reference's (bytedance/ibot loader.py, ImageFolderMask; restated in
// docs/reference-semantics.md#block-masks and in ibot_fast/masking.py:block_mask_reference):
//   high = ratio * H * W (float budget); low = (min(H, W) / 3)^2
//   while count < high:
//     budget = high - count; up to 10 attempts:
//       area ~ U(low, budget); aspect = exp(U(log a0, log a1))
//       h = round(sqrt(area * aspect)); w = round(sqrt(area / aspect))    (ties to even)
//       if w < W and h < H:                                                (strict)
//         top ~ randint(0, H - h); left ~ randint(0, W - w)                (inclusive)
//         new = h * w - (already masked cells of the rectangle)
//         if 0 < new <= budget: mark the rectangle, stop the attempts
//     ten misses: give up
// Only the random numbers differ from the Python reference, which uses Mersenne Twister: one
// Philox4x32-10 block keyed on (seed, epoch) with the counter (0, crop, sample id) draws the
// crop's ratio and the 64-bit key of a SplitMix64 sequence; rectangle attempt d takes its four
// 32-bit words (area, aspect, top, left) from positions 2d and 2d+1 of that sequence
// (AttemptStream). So a mask is a pure function of (seed, epoch, sample id, crop): independent
// of threads, ranks, workers and of the order in which masks are made.
//
// Limits: H, W <= 64 (a grid row is one uint64 bit set), at most kMaxPairs ratio pairs.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define IBOT_HD __host__ __device__ __forceinline__
#else
#define IBOT_HD inline
#endif

namespace ibot_mask {

constexpr int kMaxSide = 64;
constexpr int kMaxPairs = 8;
constexpr int kAttemptsPerRound = 10;  // BEiT's / the reference's constant

// Everything a mask depends on besides its stream. Plain data: passed by value to the kernel.
struct Config {
  int height, width;
  int n_pairs;                 // (mean, var) pairs of --pred_ratio / --pred_ratio_var
  double mean[kMaxPairs];
  double var[kMaxPairs];
  double log_aspect_lo, log_aspect_hi;
  int shape_rand;              // 0: 'block', 1: 'rand'
  int masked_epoch;            // 0 while epoch < pred_start_epoch: every mask is empty
};

IBOT_HD int popcount64(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __popcll(x);
#elif defined(__POPCNT__)
  return __builtin_popcountll(x);
#else
  // Without -mpopcnt (our builds target baseline x86-64) the builtin is a libgcc call; the
  // inline SWAR count is several times cheaper.
  x = x - ((x >> 1) & 0x5555555555555555ull);
  x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
  x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0Full;
  return (int)((x * 0x0101010101010101ull) >> 56);
#endif
}

// Philox4x32-10 (Salmon et al., SC'11), the generator curand and JAX also use; checked against
// Random123's known-answer vectors in tests/test_mask_ext.py.
IBOT_HD void philox4x32_10(const uint32_t ctr_in[4], const uint32_t key_in[2], uint32_t out[4]) {
  uint32_t c0 = ctr_in[0], c1 = ctr_in[1], c2 = ctr_in[2], c3 = ctr_in[3];
  uint32_t k0 = key_in[0], k1 = key_in[1];
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = (uint64_t)0xD2511F53u * c0;
    const uint64_t p1 = (uint64_t)0xCD9E8D57u * c2;
    const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;  // the key schedule bumps after every round; the last bump is unused
    k1 += 0xBB67AE85u;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

IBOT_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The stream of one mask. key = mix(seed, epoch); counter = (draw, crop, id_lo, id_hi).
struct Stream {
  uint32_t key[2];
  uint32_t ctr[4];

  IBOT_HD void init(uint64_t seed, int64_t epoch, int64_t sample_id, int crop) {
    const uint64_t k = splitmix64(splitmix64(seed) ^ (uint64_t)epoch);
    key[0] = (uint32_t)k;
    key[1] = (uint32_t)(k >> 32);
    ctr[0] = 0;
    ctr[1] = (uint32_t)crop;
    ctr[2] = (uint32_t)(uint64_t)sample_id;
    ctr[3] = (uint32_t)((uint64_t)sample_id >> 32);
  }
  // Four fresh 32-bit words per call (2^32 calls per mask before the counter wraps).
  IBOT_HD void next4(uint32_t out[4]) {
    philox4x32_10(ctr, key, out);
    ++ctr[0];
  }
};

// The rectangle attempts of one block mask: draw d (d = 0, 1, ... over all rounds) is the four
// 32-bit words of splitmix64(key + 2d*gamma) and splitmix64(key + (2d+1)*gamma), gamma the
// golden-ratio increment inside splitmix64. That is SplitMix64 (Steele et al., OOPSLA'14;
// passes BigCrush) at position 2d of the sequence seeded with `key`, so any draw can be
// computed directly (draws are read ahead and discarded, see try_attempts). `key` is 64 bits
// of the mask's Philox block, i.e. a pure function of (seed, epoch, sample id, crop). Two
// splitmix64 calls cost about a fifth of a Philox4x32-10 block: the whole generator got 1.15x
// faster (same mask statistics; tests/test_mask_ext.py).
struct AttemptStream {
  uint64_t key;
  IBOT_HD void draw4(uint32_t d, uint32_t out[4]) const {
    const uint64_t x0 = key + (uint64_t)(2 * (uint64_t)d) * 0x9E3779B97F4A7C15ull;
    const uint64_t z0 = splitmix64(x0);
    const uint64_t z1 = splitmix64(x0 + 0x9E3779B97F4A7C15ull);
    out[0] = (uint32_t)z0; out[1] = (uint32_t)(z0 >> 32);
    out[2] = (uint32_t)z1; out[3] = (uint32_t)(z1 >> 32);
  }
};

// exp(x) and exp(-x) together for |x| <= kExpPairMaxArg, from one Taylor series split into
// its even part E and odd part O (exp(x) = E + O, exp(-x) = E - O): no libm call (which forced
// the attempt's doubles out to the stack), no division for 1/exp, two independent Horner
// chains, and the same arithmetic on CPU and GPU. Degree 17: the truncation error at
// |x| = 0.75 is below 1e-18 relative, so the result is within a few ulp of libm's exp; only a
// product on an exact rounding tie of h or w could round differently (the masks were
// bit-identical to the libm version over every seed compared). Outside the range (an
// --pred_aspect_ratio wider than (0.22, 4.5)) it calls exp().
constexpr double kExpPairMaxArg = 0.75;

IBOT_HD void exp_pair(double x, double* e_pos, double* e_neg) {
  if (!(fabs(x) <= kExpPairMaxArg)) {
    *e_pos = exp(x);
    *e_neg = exp(-x);
    return;
  }
  const double y = x * x;
  // E(y) = sum y^k / (2k)!,  O = x * sum y^k / (2k+1)!,  k = 0..8
  double e = 1.0 / 20922789888000.0;              // 1/16!
  e = e * y + 1.0 / 87178291200.0;                // 1/14!
  e = e * y + 1.0 / 479001600.0;                  // 1/12!
  e = e * y + 1.0 / 3628800.0;                    // 1/10!
  e = e * y + 1.0 / 40320.0;                      // 1/8!
  e = e * y + 1.0 / 720.0;                        // 1/6!
  e = e * y + 1.0 / 24.0;                         // 1/4!
  e = e * y + 0.5;                                // 1/2!
  e = e * y + 1.0;
  double o = 1.0 / 355687428096000.0;             // 1/17!
  o = o * y + 1.0 / 1307674368000.0;              // 1/15!
  o = o * y + 1.0 / 6227020800.0;                 // 1/13!
  o = o * y + 1.0 / 39916800.0;                   // 1/11!
  o = o * y + 1.0 / 362880.0;                     // 1/9!
  o = o * y + 1.0 / 5040.0;                       // 1/7!
  o = o * y + 1.0 / 120.0;                        // 1/5!
  o = o * y + 1.0 / 6.0;                          // 1/3!
  o = o * y + 1.0;
  o *= x;
  *e_pos = e + o;
  *e_neg = e - o;
}

// U[0, 1) with 2^-32 resolution (Python's random() has 2^-53; invisible at these grid sizes).
IBOT_HD double u01(uint32_t x) { return (double)x * 2.3283064365386962890625e-10; }

// Uniform integer in [0, n] (inclusive, like random.randint(0, n)); bias <= (n+1) / 2^32.
IBOT_HD int randint_incl(uint32_t x, int n) {
  return (int)(((uint64_t)x * (uint64_t)(n + 1)) >> 32);
}

// One crop's ratio, as get_pred_ratio: 0 before pred_start_epoch; otherwise pick a pair
// uniformly and draw U(mean - var, mean + var) when var > 0, else the mean. (The reference draws
// every pair's candidate and then chooses; choosing first gives the same distribution.)
// Words 2 and 3 of the same Philox block become the key of the block mask's AttemptStream.
IBOT_HD double sample_ratio(const Config& cfg, Stream& s, uint64_t* attempt_key) {
  *attempt_key = 0;
  if (!cfg.masked_epoch) return 0.0;
  uint32_t x[4];
  s.next4(x);
  *attempt_key = (uint64_t)x[2] | ((uint64_t)x[3] << 32);
  int k = 0;
  if (cfg.n_pairs > 1) k = randint_incl(x[0], cfg.n_pairs - 1);
  const double m = cfg.mean[k], v = cfg.var[k];
  return v > 0 ? (m - v) + 2.0 * v * u01(x[1]) : m;
}

// Attempts first .. first+N-1 of a round, i.e. draws *next + first .. of the mask's
// AttemptStream (see block_mask_rows): their draws are computed together, so that the
// hash / sqrt / exp latency chains overlap instead of running one after another, then checked
// in draw order. Returns the cells added by the first accepted attempt (and moves *next past
// it), or 0 when all N miss. Draws after an accepted attempt are discarded unread.
template <int N>
IBOT_HD int try_attempts(const Config& cfg, const AttemptStream& s, uint32_t* next, int first,
                         double budget, double low, uint64_t* rows, int16_t* rects,
                         int rect_cap, int* n_rects) {
  const int H = cfg.height, W = cfg.width;
  const double span = cfg.log_aspect_hi - cfg.log_aspect_lo;
  int hs[N], ws[N];
  uint32_t tops_x[N], lefts_x[N];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int a = 0; a < N; ++a) {
    uint32_t x[4];
    s.draw4(*next + (uint32_t)(first + a), x);
    // U(low, budget) with budget < low lands between the two, as Python's uniform does.
    const double area = low + (budget - low) * u01(x[0]);
    // h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)) with aspect = exp(t),
    // written as sqrt(area) * exp(t / 2) and sqrt(area) * exp(-t / 2): one sqrt and one
    // exp_pair per attempt instead of two sqrt, an exp and a division. The forms differ by a
    // few ulp, i.e. only when a product sits on a rounding tie; rint rounds ties to even, like
    // Python's round.
    const double root = sqrt(area);
    double half_aspect, inv_half_aspect;
    exp_pair(0.5 * (cfg.log_aspect_lo + span * u01(x[1])), &half_aspect, &inv_half_aspect);
    hs[a] = (int)rint(root * half_aspect);
    ws[a] = (int)rint(root * inv_half_aspect);
    tops_x[a] = x[2];
    lefts_x[a] = x[3];
  }
  for (int a = 0; a < N; ++a) {
    const int h = hs[a], w = ws[a];
    if (!(w < W && h < H)) continue;  // strict, like upstream
    if (h == 0 || w == 0) continue;   // adds no cell: rejected (and avoids a 64-bit shift)
    const int top = randint_incl(tops_x[a], H - h);
    const int left = randint_incl(lefts_x[a], W - w);
    const uint64_t row_mask = ((1ull << w) - 1ull) << left;
    int overlap = 0;
    for (int i = top; i < top + h; ++i) overlap += popcount64(rows[i] & row_mask);
    const int added = h * w - overlap;
    if (added > 0 && added <= budget) {
      for (int i = top; i < top + h; ++i) rows[i] |= row_mask;
      if (rects && n_rects && *n_rects < rect_cap) {
        int16_t* r = rects + 4 * (*n_rects);
        r[0] = (int16_t)top; r[1] = (int16_t)left; r[2] = (int16_t)h; r[3] = (int16_t)w;
      }
      if (n_rects) ++*n_rects;
      *next += (uint32_t)(first + a + 1);  // the next round starts after the accepted draw
      return added;  // the reference stops the attempts once a rectangle added cells
    }
  }
  return 0;
}

// Block mask into rows[0..H) (bit j of rows[i] = cell (i, j)). Returns the masked count.
// rects (optional): the accepted rectangles as (top, left, h, w), at most rect_cap of them.
IBOT_HD int block_mask_rows(const Config& cfg, double ratio, const AttemptStream& s,
                            uint64_t* rows, int16_t* rects, int rect_cap, int* n_rects) {
  const int H = cfg.height, W = cfg.width;
  for (int i = 0; i < H; ++i) rows[i] = 0;
  if (n_rects) *n_rects = 0;
  // (ratio * H) * W, left to right like upstream: it can round differently from ratio * (H*W),
  // and `high` is both the loop bound and the acceptance test.
  const double high = ratio * H * W;
  const int side = (H < W ? H : W) / 3;
  const double low = (double)(side * side);
  uint32_t next = 0;  // first draw of the current round
  int count = 0;
  while (count < high) {
    const double budget = high - count;
    // Every rectangle adds a whole number of cells, so with budget < 1 all ten attempts would
    // miss and end the loop; nothing reads the stream after this function, so skipping their
    // draws changes no output bit.
    if (budget < 1.0) break;
    // The attempts of a round are independent until one is accepted (budget and rows change
    // only then): they run in chunks of 2, 2, 2, 4 (measured: chunks of 1-5 in any order are
    // within 5% of each other; the sequential loop was 1.2-1.8x slower).
    static_assert(kAttemptsPerRound == 10, "the chunks below add up to ten attempts");
    int delta = try_attempts<2>(cfg, s, &next, 0, budget, low, rows, rects, rect_cap, n_rects);
    if (!delta)
      delta = try_attempts<2>(cfg, s, &next, 2, budget, low, rows, rects, rect_cap, n_rects);
    if (!delta)
      delta = try_attempts<2>(cfg, s, &next, 4, budget, low, rows, rects, rect_cap, n_rects);
    if (!delta)
      delta = try_attempts<4>(cfg, s, &next, 6, budget, low, rows, rects, rect_cap, n_rects);
    if (delta == 0) break;  // ten misses in a row: stop below the target, as upstream does
    count += delta;
  }
  return count;
}

// Exactly int(ratio * H * W) distinct cells, uniformly (Floyd's sampling over the bit rows).
IBOT_HD int random_mask_rows(const Config& cfg, double ratio, Stream& s, uint64_t* rows) {
  const int H = cfg.height, W = cfg.width, n = H * W;
  for (int i = 0; i < H; ++i) rows[i] = 0;
  const int k = (int)(ratio * H * W);  // int(high): truncation, like upstream
  uint32_t x[4];
  int used = 4;
  for (int j = n - k; j < n; ++j) {
    if (used == 4) { s.next4(x); used = 0; }
    const int t = randint_incl(x[used++], j);
    const int cell = ((rows[t / W] >> (t % W)) & 1ull) ? j : t;
    rows[cell / W] |= 1ull << (cell % W);
  }
  return k;
}

// The mask of crop `crop` of sample `sample_id`: ratio draw, then block or random cells.
IBOT_HD int make_mask(const Config& cfg, uint64_t seed, int64_t epoch, int64_t sample_id,
                      int crop, uint64_t* rows, int16_t* rects, int rect_cap, int* n_rects) {
  Stream s;
  s.init(seed, epoch, sample_id, crop);
  AttemptStream attempts;
  const double ratio = sample_ratio(cfg, s, &attempts.key);
  if (cfg.shape_rand) {
    if (n_rects) *n_rects = 0;
    return random_mask_rows(cfg, ratio, s, rows);
  }
  return block_mask_rows(cfg, ratio, attempts, rows, rects, rect_cap, n_rects);
}

}  // namespace ibot_mask
