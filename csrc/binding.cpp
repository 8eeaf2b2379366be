// Python binding of the mask generator (module ibot_fast._mask_ext): argument checks, output
// allocation, CPU/CUDA dispatch. Kernel bodies live in mask_core.h / mask_cpu.cpp / mask_cuda.cu.
//
// mask_batch(sample_ids, seed, epoch, n_crops, height, width, means, vars, log_aspect_lo,
//            log_aspect_hi, shape_rand, masked_epoch, max_masked, n_threads, selection)
//   sample_ids  int64 [B] on the CPU or a CUDA device: outputs live on the same device.
//   returns (masks_CBHW bool [C, B, H, W], idx_M int64 [M], valid_M bool [M],
//            weight_M float32 [M], counts_CB int32 [C, B], n_valid int64 []),  M = C*B*max_masked
// The Python wrapper (ibot_fast.masking.MaskBatcher) validates the configuration first and
// documents the layout; the checks here only guard memory safety.
#include <torch/extension.h>

#include <vector>

#include "mask_ops.h"

#if defined(WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using ibot_mask::Config;

Config make_config(int64_t height, int64_t width, const std::vector<double>& means,
                   const std::vector<double>& vars, double log_aspect_lo, double log_aspect_hi,
                   bool shape_rand, bool masked_epoch) {
  TORCH_CHECK(height >= 1 && width >= 1 && height <= ibot_mask::kMaxSide &&
                  width <= ibot_mask::kMaxSide,
              "mask grid ", height, "x", width, " must be between 1x1 and ", ibot_mask::kMaxSide,
              "x", ibot_mask::kMaxSide);
  TORCH_CHECK(!means.empty() && means.size() == vars.size() &&
                  means.size() <= (size_t)ibot_mask::kMaxPairs,
              "need 1 to ", ibot_mask::kMaxPairs, " (ratio, var) pairs, got ", means.size(), "/",
              vars.size());
  Config cfg{};
  cfg.height = (int)height;
  cfg.width = (int)width;
  cfg.n_pairs = (int)means.size();
  for (size_t i = 0; i < means.size(); ++i) {
    TORCH_CHECK(means[i] - vars[i] >= 0 && means[i] + vars[i] <= 1, "ratio pair ", i,
                " (", means[i], ", ", vars[i], ") leaves [0, 1]");
    cfg.mean[i] = means[i];
    cfg.var[i] = vars[i];
  }
  cfg.log_aspect_lo = log_aspect_lo;
  cfg.log_aspect_hi = log_aspect_hi;
  cfg.shape_rand = shape_rand ? 1 : 0;
  cfg.masked_epoch = masked_epoch ? 1 : 0;
  return cfg;
}

void check_ids(const at::Tensor& ids) {
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong,
              "sample_ids must be a 1-D int64 tensor, got ", ids.scalar_type(), " ", ids.sizes());
}

std::vector<at::Tensor> mask_batch(const at::Tensor& sample_ids_in, uint64_t seed, int64_t epoch,
                                   int64_t n_crops, int64_t height, int64_t width,
                                   const std::vector<double>& means,
                                   const std::vector<double>& vars, double log_aspect_lo,
                                   double log_aspect_hi, bool shape_rand, bool masked_epoch,
                                   int64_t max_masked, int64_t n_threads, bool selection) {
  check_ids(sample_ids_in);
  TORCH_CHECK(n_crops >= 1, "n_crops must be >= 1, got ", n_crops);
  TORCH_CHECK(max_masked >= 0 && max_masked <= height * width, "max_masked ", max_masked,
              " outside [0, H*W]");
  const Config cfg = make_config(height, width, means, vars, log_aspect_lo, log_aspect_hi,
                                 shape_rand, masked_epoch);
  const at::Tensor ids = sample_ids_in.contiguous();
  const int64_t B = ids.size(0), C = n_crops, N = height * width;
  const int64_t M = selection ? C * B * max_masked : 0;  // selection=false: masks and counts only
  const auto dev = ids.device();
  auto masks = at::empty({C, B, height, width}, ids.options().dtype(at::kBool));
  auto counts = at::empty({C, B}, ids.options().dtype(at::kInt));
  auto idx = at::empty({M}, ids.options().dtype(at::kLong));
  auto valid = at::empty({M}, ids.options().dtype(at::kBool));
  auto weight = at::empty({M}, ids.options().dtype(at::kFloat));
  auto n_valid = at::empty({}, ids.options().dtype(at::kLong));
  auto* masks_p = reinterpret_cast<uint8_t*>(masks.data_ptr<bool>());
  auto* valid_p = reinterpret_cast<uint8_t*>(valid.data_ptr<bool>());

  if (dev.is_cpu()) {
    TORCH_CHECK(n_threads >= 1, "n_threads must be >= 1, got ", n_threads);
    const int64_t* id_p = ids.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)  // the stream takes ids as unsigned: negatives would alias
      TORCH_CHECK_VALUE(id_p[b] >= 0, "sample_ids must be >= 0, got ", id_p[b]);
    std::vector<uint64_t> rows(selection ? (size_t)(C * B * height) : 0);
    const int32_t* cp = counts.data_ptr<int32_t>();
    {
      // Plain memory work on tensors this call owns: let other Python threads run meanwhile
      // (the DALI loader draws a batch's masks on a background thread).
      pybind11::gil_scoped_release no_gil;
      ibot_mask::generate_cpu(cfg, ids.data_ptr<int64_t>(), B, C, seed, epoch, masks_p,
                              counts.data_ptr<int32_t>(), selection ? rows.data() : nullptr,
                              (int)n_threads, nullptr, 0, nullptr);
      // The per-image bound is what sizes M: a larger mask would mean a wrong max_masked.
      for (int64_t k = 0; k < C * B; ++k)
        TORCH_CHECK(cp[k] <= max_masked, "a mask has ", cp[k], " cells, above max_masked ",
                    max_masked, ": the bound does not match the ratio configuration");
      if (selection) {
        ibot_mask::fill_selection_cpu(rows.data(), cp, C, B, height, width, M,
                                      idx.data_ptr<int64_t>(), valid_p,
                                      weight.data_ptr<float>(), n_valid.data_ptr<int64_t>());
      } else {
        *n_valid.data_ptr<int64_t>() = 0;
      }
    }
    return {masks, idx, valid, weight, counts, n_valid};
  }
