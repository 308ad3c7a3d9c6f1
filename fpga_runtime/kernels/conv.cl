// Implicit-GEMM convolution over NHWC tensors with a fused epilogue (bias, residual add, ReLU).
//
// GEMM view: rows m = output pixels (n, oy, ox), columns = output channels, reduction k = (ky, kx, ci).
// A 1x1 stride-1 convolution is therefore a plain GEMM over contiguous NHWC rows; 3x3 and 7x7
// convolutions walk the KH*KW taps and, per tap, the contiguous channel run of each input pixel, so
// no im2col buffer is ever written. Taps that fall into the zero padding read from a buffer of zeros
// instead of branching inside the inner loop.
//
// Register blocking: one work-item owns an MR x VW block of the output (MR pixels, VW channels) and
// keeps it in MR vector accumulators for the whole reduction. Weights are packed offline as
// [Cout/VW][K][VW] so that each k step is one contiguous vector load. No local memory: on CPUs (PoCL)
// local-memory tiling measured 5-10x slower than register blocking, and the same source still runs
// on GPUs.
//
// Compile-time constants (-D): MR rows per work-item, VW vector width (4, 8 or 16) and one of
// PREC_FP32, PREC_FP16, PREC_INT8. Plain a*b+c on purpose: fma()/mad() builtins were 3-5x slower
// on PoCL (contraction still happens with -cl-mad-enable).

// common.cl (macros, activation storage type, FPGA attributes) is prepended by the host.

#if defined(PREC_INT8)
  typedef char a_t;
  typedef char w_t;
  #define ACC_V intV
  #define ACC_ZERO ((intV)(0))
  #define LOAD_A(p, i) ((int)(p)[i])
  #define LOAD_W(p) CONVERT(int, VW)(VLOAD(VW)(0, (p)))
  #define MAC(acc, a, w) ((acc) += (a) * (w))
#elif defined(PREC_FP16)
  typedef half a_t;
  typedef half w_t;
  #define ACC_V floatV
  #define ACC_ZERO ((floatV)(0.0f))
  #define LOAD_A(p, i) vload_half((i), (p))
  #define LOAD_W(p) VLOAD_HALF(VW)(0, (p))
  #define MAC(acc, a, w) ((acc) = (a) * (w) + (acc))
#else
  typedef float a_t;
  typedef float w_t;
  #define ACC_V floatV
  #define ACC_ZERO ((floatV)(0.0f))
  #define LOAD_A(p, i) ((p)[i])
  #define LOAD_W(p) VLOAD(VW)(0, (p))
  #define MAC(acc, a, w) ((acc) = (a) * (w) + (acc))
#endif

#define FLAG_RESIDUAL 1
#define FLAG_RELU 2

FPGA_KERNEL_ATTRS
__kernel void conv_gemm(__global const a_t* restrict in,      // [N, H, W, Cin]
                        __global const w_t* restrict wpack,   // [Cout/VW, KH*KW*Cin, VW]
                        __global const float* restrict bias,  // [Cout]
                        __global const float* restrict scale, // [Cout] dequantisation (int8 only)
                        __global const act_t* restrict res,   // [N, OH, OW, Cout] when FLAG_RESIDUAL
                        __global act_t* restrict out,         // [N, OH, OW, Cout]
                        __global const a_t* restrict zeros,   // >= Cin zeros, read by padding taps
                        const int H, const int W, const int Cin,
                        const int OH, const int OW, const int Cout,
                        const int KH, const int KW, const int stride, const int pad,
                        const int M, const int flags)
{
    const int m0 = get_global_id(0) * MR;
    const int panel = get_global_id(1);
    if (m0 >= M) return;
    const int K = KH * KW * Cin;
    const int ohw = OH * OW;

    // Output pixel coordinates of this block's rows; rows past M repeat the last one (never stored).
    int oy[MR], ox[MR], nb[MR];
    #pragma unroll
    for (int r = 0; r < MR; ++r) {
        const int m = min(m0 + r, M - 1);
        nb[r] = m / ohw;
        const int rem = m - nb[r] * ohw;
        oy[r] = rem / OW;
        ox[r] = rem - oy[r] * OW;
    }

    ACC_V acc[MR];
    #pragma unroll
    for (int r = 0; r < MR; ++r) acc[r] = ACC_ZERO;

    __global const w_t* wp = wpack + (size_t)panel * K * VW;
    for (int ky = 0; ky < KH; ++ky) {
        for (int kx = 0; kx < KW; ++kx) {
            __global const a_t* ap[MR];
            #pragma unroll
            for (int r = 0; r < MR; ++r) {
                const int iy = oy[r] * stride - pad + ky;
                const int ix = ox[r] * stride - pad + kx;
                const bool inside = iy >= 0 && iy < H && ix >= 0 && ix < W;
                ap[r] = inside ? in + ((size_t)(nb[r] * H + iy) * W + ix) * Cin : zeros;
            }
            for (int c = 0; c < Cin; ++c) {
                const ACC_V w = LOAD_W(wp);
                wp += VW;
                #pragma unroll
                for (int r = 0; r < MR; ++r) MAC(acc[r], LOAD_A(ap[r], c), w);
            }
        }
    }

    const int n0 = panel * VW;
    floatV b = VLOAD(VW)(0, bias + n0);
#if defined(PREC_INT8)
    const floatV s = VLOAD(VW)(0, scale + n0);
#endif
    #pragma unroll
    for (int r = 0; r < MR; ++r) {
        const int m = m0 + r;
        if (m < M) {
#if defined(PREC_INT8)
            floatV v = CONVERT(float, VW)(acc[r]) * s + b;
#else
            floatV v = acc[r] + b;
#endif
            const size_t o = (size_t)m * Cout + n0;
            if (flags & FLAG_RESIDUAL) v += LOAD_ACT_V(res, o);
            if (flags & FLAG_RELU) v = fmax(v, (floatV)(0.0f));
            STORE_ACT_V(v, out, o);
        }
    }
}
