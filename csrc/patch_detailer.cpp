// Schemas of the Patch Detailer Head's CUDA building blocks (torch.ops.dip_C.patch_detailer_*). The
// schedule that strings them together is the head's plan (dip_kernels/plan/patch_detailer.py), run
// on them by dip_kernels/cuda/patch_detailer.py; the kernels and their argument checks are
// csrc/cuda/patch_detailer.cu (registered only when built with CUDA).
//
// Every activation argument is a 4-D channels-last view (N, H, W, C): kernels take sizes and
// strides from the views, so callers pass slices of a concat gradient or a stride-0 expand of the
// token instead of copies. Outputs are allocated by the caller (so tests can poison them) and
// marked mutated.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY_FRAGMENT(dip_C, m) {
  // out[n, oy, ox, :] (or, with upsample, out[n, 2oy+dy, 2ox+dx, :]) = epilogue(implicit-GEMM of
  // the ks x ks / stride / pad gather of concat(src1, src2) along C with wgemm [Kpad, Npad]).
  // act: 0 none, 1 SiLU (z stored to aux when given), 2 multiply by silu'(aux). pool_order: rows
  // in 2x2-window order and the max-pooled result written to pooled.
  m.def(
      "patch_detailer_conv_gemm_(Tensor(a!) out, Tensor src1, Tensor? src2, Tensor wgemm, Tensor? bias, "
      "Tensor(b!)? aux, Tensor(c!)? pooled, int ks, int stride, int pad, bool pool_order, int act, "
      "bool upsample) -> ()");
  // partial[s, m, (tap, c)] = sum over the pixels p of split s of a[p, m] * gather(src1|src2)[p, (tap, c)]
  m.def(
      "patch_detailer_wgrad_partial_(Tensor(a!) partial, Tensor a, Tensor src1, Tensor? src2, int ks, int stride, "
      "int pad) -> ()");
  // partial[chunk, c] = sum over the pixels of chunk of x[..., c]
  m.def("patch_detailer_colsum_partial_(Tensor(a!) partial, Tensor x) -> ()");
  // out[m, c, t] = sum over s in order of partial[s, m, t * ctot + c]
  m.def("patch_detailer_grad_finalize_(Tensor(a!) out, Tensor partial, int ctot) -> ()");
  // dz = (dskip + maxpool2x2_backward(dpooled, argmax of h)) * silu'(z)
  m.def("patch_detailer_pool_silu_backward_(Tensor(a!) dz, Tensor h, Tensor z, Tensor dskip, Tensor dpooled) -> ()");
}
