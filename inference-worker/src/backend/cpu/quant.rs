//! ggml's block formats (F32, F16, Q4_0, Q4_1, Q8_0) and the dot products the CPU
//! matmul is made of. Like llama.cpp, activations are quantised to 8 bits per block of
//! 32 so that the inner loop is an integer multiply-add; the scalar code is the
//! reference and the AVX2 code (picked at run time) must agree with it.

use half::f16;

/// Elements per quantisation block.
pub const QK: usize = 32;

/// A weight matrix's element type, as far as this backend computes with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum WeightType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// 4-bit, one f16 scale per 32 (value = d * (q - 8)).
    Q4_0,
    /// 4-bit, f16 scale and minimum per 32 (value = d * q + m).
    Q4_1,
    /// 8-bit, one f16 scale per 32.
    Q8_0,
}

impl WeightType {
    /// Every type the backends compute with.
    pub const ALL: [WeightType; 5] = [
        WeightType::F32,
        WeightType::F16,
        WeightType::Q4_0,
        WeightType::Q4_1,
        WeightType::Q8_0,
    ];

    /// The backend type for a GGUF type, `None` when it has no kernel here.
    pub fn from_ggml(t: gguf::GgmlType) -> Option<WeightType> {
        use gguf::GgmlType as G;
        Some(match t {
            G::F32 => WeightType::F32,
            G::F16 => WeightType::F16,
            G::Q4_0 => WeightType::Q4_0,
            G::Q4_1 => WeightType::Q4_1,
            G::Q8_0 => WeightType::Q8_0,
            _ => return None,
        })
    }

    /// Bytes of one row of `n` elements.
    pub fn row_bytes(self, n: usize) -> usize {
        match self {
            WeightType::F32 => 4 * n,
            WeightType::F16 => 2 * n,
            WeightType::Q4_0 => n / QK * 18,
            WeightType::Q4_1 => n / QK * 20,
            WeightType::Q8_0 => n / QK * 34,
        }
    }

    /// Whether rows must be a whole number of blocks.
    pub fn is_quantized(self) -> bool {
        !matches!(self, WeightType::F32 | WeightType::F16)
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Decodes one row of `out.len()` elements.
pub fn dequantize_row(t: WeightType, row: &[u8], out: &mut [f32]) {
    match t {
        WeightType::F32 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        WeightType::F16 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        WeightType::Q4_0 | WeightType::Q4_1 => {
            // The 16 bytes of nibbles follow the block's f16 scale (and minimum).
            let bytes = t.row_bytes(QK);
            let head = bytes - QK / 2;
            for (o, b) in out.chunks_exact_mut(QK).zip(row.chunks_exact(bytes)) {
                let d = f16_at(b, 0);
                let (m, offset) = if t == WeightType::Q4_0 {
                    (0.0, 8.0)
                } else {
                    (f16_at(b, 2), 0.0)
                };
                for j in 0..QK / 2 {
                    let q = b[head + j];
                    o[j] = d * ((q & 0x0f) as f32 - offset) + m;
                    o[j + QK / 2] = d * ((q >> 4) as f32 - offset) + m;
                }
            }
        }
        WeightType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(row.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for j in 0..QK {
                    o[j] = d * (b[2 + j] as i8) as f32;
                }
            }
        }
    }
}

/// Encodes `x` as `t` (what llama.cpp's quantize functions write); used by tests to
/// make synthetic models and by nothing on the serving path.
pub fn quantize_row(t: WeightType, x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(t.row_bytes(x.len()));
    match t {
        WeightType::F32 => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
        WeightType::F16 => x
            .iter()
            .for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        WeightType::Q4_0 => {
            for b in x.chunks_exact(QK) {
                // ggml keeps the sign of the largest-magnitude value: it maps to -8.
                let max = b
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                for j in 0..QK / 2 {
                    let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                    out.push(q(b[j]) | (q(b[j + QK / 2]) << 4));
                }
            }
        }
        WeightType::Q4_1 => {
            for b in x.chunks_exact(QK) {
                let min = b.iter().copied().fold(f32::INFINITY, f32::min);
                let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(f16::from_f32(min).to_le_bytes());
                for j in 0..QK / 2 {
                    let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    out.push(q(b[j]) | (q(b[j + QK / 2]) << 4));
                }
            }
        }
        WeightType::Q8_0 => {
            for b in x.chunks_exact(QK) {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                b.iter()
                    .for_each(|v| out.push((v * id).round() as i8 as u8));
            }
        }
    }
    out
}

/// One activation row quantised to 8 bits per block: scale `d`, `s = d * sum(q)` (what
/// the Q4_1 minimum and the Q4_0 offset multiply), and the quants.
#[derive(Clone, Debug, Default)]
pub struct Q8Row {
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
    pub(super) qs: Vec<i8>,
}

impl Q8Row {
    /// Blocks of 32 quantised.
    pub fn blocks(&self) -> usize {
        self.d.len()
    }

