// Embedding lookup: x[t, :] = dequant(E[token[t], :]). Launch: grid n_tokens, block 256.
extern "C" __global__ void embed(const u8 *__restrict__ e, int ty, int dim,
                                 const int *__restrict__ tokens, float *__restrict__ x) {
    const int t = blockIdx.x;
    const u8 *row = e + (size_t)tokens[t] * row_bytes(ty, dim);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) x[(size_t)t * dim + i] = dequant(ty, row, i);
}

// out[i, :] = x[idx[i], :] (the rows whose logits were asked for).
// Launch: grid n_out, block 256.
extern "C" __global__ void gather_rows(const float *__restrict__ x, const int *__restrict__ idx,
                                       int dim, float *__restrict__ out) {
    const float *src = x + (size_t)idx[blockIdx.x] * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[(size_t)blockIdx.x * dim + i] = src[i];
}
