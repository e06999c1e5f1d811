//! Weights repacked at load into tiles of four rows, for the AVX-512 VNNI kernels.
//!
//! ggml stores a quantised matrix row after row. A kernel that reads one row at a time
//! converts each block's f16 scale in scalar code, loads the activations' block once per
//! row, and ends every row with a horizontal sum. Interleaving four rows block by block
//! (as llama.cpp's CPU "repack" buffers do, `ggml-cpu/repack.cpp`) lets one 64-byte load
//! bring the same block of four rows, one instruction convert their four scales, and one
//! broadcast of the activations' block feed all four rows through `vpdpbusd` (u8 x i8
//! products summed into i32 lanes). A tile holds exactly the bytes of its four rows:
//!
//! | type | block `b` of a tile (rows `4g..4g+4`) |
//! |---|---|
//! | Q4_0 | `d[4]` (f16), `qs[4][16]` |
//! | Q4_1 | `d[4]`, `m[4]` (f16), `qs[4][16]` |
//! | Q8_0 | `d[4]`, `qs[4][0..16]`, `qs[4][16..32]` |
//!
//! so each 128-bit lane of a 512-bit load is one row: for Q4 its low nibbles are the
//! block's elements 0..16 and its high nibbles 16..32 (ggml's order). A matrix whose row
//! count is not a multiple of four is padded with rows of zeros, which compute to 0.

use super::quant::{Q8Row, WeightType, QK};

/// Rows per tile.
pub const TILE: usize = 4;

/// Bytes of one ggml block of `ty`, and of its header (the f16 scale, and the minimum
/// for Q4_1) before the quants.
fn block_layout(ty: WeightType) -> (usize, usize) {
    let bytes = ty.row_bytes(QK);
    let quants = if ty == WeightType::Q8_0 { QK } else { QK / 2 };
    (bytes, bytes - quants)
}

