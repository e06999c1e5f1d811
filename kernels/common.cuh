// Shared by every kernel file (the worker prepends it before NVRTC compiles a file, so
// no include paths or CUDA headers are needed: NVRTC alone compiles all of kernels/).
//
// Conventions:
// - activations are f32, row-major [token][feature];
// - weights are the GGUF bytes as they are in the file (ggml block layouts below);
// - the KV cache is f16 (stored as unsigned short), paged: slot = table[pos / bs] * bs + pos % bs;
// - halves are converted with PTX cvt instructions (round-to-nearest-even, as the CPU
//   backend's `half` crate does), so numerics match the CPU reference.

#define QK 32
#define WARP 32
#define NEG_INF __int_as_float(0xff800000)

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef signed char i8;

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// f32 -> f16 -> f32: the rounding llama.cpp applies where it stores halves.
__device__ __forceinline__ float round_h(float f) { return h2f(f2h(f)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ int warp_sum_i(int v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum; every thread gets the result. `scratch` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int warps = (blockDim.x + WARP - 1) / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = 0.0f;
    for (int i = 0; i < warps; i++) t += scratch[i];
    return t;
}

__device__ __forceinline__ float block_max(float v, float *scratch) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int warps = (blockDim.x + WARP - 1) / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = NEG_INF;
    for (int i = 0; i < warps; i++) t = fmaxf(t, scratch[i]);
    return t;
}

// ggml block layouts (bytes): Q4_0 = f16 d, 16 B nibbles (18 B);
// Q4_1 = f16 d, f16 m, 16 B nibbles (20 B); Q8_0 = f16 d, 32 i8 (34 B).
// Element j < 16 of a 4-bit block is the low nibble of byte j, element j + 16 the high one.
#define Q4_0_BYTES 18
#define Q4_1_BYTES 20
#define Q8_0_BYTES 34

// Weight type codes, as the Rust side passes them.
#define TY_F32 0
#define TY_F16 1
#define TY_Q4_0 2
#define TY_Q4_1 3
#define TY_Q8_0 4

// A u32 from a 2-byte aligned address (block fields are only 2-byte aligned).
__device__ __forceinline__ u32 load_u32_a2(const u8 *p) {
    const u16 *h = (const u16 *)p;
    return (u32)h[0] | ((u32)h[1] << 16);
}

__device__ __forceinline__ u16 load_u16(const u8 *p) { return *(const u16 *)p; }

// Element `i` of a row of type `ty`, dequantised (embedding lookup, reference paths).
__device__ __forceinline__ float dequant(int ty, const u8 *row, int i) {
    switch (ty) {
    case TY_F32: return ((const float *)row)[i];
    case TY_F16: return h2f(((const u16 *)row)[i]);
    case TY_Q4_0: {
        const u8 *b = row + (i / QK) * Q4_0_BYTES;
        const int j = i % QK;
        const u8 q = b[2 + (j % 16)];
        const int n = j < 16 ? (q & 0x0f) : (q >> 4);
        return h2f(load_u16(b)) * (float)(n - 8);
    }
    case TY_Q4_1: {
        const u8 *b = row + (i / QK) * Q4_1_BYTES;
        const int j = i % QK;
        const u8 q = b[4 + (j % 16)];
        const int n = j < 16 ? (q & 0x0f) : (q >> 4);
        return h2f(load_u16(b)) * (float)n + h2f(load_u16(b + 2));
    }
    default: {
        const u8 *b = row + (i / QK) * Q8_0_BYTES;
        return h2f(load_u16(b)) * (float)(i8)b[2 + i % QK];
    }
    }
}

__device__ __forceinline__ size_t row_bytes(int ty, int cols) {
    switch (ty) {
    case TY_F32: return (size_t)cols * 4;
    case TY_F16: return (size_t)cols * 2;
    case TY_Q4_0: return (size_t)(cols / QK) * Q4_0_BYTES;
    case TY_Q4_1: return (size_t)(cols / QK) * Q4_1_BYTES;
    default: return (size_t)(cols / QK) * Q8_0_BYTES;
    }
}
