// CUDA kernels of the Patch Detailer Head (dip_kernels/reference/patch_detailer.py): bf16 / fp16
// implicit-GEMM convolutions on tensor cores (mma.sync m16n8k16, fp32 accumulation), plus the
// small deterministic reductions the backward needs. The layer schedule (which GEMM runs with which
// operands) is the head's plan, dip_kernels/plan/patch_detailer.py, shared with the Triton and torch
// executors; dip_kernels/cuda/patch_detailer.py lowers its steps onto these kernels, and
// tests/test_patch_detailer_cuda.py runs that lowering on CPU against these ops' contracts.
//
// Activations are channels-last (N, H, W, C) between layers. Every op here takes its tensors as
// 4-D channels-last *views* and reads sizes and strides from them, so a concat is never
// materialised: a GEMM's K range may be split over two sources (decoder: upsampled | skip;
// bottleneck: pooled | token, the token passed as a stride-0 expand over the 2x2 / 1x1 grid).
//
// GEMM view of one launch of conv_gemm_kernel:
//   rows  = output pixels (n, oy, ox) of a grid Ho x Wo, in linear order, or, when the epilogue
//           max-pools, in "pool order" (the 4 pixels of each 2x2 window consecutive) so that a
//           window lies in 4 lanes of one warp and is reduced with two shuffles;
//   K     = (tap, c) with tap = (ky, kx) of a ks x ks kernel, input pixel (oy*stride + ky - pad,
//           ox*stride + kx - pad), c over the channels of source 1 then source 2; zero outside;
//   B     = a weight matrix re-laid once (cached in Python) as [Kpad, Npad] row-major;
//   epilogue: + bias, SiLU (optionally also storing the pre-activation z), or the SiLU backward
//           (multiply by silu'(z) read at the output address), optional fused 2x2 max-pool
//           writing both the full-resolution skip and the pooled tensor, and for the transposed
//           conv a scatter of column block (dy, dx) to output pixel (2*oy + dy, 2*ox + dx).
// The same kernel gives every input gradient (a conv's dgrad is a conv of the output gradient
// with the flipped, transposed kernel; a ConvTranspose2d(2, 2)'s dgrad gathers with ks=2,
// stride=2, pad=0), and the bottleneck's token gradient (the same ks=stride gather summing the
// 2x2 bottleneck grid when P=32).
//
// Weight gradients: wgrad_kernel computes C[m, (tap, c)] = sum_p A[p, m] * gather(p, (tap, c)) over
// a split of the pixels p and writes fp32 partials [split, m, n]; finalize_kernel sums the splits
// in a fixed order and permutes to the nn layout. Bias gradients: colsum_kernel writes per-chunk
// fp32 column sums, reduced by the same finalize_kernel. No float atomics, so every run gives
// bitwise identical gradients for a given device (the split count depends on the SM count only).
//
// Recompute vs store (backward). The backward op gets only the inputs (the custom op saves
// patches, tokens and weights), re-runs the forward once storing the tensors below, then runs the
// backward GEMMs. Per 16x16 patch, in elements of the input dtype (P=32: 4x):
//   stored for the backward: x (NHWC, 3 padded to 8) 2,048; enc skips h1..h4 and their
//   pre-activations z1..z4 2 x 30,720; pooled p1..p4 7,680; bottleneck hb, zb 1,024;
//   upsampled u4..u1 30,720; decoder hd4..hd1 and zd4..zd1 2 x 30,720
//   => about 164k elements = 328 KB (bf16) per patch.
//   transient gradient buffers (freed level by level): at most the level-1 concat gradient
//   (16x16x128 = 32,768) plus dz at that level (16,384): about 100 KB per patch.
// The eager head under autograd stores, per patch, the inputs and outputs of every conv, every
// SiLU input, every materialised concat (16x16x128 + 8x8x256 + ... = 61,440) and int64 max-pool
// indices (4 x the pooled sizes): well above 500 KB per patch in bf16, so storing z next to h
// (instead of recomputing each layer's pre-activation a second time) stays within the eager
// budget and saves a full re-run of the forward GEMMs. The alternative, storing only h and
// recomputing z per level just before its backward, would cut the stored set to ~100k elements
// at the price of ~1x forward FLOPs more; not done.
//
// Not done (documented in the report): keeping a whole 16x16 level on chip, folding the
// transposed conv into the following conv, wgmma on sm_90a, and the 3-channel output conv uses a
// full 64-wide column tile (1.5% of the head's MACs become 22x padded).
// Only the LibTorch stable ABI (torch/csrc/stable, torch/headeronly and the C shim): the build
// defines TORCH_STABLE_ONLY and TORCH_TARGET_VERSION, so one binary loads in every torch from the
// target version on, and an ATen or c10 include fails to compile.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>

