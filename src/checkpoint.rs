//! Reading a Hugging Face safetensors checkpoint: `model.safetensors.index.json` plus
//! memory-mapped shards (or a single `model.safetensors`), one tensor at a time, on request.
//!
//! Only the tensors asked for are decoded, so a rank can later read just its experts. Each
//! shard's header is parsed and bounds-checked when the shard is first touched; every error
//! names the tensor and the file.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;

use crate::fp8;

/// Suffix of the f32 block scales that accompany an FP8 weight.
pub const SCALE_SUFFIX: &str = "_scale_inv";
/// DeepSeek's FP8 block edge.
pub const FP8_BLOCK: usize = 128;

/// Element types we read (safetensors' spelling in `StDtype::name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StDtype {
    F8E4M3,
    BF16,
    F16,
    F32,
}

impl StDtype {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F8_E4M3" => Self::F8E4M3,
            "BF16" => Self::BF16,
            "F16" => Self::F16,
            "F32" => Self::F32,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F8E4M3 => "F8_E4M3",
            Self::BF16 => "BF16",
            Self::F16 => "F16",
            Self::F32 => "F32",
        }
    }
    pub fn size(self) -> usize {
        match self {
            Self::F8E4M3 => 1,
            Self::BF16 | Self::F16 => 2,
            Self::F32 => 4,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    /// Absolute byte range inside the shard file.
    range: std::ops::Range<usize>,
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    tensors: HashMap<String, TensorInfo>,
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let file =
            File::open(path).with_context(|| format!("cannot open shard {}", path.display()))?;
        // SAFETY: the map is read-only and lives as long as the Shard. Checkpoints are not
        // modified while a run reads them; a file truncated underneath us would be a user error
        // that the bounds checks below cannot catch, as with any memory-mapped reader.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let tensors = parse_header(&mmap, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            tensors,
        })
    }

    fn bytes(&self, info: &TensorInfo) -> &[u8] {
        // Map the tensor's pages in one call rather than faulting them in one by one; only this
        // tensor's range, so a rank that reads a few experts does not read whole shards.
        #[cfg(target_os = "linux")]
        {
            let start = info.range.start / 4096 * 4096;
            let _ = self.mmap.advise_range(
                memmap2::Advice::PopulateRead,
                start,
                info.range.end - start,
            );
        }
        &self.mmap[info.range.clone()]
    }
}

/// Parse and bounds-check a safetensors header: u64 little-endian length, then JSON.
fn parse_header(bytes: &[u8], path: &Path) -> Result<HashMap<String, TensorInfo>> {
    let file = path.display();
    if bytes.len() < 8 {
        bail!(
            "{file} is truncated: {} bytes, shorter than the 8-byte safetensors header length",
            bytes.len()
        );
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data_start = 8usize
        .checked_add(n)
        .filter(|&e| e <= bytes.len())
        .with_context(|| {
            format!(
                "{file} is truncated or not safetensors: header claims {n} bytes, file has {}",
                bytes.len()
            )
        })?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..data_start])
            .map_err(|e| anyhow::anyhow!("{file}: bad safetensors header JSON: {e}"))?;
    let data_len = bytes.len() - data_start;
    let mut tensors = HashMap::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype_s = v.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
        let dtype = StDtype::parse(dtype_s).with_context(|| {
            format!("{file}: tensor {name} has dtype {dtype_s}; supported: F8_E4M3, BF16, F16, F32")
        })?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
            .with_context(|| format!("{file}: tensor {name} has no valid shape"))?;
        let offsets: Vec<usize> = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
            .filter(|o: &Vec<usize>| o.len() == 2 && o[0] <= o[1])
            .with_context(|| format!("{file}: tensor {name} has no valid data_offsets"))?;
        let need = shape.iter().product::<usize>() * dtype.size();
        if offsets[1] - offsets[0] != need {
            bail!(
                "{file}: tensor {name} holds {} bytes but shape {shape:?} of {} needs {need}",
                offsets[1] - offsets[0],
                dtype.name()
            );
        }
        if offsets[1] > data_len {
            bail!("{file} is truncated: tensor {name} ends at byte {} of the data but the file holds only {data_len}",
                offsets[1]);
        }
        tensors.insert(
            name,
            TensorInfo {
                dtype,
                shape,
                range: data_start + offsets[0]..data_start + offsets[1],
            },
        );
    }
    Ok(tensors)
}

