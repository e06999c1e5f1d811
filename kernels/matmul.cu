// Y[t, r] = W[r, :] . X[t, :] for every token t and output row r, W in its file format.
//
// Quantised weights meet activations quantised to 8 bits per block of 32 (quantize_q8),
// exactly as the CPU backend and llama.cpp do, so the inner loop is __dp4a on packed
// bytes and the results match the CPU reference up to summation order.
//
// Launch: block (32, 4): one warp per output row, 4 rows per block;
// grid (ceil(rows / 4), ceil(n_tokens / MM_TOKENS)). Each warp reads its weight row once
// per MM_TOKENS tokens: decode (1 token) and batched decode (up to 8) read each weight
// once, which is what the step's speed depends on (it is bandwidth-bound).

#define MM_TOKENS 8
#define MM_ROWS 4

// Activation rows quantised per block of 32: d = amax / 127 (stored rounded to f16),
// s = d * sum(q) (rounded to f16), q = round(x / d). Launch: block 32 (one warp per
// block of 32 values), grid n_tokens * cols / 32.
extern "C" __global__ void quantize_q8(const float *__restrict__ x, int n_blocks_total,
                                       float *__restrict__ qd, float *__restrict__ qs,
                                       i8 *__restrict__ qq) {
    const int b = blockIdx.x;
    if (b >= n_blocks_total) return;
    const int lane = threadIdx.x;
    const float v = x[(size_t)b * QK + lane];
    const float amax = warp_max(fabsf(v));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const int q = (int)roundf(v * id);
    qq[(size_t)b * QK + lane] = (i8)q;
    const int sum = warp_sum_i(q);
    if (lane == 0) {
        const float dh = round_h(d);
        qd[b] = dh;
        qs[b] = round_h(dh * (float)sum);
    }
}

// One lane's share of a 4-bit block: bytes 4k..4k+3 of the nibbles (k = lane % 4), i.e.
// elements 4k..4k+3 (low nibbles) and 16+4k..16+4k+3 (high nibbles).
__device__ __forceinline__ int dot_q4_part(u32 packed, const int *a, int k) {
    const int lo = (int)(packed & 0x0f0f0f0fu);
    const int hi = (int)((packed >> 4) & 0x0f0f0f0fu);
    return __dp4a(hi, a[4 + k], __dp4a(lo, a[k], 0));
}