namespace patch_detailer {
namespace {

constexpr int kBK = 32;         // K depth of one pipeline stage
constexpr int kStages = 3;      // cp.async pipeline depth
constexpr int kThreads = 128;   // 4 warps, 2 x 2
constexpr int kConvBM = 128;    // conv tile: 128 output pixels x 64 output channels
constexpr int kConvBN = 64;
constexpr int kWgBM = 64;       // wgrad tile: 64 output channels x 64 (tap, c) columns
constexpr int kWgBN = 64;
// Shared-memory row strides padded by 8 elements (16 bytes): consecutive rows start 4 banks
// apart (20 for the 80-byte rows), so the 8 row addresses of every ldmatrix hit distinct banks.
constexpr int kLdMK = kBK + 8;      // [m][k] tiles
constexpr int kLdKN = kConvBN + 8;  // [k][n] and [k][m] tiles (64 wide)

enum Act : int { kActNone = 0, kActSilu = 1, kActSiluBackward = 2 };

// ------------------------------------------------------------------ dtype helpers
template <typename T> struct Vec2;
template <> struct Vec2<__nv_bfloat16> { using type = __nv_bfloat162; };
template <> struct Vec2<__half> { using type = __half2; };

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
__device__ __forceinline__ __nv_bfloat162 pack2(float a, float b, __nv_bfloat16*) { return __floats2bfloat162_rn(a, b); }
__device__ __forceinline__ __half2 pack2(float a, float b, __half*) { return __floats2half2_rn(a, b); }

__device__ __forceinline__ float silu(float v) { return v / (1.0f + __expf(-v)); }
__device__ __forceinline__ float silu_grad(float z) {
  const float s = 1.0f / (1.0f + __expf(-z));
  return s * (1.0f + z * (1.0f - s));
}

// ------------------------------------------------------------------ PTX wrappers
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: the 16 bytes are zero-filled, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
}
template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// ------------------------------------------------------------------ implicit-GEMM gather
// Its contract (K ordered (ky, kx, c), windows zero-padded per image) is the torch executor's columns()
// (dip_kernels/cpu/patch_detailer.py), on which tests/test_patch_detailer_cuda.py runs the CUDA executor's
// lowering; the pool-order row map is mirrored by _pool_order_rows there.
struct Gather {
  long long s1n, s1y, s1x, s2n, s2y, s2x;  // element strides of the two sources (channel stride 1)
  int rows, ho, wo;                        // GEMM rows = nimg * ho * wo
  int hi, wi, ks, stride, pad;
  int c1, ctot, k;                         // k = ks * ks * ctot
  int pool_order;
};
struct PixelCoord { int n, oy, ox; bool valid; };
struct ChunkCoord { int ky, kx, c; bool valid; };

__device__ __forceinline__ PixelCoord row_coord(const Gather& g, int r) {
  PixelCoord pc;
  pc.valid = r < g.rows;
  const int rr = pc.valid ? r : 0;
  const int hw = g.ho * g.wo;
  pc.n = rr / hw;
  const int p = rr - pc.n * hw;
  if (g.pool_order) {
    const int half_w = g.wo >> 1;
    const int q = p >> 2, sub = p & 3;
    const int qy = q / half_w;
    pc.oy = 2 * qy + (sub >> 1);
    pc.ox = 2 * (q - qy * half_w) + (sub & 1);
  } else {
    pc.oy = p / g.wo;
    pc.ox = p - pc.oy * g.wo;
  }
  return pc;
}

// k0 is a multiple of 8 and every source's channel count is too, so the 8 channels of a chunk
// are contiguous in one source: one 16-byte cp.async.
__device__ __forceinline__ ChunkCoord chunk_coord(const Gather& g, int k0) {
  ChunkCoord cc;
  cc.valid = k0 < g.k;
  const int kk = cc.valid ? k0 : 0;
  const int tap = kk / g.ctot;
  cc.c = kk - tap * g.ctot;
  cc.ky = tap / g.ks;
  cc.kx = tap - cc.ky * g.ks;
  return cc;
}

template <typename T>
__device__ __forceinline__ const T* chunk_ptr(const Gather& g, const T* src1, const T* src2, const PixelCoord& pc,
                                              const ChunkCoord& cc) {
  if (!pc.valid || !cc.valid) return nullptr;
  const int iy = pc.oy * g.stride + cc.ky - g.pad;
  const int ix = pc.ox * g.stride + cc.kx - g.pad;
  if (iy < 0 || iy >= g.hi || ix < 0 || ix >= g.wi) return nullptr;
  if (cc.c < g.c1) return src1 + (pc.n * g.s1n + iy * g.s1y + ix * g.s1x + cc.c);
  return src2 + (pc.n * g.s2n + iy * g.s2y + ix * g.s2x + (cc.c - g.c1));
}

// ------------------------------------------------------------------ conv GEMM (forward and dgrad)
template <typename T>
struct ConvParams {
  Gather g;
  const T* src1;
  const T* src2;
  const T* wgemm;  // [ktiles * kBK, ldb]
  int ldb, ktiles, ntiles_n;
  int n_valid;           // GEMM columns that exist (the rest of the last tile is padding)
  const float* bias;     // [ldb] fp32 or null
  int act;
  T* out;
  long long osn, osy, osx, osc;
  T* aux;                // same layout as out: z written (kActSilu) or read (kActSiluBackward)
  T* pooled;             // (n, ho/2, wo/2, n_valid) when pool_order
  long long psn, psy, psx;
  int up_cout;           // > 0: ConvTranspose2d(2, 2) scatter, column = (dy, dx, channel)
};

template <typename T>
__global__ void __launch_bounds__(kThreads) conv_gemm_kernel(const ConvParams<T> p) {
  __shared__ __align__(128) T a_smem[kStages][kConvBM][kLdMK];
  __shared__ __align__(128) T b_smem[kStages][kBK][kLdKN];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile_m = blockIdx.x / p.ntiles_n;
  const int tile_n = blockIdx.x - tile_m * p.ntiles_n;
  const int m0 = tile_m * kConvBM, n0 = tile_n * kConvBN;

  // A loads: thread owns rows tid/4 + 32*i (i < 4), 8-channel chunk tid%4 of each k tile.
  PixelCoord rows[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) rows[i] = row_coord(p.g, m0 + (tid >> 2) + 32 * i);
  const int a_chunk = (tid & 3) * 8;
  // B loads: k rows tid/8 and tid/8 + 16, 8 columns at (tid%8)*8.
  const int b_row = tid >> 3, b_col = (tid & 7) * 8;

  auto load_tile = [&](int stage, int kt) {
    const ChunkCoord cc = chunk_coord(p.g, kt * kBK + a_chunk);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const T* src = chunk_ptr(p.g, p.src1, p.src2, rows[i], cc);
      cp_async16(&a_smem[stage][(tid >> 2) + 32 * i][a_chunk], src ? src : p.src1, src != nullptr);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int kr = b_row + 16 * i;
      const T* src = p.wgemm + (static_cast<long long>(kt * kBK + kr) * p.ldb + n0 + b_col);
      cp_async16(&b_smem[stage][kr][b_col], src, true);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  const int warp_m = warp >> 1, warp_n = warp & 1;  // warp tile 64 x 32
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < p.ktiles) load_tile(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < p.ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt visible to all; everyone is done reading the stage refilled next
    const int next = kt + kStages - 1;
    if (next < p.ktiles) load_tile(next % kStages, next);
    cp_async_commit();
    const int st = kt % kStages;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
        ldmatrix_x4(af[mt], &a_smem[st][warp_m * 64 + mt * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t r[4];
        ldmatrix_x4_trans(r, &b_smem[st][kk + ((lane >> 3) & 1) * 8 + (lane & 7)][warp_n * 32 + np * 16 + (lane >> 4) * 8]);
        bf[2 * np][0] = r[0];
        bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2];
        bf[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) Mma<T>::run(acc[mt][nt], af[mt], bf[nt]);
    }
  }
  cp_async_wait<0>();

  // Epilogue. Accumulator (mt, nt, e): row g + 8*(e/2), column 2*t + e%2 of the 16x8 tile.
  const int g = lane >> 2, t = lane & 3;
  using T2 = typename Vec2<T>::type;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const PixelCoord pc = row_coord(p.g, m0 + warp_m * 64 + mt * 16 + half * 8 + g);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int col = n0 + warp_n * 32 + nt * 8 + 2 * t;
        float v0 = acc[mt][nt][2 * half], v1 = acc[mt][nt][2 * half + 1];
        const bool ok0 = pc.valid && col < p.n_valid;
        const bool ok1 = pc.valid && col + 1 < p.n_valid;
        if (p.bias) {
          v0 += p.bias[col];
          v1 += p.bias[col + 1];
        }
        int oy = pc.oy, ox = pc.ox, ch = col;
        if (p.up_cout > 0) {  // up_cout is even, so col and col + 1 share one (dy, dx)
          const int sub = col / p.up_cout;
          ch = col - sub * p.up_cout;
          oy = 2 * oy + (sub >> 1);
          ox = 2 * ox + (sub & 1);
        }
        const long long off = pc.n * p.osn + oy * p.osy + ox * p.osx + ch * p.osc;
        const bool paired = ok1 && p.osc == 1;  // two adjacent channels: one 4-byte access
        if (p.act == kActSiluBackward) {
          if (paired) {
            const T2 z2 = *reinterpret_cast<const T2*>(p.aux + off);
            v0 *= silu_grad(to_float(z2.x));
            v1 *= silu_grad(to_float(z2.y));
          } else {
            if (ok0) v0 *= silu_grad(to_float(p.aux[off]));
            if (ok1) v1 *= silu_grad(to_float(p.aux[off + p.osc]));
          }
        } else if (p.act == kActSilu) {
          if (p.aux) {
            if (paired) {
              *reinterpret_cast<T2*>(p.aux + off) = pack2(v0, v1, static_cast<T*>(nullptr));
            } else {
              if (ok0) p.aux[off] = from_float<T>(v0);
              if (ok1) p.aux[off + p.osc] = from_float<T>(v1);
            }
          }
          v0 = silu(v0);
          v1 = silu(v1);
        }
        if (paired) {
          *reinterpret_cast<T2*>(p.out + off) = pack2(v0, v1, static_cast<T*>(nullptr));
        } else {
          if (ok0) p.out[off] = from_float<T>(v0);
          if (ok1) p.out[off + p.osc] = from_float<T>(v1);
        }
        if (p.pooled) {
          // pool order: rows 4w..4w+3 are one 2x2 window and sit in lanes g, g^1, g^2, g^3,
          // i.e. lane ^ 4 and lane ^ 8. All lanes shuffle; the window's first lane writes.
          float p0 = fmaxf(v0, __shfl_xor_sync(0xffffffffu, v0, 4));
          float p1 = fmaxf(v1, __shfl_xor_sync(0xffffffffu, v1, 4));
          p0 = fmaxf(p0, __shfl_xor_sync(0xffffffffu, p0, 8));
          p1 = fmaxf(p1, __shfl_xor_sync(0xffffffffu, p1, 8));
          if ((g & 3) == 0) {
            const long long poff = pc.n * p.psn + (pc.oy >> 1) * p.psy + (pc.ox >> 1) * p.psx + col;
            if (ok1) {
              *reinterpret_cast<T2*>(p.pooled + poff) = pack2(p0, p1, static_cast<T*>(nullptr));
            } else if (ok0) {
              p.pooled[poff] = from_float<T>(p0);
            }
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------ weight gradient GEMM
template <typename T>
struct WgradParams {
  Gather g;  // pixels in linear order; gathered operand B[p, (tap, c)]
  const T* src1;
  const T* src2;
  const T* a;  // plain operand A[p, m]: view (nimg, ho, wo, mw), channel stride 1
  long long asn, asy, asx;
  int mw;
  float* partial;  // [splits, mpad, npad]
  int mpad, npad, ntiles_n, rows_per_split;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) wgrad_kernel(const WgradParams<T> p) {
  __shared__ __align__(128) T a_smem[kStages][kBK][kLdKN];  // [pixel][m]
  __shared__ __align__(128) T b_smem[kStages][kBK][kLdKN];  // [pixel][n]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile_m = blockIdx.x / p.ntiles_n;
  const int tile_n = blockIdx.x - tile_m * p.ntiles_n;
  const int m0 = tile_m * kWgBM, n0 = tile_n * kWgBN;
  const int split = blockIdx.y;
  const int p_begin = split * p.rows_per_split;
  const int p_end = min(p_begin + p.rows_per_split, p.g.rows);
  const int ktiles = p_end > p_begin ? (p_end - p_begin + kBK - 1) / kBK : 0;

  // Both tiles: pixel rows tid/8 and tid/8 + 16, 8-wide chunk (tid%8)*8 of m (A) or n (B).
  const int ld_row = tid >> 3, ld_col = (tid & 7) * 8;
  const ChunkCoord cc = chunk_coord(p.g, n0 + ld_col);  // fixed for the whole block
  const bool a_col_ok = m0 + ld_col < p.mw;

  auto load_tile = [&](int stage, int kt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = ld_row + 16 * i;
      const int pix = p_begin + kt * kBK + r;
      PixelCoord pc = row_coord(p.g, pix);
      pc.valid = pc.valid && pix < p_end;
      const T* a_src = p.a + (pc.n * p.asn + pc.oy * p.asy + pc.ox * p.asx + m0 + ld_col);
      const bool a_ok = pc.valid && a_col_ok;
      cp_async16(&a_smem[stage][r][ld_col], a_ok ? a_src : p.a, a_ok);
      const T* b_src = chunk_ptr(p.g, p.src1, p.src2, pc, cc);
      cp_async16(&b_smem[stage][r][ld_col], b_src ? b_src : p.src1, b_src != nullptr);
    }
  };

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  const int warp_m = warp >> 1, warp_n = warp & 1;  // warp tile 32 x 32
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_tile(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < ktiles) load_tile(next % kStages, next);
    cp_async_commit();
    const int st = kt % kStages;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[2][4], bf[4][2];
      // A is stored [k][m]: the transposing ldmatrix turns 8x8 blocks (k 0-7 | 8-15) x (m 0-7 | 8-15)
      // into a0 = (m 0-7, k 0-7), a1 = (m 8-15, k 0-7), a2 = (m 0-7, k 8-15), a3 = (m 8-15, k 8-15).
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
        ldmatrix_x4_trans(af[mt], &a_smem[st][kk + (lane >> 4) * 8 + (lane & 7)][warp_m * 32 + mt * 16 + ((lane >> 3) & 1) * 8]);
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t r[4];
        ldmatrix_x4_trans(r, &b_smem[st][kk + ((lane >> 3) & 1) * 8 + (lane & 7)][warp_n * 32 + np * 16 + (lane >> 4) * 8]);
        bf[2 * np][0] = r[0];
        bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2];
        bf[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) Mma<T>::run(acc[mt][nt], af[mt], bf[nt]);
    }
  }
  cp_async_wait<0>();

  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int m = m0 + warp_m * 32 + mt * 16 + half * 8 + g;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int n = n0 + warp_n * 32 + nt * 8 + 2 * t;
        float2 v = make_float2(acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1]);
        *reinterpret_cast<float2*>(p.partial + ((static_cast<long long>(split) * p.mpad + m) * p.npad + n)) = v;
      }
    }
}

