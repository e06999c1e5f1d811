// Causal attention over the paged f16 KV cache, for decode and prompt processing alike:
// every (token, head) attends over its own sequence's positions 0..=pos[t], found through
// the sequence's block table. Numerics follow llama.cpp's (and the CPU backend's): Q is
// rounded to f16 before Q.K, softmax weights are rounded to f16 before they weight V.
//
// Per token: pos[t] (its position), table[t] (offset of its sequence's block table in
// `tables`). The block tables of all sequences in the batch are concatenated in `tables`.

__device__ __forceinline__ size_t kv_slot(const int *tables, int table, int bs, int p) {
    return (size_t)tables[table + p / bs] * bs + p % bs;
}

// Writes each token's K and V rows (f32) into its slot in the layer's cache (f16).
// Launch: grid n_tokens, block 256.
extern "C" __global__ void store_kv(const float *__restrict__ k, const float *__restrict__ v,
                                    const int *__restrict__ pos, const int *__restrict__ table,
                                    const int *__restrict__ tables, int bs, int kv_dim,
                                    u16 *__restrict__ k_cache, u16 *__restrict__ v_cache) {
    const int t = blockIdx.x;
    const size_t s = kv_slot(tables, table[t], bs, pos[t]) * kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        k_cache[s + i] = f2h(k[(size_t)t * kv_dim + i]);
        v_cache[s + i] = f2h(v[(size_t)t * kv_dim + i]);
    }
}

// out[t, h*hd..] = softmax(q . K^T * scale) V for head h of token t.
// Launch: grid (n_heads, n_tokens), block ATT_THREADS, dynamic shared memory
// (max_positions + head_dim) floats.
#define ATT_THREADS 128
extern "C" __global__ void attention(const float *__restrict__ q, const u16 *__restrict__ k_cache,
                                     const u16 *__restrict__ v_cache,
                                     const int *__restrict__ pos, const int *__restrict__ table,
                                     const int *__restrict__ tables, int bs, int n_heads,
                                     int n_kv_heads, int head_dim, float scale,
                                     float *__restrict__ out) {
    extern __shared__ float smem[];
    __shared__ float scratch[WARP];
    float *qh = smem;
    float *scores = smem + head_dim;
    const int h = blockIdx.x, t = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const int kv_dim = n_kv_heads * head_dim;
    const int n = pos[t] + 1;
    const int tb = table[t];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int warps = blockDim.x / WARP;

    for (int i = threadIdx.x; i < head_dim; i += blockDim.x)
        qh[i] = round_h(q[((size_t)t * n_heads + h) * head_dim + i]);
    __syncthreads();

    // Scores: one warp per position, lanes across the head (coalesced f16 reads).
    for (int p = warp; p < n; p += warps) {
        const u16 *kr = k_cache + kv_slot(tables, tb, bs, p) * kv_dim + (size_t)kvh * head_dim;
        float s = 0.0f;
        for (int i = lane; i < head_dim; i += WARP) s += qh[i] * h2f(kr[i]);
        s = warp_sum(s);
        if (lane == 0) scores[p] = s * scale;
    }
    __syncthreads();

    float m = NEG_INF;
    for (int p = threadIdx.x; p < n; p += blockDim.x) m = fmaxf(m, scores[p]);
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int p = threadIdx.x; p < n; p += blockDim.x) {
        const float e = expf(scores[p] - m);
        scores[p] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    for (int p = threadIdx.x; p < n; p += blockDim.x) scores[p] = round_h(scores[p] / sum);
    __syncthreads();

    // Output: threads across the head, positions in order (as the CPU sums them).
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
        float acc = 0.0f;
        for (int p = 0; p < n; p++)
            acc += scores[p] * h2f(v_cache[kv_slot(tables, tb, bs, p) * kv_dim +
                                           (size_t)kvh * head_dim + i]);
        out[((size_t)t * n_heads + h) * head_dim + i] = acc;
    }
}