/// A quantised matrix in four-row tiles (see the module comment).
pub struct Packed {
    ty: WeightType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl Packed {
    /// Whether `t` has a tile layout (the quantised types).
    pub fn supports(t: WeightType) -> bool {
        matches!(t, WeightType::Q4_0 | WeightType::Q4_1 | WeightType::Q8_0)
    }

    /// Repacks `rows` ggml rows of `cols` elements (`src`, row after row).
    pub fn pack(ty: WeightType, rows: usize, cols: usize, src: &[u8]) -> Packed {
        assert!(Self::supports(ty), "{ty:?} has no tile layout");
        let rb = ty.row_bytes(cols);
        assert_eq!(src.len(), rows * rb, "{rows} rows of {cols} {ty:?}");
        let (nb, (bb, head)) = (cols / QK, block_layout(ty));
        let tiles = rows.div_ceil(TILE);
        let mut data = vec![0u8; tiles * TILE * rb];
        for g in 0..tiles {
            for b in 0..nb {
                let dst = &mut data[(g * nb + b) * TILE * bb..][..TILE * bb];
                for i in (0..TILE).filter(|i| g * TILE + i < rows) {
                    let blk = &src[(g * TILE + i) * rb + b * bb..][..bb];
                    // The scale (and minimum) halves, row i's of four.
                    for h in 0..head / 2 {
                        dst[h * 2 * TILE + i * 2..][..2].copy_from_slice(&blk[h * 2..][..2]);
                    }
                    let qs = &blk[head..];
                    let out = &mut dst[head * TILE..];
                    match ty {
                        WeightType::Q8_0 => {
                            out[i * 16..][..16].copy_from_slice(&qs[..16]);
                            out[(TILE + i) * 16..][..16].copy_from_slice(&qs[16..]);
                        }
                        _ => out[i * 16..][..16].copy_from_slice(qs),
                    }
                }
            }
        }
        Packed {
            ty,
            rows,
            cols,
            data,
        }
    }

    /// The rows of `parts` one after another, as one matrix; `Err` gives the parts back
    /// unless they share type and width and every part but the last fills its last
    /// tile.
    pub fn concat(parts: Vec<Packed>) -> Result<Packed, Vec<Packed>> {
        let first = &parts[0];
        let fits = parts
            .iter()
            .all(|p| p.ty == first.ty && p.cols == first.cols)
            && parts[..parts.len() - 1]
                .iter()
                .all(|p| p.rows.is_multiple_of(TILE));
        if !fits {
            return Err(parts);
        }
        let (ty, cols) = (first.ty, first.cols);
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        parts
            .into_iter()
            .for_each(|p| data.extend_from_slice(&p.data));
        Ok(Packed {
            ty,
            rows,
            cols,
            data,
        })
    }

    /// Row `r` in ggml's layout again (the inverse of [`Packed::pack`]).
    pub fn unpack_row(&self, r: usize) -> Vec<u8> {
        let (nb, (bb, head)) = (self.cols / QK, block_layout(self.ty));
        let (g, i) = (r / TILE, r % TILE);
        let mut out = Vec::with_capacity(nb * bb);
        for b in 0..nb {
            let src = &self.data[(g * nb + b) * TILE * bb..][..TILE * bb];
            for h in 0..head / 2 {
                out.extend_from_slice(&src[h * 2 * TILE + i * 2..][..2]);
            }
            let qs = &src[head * TILE..];
            match self.ty {
                WeightType::Q8_0 => {
                    out.extend_from_slice(&qs[i * 16..][..16]);
                    out.extend_from_slice(&qs[(TILE + i) * 16..][..16]);
                }
                _ => out.extend_from_slice(&qs[i * 16..][..16]),
            }
        }
        out
    }

    /// Rows (without the padding).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Tiles, the last one possibly padded.
    pub fn tiles(&self) -> usize {
        self.rows.div_ceil(TILE)
    }

    fn tile(&self, g: usize) -> &[u8] {
        let n = TILE * self.ty.row_bytes(self.cols);
        &self.data[g * n..(g + 1) * n]
    }

    /// `out[k][i]` = row `TILE * g + i` · activation row `k`, for up to eight activation
    /// rows (`qs.len()`), each unpacked weight block used by all of them.
    pub fn dot_tile(&self, g: usize, qs: &[&Q8Row], out: &mut [[f32; TILE]]) {
        let tile = self.tile(g);
        assert!(qs.iter().all(|q| q.blocks() == self.cols / QK) && out.len() >= qs.len());
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            // SAFETY: the CPU has the features (checked above); every activation row
            // covers the tile's blocks (asserted above).
            unsafe {
                macro_rules! n {
                    ($($n:literal)*) => {
                        match qs.len() {
                            $($n => avx512::dot_tile::<$n>(self.ty, tile, qs.try_into().unwrap(), out),)*
                            n => unreachable!("{n} activation rows per tile call"),
                        }
                    };
                }
                n!(1 2 3 4 5 6 7 8);
            }
            return;
        }
        self.dot_tile_scalar(g, qs, out)
    }

    /// The reference for [`Packed::dot_tile`]: the rows unpacked, through
    /// [`super::quant::dot_q_scalar`].
    pub fn dot_tile_scalar(&self, g: usize, qs: &[&Q8Row], out: &mut [[f32; TILE]]) {
        let rows: Vec<Vec<u8>> = (0..TILE).map(|i| self.unpack_row(g * TILE + i)).collect();
        for (o, q) in out.iter_mut().zip(qs) {
            for (v, row) in o.iter_mut().zip(&rows) {
                *v = super::quant::dot_q_scalar(self.ty, row, q);
            }
        }
    }
}