// out[m][c][t] = sum over splits s, in order, of partial[s][m][t * ctot + c]
template <typename T>
__global__ void finalize_kernel(const float* __restrict__ partial, int splits, int mpad, int npad, T* __restrict__ out,
                                int mreal, int creal, int taps, int ctot) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= mreal * creal * taps) return;
  const int t = idx % taps;
  const int c = (idx / taps) % creal;
  const int m = idx / (taps * creal);
  const long long n = static_cast<long long>(t) * ctot + c;
  float s = 0.f;
  for (int sp = 0; sp < splits; ++sp) s += partial[(static_cast<long long>(sp) * mpad + m) * npad + n];
  out[idx] = from_float<T>(s);
}

// Column sums of a channels-last view over all pixels: partial[chunk][c], fixed summation order.
template <typename T>
__global__ void __launch_bounds__(256) colsum_kernel(const T* __restrict__ x, long long sn, long long sy, long long sx,
                                                     int h, int w, int rows, int channels, int rows_per_chunk,
                                                     float* __restrict__ partial) {
  __shared__ float red[4][64];
  const int c = blockIdx.x * 64 + (threadIdx.x & 63);
  const int phase = threadIdx.x >> 6;
  const int begin = blockIdx.y * rows_per_chunk;
  const int end = min(begin + rows_per_chunk, rows);
  float s = 0.f;
  if (c < channels) {
    for (int r = begin + phase; r < end; r += 4) {
      const int n = r / (h * w);
      const int q = r - n * h * w;
      const int y = q / w;
      const int xx = q - y * w;
      s += to_float(x[n * sn + y * sy + xx * sx + c]);
    }
  }
  red[phase][threadIdx.x & 63] = s;
  __syncthreads();
  if (phase == 0 && c < channels)
    partial[static_cast<long long>(blockIdx.y) * channels + c] = ((red[0][threadIdx.x] + red[1][threadIdx.x]) + red[2][threadIdx.x]) + red[3][threadIdx.x];
}

