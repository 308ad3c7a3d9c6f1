// Shared macros for every kernel file. The host prepends this file to the others and passes the
// tile sizes and the precision as -D options, so one source text serves CPUs, GPUs and FPGA offline
// compilers.

#ifndef MR
#define MR 8
#endif
#ifndef VW
#define VW 16
#endif

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define VLOAD(n) CAT(vload, n)
#define VSTORE(n) CAT(vstore, n)
#define VLOAD_HALF(n) CAT(vload_half, n)
#define VSTORE_HALF(n) CAT(vstore_half, n)
#define CONVERT(t, n) CAT(convert_, CAT(t, n))
#define floatV CAT(float, VW)
#define intV CAT(int, VW)

// Activations between layers: half in fp16 mode, float otherwise. vload_half/vstore_half are core
// OpenCL 1.2, so the half *storage* path compiles everywhere; arithmetic is always fp32 (a product
// of two halfs is exact in fp32).
#if defined(PREC_FP16)
  typedef half act_t;
  #define LOAD_ACT(p, i) vload_half((i), (p))
  #define STORE_ACT(v, p, i) vstore_half((v), (i), (p))
  #define LOAD_ACT_V(p, o) VLOAD_HALF(VW)(0, (p) + (o))
  #define STORE_ACT_V(v, p, o) VSTORE_HALF(VW)((v), 0, (p) + (o))
#else
  typedef float act_t;
  #define LOAD_ACT(p, i) ((p)[i])
  #define STORE_ACT(v, p, i) ((p)[i] = (v))
  #define LOAD_ACT_V(p, o) VLOAD(VW)(0, (p) + (o))
  #define STORE_ACT_V(v, p, o) VSTORE(VW)((v), 0, (p) + (o))
#endif

// FPGA offline compilers want fixed work-group shapes; CPUs and GPUs must not get them, because the
// host chooses work-group sizes per layer there.
#if defined(FPGA_INTEL)
  #define FPGA_KERNEL_ATTRS __attribute__((reqd_work_group_size(1, 1, 1))) __attribute__((max_global_work_dim(2)))
#elif defined(FPGA_XILINX)
  #define FPGA_KERNEL_ATTRS __attribute__((reqd_work_group_size(1, 1, 1)))
#else
  #define FPGA_KERNEL_ATTRS
#endif
