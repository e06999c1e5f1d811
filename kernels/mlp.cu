// The SiLU-gated MLP's elementwise part: gate = silu(gate) * up. (The three projections
// around it are matmuls.) Launch: grid ceil(n / 256), block 256.
extern "C" __global__ void silu_mul(float *__restrict__ gate, const float *__restrict__ up, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}