// Encoder level backward: dz = (d_skip + max-pool backward of d_pooled) * silu'(z). The pooled
// gradient goes to the first maximum of the window in (0,0), (0,1), (1,0), (1,1) order, as
// PyTorch's max_pool2d does. One thread per (n, window, 8 channels).
struct View4 { long long sn, sy, sx; };
template <typename T>
__global__ void pool_silu_backward_kernel(T* __restrict__ dz, View4 dz_v, const T* __restrict__ h, View4 h_v,
                                          const T* __restrict__ z, View4 z_v, const T* __restrict__ dskip, View4 ds_v,
                                          const T* __restrict__ dpool, View4 dp_v, int nimg, int half_h, int half_w,
                                          int channels) {
  const int chunks = channels / 8;
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<long long>(nimg) * half_h * half_w * chunks) return;
  const int c = static_cast<int>(idx % chunks) * 8;
  long long rest = idx / chunks;
  const int px = static_cast<int>(rest % half_w);
  rest /= half_w;
  const int py = static_cast<int>(rest % half_h);
  const int n = static_cast<int>(rest / half_h);
  union Pack { uint4 u; T e[8]; };
  Pack hv[4], zv[4], dv[4], pv, out[4];
  pv.u = *reinterpret_cast<const uint4*>(dpool + (n * dp_v.sn + py * dp_v.sy + px * dp_v.sx + c));
#pragma unroll
  for (int sub = 0; sub < 4; ++sub) {
    const int y = 2 * py + (sub >> 1), x = 2 * px + (sub & 1);
    hv[sub].u = *reinterpret_cast<const uint4*>(h + (n * h_v.sn + y * h_v.sy + x * h_v.sx + c));
    zv[sub].u = *reinterpret_cast<const uint4*>(z + (n * z_v.sn + y * z_v.sy + x * z_v.sx + c));
    dv[sub].u = *reinterpret_cast<const uint4*>(dskip + (n * ds_v.sn + y * ds_v.sy + x * ds_v.sx + c));
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    int arg = 0;
    float best = to_float(hv[0].e[j]);
#pragma unroll
    for (int sub = 1; sub < 4; ++sub) {
      const float v = to_float(hv[sub].e[j]);
      if (v > best) { best = v; arg = sub; }
    }
    const float gp = to_float(pv.e[j]);
#pragma unroll
    for (int sub = 0; sub < 4; ++sub) {
      const float gsum = to_float(dv[sub].e[j]) + (sub == arg ? gp : 0.f);
      out[sub].e[j] = from_float<T>(gsum * silu_grad(to_float(zv[sub].e[j])));
    }
  }
