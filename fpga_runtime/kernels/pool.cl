// Pooling, the fully connected head and the activation quantisers, all over NHWC tensors.
// These layers are memory-bound and small next to the convolutions, so they are written for
// clarity: one work-item per output element.

FPGA_KERNEL_ATTRS
__kernel void maxpool(__global const act_t* restrict in,  // [N, H, W, C]
                      __global act_t* restrict out,       // [N, OH, OW, C]
                      const int H, const int W, const int C, const int OH, const int OW,
                      const int K, const int stride, const int pad)
{
    const int p = get_global_id(0);  // output pixel (n, oy, ox)
    const int c = get_global_id(1);
    const int n = p / (OH * OW);
    const int oy = (p / OW) % OH;
    const int ox = p % OW;
    float m = -INFINITY;
    for (int ky = 0; ky < K; ++ky) {
        const int iy = oy * stride - pad + ky;
        if (iy < 0 || iy >= H) continue;
        for (int kx = 0; kx < K; ++kx) {
            const int ix = ox * stride - pad + kx;
            if (ix < 0 || ix >= W) continue;
            m = fmax(m, LOAD_ACT(in, ((size_t)(n * H + iy) * W + ix) * C + c));
        }
    }
    STORE_ACT(m, out, (size_t)p * C + c);
}

FPGA_KERNEL_ATTRS
__kernel void global_avgpool(__global const act_t* restrict in,  // [N, HW, C]
                             __global float* restrict out,       // [N, C]
                             const int HW, const int C)
{
    const int n = get_global_id(0);
    const int c = get_global_id(1);
    float s = 0.0f;
    for (int i = 0; i < HW; ++i) s += LOAD_ACT(in, ((size_t)n * HW + i) * C + c);
    out[n * C + c] = s / (float)HW;
}

FPGA_KERNEL_ATTRS
__kernel void linear(__global const float* restrict in,  // [N, C]
                     __global const float* restrict w,   // [J, C]
                     __global const float* restrict b,   // [J]
                     __global float* restrict out,       // [N, J]
                     const int C, const int J)
{
    const int n = get_global_id(0);
    const int j = get_global_id(1);
    float s = 0.0f;
    for (int c = 0; c < C; ++c) s = in[n * C + c] * w[j * C + c] + s;
    out[n * J + j] = s + b[j];
}

// int8: symmetric per-tensor activation scale, round half to even, saturate to [-127, 127].
FPGA_KERNEL_ATTRS
__kernel void quantize_int8(__global const float* restrict in, __global char* restrict out,
                            const float inv_scale)
{
    const size_t i = get_global_id(0);
    out[i] = (char)clamp(rint(in[i] * inv_scale), -127.0f, 127.0f);
}

// bfp8 (Brainwave-style block floating point): every run of BLOCK consecutive channels of a pixel
// shares one exponent; each value keeps an 8-bit signed mantissa. Writes a rounded copy (the fp32
// original may still be needed as a residual), so the fp32 GEMM then computes exactly on the narrow
// values: products of 8-bit mantissas and power-of-two steps are exact in fp32.
FPGA_KERNEL_ATTRS
__kernel void bfp8_round(__global const float* restrict in, __global float* restrict out,
                         const int C, const int BLOCK)
{
    const int p = get_global_id(0);   // pixel
    const int b = get_global_id(1);   // block within the pixel
    const int c0 = b * BLOCK;
    const int c1 = min(c0 + BLOCK, C);
    __global const float* v = in + (size_t)p * C;
    __global float* o = out + (size_t)p * C;
    float amax = 0.0f;
    for (int c = c0; c < c1; ++c) amax = fmax(amax, fabs(v[c]));
    if (amax == 0.0f) {
        for (int c = c0; c < c1; ++c) o[c] = 0.0f;
        return;
    }
    int e;
    frexp(amax, &e);                         // amax = f * 2^e, 0.5 <= f < 1
    const float step = ldexp(1.0f, e - 7);   // 7 magnitude bits + sign
    for (int c = c0; c < c1; ++c) o[c] = clamp(rint(v[c] / step), -127.0f, 127.0f) * step;
}
