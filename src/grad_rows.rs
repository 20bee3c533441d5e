//! Gradients of large weight tensors, produced a block of rows at a time.
//!
//! candle's backward builds a weight's whole gradient in the compute dtype, and for a matmul
//! or an index-select it holds three whole copies at once: the product, the zeros its gradient
//! store starts from, and their sum. For the 671B LM head and embedding ([129280, 7168],
//! 0.93B values each) that is 5.2 GiB in bf16 beside the f32 sum the trainer keeps. The
//! sources here give the same gradient rows `start..start + len` on demand, so that
//! `train::accumulate` adds it into that f32 sum with one block in memory at a time.

use candle_core::{DType, Result, Tensor};

/// A gradient of shape `shape()` that can be produced a block of rows (dim 0) at a time.
pub trait RowBlocks {
    fn shape(&self) -> &[usize];
    /// Rows `start..start + len` of the gradient, [len, shape[1..]], in any float dtype.
    fn rows(&self, start: usize, len: usize) -> Result<Tensor>;
}

/// A tensor that already exists is its own source (a view of its rows).
impl RowBlocks for Tensor {
    fn shape(&self) -> &[usize] {
        self.dims()
    }

    fn rows(&self, start: usize, len: usize) -> Result<Tensor> {
        if self.rank() == 0 {
            return Ok(self.clone());
        }
        self.narrow(0, start, len)
    }
}

/// The weight gradient of `y = x W^T` (W [out, in], as `ops::linear` computes it), given the
/// layer's input `x` [n, in] and the gradient `dy` [n, out] of its output: dW = dy^T x, whose
/// rows are the output features. The LM head's `out` is the vocabulary.
///
/// Numerics: rows `start..start + len` are `(x^T dy[:, start..start + len])^T`, candle's own
/// matmul backward (`lhs^T grad`, then transposed) restricted to those output columns: each
/// element is the same dot product over the n rows, in x's dtype, accumulated by the matmul
/// kernel. The kernel may group the n terms differently for a block of columns than for all of
/// them, so a block agrees with the whole product to the dtype's rounding, not necessarily bit
/// for bit (`a_linear_weight_gradient_by_rows_equals_candles_backward` bounds it).
pub struct LinearWeightGrad {
    x: Tensor,
    dy: Tensor,
    shape: [usize; 2],
}

impl LinearWeightGrad {
    pub fn new(x: &Tensor, dy: &Tensor) -> Result<Self> {
        let (n, inner) = x.dims2()?;
        let (m, out) = dy.dims2()?;
        if n != m {
            candle_core::bail!("a linear weight gradient needs as many input rows as output-gradient rows ({n} vs {m})");
        }
        Ok(Self {
            x: x.detach(),
            dy: dy.detach(),
            shape: [out, inner],
        })
    }
}

impl RowBlocks for LinearWeightGrad {
    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn rows(&self, start: usize, len: usize) -> Result<Tensor> {
        // A block of dy's columns, copied so that every matmul backend takes it (cuBLAS needs
        // a leading dimension equal to the row length): n x len values.
        let dy = self.dy.narrow(1, start, len)?.contiguous()?;
        self.x.t()?.matmul(&dy)?.t()
    }
}

/// The gradient of an embedding table E [vocab, dim] for `h = E[ids]` (one index-select of
/// rows), given dh [n, dim]: dE[v] = sum of dh[p] over the positions p with ids[p] = v.
///
/// Numerics: each row of a block sums, in f32 and in position order, the rows of dh (cast to
/// E's dtype, as the backward of the trainer's f32 surrogate casts it) whose token it is,
/// rounded once to E's dtype (`rows::RowPlan`: one parallel pass, no serial index_add on the
/// GPU); rows no token hits are +0. In f32 that is candle's index-select backward bit for bit
/// (the same additions from zero in the same order); in bf16 candle rounds after every
/// addition, this only once.
pub struct EmbeddingGrad {
    /// (token, position), sorted by token and, for one token, by position.
    by_token: Vec<(u32, u32)>,
    dh: Tensor,
    shape: [usize; 2],
    kernels: crate::kernels::KernelPolicy,
}

impl EmbeddingGrad {
    /// `ids` the n token ids (host copy), `dh` [n, dim] the gradient of the looked-up rows,
    /// `vocab` the table's rows, `dtype` the table's dtype; the row sums run the kernel or its
    /// twin as `kernels` says.
    pub fn new(
        kernels: crate::kernels::KernelPolicy,
        ids: &[u32],
        dh: &Tensor,
        vocab: usize,
        dtype: DType,
    ) -> Result<Self> {
        let (n, dim) = dh.dims2()?;
        if ids.len() != n {
            candle_core::bail!(
                "an embedding gradient needs one token id per gradient row ({} ids, {n} rows)",
                ids.len()
            );
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            candle_core::bail!("token id {bad} is outside the embedding table of {vocab} rows");
        }
        let mut by_token: Vec<(u32, u32)> = ids
            .iter()
            .enumerate()
            .map(|(p, &id)| (id, p as u32))
            .collect();
        by_token.sort_unstable(); // (token, position) pairs are distinct: a total order
        Ok(Self {
            by_token,
            dh: dh.detach().to_dtype(dtype)?.contiguous()?,
            shape: [vocab, dim],
            kernels,
        })
    }
}

