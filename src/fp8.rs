//! FP8 e4m3fn weights with 128 x 128 block scales, as DeepSeek ships them.
//!
//! Decoding: `W[r, c] = e4m3(W8[r, c]) * scale_inv[r / B, c / B]` (the "inverse" scale is a
//! multiplier; blocks at the right and bottom edges are partial). e4m3fn has no infinities:
//! exponent bias 7, 3 mantissa bits, subnormals below 2^-6, max 448, 0x7f/0xff are NaN.
//! Encoding (for export and for test checkpoints): per block, a power-of-two scale (DeepSeek's
//! "ue8m0" format) no smaller than amax / 448, then round-to-nearest-even into e4m3.

use std::mem::MaybeUninit;

use rayon::prelude::*;

pub const E4M3_MAX: f32 = 448.0;

/// e4m3fn bit pattern -> f32, written from the format's definition.
pub const fn e4m3_to_f32(bits: u8) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((bits >> 3) & 0x0f) as i32;
    let man = (bits & 0x07) as f32;
    if exp == 0x0f && (bits & 0x07) == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exp == 0 {
        man / 8.0 * (1.0 / 64.0) // subnormal: m/8 * 2^-6
    } else {
        let mut scale = 1.0f32;
        let mut e = exp - 7;
        while e > 0 {
            scale *= 2.0;
            e -= 1;
        }
        while e < 0 {
            scale *= 0.5;
            e += 1;
        }
        (1.0 + man / 8.0) * scale
    };
    sign * magnitude
}

/// All 256 decoded values, so the hot loop is one table lookup per byte.
pub static E4M3_TABLE: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_to_f32(i as u8);
        i += 1;
    }
    t
};

/// f32 -> e4m3fn, round to nearest even, saturating at +-448 (values are pre-scaled into range).
pub fn f32_to_e4m3(x: f32) -> u8 {
    float8::F8E4M3::from_f32(x.clamp(-E4M3_MAX, E4M3_MAX)).to_bits()
}

/// Number of blocks needed to cover `n` elements with blocks of `block`.
pub fn blocks(n: usize, block: usize) -> usize {
    n.div_ceil(block)
}

/// Dequantise a row-major [rows, cols] FP8 matrix with its [ceil(rows/B), ceil(cols/B)] scales,
/// converting each value with `store` (to f32, bf16, ...). Row blocks run in parallel. Every
/// element of `out` is written, so the caller may treat it as initialised afterwards.
///
/// Every element of a block shares one scale, so each block gets a 256-entry table of
/// `store(e4m3(b) * scale)`; the inner loop is then a single lookup per byte, and the result is
/// bit-identical to converting element by element.
pub fn dequantize_into<T: Copy + Send + Sync>(
    w8: &[u8],
    scales: &[f32],
    rows: usize,
    cols: usize,
    block: usize,
    out: &mut [MaybeUninit<T>],
    store: impl Fn(f32) -> T + Sync,
) {
    assert_eq!(w8.len(), rows * cols);
    assert_eq!(out.len(), rows * cols);
    let col_blocks = blocks(cols, block);
    assert_eq!(scales.len(), blocks(rows, block) * col_blocks);
    if cols == 0 {
        return;
    }
    out.par_chunks_mut(block * cols)
        .zip(w8.par_chunks(block * cols))
        .enumerate()
        .for_each(|(rb, (dst, src))| {
            let tables: Vec<[T; 256]> = scales[rb * col_blocks..][..col_blocks]
                .iter()
                .map(|&s| std::array::from_fn(|b| store(E4M3_TABLE[b] * s)))
                .collect();
            for (drow, srow) in dst.chunks_mut(cols).zip(src.chunks(cols)) {
                for ((d, s), table) in drow.chunks_mut(block).zip(srow.chunks(block)).zip(&tables) {
                    for (x, &b) in d.iter_mut().zip(s) {
                        x.write(table[b as usize]);
                    }
                }
            }
        });
}

/// Quantise a row-major [rows, cols] f32 matrix into FP8 bytes and power-of-two block scales.
pub fn quantize(w: &[f32], rows: usize, cols: usize, block: usize) -> (Vec<u8>, Vec<f32>) {
    assert_eq!(w.len(), rows * cols);
    let (rb, cb) = (blocks(rows, block), blocks(cols, block));
    let mut scales = vec![1f32; rb * cb];
    for br in 0..rb {
        for bc in 0..cb {
            let mut amax = 0f32;
            for r in br * block..((br + 1) * block).min(rows) {
                for c in bc * block..((bc + 1) * block).min(cols) {
                    amax = amax.max(w[r * cols + c].abs());
                }
            }
            // Smallest power of two with amax / scale <= 448; an all-zero block keeps scale 1.
            scales[br * cb + bc] = if amax > 0.0 {
                (amax / E4M3_MAX).log2().ceil().exp2()
            } else {
                1.0
            };
        }
    }
    let mut q = vec![0u8; rows * cols];
    q.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(r, dst)| {
            for (c, d) in dst.iter_mut().enumerate() {
                *d = f32_to_e4m3(w[r * cols + c] / scales[(r / block) * cb + c / block]);
            }
        });
    (q, scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_table_matches_the_float8_crate_on_every_finite_pattern() {
        for b in 0..=255u8 {
            let ours = E4M3_TABLE[b as usize];
            let theirs = float8::F8E4M3::from_bits(b).to_f32();
            if theirs.is_nan() {
                assert!(ours.is_nan(), "{b:#x}");
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{b:#x}");
            }
        }
        assert_eq!(E4M3_TABLE[0x7e], 448.0);
        assert_eq!(E4M3_TABLE[0x01], 2f32.powi(-9));
    }

    fn dequantize_vec(
        w8: &[u8],
        scales: &[f32],
        rows: usize,
        cols: usize,
        block: usize,
    ) -> Vec<f32> {
        let mut out = vec![MaybeUninit::uninit(); rows * cols];
        dequantize_into(w8, scales, rows, cols, block, &mut out, |x| x);
        out.into_iter()
            .map(|x| unsafe { x.assume_init() })
            .collect()
    }

    #[test]
    fn dequantize_applies_partial_edge_blocks() {
        // 5 x 3 with block 2: scale grid 3 x 2, the last row and column blocks are partial.
        let (rows, cols, block) = (5, 3, 2);
        let w8: Vec<u8> = (0..15).map(|i| f32_to_e4m3(i as f32 * 0.5)).collect();
        let scales = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0];
        let out = dequantize_vec(&w8, &scales, rows, cols, block);
        for r in 0..rows {
            for c in 0..cols {
                let expect = (r * cols + c) as f32 * 0.5 * scales[(r / 2) * 2 + c / 2];
                assert_eq!(out[r * cols + c], expect, "({r},{c})");
            }
        }
    }

    #[test]
    fn quantize_round_trips_within_e4m3_precision() {
        let (rows, cols) = (130, 257);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.013)
            .collect();
        let (q, s) = quantize(&w, rows, cols, 128);
        assert_eq!(s.len(), 2 * 3);
        assert!(
            s.iter().all(|x| x.log2().fract() == 0.0),
            "scales must be powers of two"
        );
        let back = dequantize_vec(&q, &s, rows, cols, 128);
        for (a, b) in w.iter().zip(&back) {
            // 3 mantissa bits: relative error <= 2^-4, plus the subnormal floor of the block.
            assert!((a - b).abs() <= a.abs() / 16.0 + 1e-3, "{a} vs {b}");
        }
    }
}