/// A checkpoint directory, opened lazily shard by shard.
pub struct Checkpoint {
    dir: PathBuf,
    /// tensor name -> shard file name (relative to `dir`)
    weight_map: BTreeMap<String, String>,
    shards: Mutex<HashMap<String, Arc<Shard>>>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let weight_map = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("cannot read {}", index_path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: bad JSON: {e}", index_path.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: no \"weight_map\" object", index_path.display()))?;
            let mut out = BTreeMap::new();
            for (k, f) in map {
                let f = f.as_str().with_context(|| {
                    format!(
                        "{}: weight_map entry {k} is not a file name",
                        index_path.display()
                    )
                })?;
                out.insert(k.clone(), f.to_string());
            }
            out
        } else if single.exists() {
            let shard = Shard::open(&single)?;
            shard
                .tensors
                .keys()
                .map(|k| (k.clone(), "model.safetensors".to_string()))
                .collect()
        } else {
            bail!(
                "{} holds neither model.safetensors.index.json nor model.safetensors",
                dir.display()
            );
        };
        // A scale without its weight means the checkpoint was cut or mislabelled.
        for name in weight_map.keys() {
            if let Some(weight) = name.strip_suffix(SCALE_SUFFIX) {
                if !weight_map.contains_key(weight) {
                    bail!(
                        "{}: scale {name} (in {}) has no weight {weight}",
                        dir.display(),
                        weight_map[name]
                    );
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            weight_map,
            shards: Mutex::new(HashMap::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.weight_map.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.weight_map.keys()
    }

    /// The shard file that holds `name`, for messages.
    pub fn file_of(&self, name: &str) -> Option<&str> {
        self.weight_map.get(name).map(|s| s.as_str())
    }

    fn shard(&self, file: &str) -> Result<Arc<Shard>> {
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = shards.get(file) {
            return Ok(s.clone());
        }
        let s = Arc::new(Shard::open(&self.dir.join(file))?);
        shards.insert(file.to_string(), s.clone());
        Ok(s)
    }

    fn locate(&self, name: &str) -> Result<(Arc<Shard>, TensorInfo)> {
        let file = self.weight_map.get(name).with_context(|| {
            format!(
                "tensor {name} is missing from the checkpoint in {}",
                self.dir.display()
            )
        })?;
        let shard = self.shard(file)?;
        let info = shard.tensors.get(name).cloned().with_context(|| {
            format!(
                "tensor {name} is listed for {} but that shard does not contain it",
                shard.path.display()
            )
        })?;
        Ok((shard, info))
    }

    /// Shape and stored dtype of a tensor.
    pub fn info(&self, name: &str) -> Result<TensorInfo> {
        Ok(self.locate(name)?.1)
    }

    /// Rows `rows` of `name` as the checkpoint stores it when that is FP8: their e4m3 bytes
    /// (row-major) and block scales (f32, the scale rows they fall in), checked (shape,
    /// scales, no NaN byte, finite scales); None when it is stored in another dtype. `rows`
    /// starts on a 128-row block (a ZeRO-3 share, `fp8_frozen::shard_rows`).
    pub fn load_fp8(
        &self,
        name: &str,
        shape: &[usize],
        rows: std::ops::Range<usize>,
    ) -> Result<Option<(Vec<u8>, Vec<f32>)>> {
        let (shard, info) = self.locate(name)?;
        if info.dtype != StDtype::F8E4M3 {
            return Ok(None);
        }
        let file = shard.path.display();
        let [n_rows, cols] = shape else {
            bail!("tensor {name} in {file} is F8_E4M3 with shape {shape:?}; only matrices are block-scaled");
        };
        if info.shape != shape {
            bail!(
                "tensor {name} in {file} has shape {:?}, expected {shape:?} from config.json",
                info.shape
            );
        }
        if !rows.start.is_multiple_of(FP8_BLOCK) || rows.end > *n_rows || rows.start > rows.end {
            bail!("tensor {name}: rows {rows:?} are not a run of 128-row blocks of its {n_rows}");
        }
        let bytes = &shard.bytes(&info)[rows.start * cols..rows.end * cols];
        // e4m3fn's NaNs are 0x7f and 0xff; it has no infinities.
        if bytes.iter().any(|&b| b & 0x7f == 0x7f) {
            bail!("tensor {name} (in {file}) holds NaN values; this model cannot be used");
        }
        let scales = self.load_scales(name, *n_rows, *cols)?;
        let col_blocks = fp8::blocks(*cols, FP8_BLOCK);
        let scales = scales
            [rows.start / FP8_BLOCK * col_blocks..fp8::blocks(rows.end, FP8_BLOCK) * col_blocks]
            .to_vec();
        if scales.iter().any(|s| !s.is_finite()) {
            bail!("the scales of tensor {name} (in {file}) hold NaN or infinite values");
        }
        Ok(Some((bytes.to_vec(), scales)))
    }

    /// Read `name` as `dtype` on `device`, checking its shape; FP8 weights are dequantised with
    /// their block scales. Precision: FP8 and bf16 values are exact in f32; an FP8 value times a
    /// power-of-two scale is exact in bf16 too (other scales round once).
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let rows = shape.first().copied().unwrap_or(1);
        self.load_rows(name, shape, 0..rows, dtype, device)
    }

    /// Rows `rows` (along dim 0; a scalar has one) of `name`, of shape `shape` whole, as `load`
    /// reads them, reading only those rows' bytes (an FP8 weight's from the first row of the
    /// 128-row scale block holding `rows.start`). Equal, value for value, to `load` narrowed.
    pub fn load_rows(
        &self,
        name: &str,
        shape: &[usize],
        rows: std::ops::Range<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (shard, info) = self.locate(name)?;
        let file = shard.path.display();
        if info.shape != shape {
            bail!(
                "tensor {name} in {file} has shape {:?}, expected {shape:?} from config.json",
                info.shape
            );
        }
        let total = shape.first().copied().unwrap_or(1);
        if rows.start > rows.end || rows.end > total {
            bail!("tensor {name} in {file}: rows {rows:?} of its {total}");
        }
        let row: usize = shape.iter().skip(1).product();
        let mut part_shape = shape.to_vec();
        if let Some(first) = part_shape.first_mut() {
            *first = rows.len();
        }
        let bytes = shard.bytes(&info);
        let size = info.dtype.size();
        let span = |r: &std::ops::Range<usize>| &bytes[r.start * row * size..r.end * row * size];
        let tensor = match info.dtype {
            StDtype::F8E4M3 => {
                let cols = match shape {
                    [_, c] => *c,
                    _ => bail!("tensor {name} in {file} is F8_E4M3 with shape {shape:?}; only matrices are block-scaled"),
                };
                let scales = self.load_scales(name, total, cols)?;
                // From the start of the scale block holding the first row.
                let first = rows.start / FP8_BLOCK * FP8_BLOCK;
                let read = first..rows.end;
                let col_blocks = fp8::blocks(cols, FP8_BLOCK);
                let scales = &scales[first / FP8_BLOCK * col_blocks
                    ..fp8::blocks(rows.end, FP8_BLOCK).max(first / FP8_BLOCK) * col_blocks];
                let block = match dtype {
                    DType::BF16 => dequantized(
                        span(&read),
                        scales,
                        read.len(),
                        cols,
                        bf16::from_f32,
                        device,
                    )?,
                    _ => dequantized(span(&read), scales, read.len(), cols, |x| x, device)?
                        .to_dtype(dtype)?,
                };
                block.narrow(0, rows.start - first, rows.len())?
            }
            StDtype::BF16 => {
                let v: Vec<bf16> = decode_le(span(&rows), |b: &[u8; 2]| {
                    bf16::from_bits(u16::from_le_bytes(*b))
                });
                Tensor::from_vec(v, part_shape.as_slice(), device)?.to_dtype(dtype)?
            }
            StDtype::F16 => {
                let v: Vec<f16> = decode_le(span(&rows), |b: &[u8; 2]| {
                    f16::from_bits(u16::from_le_bytes(*b))
                });
                Tensor::from_vec(v, part_shape.as_slice(), device)?.to_dtype(dtype)?
            }
            StDtype::F32 => {
                let v: Vec<f32> = decode_le(span(&rows), |b: &[u8; 4]| f32::from_le_bytes(*b));
                Tensor::from_vec(v, part_shape.as_slice(), device)?.to_dtype(dtype)?
            }
        };
        Ok(tensor)
    }

    /// The [ceil(rows/128), ceil(cols/128)] scales of FP8 weight `name`, as f32.
    fn load_scales(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
        let scale_name = format!("{name}{SCALE_SUFFIX}");
        if !self.contains(&scale_name) {
            bail!(
                "tensor {name} in {} is F8_E4M3 but the checkpoint has no {scale_name}",
                self.file_of(name).unwrap_or("?")
            );
        }
        let (shard, info) = self.locate(&scale_name)?;
        let expect = [fp8::blocks(rows, FP8_BLOCK), fp8::blocks(cols, FP8_BLOCK)];
        if info.shape != expect {
            bail!("scale {scale_name} in {} has shape {:?}, expected {expect:?} for a [{rows}, {cols}] weight",
                shard.path.display(), info.shape);
        }
        let bytes = shard.bytes(&info);
        Ok(match info.dtype {
            StDtype::F32 => decode_le(bytes, |b: &[u8; 4]| f32::from_le_bytes(*b)),
            StDtype::BF16 => decode_le(bytes, |b: &[u8; 2]| {
                bf16::from_bits(u16::from_le_bytes(*b)).to_f32()
            }),
            other => bail!(
                "scale {scale_name} in {} is {}; expected F32 or BF16",
                shard.path.display(),
                other.name()
            ),
        })
    }
}

/// Read every tensor of one safetensors file as f32 (training checkpoints: master weights and
/// optimizer moments).
/// The tensor names a safetensors file stores (its header only).
pub fn file_tensor_names(path: &Path) -> Result<Vec<String>> {
    Ok(Shard::open(path)?.tensors.into_keys().collect())
}

pub fn load_file_f32(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    load_file_f32_where(path, device, &|_| true)
}

/// As `load_file_f32`, reading only the tensors whose names `keep` accepts (an
/// expert-parallel rank skips the other ranks' experts).
pub fn load_file_f32_where(
    path: &Path,
    device: &Device,
    keep: &dyn Fn(&str) -> bool,
) -> Result<BTreeMap<String, Tensor>> {
    let shard = Shard::open(path)?;
    let mut out = BTreeMap::new();
    let mut names: Vec<&String> = shard.tensors.keys().filter(|n| keep(n)).collect();
    names.sort();
    for name in names {
        let info = &shard.tensors[name];
        if info.dtype != StDtype::F32 {
            bail!(
                "{}: tensor {name} is {}; training checkpoints hold F32",
                path.display(),
                info.dtype.name()
            );
        }
        let v: Vec<f32> = decode_le(shard.bytes(info), |b: &[u8; 4]| f32::from_le_bytes(*b));
        out.insert(
            name.clone(),
            Tensor::from_vec(v, info.shape.as_slice(), device)?,
        );
    }
    Ok(out)
}

/// Decode little-endian elements of `N` bytes each, in parallel.
/// FP8 rows (whole 128-row scale blocks from the first) dequantised into a [rows, cols] tensor
/// of `store`'s type (`fp8::dequantize_into`: one table lookup per byte).
fn dequantized<T: candle_core::WithDType>(
    bytes: &[u8],
    scales: &[f32],
    rows: usize,
    cols: usize,
    store: impl Fn(f32) -> T + Sync,
    device: &Device,
) -> Result<Tensor> {
    let out = filled_vec(rows * cols, |o| {
        fp8::dequantize_into(bytes, scales, rows, cols, FP8_BLOCK, o, store)
    });
    Ok(Tensor::from_vec(out, (rows, cols), device)?)
}

fn decode_le<T: Send, const N: usize>(
    bytes: &[u8],
    f: impl Fn(&[u8; N]) -> T + Sync + Send,
) -> Vec<T> {
    const CHUNK: usize = 1 << 16;
    filled_vec(bytes.len() / N, |out| {
        out.par_chunks_mut(CHUNK)
            .zip(bytes.par_chunks(CHUNK * N))
            .for_each(|(o, b)| {
                for (x, c) in o.iter_mut().zip(b.chunks_exact(N)) {
                    x.write(f(c.try_into().unwrap()));
                }
            })
    })
}

/// A vector of `n` elements produced by `fill`, which must write every element.
///
/// Loading is dominated by first-touch page faults on the fresh output buffers, not by the
/// decoding itself, so the buffer is not zeroed first and is advised to use transparent huge
/// pages (512x fewer faults on Linux with THP in "madvise" mode).
fn filled_vec<T>(n: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    advise_huge_pages(v.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>());
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: `fill` wrote all n elements (dequantize_into and decode_le cover their whole
    // output by construction; both assert the lengths), and T is a plain number type.
    unsafe { v.set_len(n) };
    v
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    const PAGE: usize = 4096;
    let start = (ptr as usize).div_ceil(PAGE) * PAGE;
    let end = (ptr as usize + len) / PAGE * PAGE;
    if end > start + (2 << 20) {
        // SAFETY: the range lies inside our own live allocation; MADV_HUGEPAGE only changes how
        // the kernel backs it and cannot invalidate memory. Failure is harmless and ignored.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_ptr: *mut u8, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// `load_rows` reads what `load` reads, narrowed: every tensor of a random checkpoint (FP8
    /// matrices whose rows are not a multiple of 128, bf16 and f32 tensors, vectors), as bf16
    /// and f32, over row ranges that start and end inside scale blocks, empty ones included.
    #[test]
    fn rows_read_alone_equal_the_whole_tensor_narrowed() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let cfg = crate::tiny::tiny_config(false);
        crate::tiny::write_random_checkpoint(dir.path(), &cfg, 7, 1 << 20)?;
        let ckpt = Checkpoint::open(dir.path())?;
        let mut rng = crate::rng::SplitMix64::new(11);
        let mut fp8 = 0;
        let names: Vec<String> = ckpt.names().cloned().collect();
        for name in names.iter().filter(|n| !n.ends_with(SCALE_SUFFIX)) {
            let info = ckpt.info(name)?;
            fp8 += (info.dtype == StDtype::F8E4M3) as usize;
            let total = info.shape.first().copied().unwrap_or(1);
            for dtype in [DType::BF16, DType::F32] {
                let whole = ckpt.load(name, &info.shape, dtype, &Device::Cpu)?;
                for _ in 0..3 {
                    let a = (rng.next_u64() % (total as u64 + 1)) as usize;
                    let b = (rng.next_u64() % (total as u64 + 1)) as usize;
                    let rows = a.min(b)..a.max(b);
                    let got =
                        ckpt.load_rows(name, &info.shape, rows.clone(), dtype, &Device::Cpu)?;
                    let want = if info.shape.is_empty() {
                        whole.clone()
                    } else {
                        whole.narrow(0, rows.start, rows.len())?
                    };
                    assert_eq!(got.dims(), want.dims(), "{name} rows {rows:?}");
                    let bits = |t: &Tensor| -> Result<Vec<u32>> {
                        Ok(t.to_dtype(DType::F32)?
                            .flatten_all()?
                            .to_vec1::<f32>()?
                            .iter()
                            .map(|x| x.to_bits())
                            .collect())
                    };
                    assert_eq!(
                        bits(&got)?,
                        bits(&want)?,
                        "{name} rows {rows:?} as {dtype:?}"
                    );
                }
            }
        }
        assert!(fp8 > 0, "the checkpoint holds FP8 weights");
        let any = names.iter().find(|n| !n.ends_with(SCALE_SUFFIX)).unwrap();
        let shape = ckpt.info(any)?.shape;
        let total = shape.first().copied().unwrap_or(1);
        let err = ckpt
            .load_rows(any, &shape, 0..total + 1, DType::F32, &Device::Cpu)
            .unwrap_err();
        assert!(err.to_string().contains("rows"), "{err}");
        Ok(())
    }
}
