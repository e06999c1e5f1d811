// Rotary position embedding, in place on Q and K rows.
// style 0: adjacent pairs (2i, 2i+1), llama.cpp's Llama layout; style 1: halves (i, i+d/2).
// Launch: grid n_tokens, block 128; threads walk (head, pair) of Q then K.
extern "C" __global__ void rope(float *__restrict__ q, float *__restrict__ k,
                                const int *__restrict__ pos, const float *__restrict__ inv_freq,
                                int n_heads, int n_kv_heads, int head_dim, int rope_pairs,
                                int style) {
    const int t = blockIdx.x;
    const float p = (float)pos[t];
    const int nq = n_heads * rope_pairs;
    const int total = (n_heads + n_kv_heads) * rope_pairs;
    for (int j = threadIdx.x; j < total; j += blockDim.x) {
        const bool is_q = j < nq;
        const int jj = is_q ? j : j - nq;
        const int head = jj / rope_pairs, i = jj % rope_pairs;
        float *v = is_q ? q + ((size_t)t * n_heads + head) * head_dim
                        : k + ((size_t)t * n_kv_heads + head) * head_dim;
        const int a = style == 0 ? 2 * i : i;
        const int b = style == 0 ? 2 * i + 1 : i + rope_pairs;
        float s, c;
        sincosf(p * inv_freq[i], &s, &c);
        const float x0 = v[a], x1 = v[b];
        v[a] = x0 * c - x1 * s;
        v[b] = x0 * s + x1 * c;
    }
}
