// Python bindings of the compiled CPU ops: one extension module, built once per machine (`cpu_build.py`).

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

void lora_apply(at::Tensor y, at::Tensor x, at::Tensor A, at::Tensor B, at::Tensor scales, at::Tensor ranks,
                at::Tensor sorted_tokens, at::Tensor segment_slots, at::Tensor segment_starts,
                at::Tensor segment_lengths, int64_t num_segments, int64_t max_length,
                std::optional<at::Tensor> out_scale, std::optional<at::Tensor> out_shift,
                std::optional<at::Tensor> out_mapped);  // cpu_lora.cpp

std::vector<at::Tensor> lora_linear(
    at::Tensor x, std::vector<std::vector<at::Tensor>> weights, std::vector<std::optional<at::Tensor>> biases,
    std::vector<at::Tensor> A, std::vector<at::Tensor> B, std::vector<at::Tensor> scales,
    std::vector<at::Tensor> ranks, at::Tensor sorted_tokens, at::Tensor segment_slots, at::Tensor segment_starts,
    at::Tensor segment_lengths, int64_t num_segments, int64_t max_length,
    std::vector<std::optional<at::Tensor>> out_scale, std::vector<std::optional<at::Tensor>> out_shift,
    std::vector<std::optional<at::Tensor>> out_mapped);  // cpu_lora.cpp

std::vector<at::Tensor> linear_group(at::Tensor x, std::vector<std::vector<at::Tensor>> weights,
                                     std::vector<std::optional<at::Tensor>> biases);  // cpu_linear.cpp

at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);  // cpu_fused.cpp
std::tuple<at::Tensor, at::Tensor> add_rms_norm(at::Tensor x, at::Tensor residual, at::Tensor weight,
                                                double eps);  // cpu_fused.cpp
at::Tensor silu_and_mul(at::Tensor gate, at::Tensor up);  // cpu_fused.cpp
at::Tensor rotary(at::Tensor x, at::Tensor cos, at::Tensor sin);  // cpu_fused.cpp

void cached_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                      at::Tensor kv_index, at::Tensor query_pos, double scale,
                      int64_t window);  // cpu_attention.cpp

at::Tensor greedy_tokens(at::Tensor logits);  // cpu_greedy.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The ops of a whole group or layer run without the GIL: the server's event loop thread goes on meanwhile. The
  // fused per-row ops (norms, rotary, silu * up: microseconds each, ~150 calls a step) keep it: each release lets a
  // busy event loop take the GIL and the engine thread wait to get it back.
  // The output affine's three tensors come last and default to None (no slot mapped).
  m.def("lora_apply", &lora_apply, "y += gathered LoRA deltas of the step's segments (float32 or bfloat16, CPU)",
        py::arg("y"), py::arg("x"), py::arg("A"), py::arg("B"), py::arg("scales"), py::arg("ranks"),
        py::arg("sorted_tokens"), py::arg("segment_slots"), py::arg("segment_starts"), py::arg("segment_lengths"),
        py::arg("num_segments"), py::arg("max_length"), py::arg("out_scale") = py::none(),
        py::arg("out_shift") = py::none(), py::arg("out_mapped") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("lora_linear", &lora_linear,
        "for each LoRA layer of a group reading one x: linear(x, W, bias) plus its gathered LoRA deltas, W in chunks "
        "of its output rows; every GEMM chunk and delta tile shared with a helper thread",
        py::arg("x"), py::arg("weights"), py::arg("biases"), py::arg("A"), py::arg("B"), py::arg("scales"),
        py::arg("ranks"), py::arg("sorted_tokens"), py::arg("segment_slots"), py::arg("segment_starts"),
        py::arg("segment_lengths"), py::arg("num_segments"), py::arg("max_length"), py::arg("out_scale"),
        py::arg("out_shift"), py::arg("out_mapped"), py::call_guard<py::gil_scoped_release>());
  m.def("linear_group", &linear_group,
        "linear(x, W, bias) for each linear of a group reading one x, W in chunks of its output rows, the chunks "
        "shared with a helper thread",
        py::arg("x"), py::arg("weights"), py::arg("biases"), py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, "RMSNorm of bfloat16 rows, as HF's LlamaRMSNorm", py::arg("x"), py::arg("weight"),
        py::arg("eps"));
  m.def("add_rms_norm", &add_rms_norm, "(residual + x, its RMSNorm) of bfloat16 rows", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of bfloat16 rows, as HF's llama MLP", py::arg("gate"),
        py::arg("up"));
  m.def("rotary", &rotary, "x * cos + rotate_half(x) * sin of bfloat16 x [T, H, D], as HF's rotary", py::arg("x"),
        py::arg("cos"), py::arg("sin"));
  m.def("cached_attention", &cached_attention,
        "query tokens against the paged KV cache, in place (float32 or bfloat16, CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("greedy_tokens", &greedy_tokens, "each row's argmax, as torch.argmax (float32 or bfloat16 logits, CPU)",
        py::arg("logits"), py::call_guard<py::gil_scoped_release>());
}
