//! The compact model file (`fl-client export`): the weights of a model file in f16 or int8,
//! with zeroed rows and zeroed weights left out, for a model that has to fit an edge box.
//!
//! Layout: the 8 bytes [`MAGIC`], then a zlib stream of a safetensors file. Its metadata holds
//! `fl.spec` (the [`ModelSpec`] as JSON, as in the plain model file), `fl.format` =
//! [`FORMAT`], and `fl.layout`: for each weight tensor NAME, its full `shape`, its `precision`
//! (`f32`, `f16` or `int8`) and whether it is stored row-sparse (`rows`) and masked (`mask`).
//! A tensor is seen as a matrix of `shape[0]` rows (one row for a vector). Its safetensors
//! entries are:
//!
//! - `NAME`: the stored values (F32, F16 or I8), row-major, the kept rows only, and with a mask
//!   only the non-zero ones;
//! - `NAME:scale` (int8): F32, one scale per kept row, or with `block` B > 1 in the layout one
//!   scale per B consecutive rows of the full tensor (`ceil(shape[0] / B)` of them, dropped rows
//!   included); a value is `q × scale`;
//! - `NAME:rows` (row-sparse): I32, the indices of the kept rows, strictly increasing; the other
//!   rows are zero;
//! - `NAME:mask` (masked): U8, one bit per value of the kept rows (least significant bit first),
//!   set where a stored value follows; the other values are zero.
//!
//! The encoder picks rows and masks itself, when they make the file smaller; they lose nothing.
//! Quantization is the only lossy step: int8 rounds each row (or block of [`INT8_BLOCK_ROWS`]
//! rows of a large table, whose 4-byte scale would otherwise cost 1/16 of a 64-wide row) to 255
//! levels symmetric around 0 (error at most `max|block| / 254` per value), f16 to 11 significant
//! bits. Vectors (biases,
//! norms) stay f32. The decoder checks everything it reads and refuses a file that claims what
//! it does not hold.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};

use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::tensors::META_SPEC;
use crate::{ModelSpec, NamedTensor, TensorSet};

/// First bytes of a compact model file.
pub const MAGIC: &[u8; 8] = b"FLEDGE\x00\x01";
/// Value of the `fl.format` metadata key of this version of the format.
pub const FORMAT: &str = "fedtext-compact-1";
/// Metadata key of the format name.
pub const META_FORMAT: &str = "fl.format";
/// Metadata key of the per-tensor layout.
pub const META_LAYOUT: &str = "fl.layout";
/// Largest safetensors payload the decoder inflates: a zlib bomb must not take the machine down.
const MAX_INFLATED: u64 = 2 << 30;
/// Rows of a large int8 matrix that share one scale: a 64-wide fastText row is 64 bytes in int8,
/// and a scale per row would add 4 bytes to each.
pub const INT8_BLOCK_ROWS: usize = 16;
/// Matrices with at least this many rows get block scales; smaller ones (a classifier head) keep
/// one scale per row, which costs nothing worth saving.
const INT8_BLOCK_MIN_ROWS: usize = 256;
/// Largest tensor the decoder builds (the model spec's own limit on the embedding table).
const MAX_ELEMENTS: usize = 1 << 28;

/// How the values of a weight matrix are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats, as trained.
    F32,
    /// IEEE half precision.
    F16,
    /// Symmetric 8-bit integers with one f32 scale per row, or per block of rows of a large table.
    Int8,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Int8 => "int8",
        })
    }
}

/// The layout entry of one tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Layout {
    shape: Vec<usize>,
    precision: Precision,
    #[serde(default)]
    rows: bool,
    #[serde(default)]
    mask: bool,
    /// Int8: rows per scale (1, or [`INT8_BLOCK_ROWS`] for large tables).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    block: usize,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