template <int TY>
__device__ __forceinline__ void mul_mat_q(const u8 *__restrict__ w, int rows, int cols,
                                          const float *__restrict__ qd,
                                          const float *__restrict__ qs,
                                          const i8 *__restrict__ qq, int n_tokens,
                                          float *__restrict__ y) {
    const int lane = threadIdx.x;
    const int r = blockIdx.x * MM_ROWS + threadIdx.y;
    if (r >= rows) return;
    const int t0 = blockIdx.y * MM_TOKENS;
    const int nt = min(MM_TOKENS, n_tokens - t0);
    const int nb = cols / QK;
    const int bytes = TY == TY_Q4_0 ? Q4_0_BYTES : TY == TY_Q4_1 ? Q4_1_BYTES : Q8_0_BYTES;
    const u8 *row = w + (size_t)r * nb * bytes;
    float acc[MM_TOKENS];
#pragma unroll
    for (int t = 0; t < MM_TOKENS; t++) acc[t] = 0.0f;
    // Four lanes per block, eight blocks per pass of the warp.
    const int k = lane % 4;
    for (int b = lane / 4; b < nb; b += WARP / 4) {
        const u8 *blk = row + (size_t)b * bytes;
        const float d = h2f(load_u16(blk));
        if (TY == TY_Q8_0) {
            const u32 w0 = load_u32_a2(blk + 2 + 8 * k);
            const u32 w1 = load_u32_a2(blk + 2 + 8 * k + 4);
#pragma unroll
            for (int t = 0; t < MM_TOKENS; t++) {
                if (t >= nt) break;
                const size_t qb = (size_t)(t0 + t) * nb + b;
                const int *a = (const int *)(qq + qb * QK);
                const int isum = __dp4a((int)w1, a[2 * k + 1], __dp4a((int)w0, a[2 * k], 0));
                acc[t] += d * qd[qb] * (float)isum;
            }
        } else {
            const int off = TY == TY_Q4_0 ? 2 : 4;
            const u32 packed = load_u32_a2(blk + off + 4 * k);
            const float m = TY == TY_Q4_1 ? h2f(load_u16(blk + 2)) : -8.0f * d;
#pragma unroll
            for (int t = 0; t < MM_TOKENS; t++) {
                if (t >= nt) break;
                const size_t qb = (size_t)(t0 + t) * nb + b;
                const int *a = (const int *)(qq + qb * QK);
                const int isum = dot_q4_part(packed, a, k);
                acc[t] += d * qd[qb] * (float)isum;
                // The minimum (Q4_1) or the -8 offset (Q4_0) times the block's sum, once.
                if (k == 0) acc[t] += m * qs[qb];
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MM_TOKENS; t++) {
        if (t >= nt) break;
        const float s = warp_sum(acc[t]);
        if (lane == 0) y[(size_t)(t0 + t) * rows + r] = s;
    }
}

extern "C" __global__ void mul_mat_q4_0(const u8 *w, int rows, int cols, const float *qd,
                                        const float *qs, const i8 *qq, int n_tokens, float *y) {
    mul_mat_q<TY_Q4_0>(w, rows, cols, qd, qs, qq, n_tokens, y);
}

extern "C" __global__ void mul_mat_q4_1(const u8 *w, int rows, int cols, const float *qd,
                                        const float *qs, const i8 *qq, int n_tokens, float *y) {
    mul_mat_q<TY_Q4_1>(w, rows, cols, qd, qs, qq, n_tokens, y);
}

extern "C" __global__ void mul_mat_q8_0(const u8 *w, int rows, int cols, const float *qd,
                                        const float *qs, const i8 *qq, int n_tokens, float *y) {
    mul_mat_q<TY_Q8_0>(w, rows, cols, qd, qs, qq, n_tokens, y);
}

// Float weights (F16, F32) meet float activations. Same launch shape.
template <bool HALF>
__device__ __forceinline__ void mul_mat_float(const u8 *__restrict__ w, int rows, int cols,
                                              const float *__restrict__ x, int n_tokens,
                                              float *__restrict__ y) {
    const int lane = threadIdx.x;
    const int r = blockIdx.x * MM_ROWS + threadIdx.y;
    if (r >= rows) return;
    const int t0 = blockIdx.y * MM_TOKENS;
    const int nt = min(MM_TOKENS, n_tokens - t0);
    float acc[MM_TOKENS];
#pragma unroll
    for (int t = 0; t < MM_TOKENS; t++) acc[t] = 0.0f;
    for (int c = lane; c < cols; c += WARP) {
        const float wv = HALF ? h2f(((const u16 *)w)[(size_t)r * cols + c])
                              : ((const float *)w)[(size_t)r * cols + c];
#pragma unroll
        for (int t = 0; t < MM_TOKENS; t++) {
            if (t >= nt) break;
            acc[t] += wv * x[(size_t)(t0 + t) * cols + c];
        }
    }
#pragma unroll
    for (int t = 0; t < MM_TOKENS; t++) {
        if (t >= nt) break;
        const float s = warp_sum(acc[t]);
        if (lane == 0) y[(size_t)(t0 + t) * rows + r] = s;
    }
}

extern "C" __global__ void mul_mat_f16(const u8 *w, int rows, int cols, const float *x,
                                       int n_tokens, float *y) {
    mul_mat_float<true>(w, rows, cols, x, n_tokens, y);
}

extern "C" __global__ void mul_mat_f32(const u8 *w, int rows, int cols, const float *x,
                                       int n_tokens, float *y) {
    mul_mat_float<false>(w, rows, cols, x, n_tokens, y);
}

// Dequantises a whole matrix to f16 (row-major [rows][cols]) for cuBLAS, which runs the
// prompt-processing GEMMs faster than the kernels above once the batch is large.
// Launch: grid (rows), block 256.
extern "C" __global__ void dequant_f16(const u8 *__restrict__ w, int ty, int rows, int cols,
                                       u16 *__restrict__ out) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const u8 *row = w + (size_t)r * row_bytes(ty, cols);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        out[(size_t)r * cols + c] = f2h(dequant(ty, row, c));
}

// f32 -> f16 for activations fed to cuBLAS. Launch: grid ceil(n / 256), block 256.
extern "C" __global__ void to_f16(const float *__restrict__ x, int n, u16 *__restrict__ out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f2h(x[i]);
}
