// Python bindings of the compiled CPU ops: one extension module, built once per machine (`cpu_build.py`).

#include <torch/extension.h>

#include <optional>
#include <vector>

void lora_apply(at::Tensor y, at::Tensor x, at::Tensor A, at::Tensor B, at::Tensor scales, at::Tensor ranks,
                at::Tensor sorted_tokens, at::Tensor segment_slots, at::Tensor segment_starts,
                at::Tensor segment_lengths, int64_t num_segments, int64_t max_length);  // cpu_lora.cpp

at::Tensor lora_linear(at::Tensor x, at::Tensor weight, std::optional<at::Tensor> bias, at::Tensor A, at::Tensor B,
                       at::Tensor scales, at::Tensor ranks, at::Tensor sorted_tokens, at::Tensor segment_slots,
                       at::Tensor segment_starts, at::Tensor segment_lengths, int64_t num_segments,
                       int64_t max_length);  // cpu_lora.cpp

void decode_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                      at::Tensor kv_index, at::Tensor query_pos, double scale,
                      int64_t window);  // cpu_attention.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Like torch's own ops they run without the GIL: the server's event loop thread goes on meanwhile.
  m.def("lora_apply", &lora_apply, "y += gathered LoRA deltas of the step's segments (float32 or bfloat16, CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("lora_linear", &lora_linear,
        "linear(x, weight, bias) plus the gathered LoRA deltas, computed on a helper thread during the GEMM",
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_attention", &decode_attention,
        "decode queries against the paged KV cache, in place (float32 or bfloat16, CPU)",
        py::call_guard<py::gil_scoped_release>());
}
