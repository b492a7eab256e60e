// VQ_HD marks a function that compiles for the host (g++) and, under nvcc, for CUDA threads too:
// the core helpers the device codecs share with the CPU code (one definition for both).
#pragma once

#if defined(__CUDACC__)
#define VQ_HD __host__ __device__ inline
#else
#define VQ_HD inline
#endif