/// Whether this CPU runs the tile kernels (AVX-512 F/BW/VL with VNNI, F16C, FMA).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return avx512::available();
    #[allow(unreachable_code)]
    false
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Q8Row, WeightType, QK, TILE};
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static YES: OnceLock<bool> = OnceLock::new();
        *YES.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("f16c")
                && is_x86_feature_detected!("fma")
                && std::env::var_os("GPUSCALE_NO_SIMD").is_none()
        })
    }

    /// Four f16 at `p` as four f32.
    #[inline]
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn halves4(p: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_loadl_epi64(p as *const __m128i))
    }

    /// The `N` activation rows against one tile; see [`super::Packed::dot_tile`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma,sse3")]
    pub unsafe fn dot_tile<const N: usize>(
        ty: WeightType,
        tile: &[u8],
        qs: [&Q8Row; N],
        out: &mut [[f32; TILE]],
    ) {
        let bb = TILE * ty.row_bytes(QK);
        let nb = tile.len() / bb;
        // Where a tile block's quants begin: after the four rows' headers.
        let quants = TILE * super::block_layout(ty).1;
        let p0 = tile.as_ptr();
        // Lane j of the 16 gets row j / 4's scale.
        let spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        let nib = _mm512_set1_epi8(0x0f);
        // Two accumulator chains (even and odd blocks) when few activation rows give
        // few independent chains: each block's multiply-add otherwise waits for the last.
        let chains = if N <= 4 { 2 } else { 1 };
        let mut acc = [[_mm512_setzero_ps(); N]; 2];
        // Per row: the Q4_1 minimum (or Q4_0's -8 d) times the activations' d * sum.
        let mut extra = [[_mm_setzero_ps(); N]; 2];
        for b in 0..nb {
            let c = b % chains;
            let p = p0.add(b * bb);
            let d4 = halves4(p);
            let d16 = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(d4));
            // The weights, ready for vpdpbusd (unsigned x signed): Q4 nibbles are
            // unsigned already; Q8_0 is split into |w| and the sign to put on the
            // activations, as ggml's AVX2 code does with `sign_epi8`.
            let (w0, w1, neg0, neg1, m4) = match ty {
                WeightType::Q8_0 => {
                    let r0 = _mm512_loadu_si512(p.add(quants) as *const _);
                    let r1 = _mm512_loadu_si512(p.add(quants + 64) as *const _);
                    (
                        _mm512_abs_epi8(r0),
                        _mm512_abs_epi8(r1),
                        _mm512_movepi8_mask(r0),
                        _mm512_movepi8_mask(r1),
                        _mm_setzero_ps(),
                    )
                }
                _ => {
                    // Q4_1's four minimums follow the four scales.
                    let m4 = match ty {
                        WeightType::Q4_1 => halves4(p.add(2 * TILE)),
                        _ => _mm_mul_ps(d4, _mm_set1_ps(-8.0)),
                    };
                    let raw = _mm512_loadu_si512(p.add(quants) as *const _);
                    let lo = _mm512_and_si512(raw, nib);
                    let hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nib);
                    (lo, hi, 0, 0, m4)
                }
            };
            for k in 0..N {
                let q = qs[k];
                let a = q.qs.as_ptr().add(b * QK);
                let mut a0 = _mm512_broadcast_i32x4(_mm_loadu_si128(a as *const __m128i));
                let mut a1 = _mm512_broadcast_i32x4(_mm_loadu_si128(a.add(16) as *const __m128i));
                if ty == WeightType::Q8_0 {
                    let zero = _mm512_setzero_si512();
                    a0 = _mm512_mask_sub_epi8(a0, neg0, zero, a0);
                    a1 = _mm512_mask_sub_epi8(a1, neg1, zero, a1);
                }
                let isum = _mm512_dpbusd_epi32(
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, a0),
                    w1,
                    a1,
                );
                let da = *q.d.get_unchecked(b);
                acc[c][k] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(isum),
                    _mm512_mul_ps(d16, _mm512_set1_ps(da)),
                    acc[c][k],
                );
                if ty != WeightType::Q8_0 {
                    let s = _mm_set1_ps(*q.s.get_unchecked(b));
                    extra[c][k] = _mm_fmadd_ps(m4, s, extra[c][k]);
                }
            }
        }
        for k in 0..N {
            // Lanes 4i..4i+4 are row i's partial sums.
            let a = _mm512_add_ps(acc[0][k], acc[1][k]);
            let r0 = _mm512_extractf32x4_ps::<0>(a);
            let r1 = _mm512_extractf32x4_ps::<1>(a);
            let r2 = _mm512_extractf32x4_ps::<2>(a);
            let r3 = _mm512_extractf32x4_ps::<3>(a);
            let sums = _mm_hadd_ps(_mm_hadd_ps(r0, r1), _mm_hadd_ps(r2, r3));
            let extra = _mm_add_ps(extra[0][k], extra[1][k]);
            _mm_storeu_ps(out[k].as_mut_ptr(), _mm_add_ps(sums, extra));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::quant::quantize_row;
    use super::*;
    use proptest::prelude::*;

    fn matrix(t: WeightType, rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let mut s = seed.wrapping_mul(2654435761).max(1);
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 500.0 - 2.0
        };
        (0..rows)
            .flat_map(|_| quantize_row(t, &(0..cols).map(|_| next()).collect::<Vec<_>>()))
            .collect()
    }

    proptest! {
        /// Packing and unpacking gives back every row's bytes, for row counts that do
        /// and do not fill the last tile.
        #[test]
        fn unpack_inverts_pack(rows in 1usize..11, blocks in 1usize..5, seed in 1u32..1000) {
            let cols = blocks * QK;
            for t in [WeightType::Q4_0, WeightType::Q4_1, WeightType::Q8_0] {
                let src = matrix(t, rows, cols, seed);
                let p = Packed::pack(t, rows, cols, &src);
                let rb = t.row_bytes(cols);
                for r in 0..rows {
                    prop_assert_eq!(p.unpack_row(r), src[r * rb..(r + 1) * rb].to_vec(), "{:?} row {}", t, r);
                }
            }
        }

        /// Matrices concatenated hold each part's rows in order; a part that leaves
        /// its last tile part-filled is refused (its padding would sit mid-matrix).
        #[test]
        fn concat_keeps_every_row_in_order(rows in prop::collection::vec(1usize..9, 1..4),
                                           seed in 1u32..1000) {
            let (t, cols) = (WeightType::Q4_1, 2 * QK);
            let srcs: Vec<Vec<u8>> = rows.iter().enumerate()
                .map(|(i, r)| matrix(t, *r, cols, seed + i as u32)).collect();
            let parts = rows.iter().zip(&srcs).map(|(r, s)| Packed::pack(t, *r, cols, s)).collect();
            let whole = rows[..rows.len() - 1].iter().all(|r| r % TILE == 0);
            match Packed::concat(parts) {
                Ok(p) => {
                    prop_assert!(whole);
                    let all: Vec<u8> = srcs.concat();
                    let rb = t.row_bytes(cols);
                    prop_assert_eq!(p.rows(), rows.iter().sum::<usize>());
                    for r in 0..p.rows() {
                        prop_assert_eq!(p.unpack_row(r), all[r * rb..(r + 1) * rb].to_vec());
                    }
                }
                Err(back) => {
                    prop_assert!(!whole);
                    prop_assert_eq!(back.len(), rows.len());
                }
            }
        }

        /// The tile kernel (AVX-512 VNNI where the CPU has it) equals the scalar
        /// reference on the ggml rows, for one to eight activation rows.
        #[test]
        fn the_tile_kernel_matches_the_scalar_rows(rows in 1usize..9, blocks in 1usize..7,
                                                   n in 1usize..9, seed in 1u32..1000) {
            let cols = blocks * QK;
            let xs: Vec<Q8Row> = (0..n).map(|k| {
                let x: Vec<f32> = matrix(WeightType::F32, 1, cols, seed + 7 * k as u32)
                    .chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                let mut q = Q8Row::default();
                q.quantize_from(&x);
                q
            }).collect();
            let qs: Vec<&Q8Row> = xs.iter().collect();
            for t in [WeightType::Q4_0, WeightType::Q4_1, WeightType::Q8_0] {
                let src = matrix(t, rows, cols, seed);
                let p = Packed::pack(t, rows, cols, &src);
                let rb = t.row_bytes(cols);
                for g in 0..p.tiles() {
                    let mut out = [[f32::NAN; TILE]; 8];
                    p.dot_tile(g, &qs, &mut out);
                    for (k, q) in qs.iter().enumerate() {
                        for (i, &got) in out[k].iter().enumerate() {
                            let r = g * TILE + i;
                            let want = if r < rows {
                                super::super::quant::dot_q_scalar(t, &src[r * rb..(r + 1) * rb], q)
                            } else {
                                0.0
                            };
                            prop_assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{:?} row {} activation {}: tile {} scalar {}", t, r, k, got, want);
                        }
                    }
                }
            }
        }
    }
}
