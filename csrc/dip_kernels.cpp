// The extension module dip_kernels._C. Importing it registers the compiled ops under
// torch.ops.dip_C.*; the Python op layer (dip_kernels/ops.py) dispatches to them through the
// "cuda" backend. Each op's schema lives beside its implementation (csrc/<op>.cpp).
//
// Built on the LibTorch stable ABI and Python's limited API: no ATen, c10 or pybind11 header (the
// build defines TORCH_STABLE_ONLY, so one would not compile), so the same binary loads in every
// torch from TORCH_TARGET_VERSION (setup.py) on and in every CPython from 3.9 on.
#include <Python.h>
#include <torch/csrc/stable/library.h>

extern "C" {
// A bare module: everything it offers is registered with the PyTorch dispatcher below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "dip-kernels compiled ops (torch.ops.dip_C)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
bool built_with_cuda() {
#ifdef DIP_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

STABLE_TORCH_LIBRARY(dip_C, m) {
  m.def("built_with_cuda() -> bool");
}

// No tensor argument: the dispatcher runs the CompositeExplicitAutograd kernel for any device.
STABLE_TORCH_LIBRARY_IMPL(dip_C, CompositeExplicitAutograd, m) {
  m.impl("built_with_cuda", TORCH_BOX(&built_with_cuda));
}
