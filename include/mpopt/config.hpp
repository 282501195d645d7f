// mpopt: configuration macros shared by every layer.
#pragma once

#define MPOPT_VERSION_MAJOR 0
#define MPOPT_VERSION_MINOR 1
#define MPOPT_VERSION_PATCH 0
#define MPOPT_VERSION (MPOPT_VERSION_MAJOR * 10000 + MPOPT_VERSION_MINOR * 100 + MPOPT_VERSION_PATCH)

// Keyed on __CUDACC__ so the same headers compile under g++ (host only) and nvcc (host + device).
#if defined(__CUDACC__)
#define MPOPT_HOST_DEVICE __host__ __device__
#define MPOPT_DEVICE __device__
#define MPOPT_KERNEL __global__
#define MPOPT_FORCEINLINE __forceinline__
#else
#define MPOPT_HOST_DEVICE
#define MPOPT_DEVICE
#define MPOPT_KERNEL
#if defined(__GNUC__) || defined(__clang__)
#define MPOPT_FORCEINLINE inline __attribute__((always_inline))
#else
#define MPOPT_FORCEINLINE inline
#endif
#endif

// True while compiling device code (the device pass of nvcc).
#if defined(__CUDA_ARCH__)
#define MPOPT_IS_DEVICE_CODE 1
#else
#define MPOPT_IS_DEVICE_CODE 0
#endif

// Asks the compiler to vectorise the next loop (its pointers are restrict): no OpenMP simd, whose per-lane
// privatised arrays GCC 12 then fails to vectorise.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define MPOPT_PRAGMA_VECTORIZE _Pragma("GCC ivdep")
#else
#define MPOPT_PRAGMA_VECTORIZE
#endif
