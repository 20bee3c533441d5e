//! f32 gradient sums added to in place, a block of rows at a time.
//!
//! A sum over micro-batches, LM-head chunks or query blocks written `sum = sum + g` holds the
//! old sum, g in f32 and the new sum at once (12 bytes per value, plus g in the compute dtype):
//! for the 671B LM head, [129280, 7168], 10.4 GiB beyond the sum itself. A `GradSum` adds g
//! one block of rows (about `BLOCK_VALUES` values) at a time instead: the block of g converted
//! to f32, added to the same rows of the sum, and written back over those rows with
//! `Tensor::slice_set`, which writes into the sum's storage. The extra memory is two f32
//! blocks (the converted block and the block's sum; 64 MiB each), not two whole copies.
//!
//! On the GPU (policy permitting) each block is added in place by one kernel
//! (`kernels::grad_sum`: `sum += f32(g)` into the sum's storage, no copies at all); the candle
//! path above is its plain twin.
//!
//! Numerics: each element gets the one f32 addition `old + f32(g)` of the out-of-place sum, in
//! the same order over the incoming gradients, so the sums are bit for bit the same. The first
//! gradient is copied, not added to zeros (0 + -0 would be +0).
//!
//! Why writing in place is safe: candle tensors share storage (clones, views, `detach`, and
//! `to_dtype` to the dtype a tensor already has all return the same buffer), so a write into
//! a storage someone else holds would change their tensor. A `GradSum` never adopts a tensor
//! it is given: it allocates its own buffer (`Tensor::zeros`, a new storage) and copies into
//! it, writes only into that buffer, and hands it out as a borrow (`as_tensor`, for reading) or
//! for good (`into_tensor`, after which it is no longer a `GradSum` and nothing writes into
//! it). A reader must not keep a clone of the borrowed tensor across a later add; the trainer's
//! readers (the reducer's collectives, the norms and the optimizer step) read after the adds.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};

use crate::grad_rows::RowBlocks;
use crate::kernels::KernelPolicy;

/// Values per block: 2^24, 64 MiB in f32.
pub const BLOCK_VALUES: usize = 1 << 24;

/// An f32 sum of gradients in a buffer this value alone owns.
pub struct GradSum {
    buf: Tensor,
}

impl GradSum {
    /// A sum of zeros of `shape` (a new buffer).
    pub fn zeros(shape: &Shape, device: &Device) -> Result<Self> {
        Ok(Self {
            buf: Tensor::zeros(shape, DType::F32, device)?,
        })
    }

    /// A new sum holding `g`'s values in f32, converted a block of rows at a time (one block:
    /// converted at once, into a buffer of its own).
    pub fn copy_of(
        g: &dyn RowBlocks,
        device: &Device,
        block_values: usize,
        kernels: KernelPolicy,
    ) -> Result<Self> {
        let shape = Shape::from_dims(g.shape());
        if kernels.uses(crate::kernels::Fused::GradSum, device) && shape.rank() > 0 {
            let mut sum = Self::zeros(&shape, device)?;
            sum.take_rows(g, block_values, false, kernels)?;
            return Ok(sum);
        }
        if shape.rank() == 0 || shape.elem_count() <= block_values {
            return Ok(Self {
                buf: owned_f32(g, &shape)?,
            });
        }
        let mut sum = Self::zeros(&shape, device)?;
        sum.take_rows(g, block_values, false, kernels)?;
        Ok(sum)
    }

    /// sum += g, a block of rows at a time (in place).
    pub fn add(
        &mut self,
        g: &dyn RowBlocks,
        block_values: usize,
        kernels: KernelPolicy,
    ) -> Result<()> {
        self.take_rows(g, block_values, true, kernels)
    }

    /// Overwrite rows `start..start + rows of values` with `values` (f32, e.g. a collective's
    /// sum of these rows).
    pub fn write_rows(&mut self, start: usize, values: &Tensor) -> Result<()> {
        let values = values.to_dtype(DType::F32)?.contiguous()?;
        if self.buf.rank() == 0 {
            self.buf = values.reshape(())?.copy()?;
            return Ok(());
        }
        Ok(self.buf.slice_set(&values, 0, start)?)
    }

    /// Overwrite the whole sum, in row-major order, from `flat` (f32, one value per element).
    pub fn write_flat(&mut self, flat: &Tensor) -> Result<()> {
        if flat.elem_count() != self.buf.elem_count() {
            bail!(
                "cannot overwrite a sum of {} values with {}",
                self.buf.elem_count(),
                flat.elem_count()
            );
        }
        let flat = flat.to_dtype(DType::F32)?.contiguous()?;
        // A view of the buffer (the buffer is contiguous, so reshaping shares its storage).
        Ok(self
            .buf
            .flatten_all()?
            .slice_set(&flat.flatten_all()?, 0, 0)?)
    }

