// The binary functions of kiln_core::ops::ElementwiseKind, F::apply(a, b) on f32: the
// element-wise and GLU kernels (elementwise.cu) and the resident mat-vec fused with a
// GLU (matvec.cu) compute each the same way.
#pragma once
#include "common.cuh"

namespace kiln {

struct Add {
    static __device__ __forceinline__ float apply(float a, float b) { return a + b; }
};

struct Mul {
    static __device__ __forceinline__ float apply(float a, float b) { return a * b; }
};

// silu(a) * b, silu(a) = a / (1 + exp(-a)).
struct SiluMul {
    static __device__ __forceinline__ float apply(float a, float b) {
        return a / (1.0f + expf(-a)) * b;
    }
};

// gelu(a) * b with the tanh approximation of gelu, evaluated as a * sigmoid(2u)
// (equal to 0.5 a (1 + tanh(u)), without its cancellation for negative a).
struct GeluMul {
    static __device__ __forceinline__ float apply(float a, float b) {
        const float sqrt_2_over_pi = 0.7978845608028654f;
        const float inner = sqrt_2_over_pi * (a + 0.044715f * a * a * a);
        return a / (1.0f + expf(-2.0f * inner)) * b;
    }
};

// sigmoid(a) * b, sigmoid(a) = 1 / (1 + exp(-a)): a gate a on b.
struct SigmoidMul {
    static __device__ __forceinline__ float apply(float a, float b) {
        return b / (1.0f + expf(-a));
    }
};

}  // namespace kiln