#pragma unroll
  for (int sub = 0; sub < 4; ++sub) {
    const int y = 2 * py + (sub >> 1), x = 2 * px + (sub & 1);
    *reinterpret_cast<uint4*>(dz + (n * dz_v.sn + y * dz_v.sy + x * dz_v.sx + c)) = out[sub].u;
  }
}

// ------------------------------------------------------------------ host side: checks and launch
// The Python op layer validates the op's inputs; these checks are the second line, guarding the
// internal schedule: every address a kernel can form must lie inside the tensor it reads or writes.
using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using DeviceIndex = torch::stable::accelerator::DeviceIndex;

std::string shape(const Tensor& t) {
  std::ostringstream s;
  s << "(";
  for (int64_t d = 0; d < t.dim(); ++d) s << (d ? ", " : "") << t.size(d);
  s << ")";
  return s.str();
}

bool on(const Tensor& t, DeviceIndex dev) { return t.is_cuda() && t.get_device_index() == dev; }

// The stream PyTorch has made current on the device (so CUDA graphs capture the launches).
cudaStream_t current_stream(DeviceIndex dev) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(dev, &stream));
  return static_cast<cudaStream_t>(stream);
}

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, "CUDA kernel launch failed: ", cudaGetErrorString(err));
}

float* f32(const Tensor& t) { return static_cast<float*>(t.data_ptr()); }

long long reachable_elements(const Tensor& t) {
  int64_t nbytes = 0;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_storage_size(t.get(), &nbytes));
  return static_cast<long long>(nbytes / static_cast<int64_t>(t.element_size())) - t.storage_offset();
}

void check_view4(const Tensor& t, const char* name, ScalarType dtype, DeviceIndex dev, bool vec16) {
  STD_TORCH_CHECK(t.dim() == 4, name, " must be a 4-D channels-last view, got ", t.dim(), " dims");
  STD_TORCH_CHECK(on(t, dev), name, " must be on cuda:", dev, " (the device of the op's first tensor)");
  STD_TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  for (int d = 0; d < 4; ++d) STD_TORCH_CHECK(t.stride(d) >= 0, name, " must not have negative strides");
  long long last = 0;
  for (int d = 0; d < 4; ++d) last += (t.size(d) - 1) * t.stride(d);
  STD_TORCH_CHECK(t.numel() == 0 || last < reachable_elements(t), name, " view reaches past its storage");
  if (vec16) {
    STD_TORCH_CHECK(t.stride(3) == 1, name, " must have channel stride 1");
    STD_TORCH_CHECK(t.size(3) % 8 == 0, name, " must have a multiple of 8 channels, got ", t.size(3));
    for (int d = 0; d < 3; ++d)
      STD_TORCH_CHECK(t.stride(d) % 8 == 0, name, " strides must be multiples of 8 elements (16-byte loads)");
    STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
  }
}

Gather make_gather(const Tensor& src1, const std::optional<Tensor>& src2, int64_t ks, int64_t stride,
                   int64_t pad, bool pool_order) {
  STD_TORCH_CHECK(ks >= 1 && stride >= 1 && pad >= 0, "bad ks/stride/pad");
  Gather g{};
  g.hi = static_cast<int>(src1.size(1));
  g.wi = static_cast<int>(src1.size(2));
  g.ks = static_cast<int>(ks);
  g.stride = static_cast<int>(stride);
  g.pad = static_cast<int>(pad);
  g.ho = static_cast<int>((g.hi + 2 * pad - ks) / stride + 1);
  g.wo = static_cast<int>((g.wi + 2 * pad - ks) / stride + 1);
  STD_TORCH_CHECK(g.ho >= 1 && g.wo >= 1, "empty output grid");
  const long long rows = src1.size(0) * static_cast<long long>(g.ho) * g.wo;
  STD_TORCH_CHECK(rows < (1LL << 31) - kConvBM, "too many pixels for 32-bit row indices");
  g.rows = static_cast<int>(rows);
  g.c1 = static_cast<int>(src1.size(3));
  g.s1n = src1.stride(0);
  g.s1y = src1.stride(1);
  g.s1x = src1.stride(2);
  g.ctot = g.c1;
  if (src2) {
    const Tensor& s2 = *src2;
    STD_TORCH_CHECK(s2.size(0) == src1.size(0) && s2.size(1) == src1.size(1) && s2.size(2) == src1.size(2),
                "src2 must share src1's (N, H, W), got ", shape(s2), " vs ", shape(src1));
    g.ctot += static_cast<int>(s2.size(3));
    g.s2n = s2.stride(0);
    g.s2y = s2.stride(1);
    g.s2x = s2.stride(2);
  }
  g.k = g.ks * g.ks * g.ctot;
  g.pool_order = pool_order ? 1 : 0;
  if (pool_order) STD_TORCH_CHECK(g.ho % 2 == 0 && g.wo % 2 == 0, "pool order needs an even output grid");
  return g;
}

