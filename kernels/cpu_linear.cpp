// The base linear of the compiled CPU ops: whole, or in chunks of the weight's output rows run by the caller and the
// helper thread together (cpu_linear.h).

#include "cpu_linear.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/core/InferenceMode.h>

namespace loradock {

at::Tensor base_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (!weight.is_mkldnn()) return at::linear(x, weight, bias);
  static const auto packed_linear =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  return packed_linear.call(x, weight, bias, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

LinearChunks::LinearChunks(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                           const std::optional<at::Tensor>& bias)
    : x_(x), weights_(weights), offsets_{0}, inference_(c10::InferenceMode::is_enabled()) {
  TORCH_CHECK(x.dim() == 2 && !weights.empty(), "linear: expected x [T, in] and at least one weight chunk");
  for (const at::Tensor& weight : weights) {
    TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.scalar_type() == x.scalar_type(),
                "linear: every weight chunk [rows, in] in x's dtype");
    offsets_.push_back(offsets_.back() + weight.size(0));
  }
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == offsets_.back()),
              "linear: the bias [out] spans every chunk");
  for (size_t c = 0; c < weights.size(); ++c)
    biases_.push_back(bias.has_value() && weights.size() > 1
                          ? std::optional<at::Tensor>(bias->narrow(0, offsets_[c], weights[c].size(0)))
                          : bias);
  if (weights.size() > 1) y_ = at::empty({x.size(0), offsets_.back()}, x.options());
}

void LinearChunks::run_tile(int64_t tile) const {
  try {
    c10::InferenceMode mode(inference_);
    at::Tensor part = base_linear(x_, weights_[tile], biases_[tile]);  // [T, rows of the chunk]
    if (weights_.size() == 1)
      y_ = part;
    else
      y_.narrow(1, offsets_[tile], part.size(1)).copy_(part);
  } catch (...) {
    std::lock_guard<std::mutex> lock(error_mutex_);
    if (!error_) error_ = std::current_exception();
  }
}

at::Tensor LinearChunks::result() const {
  if (error_) std::rethrow_exception(error_);
  return y_;
}

std::vector<const Tiles*> jobs_of(const std::vector<std::unique_ptr<LinearChunks>>& linears) {
  std::vector<const Tiles*> jobs;
  for (const auto& linear : linears) jobs.push_back(linear.get());
  return jobs;
}

}  // namespace loradock

// x [T, in] @ W_i [out_i, in]ᵀ + bias_i for each linear i of a group (a layer's q, k and v projections, say), W_i
// given as chunks of its output rows: every chunk of the group one tile of one job.
std::vector<at::Tensor> linear_group(at::Tensor x, std::vector<std::vector<at::Tensor>> weights,
                                     std::vector<std::optional<at::Tensor>> biases) {
  TORCH_CHECK(weights.size() == biases.size(), "linear_group: one bias (or None) per linear");
  std::vector<std::unique_ptr<loradock::LinearChunks>> linears;
  for (size_t i = 0; i < weights.size(); ++i)
    linears.push_back(std::make_unique<loradock::LinearChunks>(x, weights[i], biases[i]));
  loradock::run_with_helper(loradock::TilesList(loradock::jobs_of(linears)));
  std::vector<at::Tensor> ys;
  for (const auto& linear : linears) ys.push_back(linear->result());
  return ys;
}