    /// Quantises `x` (a whole number of blocks) into `self`, reusing its storage.
    pub fn quantize_from(&mut self, x: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd::available() {
            // SAFETY: AVX2 was detected; `quantize_with` hands whole blocks.
            return self.quantize_with(x, |b, q| unsafe { simd::quantize_block(b, q) });
        }
        self.quantize_with(x, quantize_block_scalar)
    }

    /// The reference quantiser (tests compare the SIMD one with it).
    pub fn quantize_scalar(&mut self, x: &[f32]) {
        self.quantize_with(x, quantize_block_scalar)
    }

    fn quantize_with(&mut self, x: &[f32], block: impl Fn(&[f32], &mut [i8]) -> (f32, i32)) {
        let n = x.len() / QK;
        self.d.resize(n, 0.0);
        self.s.resize(n, 0.0);
        self.qs.resize(n * QK, 0);
        for (b, x) in x.chunks_exact(QK).enumerate() {
            let (d, sum) = block(x, &mut self.qs[b * QK..(b + 1) * QK]);
            // ggml keeps d and d*sum as f16; rounding them the same way keeps the peer's
            // numerics (the quants themselves use the unrounded scale, as ggml does).
            let d = f16::from_f32(d).to_f32();
            self.d[b] = d;
            self.s[b] = f16::from_f32(d * sum as f32).to_f32();
        }
    }
}

/// One block of 32 to 8 bits: writes the quants, returns the (unrounded) scale and the
/// quants' sum. Rounds half away from zero, as ggml's reference `quantize_row_q8_1_ref`
/// (`roundf`) does and as this worker always has; the SIMD version is bit-identical.
/// (ggml's AVX2 code rounds half to even; exact halves are rare, and on the parity
/// fixture neither rule is closer to llama.cpp than the other.)
fn quantize_block_scalar(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
        sum += *q as i32;
    }
    (d, sum)
}

/// `row · x` for one weight row of type `t`. `q` must hold `x` quantised when `t` is a
/// quantised type (it is ignored otherwise).
#[inline]
pub fn dot(t: WeightType, row: &[u8], x: &[f32], q: &Q8Row) -> f32 {
    match t {
        WeightType::F32 | WeightType::F16 => dot_float(t, row, x),
        _ => {
            #[cfg(target_arch = "x86_64")]
            if simd::available() {
                // SAFETY: the CPU supports AVX2, FMA and F16C (checked above).
                return unsafe { simd::dot_q(t, row, q) };
            }
            dot_q_scalar(t, row, q)
        }
    }
}

fn dot_float(t: WeightType, row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    match t {
        WeightType::F32 => {
            for (i, (c, v)) in row.chunks_exact(4).zip(x).enumerate() {
                acc[i % 8] += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * v;
            }
        }
        _ => {
            for (i, (c, v)) in row.chunks_exact(2).zip(x).enumerate() {
                acc[i % 8] += f16::from_le_bytes([c[0], c[1]]).to_f32() * v;
            }
        }
    }
    acc.iter().sum()
}

