// The extension module dip_kernels._C. Importing it registers the compiled ops under
// torch.ops.dip_C.*; the Python op layer (dip_kernels/ops.py) dispatches to them through the
// "cuda" backend. Each op's schema lives beside its implementation (csrc/<op>.cpp).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A bare module: everything it offers is registered with the PyTorch dispatcher below.
PyObject* PyInit__C(void) {
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

TORCH_LIBRARY(dip_C, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
}