/// Why bytes are not a compact model file, or a model cannot be written as one.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    /// The bytes do not start with [`MAGIC`].
    #[error("not a compact model file (no FLEDGE header)")]
    NotCompact,
    /// The zlib stream is broken or truncated.
    #[error("compressed payload is corrupt: {0}")]
    Inflate(std::io::Error),
    /// The payload inflates past [`MAX_INFLATED`].
    #[error("payload inflates to more than {MAX_INFLATED} bytes")]
    TooLarge,
    /// The inflated payload is not safetensors.
    #[error("malformed tensor payload: {0}")]
    Malformed(String),
    /// The metadata names another format, or none.
    #[error("format is {found:?}, expected '{FORMAT}'")]
    Format {
        /// The `fl.format` value found, if any.
        found: Option<String>,
    },
    /// The metadata holds no spec.
    #[error("no model spec in the metadata")]
    NoSpec,
    /// The spec or the layout is not valid JSON.
    #[error("bad {what} metadata: {source}")]
    BadJson {
        /// `spec` or `layout`.
        what: &'static str,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A tensor does not hold what the layout claims.
    #[error("tensor '{name}': {problem}")]
    Tensor {
        /// The tensor (or its `:scale`, `:rows`, `:mask` entry).
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// The payload has a tensor that the layout does not account for.
    #[error("unexpected tensor '{0}' (not in the layout)")]
    Unexpected(String),
    /// A value does not fit the chosen precision.
    #[error("tensor '{name}' holds {value}, beyond the range of {precision}")]
    Range {
        /// The tensor.
        name: String,
        /// The value.
        value: f32,
        /// The precision asked for.
        precision: Precision,
    },
}

fn bad(name: &str, problem: impl Into<String>) -> CompactError {
    CompactError::Tensor { name: name.to_string(), problem: problem.into() }
}

/// The values of one tensor as the file holds them, over its full shape.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    /// Plain floats (stored as f32 or f16).
    F32(Vec<f32>),
    /// 8-bit integers; the value at row `r` is `q × scales[r]`.
    Int8 {
        /// One integer per value, row-major.
        q: Vec<i8>,
        /// One scale per row (zero for a dropped row).
        scales: Vec<f32>,
    },
}

/// One tensor of a compact model.
#[derive(Clone, Debug, PartialEq)]
pub struct CompactTensor {
    /// Parameter name.
    pub name: String,
    /// Full dimensions.
    pub shape: Vec<usize>,
    /// How the file stored it.
    pub precision: Precision,
    /// The values.
    pub values: Values,
}

impl CompactTensor {
    /// The values as f32 (int8 multiplied out).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.values {
            Values::F32(v) => v.clone(),
            Values::Int8 { q, scales } => {
                let cols = q.len() / scales.len().max(1);
                dequantize_int8_rows(q, scales, cols)
            }
        }
    }
}

/// A decoded compact model file.
#[derive(Clone, Debug, PartialEq)]
pub struct CompactModel {
    /// What the model is.
    pub spec: ModelSpec,
    /// The tensors, in name order.
    pub tensors: Vec<CompactTensor>,
}

impl CompactModel {
    /// The weights as f32, ready for a model.
    pub fn to_tensor_set(&self) -> TensorSet {
        TensorSet::new(
            self.tensors
                .iter()
                .map(|t| NamedTensor { name: t.name.clone(), shape: t.shape.clone(), data: t.to_f32() })
                .collect(),
        )
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&CompactTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Rows of a tensor seen as a matrix: `shape[0]` for a matrix, 1 for a vector or a scalar.
fn rows_of(shape: &[usize]) -> usize {
    if shape.len() >= 2 {
        shape[0]
    } else {
        1
    }
}

/// Symmetric int8 quantization of each of the `data.len() / cols` rows: `scale = max|row| / 127`,
/// `q = round(x / scale)`. Each value is off by at most `scale / 2` after [`dequantize_int8_rows`].
pub fn quantize_int8_rows(data: &[f32], cols: usize) -> (Vec<i8>, Vec<f32>) {
    quantize_int8_blocks(data, cols, 1)
}

/// [`quantize_int8_rows`] with one scale per `block` consecutive rows (`max|block| / 127`);
/// returns one scale per block. Each value is off by at most half its block's scale.
pub fn quantize_int8_blocks(data: &[f32], cols: usize, block: usize) -> (Vec<i8>, Vec<f32>) {
    let width = cols.max(1) * block.max(1);
    let mut q = Vec::with_capacity(data.len());
    let mut scales = Vec::with_capacity(data.len().div_ceil(width));
    for chunk in data.chunks(width) {
        let max = chunk.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let scale = max / 127.0;
        scales.push(scale);
        if scale == 0.0 {
            q.extend(std::iter::repeat_n(0i8, chunk.len()));
        } else {
            q.extend(chunk.iter().map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8));
        }
    }
    (q, scales)
}

/// The values of [`quantize_int8_rows`]: `q × scale` of its row.
pub fn dequantize_int8_rows(q: &[i8], scales: &[f32], cols: usize) -> Vec<f32> {
    q.chunks(cols.max(1)).zip(scales).flat_map(|(row, &s)| row.iter().map(move |&v| f32::from(v) * s)).collect()
}

/// One tensor quantized, before it is laid out.
enum Stored {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    /// Values, and one scale per block of `.2` rows.
    Int8(Vec<i8>, Vec<f32>, usize),
}

impl Stored {
    fn bytes_per_value(&self) -> usize {
        match self {
            Stored::F32(_) => 4,
            Stored::F16(_) => 2,
            Stored::Int8(..) => 1,
        }
    }

