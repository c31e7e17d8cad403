// The base linear of the compiled CPU ops, on weights stored whole or in chunks of their output rows.

#pragma once

#include <ATen/core/Tensor.h>

#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "cpu_helper.h"

namespace loradock {

// x [T, in] @ weight [out, in]ᵀ + bias: at::linear, or oneDNN's linear when the weight is packed in oneDNN's layout
// (`packed_linear.py`).
at::Tensor base_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// y [T, out] = x Wᵀ + bias for W given as chunks of its output rows, one tile per chunk, each writing its own columns
// of y: the helper thread and the caller split the read of the weights, which bounds a decode step's GEMMs on a
// core (its few rows make every GEMM wait on memory; loadtest/RESULTS.md). One chunk writes y itself, no copy.
// Tiles run under the caller's inference mode, on whichever thread claims them; a chunk's error is kept and
// rethrown by result(), on the caller.
class LinearChunks final : public Tiles {
 public:
  LinearChunks(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::optional<at::Tensor>& bias);

  int64_t num_tiles() const override { return static_cast<int64_t>(weights_.size()); }
  void run_tile(int64_t tile) const override;
  int64_t out_features() const { return offsets_.back(); }
  at::Tensor result() const;  // y, once every tile has run

 private:
  const at::Tensor& x_;
  const std::vector<at::Tensor>& weights_;
  std::vector<std::optional<at::Tensor>> biases_;  // each chunk's part of the bias
  std::vector<int64_t> offsets_;  // [chunks + 1]: the first output column of each chunk
  bool inference_;  // the caller's inference mode, set on the thread that runs a tile
  mutable at::Tensor y_;  // [T, out]
  mutable std::mutex error_mutex_;
  mutable std::exception_ptr error_;
};

// Every chunk's tiles of a group of linears as one job (their weights' chunks, module after module).
std::vector<const Tiles*> jobs_of(const std::vector<std::unique_ptr<LinearChunks>>& linears);

}  // namespace loradock
