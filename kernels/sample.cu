// Choosing the next token on the device, so only one int per sequence crosses the bus.
// Launch both: grid n_rows, block SAMPLE_THREADS.
#define SAMPLE_THREADS 256

// Greedy: the index of the largest logit (the last one on ties, as the CPU sampler's
// max_by picks).
extern "C" __global__ void argmax(const float *__restrict__ logits, int vocab, int *__restrict__ out) {
    __shared__ float best_v[SAMPLE_THREADS];
    __shared__ int best_i[SAMPLE_THREADS];
    const float *l = logits + (size_t)blockIdx.x * vocab;
    float bv = NEG_INF;
    int bi = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (l[i] >= bv) { bv = l[i]; bi = i; }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            const float ov = best_v[threadIdx.x + s];
            const int oi = best_i[threadIdx.x + s];
            if (ov > best_v[threadIdx.x] || (ov == best_v[threadIdx.x] && oi > best_i[threadIdx.x])) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = best_i[0];
}

// Top-p (nucleus) sampling at a temperature, without sorting the vocabulary: bisect for
// the probability threshold whose tokens hold at least top_p of the mass (the nucleus a
// sort would keep, up to ties at the threshold), then pick within it with the uniform u.
// temperature[row] > 0, top_p[row] in (0, 1], u[row] in [0, 1).
extern "C" __global__ void sample_top_p(const float *__restrict__ logits, int vocab,
                                        const float *__restrict__ temperature,
                                        const float *__restrict__ top_p,
                                        const float *__restrict__ u, int *__restrict__ out) {
    __shared__ float scratch[WARP];
    __shared__ float prefix[SAMPLE_THREADS];
    const int row = blockIdx.x;
    const float *l = logits + (size_t)row * vocab;
    const float inv_t = 1.0f / temperature[row];
    float m = NEG_INF;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, l[i]);
    m = block_max(m, scratch);
    float z = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) z += expf((l[i] - m) * inv_t);
    z = block_sum(z, scratch);
    // Largest threshold (unnormalised probability; the top token has 1) whose kept mass
    // still reaches top_p * z.
    const float want = top_p[row] * z;
    float lo = 0.0f, hi = 1.0f;
    for (int it = 0; it < 24; it++) {
        const float mid = 0.5f * (lo + hi);
        float mass = 0.0f;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float p = expf((l[i] - m) * inv_t);
            if (p >= mid) mass += p;
        }
        mass = block_sum(mass, scratch);
        if (mass >= want) lo = mid; else hi = mid;
    }
    // Contiguous chunk per thread so a prefix over threads orders the kept tokens by id.
    const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
    const int begin = threadIdx.x * chunk, end = min(vocab, begin + chunk);
    float mine = 0.0f;
    for (int i = begin; i < end; i++) {
        const float p = expf((l[i] - m) * inv_t);
        if (p >= lo) mine += p;
    }
    prefix[threadIdx.x] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
        float acc = 0.0f;
        for (int i = 0; i < blockDim.x; i++) { const float v = prefix[i]; prefix[i] = acc; acc += v; }
        scratch[0] = acc;
        out[row] = -1;
    }
    __syncthreads();
    const float target = u[row] * scratch[0];
    if (target >= prefix[threadIdx.x] && target < prefix[threadIdx.x] + mine) {
        float acc = prefix[threadIdx.x];
        int pick = -1;
        for (int i = begin; i < end; i++) {
            const float p = expf((l[i] - m) * inv_t);
            if (p < lo) continue;
            pick = i;
            acc += p;
            if (acc > target) break;
        }
        out[row] = pick;
    }
    __syncthreads();
    // Rounding can leave the target just past the last kept token: take the top token.
    if (threadIdx.x == 0 && out[row] < 0) {
        for (int i = 0; i < vocab; i++) if (l[i] == m) { out[row] = i; break; }
    }
}