    pub fn as_tensor(&self) -> &Tensor {
        &self.buf
    }

    pub fn into_tensor(self) -> Tensor {
        self.buf
    }

    pub fn elem_count(&self) -> usize {
        self.buf.elem_count()
    }

    /// Rows of g a block at a time: added to the sum's rows (`add`) or copied over them.
    fn take_rows(
        &mut self,
        g: &dyn RowBlocks,
        block_values: usize,
        add: bool,
        kernels: KernelPolicy,
    ) -> Result<()> {
        if g.shape() != self.buf.dims() {
            bail!(
                "cannot add a gradient of shape {:?} to a sum of shape {:?}",
                g.shape(),
                self.buf.dims()
            );
        }
        let fused =
            kernels.uses(crate::kernels::Fused::GradSum, self.buf.device()) && self.buf.rank() > 0;
        if !fused && (self.buf.rank() == 0 || self.buf.elem_count() <= block_values) {
            // One block (most tensors): out of place costs one block, and `buf + g` (or the
            // converted copy) is a new buffer that this sum alone holds.
            let part = owned_f32(g, self.buf.shape())?;
            self.buf = if add { (&self.buf + part)? } else { part };
            return Ok(());
        }
        let rows = self.buf.dim(0)?;
        let per_row: usize = self.buf.dims()[1..].iter().product();
        let block = (block_values / per_row.max(1)).max(1);
        for start in (0..rows).step_by(block) {
            let len = block.min(rows - start);
            let part = g.rows(start, len)?.detach();
            if part.dims()[0] != len || part.dims()[1..] != self.buf.dims()[1..] {
                bail!(
                    "a gradient source gave rows of shape {:?} for rows {start}..{} of {:?}",
                    part.dims(),
                    start + len,
                    self.buf.dims()
                );
            }
            let rows_of_sum = self.buf.narrow(0, start, len)?;
            let part = part.contiguous()?;
            if fused && crate::kernels::grad_sum::supported(kernels, &rows_of_sum, &part) {
                crate::kernels::grad_sum::add_into(&rows_of_sum, &part, add).with_context(
                    || format!("adding rows {start}..{} of a gradient sum", start + len),
                )?;
                continue;
            }
            let part = part.to_dtype(DType::F32)?;
            let new = if add {
                (self.buf.narrow(0, start, len)? + part)?
            } else {
                part.contiguous()?
            };
            self.buf.slice_set(&new, 0, start).with_context(|| {
                format!("writing rows {start}..{} of a gradient sum", start + len)
            })?;
        }
        Ok(())
    }
}

