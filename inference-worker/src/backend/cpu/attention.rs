//! Causal attention for one (token, head) over the paged f16 KV cache, and the f16
//! vector operations it is made of: F16C and FMA where the CPU has them (the `half`
//! crate's slice conversion plus a separate dot cost more than the matmuls at decode).

use half::f16;
use half::slice::HalfFloatSliceExt;

/// One head's keys and values: a layer's cache, the sequence's block table, and where
/// the head lies within a slot.
pub(super) struct Head<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub blocks: &'a [u32],
    pub block_size: usize,
    pub kv_dim: usize,
    pub offset: usize,
}

impl Head<'_> {
    /// Where positions 0..n of the head lie in the cache, block by block (a division
    /// per position, as `slot` does, cost a third of attention at decode).
    fn positions(&self, n: usize) -> impl Iterator<Item = usize> + '_ {
        let (bs, kvd, offset) = (self.block_size, self.kv_dim, self.offset);
        self.blocks
            .iter()
            .flat_map(move |&b| (0..bs).map(move |j| (b as usize * bs + j) * kvd + offset))
            .take(n)
    }

    /// `out` = softmax(q · K[0..=pos] × scale) · V[0..=pos].
    pub fn attend(&self, q: &[f32], pos: usize, scale: f32, out: &mut [f32]) {
        let hd = out.len();
        // Q meets the f16 cache at f16 precision, as in llama.cpp.
        let qh: Vec<f32> = q.iter().map(|v| f16::from_f32(*v).to_f32()).collect();
        let mut scores: Vec<f32> = self
            .positions(pos + 1)
            .map(|at| dot_f16(&qh, &self.k[at..][..hd]) * scale)
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        scores.iter_mut().for_each(|s| {
            *s = (*s - max).exp();
            sum += *s;
        });
        out.fill(0.0);
        for (at, w) in self.positions(pos + 1).zip(&scores) {
            // The weights meet V at f16 precision, as in llama.cpp.
            let w = f16::from_f32(w / sum).to_f32();
            axpy_f16(out, w, &self.v[at..][..hd]);
        }
    }
}

/// `a · b`.
pub fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if super::quant::simd_available() {
        // SAFETY: AVX2, FMA and F16C were detected; the lengths are equal.
        return unsafe { simd::dot_f16(a, b) };
    }
    let mut bf = vec![0f32; b.len()];
    b.convert_to_f32_slice(&mut bf);
    a.iter().zip(&bf).map(|(x, y)| x * y).sum()
}

/// `out += w * v`.
pub fn axpy_f16(out: &mut [f32], w: f32, v: &[f16]) {
    assert_eq!(out.len(), v.len());
    #[cfg(target_arch = "x86_64")]
    if super::quant::simd_available() {
        // SAFETY: AVX2, FMA and F16C were detected; the lengths are equal.
        return unsafe { simd::axpy_f16(out, w, v) };
    }
    for (o, v) in out.iter_mut().zip(v) {
        *o += w * v.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use half::f16;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
        let whole = a.len() / 8 * 8;
        // Two chains of fused multiply-adds, so each waits on the other's latency less.
        let mut acc = [_mm256_setzero_ps(); 2];
        for (j, i) in (0..whole).step_by(8).enumerate() {
            let x = _mm256_loadu_ps(a.as_ptr().add(i));
            acc[j & 1] = _mm256_fmadd_ps(x, load8(b.as_ptr().add(i)), acc[j & 1]);
        }
        let tail: f32 = (whole..a.len()).map(|i| a[i] * b[i].to_f32()).sum();
        super::super::quant::simd::hsum(_mm256_add_ps(acc[0], acc[1])) + tail
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_f16(out: &mut [f32], w: f32, v: &[f16]) {
        let whole = out.len() / 8 * 8;
        let wv = _mm256_set1_ps(w);
        for i in (0..whole).step_by(8) {
            let o = out.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                o,
                _mm256_fmadd_ps(wv, load8(v.as_ptr().add(i)), _mm256_loadu_ps(o)),
            );
        }
        for i in whole..out.len() {
            out[i] += w * v[i].to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The f16 dot and axpy agree with f32 arithmetic on the converted values, for
        /// lengths with and without a tail.
        #[test]
        fn f16_vector_ops_match_f32(a in prop::collection::vec(-4f32..4.0, 1..150),
                                    w in -2f32..2.0) {
            let n = a.len();
            let b: Vec<f16> = a.iter().rev().map(|v| f16::from_f32(v * 0.7)).collect();
            let bf: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
            let want: f32 = a.iter().zip(&bf).map(|(x, y)| x * y).sum();
            let magnitude: f32 = a.iter().zip(&bf).map(|(x, y)| (x * y).abs()).sum();
            let got = dot_f16(&a, &b);
            prop_assert!((got - want).abs() <= 1e-5 * (1.0 + magnitude), "dot {got} want {want}");
            let mut out = a.clone();
            axpy_f16(&mut out, w, &b);
            for i in 0..n {
                let want = a[i] + w * bf[i];
                prop_assert!((out[i] - want).abs() <= 1e-6 * (1.0 + want.abs()), "axpy {i}: {} want {want}", out[i]);
            }
        }
    }
}