#if defined(WITH_CUDA)
  TORCH_CHECK(dev.is_cuda(), "sample_ids must be on the CPU or a CUDA device, got ", dev);
  const c10::cuda::CUDAGuard guard(dev);
  void* stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  int err = ibot_mask::generate_cuda(cfg, ids.data_ptr<int64_t>(), B, C, seed, epoch, masks_p,
                                     counts.data_ptr<int32_t>(), stream);
  TORCH_CHECK(err == 0, "mask generation kernel: ", ibot_mask::cuda_error_string(err));
  // No host check of the counts here (it would sync): they are bounded by construction and the
  // fill kernel clamps every write to M rows.
  if (!selection) {
    n_valid.zero_();
    return {masks, idx, valid, weight, counts, n_valid};
  }
  err = ibot_mask::fill_selection_cuda(masks_p, counts.data_ptr<int32_t>(), C, B, N, M,
                                       idx.data_ptr<int64_t>(), valid_p, weight.data_ptr<float>(),
                                       n_valid.data_ptr<int64_t>(), stream);
  TORCH_CHECK(err == 0, "mask selection kernel: ", ibot_mask::cuda_error_string(err));
  return {masks, idx, valid, weight, counts, n_valid};
#else
  TORCH_CHECK(false, "this ibot_fast._mask_ext was built without CUDA; sample_ids are on ", dev);
#endif
}

// Test hook: the accepted rectangles of each mask (CPU only), as (top, left, h, w) rows padded
// with -1 to H*W rows (every rectangle adds a cell, so there are at most H*W).
std::vector<at::Tensor> block_rects(const at::Tensor& sample_ids_in, uint64_t seed, int64_t epoch,
                                    int64_t n_crops, int64_t height, int64_t width,
                                    const std::vector<double>& means,
                                    const std::vector<double>& vars, double log_aspect_lo,
                                    double log_aspect_hi, bool masked_epoch, int64_t n_threads) {
  check_ids(sample_ids_in);
  TORCH_CHECK(sample_ids_in.device().is_cpu(), "block_rects runs on the CPU");
  TORCH_CHECK(n_crops >= 1 && n_threads >= 1, "n_crops and n_threads must be >= 1");
  const Config cfg = make_config(height, width, means, vars, log_aspect_lo, log_aspect_hi, false,
                                 masked_epoch);
  const at::Tensor ids = sample_ids_in.contiguous();
  const int64_t B = ids.size(0), C = n_crops, cap = height * width;
  auto masks = at::empty({C, B, height, width}, ids.options().dtype(at::kBool));
  auto counts = at::empty({C, B}, ids.options().dtype(at::kInt));
  auto rects = at::full({C, B, cap, 4}, -1, ids.options().dtype(at::kShort));
  auto n_rects = at::empty({C, B}, ids.options().dtype(at::kInt));
  ibot_mask::generate_cpu(cfg, ids.data_ptr<int64_t>(), B, C, seed, epoch,
                          reinterpret_cast<uint8_t*>(masks.data_ptr<bool>()),
                          counts.data_ptr<int32_t>(), nullptr, (int)n_threads, rects.data_ptr<int16_t>(),
                          (int)cap, n_rects.data_ptr<int32_t>());
  return {masks, counts, rects, n_rects};
}

// Test hook: one Philox4x32-10 block, for the known-answer vectors.
std::vector<int64_t> philox4x32_10(std::vector<int64_t> ctr, std::vector<int64_t> key) {
  TORCH_CHECK(ctr.size() == 4 && key.size() == 2, "need 4 counter words and 2 key words");
  uint32_t c[4], k[2], out[4];
  for (int i = 0; i < 4; ++i) c[i] = (uint32_t)ctr[i];
  for (int i = 0; i < 2; ++i) k[i] = (uint32_t)key[i];
  ibot_mask::philox4x32_10(c, k, out);
  return {out[0], out[1], out[2], out[3]};
}

bool built_with_cuda() {
#if defined(WITH_CUDA)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "iBOT block/random mask generation (C++ with OpenMP, optional CUDA)";
  m.def("mask_batch", &mask_batch, "masks and padded masked-token selection of a batch");
  m.def("block_rects", &block_rects, "block masks with their accepted rectangles (tests)");
  m.def("philox4x32_10", &philox4x32_10, "one Philox4x32-10 block (tests)");
  m.def("built_with_cuda", &built_with_cuda);
  m.attr("max_side") = ibot_mask::kMaxSide;
  m.attr("max_pairs") = ibot_mask::kMaxPairs;
}
