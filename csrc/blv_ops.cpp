// The BLV CUDA kernels as torch operators: schema in TORCH_LIBRARY(blv_kernels_cuda), CUDA
// implementation calling the plain-C launchers of cuda/blv_kernel.h on the current stream.
// blv_kernels/cuda.py adds the fake (meta) and autograd registrations and the label check.

#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <utility>
#include <vector>

#include "cuda/blv_kernel.h"

// An importable module (blv_kernels._C) whose loading runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace blv_kernels_cuda {
namespace {

// The single stride of the flattened dims [lead, dim), or nullopt when they are not one
// strided run (blv_kernels._layout.spatial_stride).
std::optional<int64_t> spatial_stride(const at::Tensor& t, int64_t lead) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (size, stride) of the dims of size != 1
  for (int64_t i = lead; i < t.dim(); ++i)
    if (t.size(i) != 1) dims.emplace_back(t.size(i), t.stride(i));
  for (size_t i = 0; i + 1 < dims.size(); ++i)
    if (dims[i].second != dims[i + 1].second * dims[i + 1].first) return std::nullopt;
  return dims.empty() ? 1 : dims.back().second;
}

// t addressed as (N, [C,] S): its `lead` leading strides and one spatial stride, copying
// only when the spatial dims are not one strided run (blv_kernels._layout.as_ncs).
std::pair<at::Tensor, std::vector<int64_t>> as_ncs(at::Tensor t, int64_t lead) {
  auto stride_s = spatial_stride(t, lead);
  if (!stride_s) {
    t = t.contiguous();
    stride_s = spatial_stride(t, lead);
  }
  std::vector<int64_t> strides(t.strides().begin(), t.strides().begin() + lead);
  strides.push_back(*stride_s);
  return {t, strides};
}

int float_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return BLV_FLOAT32;
    case at::kHalf: return BLV_FLOAT16;
    case at::kBFloat16: return BLV_BFLOAT16;
    default: TORCH_CHECK(false, "blv_kernels_cuda: logits must be float32, float16 or bfloat16, got ", dtype);
  }
}

int int_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kByte: return BLV_UINT8;
    case at::kChar: return BLV_INT8;
    case at::kShort: return BLV_INT16;
    case at::kInt: return BLV_INT32;
    case at::kLong: return BLV_INT64;
    default: TORCH_CHECK(false, "blv_kernels_cuda: target must be an integer tensor, got ", dtype);
  }
}

// The kernel problem, and the tensors that must outlive the launch (views or copies).
struct Problem {
  BlvProblem p;
  std::vector<at::Tensor> keep;
};

Problem make_problem(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& variation_weight,
                     const at::Tensor& seed, int64_t offset, double scale, double threshold, bool use_poly,
                     bool clamp_mode, const std::optional<at::Tensor>& class_weight,
                     const std::optional<at::Tensor>& position_weight, int64_t ignore_index) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() >= 2, "blv_kernels_cuda: logits must be a CUDA tensor (N, C, ...)");
  const int64_t num_classes = logits.size(1);
  // the full shape, not only the rank: the kernel addresses the logits with the target's N*S
  std::vector<int64_t> expected{logits.size(0)};
  for (int64_t i = 2; i < logits.dim(); ++i) expected.push_back(logits.size(i));
  TORCH_CHECK(target.device() == logits.device() && target.sizes() == at::IntArrayRef(expected),
              "blv_kernels_cuda: target must be (N, d1, ..., dk) on the logits' device");
  TORCH_CHECK(variation_weight.numel() == num_classes && variation_weight.device() == logits.device(),
              "blv_kernels_cuda: variation_weight must have C elements on the logits' device");
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device() == logits.device(),
              "blv_kernels_cuda: seed must be a one-element int64 tensor on the logits' device");
  Problem out;
  auto [x, xs] = as_ncs(logits, 2);
  auto [t, ts] = as_ncs(target, 1);
  const at::Tensor w = variation_weight.to(at::kFloat).contiguous();
  out.keep = {x, t, w, seed};
  BlvProblem& p = out.p;
  p.logits = x.data_ptr();
  p.logits_dtype = float_code(x.scalar_type());
  p.target = t.data_ptr();
  p.target_dtype = int_code(t.scalar_type());
  p.variation_weight = w.data_ptr<float>();
  p.class_weight = nullptr;
  if (class_weight) {
    TORCH_CHECK(class_weight->numel() == num_classes && class_weight->device() == logits.device(),
                "blv_kernels_cuda: class_weight must have C elements on the logits' device");
    const at::Tensor cw = class_weight->to(at::kFloat).contiguous();
    out.keep.push_back(cw);
    p.class_weight = cw.data_ptr<float>();
  }
  p.position_weight = nullptr;
  p.stride_wn = p.stride_ws = 0;
  if (position_weight) {
    TORCH_CHECK(position_weight->sizes() == target.sizes() && position_weight->device() == logits.device(),
                "blv_kernels_cuda: position_weight must have the target's shape and device");
    auto [pw, ws] = as_ncs(position_weight->to(at::kFloat), 1);
    out.keep.push_back(pw);
    p.position_weight = pw.data_ptr<float>();
    p.stride_wn = ws[0];
    p.stride_ws = ws[1];
  }
  p.seed = seed.data_ptr<int64_t>();
  p.offset = offset;
  p.N = logits.size(0);
  p.C = num_classes;
  p.S = target.numel() == 0 ? 0 : target.numel() / p.N;
  p.stride_xn = xs[0];
  p.stride_xc = xs[1];
  p.stride_xs = xs[2];
  p.stride_tn = ts[0];
  p.stride_ts = ts[1];
  p.ignore_index = ignore_index;
  p.scale = static_cast<float>(scale);
  p.threshold = static_cast<float>(threshold);
  p.use_poly = use_poly;
  p.clamp_mode = clamp_mode;
  return out;
}

