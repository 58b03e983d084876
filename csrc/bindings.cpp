// SPDX-License-Identifier: Apache-2.0
// teacache_fast._C: a thin pybind11 layer over the C API. Pointers and the
// stream are plain integers (tensor.data_ptr(), stream.cuda_stream), so this
// module needs neither torch headers nor a torch build to compile.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "teacache_fast.h"

namespace py = pybind11;

namespace {

// setup.py passes these unquoted (quotes do not survive nvcc's own argument
// parsing); the build's version and "sm_80:sm_90:..." become strings here.
#define TCF_STR_(...) #__VA_ARGS__
#define TCF_STR(...) TCF_STR_(__VA_ARGS__)
#ifdef TCF_VERSION
constexpr const char *kVersion = TCF_STR(TCF_VERSION);
#else
constexpr const char *kVersion = "unknown";
#endif
#ifdef TCF_CUDA_ARCHS
constexpr const char *kArchs = TCF_STR(TCF_CUDA_ARCHS);
#else
constexpr const char *kArchs = "";
#endif

template <typename P>
P *ptr(std::uintptr_t address) { return reinterpret_cast<P *>(address); }

cudaStream_t stream_of(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

tcf_dtype dtype_of(int code) { return static_cast<tcf_dtype>(code); }  // the C API checks it

void check(tcf_status status) {
  if (status != TCF_SUCCESS) throw std::runtime_error(tcf_last_error());
}

std::vector<std::string> split_archs(const std::string &s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == ':' || c == ';' || c == ',' || c == ' ') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "teacache_fast CUDA kernels (torch-free C API bound with pybind11)";
  m.attr("__version__") = kVersion;
  m.attr("API_VERSION") = TCF_API_VERSION;
  m.attr("CUDA_ARCHS") = split_archs(kArchs);
  m.attr("CUDART_VERSION") = CUDART_VERSION;
  m.attr("FLOAT32") = static_cast<int>(TCF_FLOAT32);
  m.attr("FLOAT16") = static_cast<int>(TCF_FLOAT16);
  m.attr("BFLOAT16") = static_cast<int>(TCF_BFLOAT16);
  m.attr("NORM_NONE") = static_cast<int>(TCF_NORM_NONE);
  m.attr("NORM_LAYER") = static_cast<int>(TCF_NORM_LAYER);
  m.attr("NORM_RMS") = static_cast<int>(TCF_NORM_RMS);
  m.attr("MAX_COEFFICIENTS") = TCF_MAX_COEFFICIENTS;

  m.def("device_error", []() -> std::string {
    return tcf_device_check() == TCF_SUCCESS ? std::string() : std::string(tcf_last_error());
  }, "'' when the current CUDA device can run the kernels, else the reason (probes the device)");

  m.def("rel_l1_workspace_size", [](int64_t batch, int64_t len, int dtype) {
    size_t n = 0;
    check(tcf_rel_l1_workspace_size(batch, len, dtype_of(dtype), &n));
    return n;
  }, py::arg("batch"), py::arg("len"), py::arg("dtype"),
     "floats of workspace rel_l1_partials needs on the current device");

  m.def("modulated_rel_l1_workspace_size", [](int64_t batch, int64_t rows, int64_t cols, int dtype) {
    size_t n = 0;
    check(tcf_modulated_rel_l1_workspace_size(batch, rows, cols, dtype_of(dtype), &n));
    return n;
  }, py::arg("batch"), py::arg("rows"), py::arg("cols"), py::arg("dtype"),
     "floats of workspace modulated_rel_l1_ needs on the current device");

  m.def("modulate", [](std::uintptr_t x, std::uintptr_t scale, int64_t scale_stride,
                       std::uintptr_t shift, int64_t shift_stride, std::uintptr_t out,
                       int64_t batch, int64_t rows, int64_t cols, int dtype, int param_dtype,
                       int norm, float eps, std::uintptr_t stream) {
    check(tcf_modulate(ptr<const void>(x), ptr<const void>(scale), scale_stride,
                       ptr<const void>(shift), shift_stride, ptr<void>(out), batch, rows, cols,
                       dtype_of(dtype), dtype_of(param_dtype), static_cast<tcf_norm>(norm), eps,
                       stream_of(stream)));
  }, py::arg("x"), py::arg("scale"), py::arg("scale_stride"), py::arg("shift"),
     py::arg("shift_stride"), py::arg("out"), py::arg("batch"), py::arg("rows"), py::arg("cols"),
     py::arg("dtype"), py::arg("param_dtype"), py::arg("norm"), py::arg("eps"), py::arg("stream"));

  m.def("rel_l1_partials", [](std::uintptr_t cur, std::uintptr_t prev, std::uintptr_t partials,
                              int64_t batch, int64_t len, int dtype, bool per_sample,
                              std::uintptr_t workspace, size_t workspace_floats,
                              std::uintptr_t stream) {
    check(tcf_rel_l1_partials(ptr<const void>(cur), ptr<const void>(prev), ptr<float>(partials),
                              batch, len, dtype_of(dtype), per_sample ? 1 : 0,
                              ptr<float>(workspace), workspace_floats, stream_of(stream)));
  }, py::arg("cur"), py::arg("prev"), py::arg("partials"), py::arg("batch"), py::arg("len"),
     py::arg("dtype"), py::arg("per_sample"), py::arg("workspace"), py::arg("workspace_floats"),
     py::arg("stream"));

  m.def("modulated_rel_l1_", [](std::uintptr_t x, std::uintptr_t scale, int64_t scale_stride,
                                std::uintptr_t shift, int64_t shift_stride, std::uintptr_t prev,
                                std::uintptr_t partials, int64_t batch, int64_t rows, int64_t cols,
                                int dtype, int param_dtype, int norm, float eps, bool per_sample,
                                std::uintptr_t workspace, size_t workspace_floats,
                                std::uintptr_t stream) {
    check(tcf_modulated_rel_l1(ptr<const void>(x), ptr<const void>(scale), scale_stride,
                               ptr<const void>(shift), shift_stride, ptr<void>(prev),
                               ptr<float>(partials), batch, rows, cols, dtype_of(dtype),
                               dtype_of(param_dtype), static_cast<tcf_norm>(norm), eps,
                               per_sample ? 1 : 0, ptr<float>(workspace), workspace_floats,
                               stream_of(stream)));
  }, py::arg("x"), py::arg("scale"), py::arg("scale_stride"), py::arg("shift"),
     py::arg("shift_stride"), py::arg("prev"), py::arg("partials"), py::arg("batch"),
     py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("param_dtype"), py::arg("norm"),
     py::arg("eps"), py::arg("per_sample"), py::arg("workspace"), py::arg("workspace_floats"),
     py::arg("stream"));

  m.def("teacache_decide_", [](std::uintptr_t partials, std::uintptr_t state,
                               const std::vector<float> &coefficients, double threshold,
                               std::uintptr_t force, int64_t max_skips, bool accumulate_abs,
                               std::uintptr_t compute, int64_t count, std::uintptr_t stream) {
    check(tcf_teacache_decide(ptr<const float>(partials), ptr<float>(state), coefficients.data(),
                              static_cast<int>(coefficients.size()), threshold,
                              ptr<const uint8_t>(force), max_skips, accumulate_abs ? 1 : 0,
                              ptr<uint8_t>(compute), count, stream_of(stream)));
  }, py::arg("partials"), py::arg("state"), py::arg("coefficients"), py::arg("threshold"),
     py::arg("force"), py::arg("max_skips"), py::arg("accumulate_abs"), py::arg("compute"),
     py::arg("count"), py::arg("stream"));

  m.def("residual_capture_", [](std::uintptr_t out, std::uintptr_t inp, std::uintptr_t residual,
                                int64_t numel, int dtype, int residual_dtype, std::uintptr_t stream) {
    check(tcf_residual_capture(ptr<const void>(out), ptr<const void>(inp), ptr<void>(residual),
                               numel, dtype_of(dtype), dtype_of(residual_dtype), stream_of(stream)));
  }, py::arg("out"), py::arg("inp"), py::arg("residual"), py::arg("numel"), py::arg("dtype"),
     py::arg("residual_dtype"), py::arg("stream"));

  m.def("residual_apply_", [](std::uintptr_t hidden, std::uintptr_t residual, std::uintptr_t mask,
                              int64_t batch, int64_t len, int dtype, int residual_dtype,
                              std::uintptr_t stream, std::uintptr_t out) {
    if (out == 0) {
      check(tcf_residual_apply(ptr<void>(hidden), ptr<const void>(residual), ptr<const uint8_t>(mask),
                               batch, len, dtype_of(dtype), dtype_of(residual_dtype),
                               stream_of(stream)));
    } else {
      check(tcf_residual_apply_out(ptr<const void>(hidden), ptr<const void>(residual),
                                   ptr<const uint8_t>(mask), ptr<void>(out), batch, len,
                                   dtype_of(dtype), dtype_of(residual_dtype), stream_of(stream)));
    }
  }, py::arg("hidden"), py::arg("residual"), py::arg("mask"), py::arg("batch"), py::arg("len"),
     py::arg("dtype"), py::arg("residual_dtype"), py::arg("stream"), py::arg("out") = 0,
     "hidden += residual (out = 0), or out = hidden + residual with hidden kept");

  m.def("finish_span_", [](std::uintptr_t compute, std::uintptr_t out, std::uintptr_t inp,
                           std::uintptr_t residual, int64_t numel, int dtype, int residual_dtype,
                           std::uintptr_t stream) {
    check(tcf_finish_span(ptr<const uint8_t>(compute), ptr<void>(out), ptr<const void>(inp),
                          ptr<void>(residual), numel, dtype_of(dtype), dtype_of(residual_dtype),
                          stream_of(stream)));
  }, py::arg("compute"), py::arg("out"), py::arg("inp"), py::arg("residual"), py::arg("numel"),
     py::arg("dtype"), py::arg("residual_dtype"), py::arg("stream"),
     "sync-free span end by the device flag: residual = out - inp, or out += residual");
}