/// All of `g` (of `shape`) in f32, in a new buffer nothing else holds.
fn owned_f32(g: &dyn RowBlocks, shape: &Shape) -> Result<Tensor> {
    let rows = if shape.rank() == 0 {
        1
    } else {
        shape.dims()[0]
    };
    let part = g.rows(0, rows)?.detach();
    if part.elem_count() != shape.elem_count() {
        bail!(
            "a gradient source gave {:?} for a sum of shape {:?}",
            part.dims(),
            shape.dims()
        );
    }
    let part = part.reshape(shape)?;
    // to_dtype into the dtype a tensor already has returns that tensor: copy it then.
    Ok(if part.dtype() == DType::F32 {
        part.force_contiguous()?
    } else {
        part.to_dtype(DType::F32)?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    /// The sum as it was written before: the first gradient in f32, then `sum + f32(g)`.
    fn out_of_place(gs: &[Tensor]) -> Tensor {
        let mut sum = gs[0].to_dtype(DType::F32).unwrap();
        for g in &gs[1..] {
            sum = (sum + g.to_dtype(DType::F32).unwrap()).unwrap();
        }
        sum
    }

    #[test]
    fn in_place_block_sums_equal_the_out_of_place_sum_bit_for_bit() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            for rows in [1usize, 97, 1025] {
                for block_values in [1usize, 5 * 3, 64, 1 << 24] {
                    let shape = [rows, 5];
                    // Values of mixed magnitude (rounding matters) and signed zeros.
                    let gs: Vec<Tensor> = (0..4)
                        .map(|i| {
                            let scale = [1.0, 1e-3, 3e4, 1.0][i];
                            let g = crate::rng::randn(&shape, 10 + i as u64, scale, &dev).unwrap();
                            let g = if i == 3 {
                                // Signed zeros (an affine op would turn -0 into +0).
                                g.zeros_like().unwrap().neg().unwrap()
                            } else {
                                g
                            };
                            g.to_dtype(dtype).unwrap()
                        })
                        .collect();
                    let mut sum =
                        GradSum::copy_of(&gs[0], &dev, block_values, KernelPolicy::KERNELS)
                            .unwrap();
                    for g in &gs[1..] {
                        sum.add(g, block_values, KernelPolicy::KERNELS).unwrap();
                    }
                    assert_eq!(
                        bits(sum.as_tensor()),
                        bits(&out_of_place(&gs)),
                        "{dtype:?}, {rows} rows, block {block_values}"
                    );
                    // One gradient: an exact copy, -0 kept.
                    let one = GradSum::copy_of(&gs[3], &dev, block_values, KernelPolicy::KERNELS)
                        .unwrap();
                    assert_eq!(
                        bits(one.as_tensor()),
                        bits(&gs[3].to_dtype(DType::F32).unwrap())
                    );
                }
            }
        }
    }

    #[test]
    fn strided_scalar_and_vector_gradients_add_like_the_out_of_place_sum() {
        let dev = Device::Cpu;
        // A transposed (non-contiguous) gradient, as a matmul backward can give.
        let g = crate::rng::randn(&[7, 33], 1, 1.0, &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .t()
            .unwrap();
        let h = crate::rng::randn(&[33, 7], 2, 1.0, &dev).unwrap();
        let mut sum = GradSum::copy_of(&h, &dev, 8, KernelPolicy::KERNELS).unwrap();
        sum.add(&g, 8, KernelPolicy::KERNELS).unwrap();
        assert_eq!(
            bits(sum.as_tensor()),
            bits(&out_of_place(&[h.clone(), g.clone()]))
        );
        // A vector and a scalar.
        let v = crate::rng::randn(&[1025], 3, 1.0, &dev).unwrap();
        let mut sum = GradSum::copy_of(&v, &dev, 100, KernelPolicy::KERNELS).unwrap();
        sum.add(&v, 100, KernelPolicy::KERNELS).unwrap();
        assert_eq!(
            bits(sum.as_tensor()),
            bits(&out_of_place(&[v.clone(), v.clone()]))
        );
        let s = Tensor::new(1.5f32, &dev).unwrap();
        let mut sum = GradSum::copy_of(&s, &dev, 1, KernelPolicy::KERNELS).unwrap();
        sum.add(&s, 1, KernelPolicy::KERNELS).unwrap();
        assert_eq!(sum.as_tensor().to_scalar::<f32>().unwrap(), 3.0);
    }

    #[test]
    fn the_sum_never_writes_into_the_tensors_it_was_given() {
        let dev = Device::Cpu;
        let g = crate::rng::randn(&[9, 4], 5, 1.0, &dev).unwrap();
        let before = bits(&g);
        // Blocks of 4 values, and one block for the whole tensor (the f32 copy must be a copy).
        for block in [1 << 24, 4] {
            let mut sum = GradSum::copy_of(&g, &dev, block, KernelPolicy::KERNELS).unwrap();
            sum.write_rows(0, &Tensor::ones((9, 4), DType::F32, &dev).unwrap())
                .unwrap();
            assert_eq!(
                bits(&g),
                before,
                "block {block}: the first gradient's storage was written"
            );
        }
        let mut sum = GradSum::copy_of(&g, &dev, 4, KernelPolicy::KERNELS).unwrap();
        sum.add(&g, 4, KernelPolicy::KERNELS).unwrap();
        sum.write_rows(2, &Tensor::ones((3, 4), DType::F32, &dev).unwrap())
            .unwrap();
        assert_eq!(bits(&g), before, "the first gradient's storage was written");
        assert_eq!(
            sum.as_tensor()
                .narrow(0, 2, 3)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![1.0; 12]
        );
        // A clear error for a shape that does not match, not a panic.
        assert!(sum
            .add(
                &Tensor::zeros((9, 5), DType::F32, &dev).unwrap(),
                4,
                KernelPolicy::KERNELS
            )
            .is_err());
        assert!(sum
            .write_flat(&Tensor::zeros(3, DType::F32, &dev).unwrap())
            .is_err());
        sum.write_flat(&Tensor::arange(0f32, 36., &dev).unwrap())
            .unwrap();
        assert_eq!(
            sum.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            (0..36).map(|x| x as f32).collect::<Vec<_>>()
        );
    }
}