    fn is_zero(&self, i: usize) -> bool {
        match self {
            Stored::F32(v) => v[i] == 0.0,
            Stored::F16(v) => v[i].to_f32() == 0.0,
            Stored::Int8(q, ..) => q[i] == 0,
        }
    }

    /// Little-endian bytes of the values at `idx`.
    fn bytes(&self, idx: &[usize]) -> Vec<u8> {
        match self {
            Stored::F32(v) => idx.iter().flat_map(|&i| v[i].to_le_bytes()).collect(),
            Stored::F16(v) => idx.iter().flat_map(|&i| v[i].to_le_bytes()).collect(),
            Stored::Int8(q, ..) => idx.iter().map(|&i| q[i] as u8).collect(),
        }
    }
}

/// Encodes a model as a compact file: matrices in `precision` (vectors stay f32), zero rows and
/// zero values left out where that is smaller. Fails if a value does not fit f16.
pub fn encode_compact(spec: &ModelSpec, weights: &TensorSet, precision: Precision) -> Result<Vec<u8>, CompactError> {
    let mut layout = BTreeMap::new();
    // Owned byte buffers first, views on them after.
    let mut entries: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for t in &weights.tensors {
        let rows = rows_of(&t.shape);
        let cols = t.data.len().checked_div(rows).unwrap_or(0);
        let precision = if t.shape.len() >= 2 { precision } else { Precision::F32 };
        let stored = match precision {
            Precision::F32 => Stored::F32(t.data.clone()),
            Precision::F16 => {
                let mut out = Vec::with_capacity(t.data.len());
                for &x in &t.data {
                    let h = half::f16::from_f32(x);
                    if !h.is_finite() {
                        return Err(CompactError::Range { name: t.name.clone(), value: x, precision });
                    }
                    out.push(h);
                }
                Stored::F16(out)
            }
            Precision::Int8 => {
                let block = if rows >= INT8_BLOCK_MIN_ROWS { INT8_BLOCK_ROWS } else { 1 };
                let (q, scales) = quantize_int8_blocks(&t.data, cols, block);
                Stored::Int8(q, scales, block)
            }
        };
        let bpv = stored.bytes_per_value();
        // A dropped row saves its scale only when it has one of its own.
        let scale_bytes = match &stored {
            Stored::Int8(_, _, 1) => 4,
            _ => 0,
        };
        let zero_row = |r: usize| (r * cols..(r + 1) * cols).all(|i| stored.is_zero(i));
        let kept: Vec<usize> = (0..rows).filter(|&r| !zero_row(r)).collect();
        // Row indices cost 4 bytes per kept row; a dropped row saves its values and its scale.
        let row_sparse = t.shape.len() >= 2 && (rows - kept.len()) * (cols * bpv + scale_bytes) > kept.len() * 4;
        let kept: Vec<usize> = if row_sparse { kept } else { (0..rows).collect() };
        let positions: Vec<usize> = kept.iter().flat_map(|&r| r * cols..(r + 1) * cols).collect();
        let nonzero: Vec<usize> = positions.iter().copied().filter(|&i| !stored.is_zero(i)).collect();
        // A mask costs one bit per value and saves the zero values.
        let masked = (positions.len() - nonzero.len()) * bpv > positions.len().div_ceil(8);
        let (dtype, values) = match &stored {
            Stored::F32(_) => (Dtype::F32, &stored),
            Stored::F16(_) => (Dtype::F16, &stored),
            Stored::Int8(..) => (Dtype::I8, &stored),
        };
        if masked {
            let mut mask = vec![0u8; positions.len().div_ceil(8)];
            for (bit, &i) in positions.iter().enumerate() {
                if !stored.is_zero(i) {
                    mask[bit / 8] |= 1 << (bit % 8);
                }
            }
            entries.push((t.name.clone(), dtype, vec![nonzero.len()], values.bytes(&nonzero)));
            entries.push((format!("{}:mask", t.name), Dtype::U8, vec![mask.len()], mask));
        } else {
            let shape = if t.shape.len() >= 2 { vec![kept.len(), cols] } else { vec![positions.len()] };
            entries.push((t.name.clone(), dtype, shape, values.bytes(&positions)));
        }
        let mut block = 1;
        if let Stored::Int8(_, scales, rows_per_scale) = &stored {
            block = *rows_per_scale;
            let bytes: Vec<u8> = if block == 1 {
                kept.iter().flat_map(|&r| scales[r].to_le_bytes()).collect()
            } else {
                scales.iter().flat_map(|s| s.to_le_bytes()).collect()
            };
            entries.push((format!("{}:scale", t.name), Dtype::F32, vec![bytes.len() / 4], bytes));
        }
        if row_sparse {
            let bytes = kept.iter().flat_map(|&r| (r as i32).to_le_bytes()).collect();
            entries.push((format!("{}:rows", t.name), Dtype::I32, vec![kept.len()], bytes));
        }
        let entry = Layout { shape: t.shape.clone(), precision, rows: row_sparse, mask: masked, block };
        layout.insert(t.name.clone(), entry);
    }
    let mut meta = HashMap::new();
    meta.insert(META_SPEC.to_string(), serde_json::to_string(spec).expect("spec serializes"));
    meta.insert(META_FORMAT.to_string(), FORMAT.to_string());
    meta.insert(META_LAYOUT.to_string(), serde_json::to_string(&layout).expect("layout serializes"));
    let views = entries.iter().map(|(name, dtype, shape, bytes)| {
        (name.as_str(), TensorView::new(*dtype, shape.clone(), bytes).expect("shape matches the bytes"))
    });
    let payload = safetensors::serialize(views, Some(meta)).expect("serializing tensors cannot fail");
    let mut out = MAGIC.to_vec();
    let mut encoder = flate2::write::ZlibEncoder::new(&mut out, flate2::Compression::default());
    encoder.write_all(&payload).expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail");
    Ok(out)
}

/// True when `bytes` start like a compact model file (they may still be refused by [`decode_compact`]).
pub fn is_compact(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Decodes and checks a compact model file.
pub fn decode_compact(bytes: &[u8]) -> Result<CompactModel, CompactError> {
    let compressed = bytes.strip_prefix(MAGIC.as_slice()).ok_or(CompactError::NotCompact)?;
    let mut payload = Vec::new();
    flate2::read::ZlibDecoder::new(compressed)
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut payload)
        .map_err(CompactError::Inflate)?;
    if payload.len() as u64 > MAX_INFLATED {
        return Err(CompactError::TooLarge);
    }
    let parsed = SafeTensors::deserialize(&payload).map_err(|e| CompactError::Malformed(e.to_string()))?;
    let (_, header) = SafeTensors::read_metadata(&payload).map_err(|e| CompactError::Malformed(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let format = meta.get(META_FORMAT);
    if format.map(String::as_str) != Some(FORMAT) {
        return Err(CompactError::Format { found: format.cloned() });
    }
    let spec_json = meta.get(META_SPEC).ok_or(CompactError::NoSpec)?;
    let spec: ModelSpec =
        serde_json::from_str(spec_json).map_err(|source| CompactError::BadJson { what: "spec", source })?;
    let layout: BTreeMap<String, Layout> =
        serde_json::from_str(meta.get(META_LAYOUT).map(String::as_str).unwrap_or("null"))
            .map_err(|source| CompactError::BadJson { what: "layout", source })?;

    let mut used = std::collections::HashSet::new();
    let mut tensors = Vec::with_capacity(layout.len());
    for (name, entry) in &layout {
        let need = |key: String, dtype: Dtype| -> Result<TensorView<'_>, CompactError> {
            match parsed.tensor(&key) {
                Ok(view) if view.dtype() == dtype => Ok(view),
                Ok(view) => Err(bad(&key, format!("holds {:?}, expected {dtype:?}", view.dtype()))),
                Err(_) => Err(bad(&key, "missing")),
            }
        };
        let elements = entry
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|&n| n <= MAX_ELEMENTS)
            .ok_or_else(|| bad(name, format!("shape {:?} is too large", entry.shape)))?;
        if entry.block != 1 && entry.precision != Precision::Int8 {
            return Err(bad(name, "only int8 values have blocks of scales"));
        }
        if entry.shape.len() < 2 && (entry.rows || entry.precision != Precision::F32) {
            return Err(bad(name, "a vector must be stored dense in f32"));
        }
        let rows = rows_of(&entry.shape);
        let cols = elements.checked_div(rows).unwrap_or(0);
        let dtype = match entry.precision {
            Precision::F32 => Dtype::F32,
            Precision::F16 => Dtype::F16,
            Precision::Int8 => Dtype::I8,
        };
        let values = parsed.tensor(name).map_err(|_| bad(name, "missing"))?;
        if values.dtype() != dtype {
            let problem = format!("the layout says {} but it holds {:?}", entry.precision, values.dtype());
            return Err(bad(name, problem));
        }
        used.insert(name.clone());

        let kept: Vec<usize> = if entry.rows {
            let view = need(format!("{name}:rows"), Dtype::I32)?;
            used.insert(format!("{name}:rows"));
            let idx: Vec<i32> =
                view.data().chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            if !idx.windows(2).all(|w| w[0] < w[1]) || idx.iter().any(|&r| r < 0 || r as usize >= rows) {
                return Err(bad(&format!("{name}:rows"), format!("row indices must increase and be below {rows}")));
            }
            idx.into_iter().map(|r| r as usize).collect()
        } else {
            (0..rows).collect()
        };
        let stored_len = kept.len() * cols;
        let present: Vec<usize> = if entry.mask {
            let view = need(format!("{name}:mask"), Dtype::U8)?;
            used.insert(format!("{name}:mask"));
            let mask = view.data();
            if mask.len() != stored_len.div_ceil(8) {
                return Err(bad(
                    &format!("{name}:mask"),
                    format!("{} bytes, expected {}", mask.len(), stored_len.div_ceil(8)),
                ));
            }
            (0..stored_len).filter(|&bit| mask[bit / 8] & (1 << (bit % 8)) != 0).collect()
        } else {
            (0..stored_len).collect()
        };
        let count: usize = values.shape().iter().product();
        if count != present.len() {
            return Err(bad(name, format!("holds {count} values, the layout needs {}", present.len())));
        }
        // Position `p` of the kept rows is this index of the full tensor.
        let full_index = |p: usize| kept[p / cols] * cols + p % cols;
        let data = values.data();
        let values = match entry.precision {
            Precision::Int8 => {
                let view = need(format!("{name}:scale"), Dtype::F32)?;
                used.insert(format!("{name}:scale"));
                let stored_scales: Vec<f32> =
                    view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                if entry.block == 0 || entry.block > rows.max(1) {
                    return Err(bad(name, format!("block of {} rows, expected 1 to {rows}", entry.block)));
                }
                let want = if entry.block == 1 { kept.len() } else { rows.div_ceil(entry.block) };
                if stored_scales.len() != want || stored_scales.iter().any(|s| !s.is_finite() || *s < 0.0) {
                    return Err(bad(&format!("{name}:scale"), format!("needs {want} finite non-negative scales")));
                }
                // One scale per row, as inference reads them; zero for a dropped row.
                let mut scales = vec![0.0f32; rows];
                for (i, &r) in kept.iter().enumerate() {
                    scales[r] = if entry.block == 1 { stored_scales[i] } else { stored_scales[r / entry.block] };
                }
                let mut q = vec![0i8; elements];
                for (&p, &b) in present.iter().zip(data) {
                    q[full_index(p)] = b as i8;
                }
                Values::Int8 { q, scales }
            }
            Precision::F32 | Precision::F16 => {
                let floats: Vec<f32> = if entry.precision == Precision::F32 {
                    data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
                } else {
                    data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
                };
                if let Some(i) = floats.iter().position(|v| !v.is_finite()) {
                    return Err(bad(name, format!("non-finite value at stored index {i}")));
                }
                let mut full = vec![0.0f32; elements];
                for (&p, &v) in present.iter().zip(&floats) {
                    full[full_index(p)] = v;
                }
                Values::F32(full)
            }
        };
        tensors.push(CompactTensor {
            name: name.clone(),
            shape: entry.shape.clone(),
            precision: entry.precision,
            values,
        });
    }
    if let Some(extra) = parsed.names().into_iter().find(|n| !used.contains(*n)) {
        return Err(CompactError::Unexpected(extra.to_string()));
    }
    Ok(CompactModel { spec, tensors })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelKind;
    use proptest::prelude::*;

    fn spec() -> ModelSpec {
        ModelSpec::with_defaults(ModelKind::Fasttext, vec!["a".into(), "b".into()])
    }

    fn weights(table: Vec<f32>, rows: usize) -> TensorSet {
        TensorSet::new(vec![
            NamedTensor { name: "embedding.weight".into(), shape: vec![rows, table.len() / rows], data: table },
            NamedTensor { name: "linear.bias".into(), shape: vec![2], data: vec![0.5, -1.5] },
        ])
    }

    /// Re-encodes the payload of a compact file after `edit` changes its safetensors entries and metadata.
    fn tamper(
        bytes: &[u8],
        edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>, &mut HashMap<String, String>),
    ) -> Vec<u8> {
        let mut payload = Vec::new();
        flate2::read::ZlibDecoder::new(&bytes[MAGIC.len()..]).read_to_end(&mut payload).unwrap();
        let parsed = SafeTensors::deserialize(&payload).unwrap();
        let (_, header) = SafeTensors::read_metadata(&payload).unwrap();
        let mut meta = header.metadata().clone().unwrap();
        let mut entries: Vec<_> =
            parsed.iter().map(|(n, v)| (n.to_string(), v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
        edit(&mut entries, &mut meta);
        let views = entries.iter().map(|(n, d, s, b)| (n.as_str(), TensorView::new(*d, s.clone(), b).unwrap()));
        let payload = safetensors::serialize(views, Some(meta)).unwrap();
        let mut out = MAGIC.to_vec();
        let mut enc = flate2::write::ZlibEncoder::new(&mut out, flate2::Compression::fast());
        enc.write_all(&payload).unwrap();
        enc.finish().unwrap();
        out
    }

    proptest! {
        #[test]
        fn int8_error_is_at_most_half_a_step_of_its_row(
            rows in proptest::collection::vec(proptest::collection::vec(-1e3f32..1e3, 8), 1..20)
        ) {
            let data: Vec<f32> = rows.concat();
            let (q, scales) = quantize_int8_rows(&data, 8);
            let back = dequantize_int8_rows(&q, &scales, 8);
            for (r, row) in rows.iter().enumerate() {
                let max = row.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                for (c, &x) in row.iter().enumerate() {
                    let err = (x - back[r * 8 + c]).abs();
                    // Half a step, plus the f32 rounding of x / scale and of q · scale (a few ulps
                    // of the row's largest value: 574 came back 1.6e-5 past the bare half step).
                    let bound = max / 254.0 + 4.0 * f32::EPSILON * max + 1e-30;
                    prop_assert!(err <= bound, "row {r}: {x} -> {} (max {max})", back[r * 8 + c]);
                }
            }
        }

        #[test]
        fn decode_of_encode_is_the_quantized_model(
            table in proptest::collection::vec(prop_oneof![3 => Just(0.0f32), 2 => -2.0f32..2.0], 6 * 4),
            zero_rows in proptest::collection::vec(any::<bool>(), 6),
        ) {
            let mut table = table;
            for (r, zero) in zero_rows.iter().enumerate() {
                if *zero {
                    table[r * 4..(r + 1) * 4].fill(0.0);
                }
            }
            let w = weights(table.clone(), 6);
            for precision in [Precision::F32, Precision::F16, Precision::Int8] {
                let model = decode_compact(&encode_compact(&spec(), &w, precision).unwrap()).unwrap();
                prop_assert_eq!(&model.spec, &spec());
                let got = model.to_tensor_set();
                prop_assert_eq!(&got.tensors[1], &w.tensors[1], "vectors stay f32");
                let expected: Vec<f32> = match precision {
                    Precision::F32 => table.clone(),
                    Precision::F16 => table.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
                    Precision::Int8 => {
                        let (q, s) = quantize_int8_rows(&table, 4);
                        dequantize_int8_rows(&q, &s, 4)
                    }
                };
                prop_assert_eq!(&got.tensors[0].data, &expected, "{}", precision);
                prop_assert_eq!(model.tensor("embedding.weight").unwrap().precision, precision);
            }
        }

        #[test]
        fn the_decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut file = MAGIC.to_vec();
            file.extend(bytes);
            let _ = decode_compact(&file);
        }
    }

    #[test]
    fn a_large_int8_table_shares_a_scale_per_block_and_is_a_quarter_of_f32() {
        // A fastText-like table: 4,096 rows of 64, with rows of different norms and some rows
        // never trained (zero), so that blocks and row-sparsity both matter.
        let (rows, cols) = (4096, 64);
        let mut rng = 7u32;
        let mut table = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let norm = if r % 5 == 0 { 0.0 } else { 0.05 + (r % 7) as f32 * 0.1 };
            for _ in 0..cols {
                rng = rng.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                table.push(((rng >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * norm);
            }
        }
        let w = weights(table.clone(), rows);
        let file = encode_compact(&spec(), &w, Precision::Int8).unwrap();
        let f32_bytes = crate::model_file::encode_model(&spec(), &w).len();
        assert!(file.len() * 4 <= f32_bytes, "int8 {} bytes vs f32 {f32_bytes}", file.len());
        let model = decode_compact(&file).unwrap();
        let back = &model.to_tensor_set().tensors[0].data;
        for block in 0..rows / INT8_BLOCK_ROWS {
            let span = block * INT8_BLOCK_ROWS * cols..(block + 1) * INT8_BLOCK_ROWS * cols;
            let max = table[span.clone()].iter().fold(0.0f32, |m, x| m.max(x.abs()));
            for i in span {
                assert!((table[i] - back[i]).abs() <= max / 254.0 * (1.0 + 1e-5), "{} -> {}", table[i], back[i]);
            }
        }
        // A scale count that does not fit the block is refused.
        let forged = tamper(&file, |e, _| {
            let scale = e.iter_mut().find(|(n, ..)| n == "embedding.weight:scale").unwrap();
            scale.3.truncate(scale.3.len() - 4);
            scale.2 = vec![scale.3.len() / 4];
        });
        let err = decode_compact(&forged).unwrap_err().to_string();
        assert!(err.contains(&format!("needs {} finite non-negative scales", rows / INT8_BLOCK_ROWS)), "{err}");
        let forged = tamper(&file, |_, meta| {
            let layout = meta.get_mut(META_LAYOUT).unwrap();
            *layout = layout.replace("\"block\":16", "\"block\":0");
        });
        assert!(decode_compact(&forged).unwrap_err().to_string().contains("block of 0 rows"));
    }

    #[test]
    fn zero_rows_and_zero_values_are_left_out_and_shrink_the_file() {
        // Incompressible values, so that the sizes show the layout rather than zlib.
        let mut rng = 1u32;
        let mut table: Vec<f32> = (0..256 * 16)
            .map(|_| {
                rng = rng.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (rng >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect();
        let dense = encode_compact(&spec(), &weights(table.clone(), 256), Precision::Int8).unwrap().len();
        table[..128 * 16].fill(0.0); // half the rows
        let sparse = encode_compact(&spec(), &weights(table.clone(), 256), Precision::Int8).unwrap();
        for x in table.iter_mut().skip(128 * 16).step_by(2) {
            *x = 0.0; // half the values of the other rows
        }
        let masked = encode_compact(&spec(), &weights(table.clone(), 256), Precision::Int8).unwrap();
        // Half the rows go; each kept 16-byte row pays a 4-byte index: about 0.5 × 1.25 of dense.
        assert!(sparse.len() * 100 < dense * 65, "row-sparse {} vs dense {dense}", sparse.len());
        assert!(masked.len() * 10 < sparse.len() * 7, "masked {} vs row-sparse {}", masked.len(), sparse.len());
        let model = decode_compact(&masked).unwrap();
        // 256 rows: one scale per block of rows.
        let (q, s) = quantize_int8_blocks(&table, 16, INT8_BLOCK_ROWS);
        let per_row: Vec<f32> = (0..256).map(|r| s[r / INT8_BLOCK_ROWS]).collect();
        assert_eq!(model.to_tensor_set().tensors[0].data, dequantize_int8_rows(&q, &per_row, 16));
    }

    #[test]
    fn f16_refuses_values_it_cannot_hold() {
        let err = encode_compact(&spec(), &weights(vec![1.0, 1e6], 1), Precision::F16).unwrap_err();
        assert!(err.to_string().contains("1000000") && err.to_string().contains("f16"), "{err}");
    }

    #[test]
    fn files_that_claim_what_they_do_not_hold_are_refused() {
        let mut table = vec![0.25f32; 8 * 4];
        table[..4 * 4].fill(0.0);
        let good = encode_compact(&spec(), &weights(table, 8), Precision::Int8).unwrap();
        assert!(decode_compact(&good).is_ok());
        let refused = |bytes: &[u8], expect: &str| {
            let err = decode_compact(bytes).unwrap_err().to_string();
            assert!(err.contains(expect), "expected '{expect}' in: {err}");
        };
        refused(b"safetensors?", "not a compact model file");
        refused(&good[..good.len() - 20], "corrupt");
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x55;
        assert!(decode_compact(&flipped).is_err());
        refused(
            &tamper(&good, |_, m| drop(m.insert(META_FORMAT.into(), "fedtext-compact-9".into()))),
            "fedtext-compact-9",
        );
        refused(&tamper(&good, |_, m| drop(m.remove(META_SPEC))), "no model spec");
        refused(
            &tamper(&good, |_, m| {
                let l = m[META_LAYOUT].replace("int8", "f16");
                m.insert(META_LAYOUT.into(), l);
            }),
            "the layout says f16 but it holds I8",
        );
        refused(
            &tamper(&good, |e, _| e.retain(|(n, ..)| n != "embedding.weight:scale")),
            "'embedding.weight:scale': missing",
        );
        refused(
            &tamper(&good, |e, _| {
                let rows = e.iter_mut().find(|(n, ..)| n == "embedding.weight:rows").unwrap();
                rows.3[..4].copy_from_slice(&99i32.to_le_bytes());
            }),
            "row indices must increase and be below 8",
        );
        refused(
            &tamper(&good, |e, _| {
                let scale = e.iter_mut().find(|(n, ..)| n == "embedding.weight:scale").unwrap();
                scale.3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            }),
            "finite non-negative scales",
        );
        refused(
            &tamper(&good, |e, _| e.push(("extra".into(), Dtype::U8, vec![1], vec![0]))),
            "unexpected tensor 'extra'",
        );
        refused(
            &tamper(&good, |_, m| {
                let l = m[META_LAYOUT].replace("[8,4]", "[8,5]");
                m.insert(META_LAYOUT.into(), l);
            }),
            "the layout needs",
        );
    }
}