template <typename T>
void launch_conv(const Tensor& out, const Tensor& src1, const std::optional<Tensor>& src2,
                 const Tensor& wgemm, const std::optional<Tensor>& bias, const std::optional<Tensor>& aux,
                 const std::optional<Tensor>& pooled, const Gather& g, int64_t act, bool upsample) {
  ConvParams<T> p{};
  p.g = g;
  p.src1 = reinterpret_cast<const T*>(src1.data_ptr());
  p.src2 = src2 ? reinterpret_cast<const T*>(src2->data_ptr()) : nullptr;
  p.wgemm = reinterpret_cast<const T*>(wgemm.data_ptr());
  p.ldb = static_cast<int>(wgemm.size(1));
  p.ktiles = static_cast<int>(wgemm.size(0) / kBK);
  p.ntiles_n = p.ldb / kConvBN;
  p.n_valid = static_cast<int>(upsample ? 4 * out.size(3) : out.size(3));
  p.bias = bias ? f32(*bias) : nullptr;
  p.act = static_cast<int>(act);
  p.out = reinterpret_cast<T*>(out.data_ptr());
  p.osn = out.stride(0);
  p.osy = out.stride(1);
  p.osx = out.stride(2);
  p.osc = out.stride(3);
  p.aux = aux ? reinterpret_cast<T*>(aux->data_ptr()) : nullptr;
  p.pooled = pooled ? reinterpret_cast<T*>(pooled->data_ptr()) : nullptr;
  if (pooled) {
    p.psn = pooled->stride(0);
    p.psy = pooled->stride(1);
    p.psx = pooled->stride(2);
  }
  p.up_cout = upsample ? static_cast<int>(out.size(3)) : 0;
  const long long tiles_m = (static_cast<long long>(g.rows) + kConvBM - 1) / kConvBM;
  const long long blocks = tiles_m * p.ntiles_n;
  STD_TORCH_CHECK(blocks < (1LL << 31), "grid too large");
  if (blocks == 0) return;
  conv_gemm_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, current_stream(src1.get_device_index())>>>(p);
  check_launch();
}

void conv_gemm_cuda(const Tensor& out, const Tensor& src1, const std::optional<Tensor>& src2,
                    const Tensor& wgemm, const std::optional<Tensor>& bias,
                    const std::optional<Tensor>& aux, const std::optional<Tensor>& pooled, int64_t ks,
                    int64_t stride, int64_t pad, bool pool_order, int64_t act, bool upsample) {
  STD_TORCH_CHECK(src1.is_cuda(), "patch_detailer_conv_gemm_: src1 must be a CUDA tensor");
  const DeviceIndex dev = src1.get_device_index();
  const auto dtype = src1.scalar_type();
  STD_TORCH_CHECK(dtype == ScalarType::BFloat16 || dtype == ScalarType::Half, "patch_detailer_conv_gemm_: dtype must be bfloat16 or float16, got ", dtype);
  torch::stable::accelerator::DeviceGuard guard(dev);
  check_view4(src1, "src1", dtype, dev, true);
  if (src2) check_view4(*src2, "src2", dtype, dev, true);
  const Gather g = make_gather(src1, src2, ks, stride, pad, pool_order);
  check_view4(out, "out", dtype, dev, false);
  const long long up = upsample ? 2 : 1;
  STD_TORCH_CHECK(out.size(0) == src1.size(0) && out.size(1) == up * g.ho && out.size(2) == up * g.wo,
              "out must be (N, ", up * g.ho, ", ", up * g.wo, ", C), got ", shape(out));
  const long long n_valid = upsample ? 4 * out.size(3) : out.size(3);
  STD_TORCH_CHECK(n_valid >= 1, "out has no channels");
  if (upsample) STD_TORCH_CHECK(out.size(3) % 2 == 0, "upsample needs an even channel count");
  STD_TORCH_CHECK(!upsample || (!pool_order && !pooled), "upsample cannot be combined with pooling");
  STD_TORCH_CHECK(out.stride(3) == 1 || (!upsample && !pooled), "out must have channel stride 1 here");
  if (out.stride(3) == 1) STD_TORCH_CHECK(out.size(3) % 2 == 0 || !pooled, "pooled output needs an even channel count");
  if (out.stride(3) == 1) {  // paired 4-byte stores of adjacent channels
    for (int d = 0; d < 3; ++d) STD_TORCH_CHECK(out.stride(d) % 2 == 0, "out strides must be even (paired stores)");
    STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 4 == 0, "out must be 4-byte aligned");
  }
  STD_TORCH_CHECK(wgemm.dim() == 2 && wgemm.is_contiguous() && wgemm.scalar_type() == dtype && on(wgemm, dev),
              "wgemm must be a contiguous 2-D ", dtype, " tensor on cuda:", dev);
  STD_TORCH_CHECK(wgemm.size(0) % kBK == 0 && wgemm.size(0) >= g.k, "wgemm must have a multiple of ", kBK,
              " rows and at least K=", g.k, ", got ", shape(wgemm));
  STD_TORCH_CHECK(wgemm.size(1) % kConvBN == 0 && wgemm.size(1) >= n_valid, "wgemm must have a multiple of ", kConvBN,
              " columns and at least ", n_valid, ", got ", shape(wgemm));
  STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(wgemm.data_ptr()) % 16 == 0, "wgemm must be 16-byte aligned");
  if (bias) {
    STD_TORCH_CHECK(bias->scalar_type() == ScalarType::Float && bias->is_contiguous() && on(*bias, dev) &&
                    bias->numel() == wgemm.size(1),
                "bias must be a contiguous float32 vector of ", wgemm.size(1), " on cuda:", dev);
  }
  STD_TORCH_CHECK(act == kActNone || act == kActSilu || act == kActSiluBackward, "act must be 0, 1 or 2");
  STD_TORCH_CHECK(act != kActSiluBackward || aux, "the SiLU backward reads z from aux");
  STD_TORCH_CHECK(!aux || act != kActNone, "aux is only used with act 1 or 2");
  if (aux) {
    check_view4(*aux, "aux", dtype, dev, false);
    STD_TORCH_CHECK(aux->sizes().equals(out.sizes()) && aux->strides().equals(out.strides()), "aux must have out's sizes and strides");
    STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(aux->data_ptr()) % 4 == 0, "aux must be 4-byte aligned");
  }
  STD_TORCH_CHECK(pool_order == pooled.has_value(), "pooled is written exactly when pool_order is set");
  if (pooled) {
    check_view4(*pooled, "pooled", dtype, dev, false);
    STD_TORCH_CHECK(pooled->size(0) == out.size(0) && pooled->size(1) == g.ho / 2 && pooled->size(2) == g.wo / 2 &&
                    pooled->size(3) == out.size(3) && pooled->stride(3) == 1,
                "pooled must be (N, ", g.ho / 2, ", ", g.wo / 2, ", ", out.size(3), ") channels-last, got ",
                shape(*pooled));
    for (int d = 0; d < 3; ++d) STD_TORCH_CHECK(pooled->stride(d) % 2 == 0, "pooled strides must be even");
    STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(pooled->data_ptr()) % 4 == 0, "pooled must be 4-byte aligned");
  }
  if (dtype == ScalarType::BFloat16)
    launch_conv<__nv_bfloat16>(out, src1, src2, wgemm, bias, aux, pooled, g, act, upsample);
  else
    launch_conv<__half>(out, src1, src2, wgemm, bias, aux, pooled, g, act, upsample);
}

