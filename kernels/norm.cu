// RMSNorm and the residual/bias additions around it.

// out[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * w. Launch: grid n_tokens, block 256.
extern "C" __global__ void rmsnorm(const float *__restrict__ x, const float *__restrict__ w,
                                   int dim, float eps, float *__restrict__ out) {
    __shared__ float scratch[WARP];
    const float *xr = x + (size_t)blockIdx.x * dim;
    float *o = out + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    const float scale = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = xr[i] * scale * w[i];
}

// x += y (the residual stream). Launch: grid ceil(n / 256), block 256.
extern "C" __global__ void add_inplace(float *__restrict__ x, const float *__restrict__ y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// y[t, i] += b[i] (Qwen2's Q/K/V biases). Launch: grid ceil(n * dim / 256), block 256.
extern "C" __global__ void add_bias(float *__restrict__ y, const float *__restrict__ b, int dim,
                                    int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n * dim) y[i] += b[i % dim];
}