impl RowBlocks for EmbeddingGrad {
    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn rows(&self, start: usize, len: usize) -> Result<Tensor> {
        let dev = self.dh.device();
        let lo = self
            .by_token
            .partition_point(|&(id, _)| (id as usize) < start);
        let hi = self
            .by_token
            .partition_point(|&(id, _)| (id as usize) < start + len);
        // The block's groups straight from the (token, position) order: row r of the block sums
        // the positions of token start + r, read from dh where they are (no gathered copy).
        let pairs = &self.by_token[lo..hi];
        let mut off = vec![0u32; len + 1];
        pairs
            .iter()
            .for_each(|&(id, _)| off[id as usize - start + 1] += 1);
        for r in 0..len {
            off[r + 1] += off[r];
        }
        let src: Vec<u32> = pairs.iter().map(|&(_, p)| p).collect();
        crate::rows::RowPlan::sums(src, off, self.dh.dim(0)?, dev)?.apply(self.kernels, &self.dh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    fn all_rows(src: &dyn RowBlocks, block: usize) -> Tensor {
        let rows = src.shape()[0];
        let parts: Vec<Tensor> = (0..rows)
            .step_by(block)
            .map(|s| src.rows(s, block.min(rows - s)).unwrap())
            .collect();
        Tensor::cat(&parts, 0).unwrap()
    }

    #[test]
    fn an_embedding_gradient_by_rows_is_the_index_select_backward_summed_in_f32() {
        let dev = Device::Cpu;
        let (vocab, dim, n) = (97, 6, 300);
        // Repeated tokens (so rows sum several terms and bf16 rounds in between), unused rows.
        let ids: Vec<u32> = (0..n as u32)
            .map(|i| (i * 37 + i / 7) % 61 + (i % 3) * 11)
            .collect();
        for dtype in [DType::F32, DType::BF16] {
            let table = Var::from_tensor(
                &crate::rng::randn(&[vocab, dim], 3, 1.0, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let dh = crate::rng::randn(&[n, dim], 4, 1.0, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let idx = Tensor::new(ids.as_slice(), &dev).unwrap();
            let out = table.as_tensor().index_select(&idx, 0).unwrap();
            // The trainer's surrogate: sum(out * dh) in f32.
            let loss = (out.to_dtype(DType::F32).unwrap() * dh.to_dtype(DType::F32).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let want = loss
                .backward()
                .unwrap()
                .get(table.as_tensor())
                .unwrap()
                .clone();
            // bf16: the same sums taken in f32 (candle's backward of an f32 table) and rounded once.
            let want = if dtype == DType::F32 {
                want
            } else {
                let t32 =
                    Var::from_tensor(&table.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
                let out = t32.as_tensor().index_select(&idx, 0).unwrap();
                let loss = (out * dh.to_dtype(DType::F32).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap();
                loss.backward()
                    .unwrap()
                    .get(t32.as_tensor())
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let src = EmbeddingGrad::new(
                crate::kernels::KernelPolicy::default(),
                &ids,
                &dh,
                vocab,
                dtype,
            )
            .unwrap();
            for block in [1, 10, 30, 97] {
                assert_eq!(
                    bits(&all_rows(&src, block)),
                    bits(&want),
                    "{dtype:?}, block {block}"
                );
            }
        }
        let dh = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        assert!(EmbeddingGrad::new(
            crate::kernels::KernelPolicy::default(),
            &[1, 5],
            &dh,
            4,
            DType::F32
        )
        .is_err());
        assert!(EmbeddingGrad::new(
            crate::kernels::KernelPolicy::default(),
            &[1],
            &dh,
            4,
            DType::F32
        )
        .is_err());
    }

    #[test]
    fn a_linear_weight_gradient_by_rows_equals_candles_backward() {
        let dev = Device::Cpu;
        let (n, inner, out) = (600, 64, 300);
        for dtype in [DType::F32, DType::BF16] {
            let x = crate::rng::randn(&[n, inner], 5, 1.0, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let w = Var::from_tensor(
                &crate::rng::randn(&[out, inner], 6, 1.0, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let dy = crate::rng::randn(&[n, out], 7, 1.0, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let y = crate::ops::linear(&x, w.as_tensor()).unwrap();
            let loss = (y.to_dtype(DType::F32).unwrap() * dy.to_dtype(DType::F32).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let want = loss
                .backward()
                .unwrap()
                .get(w.as_tensor())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let src = LinearWeightGrad::new(&x, &dy).unwrap();
            for block in [1, 77, 300] {
                let got = all_rows(&src, block).to_dtype(DType::F32).unwrap();
                let diff = (&got - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let scale = want
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                // The dtype's rounding (bf16: 2^-8 of the largest value; f32: the sum of 600
                // products grouped differently, as a one-column block is by the CPU kernel).
                let tol = if dtype == DType::BF16 {
                    scale / 256.0
                } else {
                    scale * 1e-5
                };
                assert!(
                    diff <= tol,
                    "{dtype:?}, block {block}: max diff {diff} (max |dW| {scale})"
                );
            }
        }
        assert!(LinearWeightGrad::new(
            &Tensor::zeros((3, 2), DType::F32, &dev).unwrap(),
            &Tensor::zeros((4, 5), DType::F32, &dev).unwrap()
        )
        .is_err());
    }
}