void wgrad_partial_cuda(const Tensor& partial, const Tensor& a, const Tensor& src1,
                        const std::optional<Tensor>& src2, int64_t ks, int64_t stride, int64_t pad) {
  STD_TORCH_CHECK(src1.is_cuda(), "patch_detailer_wgrad_partial_: src1 must be a CUDA tensor");
  const DeviceIndex dev = src1.get_device_index();
  const auto dtype = src1.scalar_type();
  STD_TORCH_CHECK(dtype == ScalarType::BFloat16 || dtype == ScalarType::Half, "patch_detailer_wgrad_partial_: dtype must be bfloat16 or float16");
  torch::stable::accelerator::DeviceGuard guard(dev);
  check_view4(src1, "src1", dtype, dev, true);
  if (src2) check_view4(*src2, "src2", dtype, dev, true);
  const Gather g = make_gather(src1, src2, ks, stride, pad, false);
  check_view4(a, "a", dtype, dev, true);
  STD_TORCH_CHECK(a.size(0) == src1.size(0) && a.size(1) == g.ho && a.size(2) == g.wo,
              "a must be (N, ", g.ho, ", ", g.wo, ", M), got ", shape(a));
  STD_TORCH_CHECK(partial.dim() == 3 && partial.is_contiguous() && partial.scalar_type() == ScalarType::Float &&
                  on(partial, dev),
              "partial must be a contiguous float32 (splits, mpad, npad) tensor on cuda:", dev);
  const long long splits = partial.size(0), mpad = partial.size(1), npad = partial.size(2);
  STD_TORCH_CHECK(splits >= 1 && splits <= 65535, "splits must be in [1, 65535]");
  STD_TORCH_CHECK(mpad % kWgBM == 0 && mpad >= a.size(3), "partial dim 1 must be a multiple of ", kWgBM, " >= M");
  STD_TORCH_CHECK(npad % kWgBN == 0 && npad >= g.k, "partial dim 2 must be a multiple of ", kWgBN, " >= K=", g.k);
  const long long per_split_raw = (g.rows + splits - 1) / splits;
  const long long rows_per_split = (per_split_raw + kBK - 1) / kBK * kBK;
  const long long blocks_x = (mpad / kWgBM) * (npad / kWgBN);
  STD_TORCH_CHECK(blocks_x < (1LL << 31), "grid too large");
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(splits));
  auto fill = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    WgradParams<T> p{};
    p.g = g;
    p.src1 = reinterpret_cast<const T*>(src1.data_ptr());
    p.src2 = src2 ? reinterpret_cast<const T*>(src2->data_ptr()) : nullptr;
    p.a = reinterpret_cast<const T*>(a.data_ptr());
    p.asn = a.stride(0);
    p.asy = a.stride(1);
    p.asx = a.stride(2);
    p.mw = static_cast<int>(a.size(3));
    p.partial = f32(partial);
    p.mpad = static_cast<int>(mpad);
    p.npad = static_cast<int>(npad);
    p.ntiles_n = static_cast<int>(npad / kWgBN);
    p.rows_per_split = static_cast<int>(rows_per_split);
    if (partial.numel() == 0) return;
    wgrad_kernel<T><<<grid, kThreads, 0, current_stream(dev)>>>(p);
    check_launch();
  };
  if (dtype == ScalarType::BFloat16)
    fill(static_cast<__nv_bfloat16*>(nullptr));
  else
    fill(static_cast<__half*>(nullptr));
}

void colsum_partial_cuda(const Tensor& partial, const Tensor& x) {
  STD_TORCH_CHECK(x.is_cuda(), "patch_detailer_colsum_partial_: x must be a CUDA tensor");
  const DeviceIndex dev = x.get_device_index();
  const auto dtype = x.scalar_type();
  STD_TORCH_CHECK(dtype == ScalarType::BFloat16 || dtype == ScalarType::Half, "patch_detailer_colsum_partial_: dtype must be bfloat16 or float16");
  torch::stable::accelerator::DeviceGuard guard(dev);
  check_view4(x, "x", dtype, dev, false);
  STD_TORCH_CHECK(x.stride(3) == 1, "x must have channel stride 1");
  STD_TORCH_CHECK(partial.dim() == 2 && partial.is_contiguous() && partial.scalar_type() == ScalarType::Float &&
                  on(partial, dev) && partial.size(1) == x.size(3),
              "partial must be a contiguous float32 (chunks, ", x.size(3), ") tensor on cuda:", dev);
  const long long rows = x.size(0) * x.size(1) * x.size(2);
  STD_TORCH_CHECK(rows < (1LL << 31), "too many pixels");
  const long long chunks = partial.size(0);
  STD_TORCH_CHECK(chunks >= 1 && chunks <= 65535, "chunks must be in [1, 65535]");
  const int rows_per_chunk = static_cast<int>((rows + chunks - 1) / chunks);
  const dim3 grid(static_cast<unsigned>((x.size(3) + 63) / 64), static_cast<unsigned>(chunks));
  if (partial.numel() == 0) return;
  auto stream = current_stream(dev);
  const int h = static_cast<int>(x.size(1)), w = static_cast<int>(x.size(2)), c = static_cast<int>(x.size(3));
  if (dtype == ScalarType::BFloat16)
    colsum_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()),
        x.stride(0), x.stride(1), x.stride(2), h, w, static_cast<int>(rows), c, rows_per_chunk, f32(partial));
  else
    colsum_kernel<__half><<<grid, 256, 0, stream>>>(reinterpret_cast<const __half*>(x.data_ptr()), x.stride(0),
        x.stride(1), x.stride(2), h, w, static_cast<int>(rows), c, rows_per_chunk, f32(partial));
  check_launch();
}