/// The reference integer dot product: exactly what the SIMD code computes.
pub fn dot_q_scalar(t: WeightType, row: &[u8], q: &Q8Row) -> f32 {
    let mut sum = 0f32;
    for b in 0..q.d.len() {
        let a = &q.qs[b * QK..(b + 1) * QK];
        match t {
            WeightType::Q4_0 | WeightType::Q4_1 => {
                let bytes = t.row_bytes(QK);
                let blk = &row[b * bytes..(b + 1) * bytes];
                let qs = &blk[bytes - 16..];
                let mut isum = 0i32;
                for j in 0..QK / 2 {
                    isum += (qs[j] & 0x0f) as i32 * a[j] as i32;
                    isum += (qs[j] >> 4) as i32 * a[j + QK / 2] as i32;
                }
                let d = f16_at(blk, 0);
                sum += d * q.d[b] * isum as f32;
                sum += if t == WeightType::Q4_0 {
                    -8.0 * d * q.s[b]
                } else {
                    f16_at(blk, 2) * q.s[b]
                };
            }
            WeightType::Q8_0 => {
                let blk = &row[b * 34..(b + 1) * 34];
                let isum: i32 = (0..QK)
                    .map(|j| (blk[2 + j] as i8) as i32 * a[j] as i32)
                    .sum();
                sum += f16_at(blk, 0) * q.d[b] * isum as f32;
            }
            WeightType::F32 | WeightType::F16 => unreachable!("float rows use dot_float"),
        }
    }
    sum
}

/// Whether the row kernels run AVX2 here (else the scalar reference).
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return simd::available();
    #[allow(unreachable_code)]
    false
}

#[cfg(target_arch = "x86_64")]
pub(super) mod simd {
    use super::{Q8Row, WeightType, QK};
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static AVX2: OnceLock<bool> = OnceLock::new();
        *AVX2.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
                && std::env::var_os("GPUSCALE_NO_SIMD").is_none()
        })
    }

    /// [`super::quantize_block_scalar`] in AVX2, bit for bit.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_block(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
        assert!(x.len() == QK && qs.len() == QK);
        let p = x.as_ptr();
        let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(p.add(o)));
        let sign = _mm256_set1_ps(-0.0);
        let m = v.iter().fold(_mm256_setzero_ps(), |m, &v| {
            _mm256_max_ps(m, _mm256_andnot_ps(sign, v))
        });
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let i = v.map(|v| {
            // roundf: truncate, then step away from zero when the part cut off is at
            // least a half (both steps exact in f32).
            let x = _mm256_mul_ps(v, id);
            let t = _mm256_round_ps(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            let cut = _mm256_andnot_ps(sign, _mm256_sub_ps(x, t));
            let up = _mm256_cmp_ps(cut, _mm256_set1_ps(0.5), _CMP_GE_OQ);
            let step = _mm256_or_ps(_mm256_set1_ps(1.0), _mm256_and_ps(x, sign));
            _mm256_cvtps_epi32(_mm256_add_ps(t, _mm256_and_ps(up, step)))
        });
        let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)));
        // Packing works within 128-bit halves; the permute puts the lanes back in order.
        let packed = _mm256_packs_epi16(
            _mm256_packs_epi32(i[0], i[1]),
            _mm256_packs_epi32(i[2], i[3]),
        );
        let ordered =
            _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, ordered);
        (d, sum)
    }

    /// Sum of the eight i32 lanes of `p` (products of one block) as f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_sum_u8_i8(w: __m256i, a: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(w, a);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    /// The sum of the eight lanes of `v`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::backend::cpu) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Unpacks 16 bytes of nibbles into 32 u8 lanes: low nibbles first, as ggml orders them.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let raw = _mm_loadu_si128(p as *const __m128i);
        let lo = _mm_and_si128(raw, _mm_set1_epi8(0x0f));
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0f));
        _mm256_set_m128i(hi, lo)
    }

    /// f16 at `p` with the F16C instruction (the software conversion costs more than
    /// the block's whole dot product).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half(p: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            u16::from_le_bytes([*p, *p.add(1)]) as i32,
        )))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q(t: WeightType, row: &[u8], q: &Q8Row) -> f32 {
        let mut out = [0f32; 1];
        dot_q_n::<1>(t, row, [q], &mut out);
        out[0]
    }

    /// `row` against `N` activation rows at once: each weight block is unpacked once and
    /// used `N` times, which is what makes prompt processing and batched decode cheaper
    /// per token than single-stream decode.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q_n<const N: usize>(
        t: WeightType,
        row: &[u8],
        qs: [&Q8Row; N],
        out: &mut [f32],
    ) {
        let n = qs[0].d.len();
        let mut acc = [_mm256_setzero_ps(); N];
        let mut extra = [0f32; N];
        let rp = row.as_ptr();
        match t {
            WeightType::Q4_0 | WeightType::Q4_1 => {
                let bytes = t.row_bytes(QK);
                assert!(row.len() >= n * bytes);
                for b in 0..n {
                    let blk = rp.add(b * bytes);
                    let w = nibbles(blk.add(bytes - 16));
                    let d = half(blk);
                    let m = if t == WeightType::Q4_0 {
                        -8.0 * d
                    } else {
                        half(blk.add(2))
                    };
                    for k in 0..N {
                        let q = qs[k];
                        let a = _mm256_loadu_si256(q.qs.as_ptr().add(b * QK) as *const __m256i);
                        acc[k] = _mm256_fmadd_ps(
                            _mm256_set1_ps(d * *q.d.get_unchecked(b)),
                            block_sum_u8_i8(w, a),
                            acc[k],
                        );
                        extra[k] += m * *q.s.get_unchecked(b);
                    }
                }
            }
            WeightType::Q8_0 => {
                assert!(row.len() >= n * 34);
                for b in 0..n {
                    let w = _mm256_loadu_si256(rp.add(b * 34 + 2) as *const __m256i);
                    let d = half(rp.add(b * 34));
                    let aw = _mm256_sign_epi8(w, w);
                    for k in 0..N {
                        let q = qs[k];
                        let a = _mm256_loadu_si256(q.qs.as_ptr().add(b * QK) as *const __m256i);
                        // maddubs wants one unsigned operand: |w| and a carrying w's sign.
                        let p = block_sum_u8_i8(aw, _mm256_sign_epi8(a, w));
                        acc[k] =
                            _mm256_fmadd_ps(_mm256_set1_ps(d * *q.d.get_unchecked(b)), p, acc[k]);
                    }
                }
            }
            WeightType::F32 | WeightType::F16 => unreachable!("float rows use dot_float"),
        }
        for k in 0..N {
            out[k] = hsum(acc[k]) + extra[k];
        }
    }
}