// -> (loss, lse, denom, num_bad): loss as F.cross_entropy(..., reduction) gives it, lse per
// position for the backward, denom the divisor of "mean", num_bad the count of labels outside
// [0, C) that are not ignore_index (checked by the caller without a host sync).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> blv_cross_entropy_fwd(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& variation_weight, const at::Tensor& seed,
    int64_t offset, double scale, double threshold, bool use_poly, bool clamp_mode,
    const std::optional<at::Tensor>& class_weight, const std::optional<at::Tensor>& position_weight,
    int64_t ignore_index, c10::string_view reduction) {
  TORCH_CHECK(reduction == "none" || reduction == "sum" || reduction == "mean",
              "blv_kernels_cuda: reduction must be none, sum or mean");
  const c10::cuda::CUDAGuard guard(logits.device());
  Problem pr = make_problem(logits, target, variation_weight, seed, offset, scale, threshold, use_poly, clamp_mode,
                            class_weight, position_weight, ignore_index);
  const bool store_loss = reduction == "none";
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = store_loss ? at::empty(target.sizes(), logits.options()) : at::Tensor();
  at::Tensor lse = at::empty({target.numel()}, f32);
  const int64_t blocks = blv_ce_fwd_num_partials(&pr.p);
  at::Tensor partial = at::empty({blocks, 2}, f32);
  at::Tensor bad = at::empty({blocks}, logits.options().dtype(at::kInt));
  C10_CUDA_CHECK(blv_ce_fwd_cuda(&pr.p, store_loss ? loss.data_ptr() : nullptr, lse.data_ptr<float>(),
                                 partial.data_ptr<float>(), bad.data_ptr<int32_t>(),
                                 c10::cuda::getCurrentCUDAStream().stream()));
  // separate tensors: custom-op outputs may not alias
  at::Tensor total = partial.select(1, 0).sum();
  at::Tensor denom = partial.select(1, 1).sum();
  if (reduction == "sum") loss = total.to(logits.scalar_type());
  if (reduction == "mean") loss = (total / denom).to(logits.scalar_type());
  return {loss, lse, denom, bad.sum()};
}

// dL/dlogits, recomputing the forward's noise and softmax from its lse.
at::Tensor blv_cross_entropy_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                 const at::Tensor& variation_weight, const at::Tensor& seed, int64_t offset,
                                 double scale, double threshold, bool use_poly, bool clamp_mode,
                                 const std::optional<at::Tensor>& class_weight,
                                 const std::optional<at::Tensor>& position_weight, const at::Tensor& lse,
                                 const at::Tensor& denom, int64_t ignore_index, c10::string_view reduction) {
  TORCH_CHECK(reduction == "none" || reduction == "sum" || reduction == "mean",
              "blv_kernels_cuda: reduction must be none, sum or mean");
  const c10::cuda::CUDAGuard guard(logits.device());
  Problem pr = make_problem(logits, target, variation_weight, seed, offset, scale, threshold, use_poly, clamp_mode,
                            class_weight, position_weight, ignore_index);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == target.numel() &&
                  lse.device() == logits.device(),
              "blv_kernels_cuda: lse must be the forward's float32 (N*S,) output");
  TORCH_CHECK(grad_loss.device() == logits.device() &&
                  (reduction == "none" ? grad_loss.sizes() == target.sizes() : grad_loss.numel() == 1),
              "blv_kernels_cuda: grad_loss must have the loss's shape, on the logits' device");
  TORCH_CHECK(reduction != "mean" || (denom.numel() == 1 && denom.device() == logits.device()),
              "blv_kernels_cuda: denom must be the forward's one-element output");
  // keeps channels_last and other dense layouts; anything the kernel cannot address is contiguous
  at::Tensor grad = at::empty_like(logits);
  if (!spatial_stride(grad, 2)) grad = at::empty(logits.sizes(), logits.options());
  const auto ds = as_ncs(grad, 2).second;
  at::Tensor g = grad_loss.to(at::kFloat);
  std::vector<int64_t> gs = {0, 0};  // a scalar grad_output: the same for every position
  if (reduction == "none") std::tie(g, gs) = as_ncs(g, 1);
  const at::Tensor d = reduction == "mean" ? denom.to(at::kFloat) : at::Tensor();
  C10_CUDA_CHECK(blv_ce_bwd_cuda(&pr.p, g.data_ptr<float>(), gs[0], gs[1], d.defined() ? d.data_ptr<float>() : nullptr,
                                 lse.data_ptr<float>(), grad.data_ptr(), ds[0], ds[1], ds[2],
                                 c10::cuda::getCurrentCUDAStream().stream()));
  return grad;
}

}  // namespace

TORCH_LIBRARY(blv_kernels_cuda, m) {
  m.def(
      "blv_cross_entropy_fwd(Tensor logits, Tensor target, Tensor variation_weight, Tensor seed, int offset, "
      "float scale, float threshold, bool use_poly, bool clamp_mode, Tensor? class_weight, "
      "Tensor? position_weight, int ignore_index, str reduction) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "blv_cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor variation_weight, Tensor seed, "
      "int offset, float scale, float threshold, bool use_poly, bool clamp_mode, Tensor? class_weight, "
      "Tensor? position_weight, Tensor lse, Tensor denom, int ignore_index, str reduction) -> Tensor");
}

TORCH_LIBRARY_IMPL(blv_kernels_cuda, CUDA, m) {
  m.impl("blv_cross_entropy_fwd", &blv_cross_entropy_fwd);
  m.impl("blv_cross_entropy_bwd", &blv_cross_entropy_bwd);
}

}  // namespace blv_kernels_cuda