void grad_finalize_cuda(const Tensor& out, const Tensor& partial, int64_t ctot) {
  STD_TORCH_CHECK(out.is_cuda(), "patch_detailer_grad_finalize_: out must be a CUDA tensor");
  const DeviceIndex dev = out.get_device_index();
  const auto dtype = out.scalar_type();
  STD_TORCH_CHECK(dtype == ScalarType::BFloat16 || dtype == ScalarType::Half, "patch_detailer_grad_finalize_: dtype must be bfloat16 or float16");
  torch::stable::accelerator::DeviceGuard guard(dev);
  STD_TORCH_CHECK(out.dim() == 3 && out.is_contiguous(), "out must be a contiguous (M, C, taps) tensor");
  STD_TORCH_CHECK(partial.dim() == 3 && partial.is_contiguous() && partial.scalar_type() == ScalarType::Float &&
                  on(partial, dev),
              "partial must be a contiguous float32 (splits, mpad, npad) tensor on cuda:", dev);
  const long long mreal = out.size(0), creal = out.size(1), taps = out.size(2);
  STD_TORCH_CHECK(mreal <= partial.size(1), "partial has fewer rows than out");
  STD_TORCH_CHECK(creal <= ctot && taps * ctot <= partial.size(2), "partial has fewer columns than taps * ctot");
  const long long total = out.numel();
  if (total == 0) return;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((total + threads - 1) / threads);
  auto stream = current_stream(dev);
  const int s = static_cast<int>(partial.size(0)), mp = static_cast<int>(partial.size(1)), np = static_cast<int>(partial.size(2));
  if (dtype == ScalarType::BFloat16)
    finalize_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(f32(partial), s, mp, np,
        reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), static_cast<int>(mreal), static_cast<int>(creal),
        static_cast<int>(taps), static_cast<int>(ctot));
  else
    finalize_kernel<__half><<<blocks, threads, 0, stream>>>(f32(partial), s, mp, np,
        reinterpret_cast<__half*>(out.data_ptr()), static_cast<int>(mreal), static_cast<int>(creal),
        static_cast<int>(taps), static_cast<int>(ctot));
  check_launch();
}

void pool_silu_backward_cuda(const Tensor& dz, const Tensor& h, const Tensor& z, const Tensor& dskip,
                             const Tensor& dpooled) {
  STD_TORCH_CHECK(dz.is_cuda(), "patch_detailer_pool_silu_backward_: dz must be a CUDA tensor");
  const DeviceIndex dev = dz.get_device_index();
  const auto dtype = dz.scalar_type();
  STD_TORCH_CHECK(dtype == ScalarType::BFloat16 || dtype == ScalarType::Half, "patch_detailer_pool_silu_backward_: dtype must be bfloat16 or float16");
  torch::stable::accelerator::DeviceGuard guard(dev);
  check_view4(dz, "dz", dtype, dev, true);
  check_view4(h, "h", dtype, dev, true);
  check_view4(z, "z", dtype, dev, true);
  check_view4(dskip, "dskip", dtype, dev, true);
  check_view4(dpooled, "dpooled", dtype, dev, true);
  STD_TORCH_CHECK(h.sizes().equals(dz.sizes()) && z.sizes().equals(dz.sizes()) && dskip.sizes().equals(dz.sizes()),
              "dz, h, z and dskip must share one shape");
  STD_TORCH_CHECK(dz.size(1) % 2 == 0 && dz.size(2) % 2 == 0, "the grid must be even");
  STD_TORCH_CHECK(dpooled.size(0) == dz.size(0) && dpooled.size(1) == dz.size(1) / 2 && dpooled.size(2) == dz.size(2) / 2 &&
                  dpooled.size(3) == dz.size(3),
              "dpooled must be (N, H/2, W/2, C), got ", shape(dpooled));
  const long long total = dz.size(0) * (dz.size(1) / 2) * (dz.size(2) / 2) * (dz.size(3) / 8);
  if (total == 0) return;
  const int threads = 128;
  const long long blocks = (total + threads - 1) / threads;
  STD_TORCH_CHECK(blocks < (1LL << 31), "grid too large");
  auto v = [](const Tensor& t) { return View4{t.stride(0), t.stride(1), t.stride(2)}; };
  auto stream = current_stream(dev);
  const int n = static_cast<int>(dz.size(0)), hh = static_cast<int>(dz.size(1) / 2), hw = static_cast<int>(dz.size(2) / 2),
            c = static_cast<int>(dz.size(3));
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    pool_silu_backward_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        reinterpret_cast<T*>(dz.data_ptr()), v(dz), reinterpret_cast<const T*>(h.data_ptr()), v(h),
        reinterpret_cast<const T*>(z.data_ptr()), v(z), reinterpret_cast<const T*>(dskip.data_ptr()), v(dskip),
        reinterpret_cast<const T*>(dpooled.data_ptr()), v(dpooled), n, hh, hw, c);
    check_launch();
  };
  if (dtype == ScalarType::BFloat16)
    run(static_cast<__nv_bfloat16*>(nullptr));
  else
    run(static_cast<__half*>(nullptr));
}

}  // namespace
}  // namespace patch_detailer

STABLE_TORCH_LIBRARY_IMPL(dip_C, CUDA, m) {
  m.impl("patch_detailer_conv_gemm_", TORCH_BOX(&patch_detailer::conv_gemm_cuda));
  m.impl("patch_detailer_wgrad_partial_", TORCH_BOX(&patch_detailer::wgrad_partial_cuda));
  m.impl("patch_detailer_colsum_partial_", TORCH_BOX(&patch_detailer::colsum_partial_cuda));
  m.impl("patch_detailer_grad_finalize_", TORCH_BOX(&patch_detailer::grad_finalize_cuda));
  m.impl("patch_detailer_pool_silu_backward_", TORCH_BOX(&patch_detailer::pool_silu_backward_cuda));
}