/// `row` against up to four activation rows (`out.len()` of them) at once.
#[inline]
pub fn dot_many(t: WeightType, row: &[u8], x: &[&[f32]], q: &[&Q8Row], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if t.is_quantized() && simd::available() {
        // SAFETY: AVX2, FMA and F16C were detected; every Q8Row covers the row's blocks.
        unsafe {
            match q.len() {
                4 => simd::dot_q_n::<4>(t, row, [q[0], q[1], q[2], q[3]], out),
                3 => simd::dot_q_n::<3>(t, row, [q[0], q[1], q[2]], out),
                2 => simd::dot_q_n::<2>(t, row, [q[0], q[1]], out),
                _ => simd::dot_q_n::<1>(t, row, [q[0]], out),
            }
        }
        return;
    }
    for (k, o) in out.iter_mut().enumerate() {
        *o = dot(t, row, x[k], q[k]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn plain_dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    proptest! {
        /// Every format's dot product matches the f32 dot of the decoded row with x,
        /// within the 8-bit activation rounding; SIMD equals scalar.
        #[test]
        fn dot_matches_decoded_reference(w in prop::collection::vec(-2f32..2.0, 128),
                                         x in prop::collection::vec(-3f32..3.0, 128)) {
            let mut q = Q8Row::default();
            q.quantize_from(&x);
            for t in WeightType::ALL {
                let row = quantize_row(t, &w);
                let mut decoded = vec![0f32; 128];
                dequantize_row(t, &row, &mut decoded);
                let want = plain_dot(&decoded, &x);
                let got = dot(t, &row, &x, &q);
                let scale = decoded.iter().map(|v| v.abs()).sum::<f32>() * 3.0 / 127.0;
                prop_assert!((got - want).abs() <= scale * 0.6 + 1e-3, "{t:?}: {got} vs {want}");
                if t.is_quantized() {
                    let reference = dot_q_scalar(t, &row, &q);
                    prop_assert!((got - reference).abs() <= 1e-3 * (1.0 + reference.abs()), "{t:?} simd {got} scalar {reference}");
                }
            }
        }

        /// The SIMD activation quantiser is bit-identical to the scalar one, ties
        /// included (a block whose largest magnitude is 127 has scale 1, so x.5 values
        /// are exact ties).
        #[test]
        fn simd_quantisation_equals_the_scalar_reference(x in prop::collection::vec(-300i32..300, 64),
                                                         ties in any::<bool>()) {
            let x: Vec<f32> = x.iter().enumerate().map(|(i, v)| match (ties, i % 32) {
                (true, 0) => 127.0,
                (true, _) => (*v % 127) as f32 + 0.5 * (v.signum() as f32),
                (false, _) => *v as f32 / 37.0,
            }).collect();
            let (mut fast, mut reference) = (Q8Row::default(), Q8Row::default());
            fast.quantize_from(&x);
            reference.quantize_scalar(&x);
            prop_assert_eq!(&fast.qs, &reference.qs);
            prop_assert_eq!(&fast.d, &reference.d);
            prop_assert_eq!(&fast.s, &reference.s);
        }

        /// Quantising then decoding stays within half a step of the original.
        #[test]
        fn round_trip_error_is_bounded(w in prop::collection::vec(-4f32..4.0, 64)) {
            for t in WeightType::ALL {
                let mut decoded = vec![0f32; 64];
                dequantize_row(t, &quantize_row(t, &w), &mut decoded);
                for (b, (orig, dec)) in w.chunks(QK).zip(decoded.chunks(QK)).enumerate() {
                    let range = orig.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
                    // Half a step, except Q4_0: ggml maps the largest magnitude to -8, so
                    // the opposite extreme is clamped at +7 and may lose a whole step.
                    let bound = match t { WeightType::F32 => 0.0, WeightType::F16 => range * 5e-4,
                        WeightType::Q8_0 => range / 254.0 * 0.51, WeightType::Q4_0 => range / 16.0,
                        _ => range / 15.0 * 0.51 };
                    for (o, d) in orig.iter().zip(dec) {
                        prop_assert!((o - d).abs() <= bound + 1e-6 + range * 1e-3, "{t:?} block {b}: {o} -> {d}");
                    }
                }
            }
        }
    }

    /// Golden blocks derived by hand from ggml's block layouts (ggml-common.h:
    /// `block_q4_0 { ggml_half d; uint8_t qs[16]; }` with x = (q - 8) * d, low nibbles
    /// the first 16 elements; `block_q4_1 { ggml_half d, m; uint8_t qs[16]; }` with
    /// x = q * d + m, the same nibble order; `block_q8_0 { ggml_half d; int8_t qs[32]; }`
    /// with x = q * d; F16 as IEEE 754 binary16, little-endian). Written as bytes, never
    /// through `quantize_row`, so a layout bug shared by the encoder and the decoder
    /// (which every forward test would pass) fails here.
    fn golden() -> Vec<(WeightType, Vec<u8>, Vec<f32>)> {
        // Q4_0: d = 2.0 (f16 0x4000); byte j = j | (15 - j) << 4.
        let mut q4 = vec![0x00, 0x40];
        q4.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut q4_want: Vec<f32> = (0..16).map(|j| (j as f32 - 8.0) * 2.0).collect();
        q4_want.extend((0..16).map(|j| (7.0 - j as f32) * 2.0));
        // Q4_1: d = 1.0 (f16 0x3c00), m = -3.0 (f16 0xc200); byte j = (15 - j) | j << 4.
        let mut q41 = vec![0x00, 0x3c, 0x00, 0xc2];
        q41.extend((0..16u8).map(|j| (15 - j) | (j << 4)));
        let mut q41_want: Vec<f32> = (0..16).map(|j| 15.0 - j as f32 - 3.0).collect();
        q41_want.extend((0..16).map(|j| j as f32 - 3.0));
        // Q8_0: d = 0.5 (f16 0x3800); q = -128, then j - 16, then 127.
        let q8_q: Vec<i8> = (0..32)
            .map(|j| match j {
                0 => -128,
                31 => 127,
                j => j as i8 - 16,
            })
            .collect();
        let mut q8 = vec![0x00, 0x38];
        q8.extend(q8_q.iter().map(|&q| q as u8));
        let q8_want: Vec<f32> = q8_q.iter().map(|&q| q as f32 * 0.5).collect();
        // F16: 1, -2, 1/3 rounded (0x3555 = 0.333251953125), the largest finite
        // (65504), the smallest subnormal (2^-24), -0, 0.5, -0.25.
        let halves: [(u16, f32); 8] = [
            (0x3c00, 1.0),
            (0xc000, -2.0),
            (0x3555, 0.333_251_95),
            (0x7bff, 65504.0),
            (0x0001, 5.960_464_5e-8),
            (0x8000, -0.0),
            (0x3800, 0.5),
            (0xb400, -0.25),
        ];
        let f16_bytes: Vec<u8> = halves.iter().flat_map(|(h, _)| h.to_le_bytes()).collect();
        let f16_want: Vec<f32> = halves.iter().map(|(_, v)| *v).collect();
        vec![
            (WeightType::Q4_0, q4, q4_want),
            (WeightType::Q4_1, q41, q41_want),
            (WeightType::Q8_0, q8, q8_want),
            (WeightType::F16, f16_bytes, f16_want),
        ]
    }

    #[test]
    fn golden_blocks_decode_to_the_hand_derived_values() {
        for (t, row, want) in golden() {
            let mut out = vec![f32::NAN; want.len()];
            dequantize_row(t, &row, &mut out);
            for (i, (o, w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    o == w && o.is_sign_negative() == w.is_sign_negative(),
                    "{t:?} element {i}: {o} != {w}"
                );
            }
        }
    }

    /// Every element of each golden block, read by the dot kernels (SIMD where the
    /// CPU has it, one and four activation rows at once): an activation that is 127 at
    /// element k and 0 elsewhere quantises exactly (d = 1), so `row · x` is exactly
    /// 127 times element k.
    #[test]
    fn golden_blocks_through_the_dot_kernels_read_every_element_in_place() {
        for (t, row, want) in golden() {
            let n = want.len();
            let (mut xs, mut qs) = (Vec::new(), Vec::new());
            for k in 0..n {
                let mut x = vec![0f32; n.max(QK)];
                x[k] = 127.0;
                let mut q = Q8Row::default();
                q.quantize_from(&x);
                let got = dot(t, &row, &x[..n], &q);
                let expect = 127.0 * want[k];
                assert!(
                    (got - expect).abs() <= expect.abs() * 1e-6,
                    "{t:?} element {k}: dot {got}, want {expect}"
                );
                if t.is_quantized() {
                    assert_eq!(
                        dot_q_scalar(t, &row, &q),
                        expect,
                        "{t:?} scalar, element {k}"
                    );
                }
                xs.push(x);
                qs.push(q);
            }
            for k in (0..n).step_by(4).filter(|k| k + 4 <= n) {
                let x: Vec<&[f32]> = (k..k + 4).map(|i| &xs[i][..n]).collect();
                let q: Vec<&Q8Row> = (k..k + 4).map(|i| &qs[i]).collect();
                let mut out = [0f32; 4];
                dot_many(t, &row, &x, &q, &mut out);
                for (i, o) in out.iter().enumerate() {
                    let expect = 127.0 * want[k + i];
                    assert!(
                        (o - expect).abs() <= expect.abs() * 1e-6,
                        "{t:?} element {}: four-row dot {o}, want {expect}",
                        k + i
                    );
                }
            }
        }
    }

    #[test]
    fn ggml_layout_low_nibbles_are_the_first_half() {
        // d = 1.0 (f16 0x3c00), m = 0: byte j holds elements j (low) and j+16 (high).
        let mut row = vec![0x00, 0x3c, 0x00, 0x00];
        row.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = [0f32; 32];
        dequantize_row(WeightType::Q4_1, &row, &mut out);
        assert_eq!(out[0], 0.0);
        assert_eq!(out[15], 15.0);
        assert_eq!(out[16], 15.0);
        assert_eq!(out[31], 0.0);
    }
}
