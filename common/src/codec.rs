//! Update codecs: how a weight delta (an update, or a round's aggregate) travels.
//!
//! A codec is a name of the form `SPARSITY-PRECISION`, negotiated through the round task's
//! `update_codecs` and the update header's `codec`:
//!
//! - `safetensors-f32`: every value, dense f32 safetensors. Exact; the fallback every peer reads.
//! - sparsity `dense` (every value), `sparse` (matrices send only their non-zero rows plus the
//!   row indices; vectors are dense) or `topk` (each tensor of at least [`TOPK_MIN_VALUES`]
//!   values sends its largest-magnitude values, [`TOPK_DIVISOR`]⁻¹ of them, plus their flat
//!   indices, smaller tensors are dense; what is left out is kept by the sender as
//!   [`ErrorFeedback`] and added to its next delta);
//! - precision `f32` (exact), `f16` (relative error at most 2⁻¹¹ for normal values, absolute
//!   2⁻²⁵ below) or `int8` (one f32 scale per row, or per [`INT8_BLOCK`] values of a top-k
//!   tensor; each value is off by at most half its scale).
//!
//! So `sparse-f32` is exact, and aggregating it equals aggregating dense f32. The decoder
//! rebuilds the dense [`TensorSet`] that aggregation takes, and refuses, with a reason, a
//! payload that does not fit the model: another name or shape, an index out of range, a
//! duplicate or unordered index, a wrong number of scales, a NaN or infinite value or scale, a
//! truncated or overlong payload.
//!
//! Layout of the non-safetensors payloads (little-endian): [`MAGIC`], `u8` sparsity, `u8`
//! precision, `u32` tensor count; per tensor: `u16` name length and the UTF-8 name, `u8` rank and
//! `u64` dimensions, `u32` count of kept rows (sparse) or values (top-k) and as many `u32`
//! indices (none for dense), for int8 `u32` scale count and the `f32` scales, then the kept
//! values (4, 2 or 1 bytes each).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::compact::{dequantize_int8_rows, quantize_int8_rows};
use crate::tensors::{TensorError, CODEC_SAFETENSORS_F32};
use crate::{NamedTensor, TensorSet};

/// First bytes of a non-safetensors update payload.
pub const MAGIC: &[u8; 8] = b"FLUPD\x00\x00\x01";
/// A top-k codec keeps `ceil(n / TOPK_DIVISOR)` values of a tensor of `n` values.
pub const TOPK_DIVISOR: usize = 16;
/// Tensors smaller than this are sent whole by a top-k codec: they cost little, and a classifier's
/// bias would otherwise move one value per round.
pub const TOPK_MIN_VALUES: usize = 4096;
/// Values per int8 scale in a top-k tensor (its kept values have no rows).
pub const INT8_BLOCK: usize = 256;
/// Largest tensor a decoder builds.
const MAX_ELEMENTS: usize = 1 << 28;

/// Which values of a delta are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sparsity {
    /// All of them.
    Dense,
    /// The non-zero rows of each matrix (vectors whole).
    Rows,
    /// The largest-magnitude values of each tensor; the rest stays with the sender.
    TopK,
}

/// How each sent value is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    /// 32-bit float: exact.
    F32,
    /// IEEE half precision.
    F16,
    /// Symmetric 8-bit integer with one f32 scale per row or block.
    Int8,
}

/// An update codec: see the module documentation for the names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UpdateCodec {
    /// Which values are sent.
    pub sparsity: Sparsity,
    /// How they are stored.
    pub precision: Precision,
}

/// Every codec name, the exact fallback first.
pub const CODEC_NAMES: [&str; 9] = [
    CODEC_SAFETENSORS_F32,
    "dense-f16",
    "dense-int8",
    "sparse-f32",
    "sparse-f16",
    "sparse-int8",
    "topk-f32",
    "topk-f16",
    "topk-int8",
];

/// Why a codec name, an encoding or a payload is refused.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A name that is not in [`CODEC_NAMES`].
    #[error("unknown update codec '{0}' (known: {names})", names = CODEC_NAMES.join(", "))]
    Unknown(String),
    /// The safetensors payload does not decode or fit.
    #[error(transparent)]
    Tensors(#[from] TensorError),
    /// The payload does not start with [`MAGIC`].
    #[error("not an update payload (no FLUPD header)")]
    NoMagic,
    /// The payload says another codec than the one named in the header.
    #[error("payload is encoded as {found}, the header says {expected}")]
    WrongCodec {
        /// From the header.
        expected: String,
        /// From the payload.
        found: String,
    },
    /// The payload ends early.
    #[error("payload truncated while reading {0}")]
    Truncated(String),
    /// Bytes follow the last tensor.
    #[error("{0} bytes after the last tensor")]
    Trailing(usize),
    /// The tensors differ from the model's.
    #[error("tensor {index}: {problem}")]
    Tensor {
        /// Position in the payload.
        index: usize,
        /// What is wrong.
        problem: String,
    },
    /// An index is not below its limit.
    #[error("tensor '{name}': index {index} out of range (< {limit})")]
    IndexOutOfRange {
        /// The tensor.
        name: String,
        /// The index.
        index: u64,
        /// Rows (sparse) or values (top-k) of the tensor.
        limit: usize,
    },
    /// An index that repeats, or comes before the one ahead of it.
    #[error("tensor '{name}': {what} index {index} repeats or is out of order (indices must increase)")]
    DuplicateIndex {
        /// The tensor.
        name: String,
        /// `row` or `value`.
        what: &'static str,
        /// The index.
        index: u64,
    },
    /// An int8 tensor with another number of scales than it needs.
    #[error("tensor '{name}': {got} scales, expected {expected}")]
    ScaleCount {
        /// The tensor.
        name: String,
        /// Needed.
        expected: usize,
        /// Found.
        got: usize,
    },
    /// A NaN, infinite or negative scale, or a NaN or infinite value.
    #[error("tensor '{name}': {what} {index} is {value} (must be finite{sign})", sign = if *what == "scale" { " and non-negative" } else { "" })]
    NonFinite {
        /// The tensor.
        name: String,
        /// `scale` or `value`.
        what: &'static str,
        /// Its position.
        index: usize,
        /// The value read.
        value: f32,
    },
    /// A value too large for f16.
    #[error("tensor '{name}' holds {value}, beyond the range of f16; use an f32 or int8 codec")]
    F16Range {
        /// The tensor.
        name: String,
        /// The value.
        value: f32,
    },
}

impl fmt::Display for UpdateCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for UpdateCodec {
    type Err = CodecError;

    fn from_str(name: &str) -> Result<Self, CodecError> {
        let (sparsity, precision) = match name {
            CODEC_SAFETENSORS_F32 => (Sparsity::Dense, Precision::F32),
            "dense-f16" => (Sparsity::Dense, Precision::F16),
            "dense-int8" => (Sparsity::Dense, Precision::Int8),
            "sparse-f32" => (Sparsity::Rows, Precision::F32),
            "sparse-f16" => (Sparsity::Rows, Precision::F16),
            "sparse-int8" => (Sparsity::Rows, Precision::Int8),
            "topk-f32" => (Sparsity::TopK, Precision::F32),
            "topk-f16" => (Sparsity::TopK, Precision::F16),
            "topk-int8" => (Sparsity::TopK, Precision::Int8),
            other => return Err(CodecError::Unknown(other.to_string())),
        };
        Ok(UpdateCodec { sparsity, precision })
    }
}

impl UpdateCodec {
    /// The exact dense fallback, `safetensors-f32`.
    pub const EXACT: UpdateCodec = UpdateCodec { sparsity: Sparsity::Dense, precision: Precision::F32 };

    /// The codec's name, as negotiated.
    pub fn name(&self) -> &'static str {
        let i = match self.sparsity {
            Sparsity::Dense => 0,
            Sparsity::Rows => 3,
            Sparsity::TopK => 6,
        } + match self.precision {
            Precision::F32 => 0,
            Precision::F16 => 1,
            Precision::Int8 => 2,
        };
        CODEC_NAMES[i]
    }

    /// True when decode(encode(x)) is x for every x: nothing is rounded and nothing held back.
    pub fn is_exact(&self) -> bool {
        self.precision == Precision::F32 && self.sparsity != Sparsity::TopK
    }

    /// True when the sender must keep what the payload leaves out ([`ErrorFeedback`]).
    pub fn needs_error_feedback(&self) -> bool {
        self.sparsity == Sparsity::TopK || self.precision != Precision::F32
    }

    /// The codec that carries a round's aggregate to clients: the same one. With top-k the
    /// coordinator keeps the residual of the aggregate (its own [`ErrorFeedback`]).
    pub fn for_download(&self) -> UpdateCodec {
        *self
    }

    /// Encodes `delta`. Fails only for f16 when a value is beyond its range.
    pub fn encode(&self, delta: &TensorSet) -> Result<Vec<u8>, CodecError> {
        if *self == UpdateCodec::EXACT {
            return Ok(delta.encode(None));
        }
        let mut out = MAGIC.to_vec();
        out.push(self.sparsity as u8);
        out.push(self.precision as u8);
        out.extend((delta.tensors.len() as u32).to_le_bytes());
        for t in &delta.tensors {
            self.encode_tensor(t, &mut out)?;
        }
        Ok(out)
    }

    fn encode_tensor(&self, t: &NamedTensor, out: &mut Vec<u8>) -> Result<(), CodecError> {
        out.extend((t.name.len() as u16).to_le_bytes());
        out.extend(t.name.as_bytes());
        out.push(t.shape.len() as u8);
        for &d in &t.shape {
            out.extend((d as u64).to_le_bytes());
        }
        let cols = cols_of(&t.shape);
        // The kept values, and how many values share one int8 scale.
        let (values, block): (Vec<f32>, usize) = match layout_of(self.sparsity, &t.shape) {
            Layout::Dense => (t.data.clone(), cols),
            Layout::Rows => {
                let kept: Vec<usize> = (0..rows_of(&t.shape))
                    .filter(|&r| t.data[r * cols..(r + 1) * cols].iter().any(|&v| v != 0.0))
                    .collect();
                push_indices(out, &kept);
                (kept.iter().flat_map(|&r| t.data[r * cols..(r + 1) * cols].iter().copied()).collect(), cols)
            }
            Layout::Values => {
                let kept = top_k(&t.data, t.data.len().div_ceil(TOPK_DIVISOR));
                push_indices(out, &kept);
                (kept.iter().map(|&i| t.data[i]).collect(), INT8_BLOCK)
            }
        };
        match self.precision {
            Precision::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
            Precision::F16 => {
                for &v in &values {
                    let h = half::f16::from_f32(v);
                    if !h.is_finite() {
                        return Err(CodecError::F16Range { name: t.name.clone(), value: v });
                    }
                    out.extend(h.to_le_bytes());
                }
            }
            Precision::Int8 => {
                let (q, scales) = quantize_int8_rows(&values, block);
                out.extend((scales.len() as u32).to_le_bytes());
                out.extend(scales.iter().flat_map(|s| s.to_le_bytes()));
                out.extend(q.iter().map(|&b| b as u8));
            }
        }
        Ok(())
    }

    /// Decodes a payload of this codec into a dense delta with the names and shapes of
    /// `reference` (the global model it is relative to), refusing anything else.
    pub fn decode(&self, bytes: &[u8], reference: &TensorSet) -> Result<TensorSet, CodecError> {
        if *self == UpdateCodec::EXACT {
            let (delta, _) = TensorSet::decode(bytes)?;
            delta.check_matches(reference)?;
            return Ok(delta);
        }
        Ok(self.decode_sparse(bytes, reference)?.to_dense(reference))
    }

    /// [`UpdateCodec::decode`] short of making the delta dense: the same checks, the same
    /// values, each with its position. Applying or folding it touches only those positions.
    pub fn decode_sparse(&self, bytes: &[u8], reference: &TensorSet) -> Result<SparseDelta, CodecError> {
        if *self == UpdateCodec::EXACT {
            let (delta, _) = TensorSet::decode(bytes)?;
            delta.check_matches(reference)?;
            let tensors = delta.tensors.into_iter().map(|t| SparseTensor { positions: None, values: t.data }).collect();
            return Ok(SparseDelta { tensors });
        }
        let mut r = Reader { bytes, at: 0 };
        if r.take(MAGIC.len(), "the header")? != MAGIC {
            return Err(CodecError::NoMagic);
        }
        let (sparsity, precision) = (r.u8("the sparsity")?, r.u8("the precision")?);
        if (sparsity, precision) != (self.sparsity as u8, self.precision as u8) {
            let found = match (sparsity, precision) {
                (s @ 0..=2, p @ 0..=2) => CODEC_NAMES[usize::from(s) * 3 + usize::from(p)].to_string(),
                _ => format!("unknown (sparsity {sparsity}, precision {precision})"),
            };
            return Err(CodecError::WrongCodec { expected: self.name().to_string(), found });
        }
        let count = r.u32("the tensor count")? as usize;
        if count != reference.tensors.len() {
            return Err(CodecError::Tensor {
                index: count.min(reference.tensors.len()),
                problem: format!("{count} tensors, the model has {}", reference.tensors.len()),
            });
        }
        let mut tensors = Vec::with_capacity(count);
        for (index, want) in reference.tensors.iter().enumerate() {
            tensors.push(self.decode_tensor(&mut r, index, want)?);
        }
        if r.at != bytes.len() {
            return Err(CodecError::Trailing(bytes.len() - r.at));
        }
        Ok(SparseDelta { tensors })
    }

    fn decode_tensor(&self, r: &mut Reader<'_>, index: usize, want: &NamedTensor) -> Result<SparseTensor, CodecError> {
        let bad = |problem: String| CodecError::Tensor { index, problem };
        let name_len = r.u16("a tensor name length")? as usize;
        let name = std::str::from_utf8(r.take(name_len, "a tensor name")?)
            .map_err(|_| bad("name is not UTF-8".into()))?
            .to_string();
        if name != want.name {
            return Err(bad(format!("is '{name}', the model has '{}' here", want.name)));
        }
        let rank = r.u8("a rank")? as usize;
        let mut shape = Vec::with_capacity(rank);
        for _ in 0..rank {
            shape.push(usize::try_from(r.u64("a dimension")?).unwrap_or(usize::MAX));
        }
        if shape != want.shape {
            return Err(bad(format!("'{name}' has shape {shape:?}, the model has {:?}", want.shape)));
        }
        let elements = want.data.len();
        if elements > MAX_ELEMENTS {
            return Err(bad(format!("'{name}' has {elements} values, more than {MAX_ELEMENTS}")));
        }
        let cols = cols_of(&shape);
        let layout = layout_of(self.sparsity, &shape);
        // Positions in the full tensor of the kept values, in order (none: all of them), and
        // values per scale.
        let (positions, block): (Option<Vec<u32>>, usize) = match layout {
            Layout::Dense => (None, cols),
            Layout::Rows => {
                let rows = read_indices(r, &name, "row", rows_of(&shape))?;
                (Some(rows.iter().flat_map(|&row| row * cols..(row + 1) * cols).map(|p| p as u32).collect()), cols)
            }
            Layout::Values => {
                (Some(read_indices(r, &name, "value", elements)?.into_iter().map(|p| p as u32).collect()), INT8_BLOCK)
            }
        };
        let n = positions.as_ref().map_or(elements, Vec::len);
        let values: Vec<f32> = match self.precision {
            Precision::F32 => {
                r.take(n * 4, "values")?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            }
            Precision::F16 => r
                .take(n * 2, "values")?
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Precision::Int8 => {
                let got = r.u32("the scale count")? as usize;
                let expected = if block == 0 { 0 } else { n.div_ceil(block) };
                if got != expected {
                    return Err(CodecError::ScaleCount { name, expected, got });
                }
                let scales: Vec<f32> = r
                    .take(got * 4, "scales")?
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                if let Some((i, &s)) = scales.iter().enumerate().find(|(_, s)| !s.is_finite() || **s < 0.0) {
                    return Err(CodecError::NonFinite { name, what: "scale", index: i, value: s });
                }
                let q: Vec<i8> = r.take(n, "values")?.iter().map(|&b| b as i8).collect();
                dequantize_int8_rows(&q, &scales, block)
            }
        };
        if let Some(i) = crate::tensors::first_non_finite(&values) {
            return Err(CodecError::NonFinite { name, what: "value", index: i, value: values[i] });
        }
        Ok(SparseTensor { positions, values })
    }

    /// Encodes `delta` plus the residual that earlier rounds left out, and keeps as the new
    /// residual what this payload leaves out: `sent + residual` equals `delta + old residual`.
    pub fn encode_with_feedback(&self, delta: &TensorSet, feedback: &mut ErrorFeedback) -> Result<Vec<u8>, CodecError> {
        let sent = self.encode_owned_with_feedback(delta.clone(), feedback.residual.as_ref())?;
        feedback.residual = Some(sent.residual);
        Ok(sent.payload)
    }

    /// [`UpdateCodec::encode_with_feedback`] of a delta the caller gives up: the delta is
    /// corrected by `residual` in place and becomes the new residual, and what the payload
    /// carries comes back decoded (as a receiver decodes it), so a caller that applies it need
    /// not decode it again. Same bits as `encode_with_feedback`. A residual of another layout
    /// (another model) is ignored.
    pub fn encode_owned_with_feedback(
        &self,
        mut delta: TensorSet,
        residual: Option<&TensorSet>,
    ) -> Result<FeedbackPayload, CodecError> {
        if let Some(residual) = residual.filter(|r| r.same_layout(&delta)) {
            delta.add_scaled(residual, 1.0);
        }
        let payload = self.encode(&delta)?;
        // Only the kept values are decoded, and taken off where they were: x + (-1 · y) is x - y,
        // bit for bit, and the values left out stay as they are.
        let sent = self.decode_sparse(&payload, &delta)?;
        sent.add_to(&mut delta, -1.0);
        Ok(FeedbackPayload { payload, sent, residual: delta })
    }
}

/// What [`UpdateCodec::encode_owned_with_feedback`] makes of a delta.
#[derive(Debug)]
pub struct FeedbackPayload {
    /// The encoded payload.
    pub payload: Vec<u8>,
    /// The payload decoded: what a receiver applies.
    pub sent: SparseDelta,
    /// What the payload leaves out, for the next delta.
    pub residual: TensorSet,
}

/// What a lossy codec has not sent yet, added to the next delta. A client keeps it in its state
/// dir, so it survives restarts ([`ErrorFeedback::load`], [`ErrorFeedback::save`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ErrorFeedback {
    /// The residual, with the model's names and shapes; `None` before the first round.
    pub residual: Option<TensorSet>,
}

impl ErrorFeedback {
    /// Reads a residual saved by [`ErrorFeedback::save`]; a missing file is an empty residual.
    pub fn load(path: &Path) -> std::io::Result<ErrorFeedback> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let (residual, _) = TensorSet::decode(&bytes).map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))
                })?;
                Ok(ErrorFeedback { residual: Some(residual) })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ErrorFeedback::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes the residual atomically and durably; an empty one removes the file.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        match &self.residual {
            Some(residual) => crate::files::write_atomic(path, &residual.encode(None), 0o600),
            None => crate::files::remove_if_exists(path),
        }
    }

    /// [`ErrorFeedback::save`] for a cache that is checked when read: replaced atomically, straight
    /// from the residual's buffers, without fsync ([`crate::files::replace_unsynced`]).
    pub fn save_unsynced(&self, path: &Path) -> std::io::Result<()> {
        match &self.residual {
            Some(residual) => crate::files::replace_unsynced(path, 0o600, |tmp| residual.write_file(tmp, None)),
            None => crate::files::remove_if_exists(path),
        }
    }
}

/// BLAKE3 over names, shapes and the f32 bits of the values, in hex: two sets hash alike only
/// when they are bit-identical. Clients and the coordinator compare global models with it, on
/// each round's critical path, so the hash is BLAKE3 (several times SHA-256's speed on one core),
/// on the rayon pool (the blake3 crate splits large inputs only; the hash is that of one thread).
pub fn tensor_digest(set: &TensorSet) -> String {
    let mut h = blake3::Hasher::new();
    for t in &set.tensors {
        h.update(&(t.name.len() as u64).to_le_bytes());
        h.update(t.name.as_bytes());
        h.update(&(t.shape.len() as u64).to_le_bytes());
        for &d in &t.shape {
            h.update(&(d as u64).to_le_bytes());
        }
        h.update_rayon(bytemuck::cast_slice::<f32, u8>(&t.data));
    }
    h.finalize().to_hex().to_string()
}

/// A decoded payload before it is made dense ([`UpdateCodec::decode_sparse`]): per tensor of
/// the model, in its order, the values the payload carries and their flat positions. Applying
/// it ([`SparseDelta::add_to`]) is the one way both sides of a delta download do it, so the
/// coordinator and every client hold the same bits; folding it touches only its values.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseDelta {
    /// One per tensor of the model.
    pub tensors: Vec<SparseTensor>,
}

/// The values of one tensor in a [`SparseDelta`].
#[derive(Clone, Debug, PartialEq)]
pub struct SparseTensor {
    /// Flat positions of `values`, increasing; `None`: every position, in order.
    pub positions: Option<Vec<u32>>,
    /// The values, all finite.
    pub values: Vec<f32>,
}

impl SparseDelta {
    /// `target += scale · self`, at the positions carried only; `target` has the layout of the
    /// reference the delta was decoded against. With `scale` 1 this is `x + v` (1 · v is v).
    pub fn add_to(&self, target: &mut TensorSet, scale: f32) {
        for (s, t) in self.tensors.iter().zip(&mut target.tensors) {
            match &s.positions {
                None => t.data.iter_mut().zip(&s.values).for_each(|(x, v)| *x += scale * v),
                Some(positions) => positions.iter().zip(&s.values).for_each(|(&p, v)| t.data[p as usize] += scale * v),
            }
        }
    }

    /// `base` with the delta applied ([`SparseDelta::add_to`]).
    pub fn applied_to(&self, base: &TensorSet) -> TensorSet {
        let mut out = base.clone();
        self.add_to(&mut out, 1.0);
        out
    }

    /// The dense delta, zero where no value is carried, with the names and shapes of `reference`.
    pub fn to_dense(&self, reference: &TensorSet) -> TensorSet {
        let tensors = self
            .tensors
            .iter()
            .zip(&reference.tensors)
            .map(|(s, r)| {
                let data = match &s.positions {
                    None => s.values.clone(),
                    Some(positions) => {
                        let mut data = vec![0.0f32; r.data.len()];
                        positions.iter().zip(&s.values).for_each(|(&p, &v)| data[p as usize] = v);
                        data
                    }
                };
                NamedTensor { name: r.name.clone(), shape: r.shape.clone(), data }
            })
            .collect();
        TensorSet { tensors }
    }

    /// The Euclidean norm (the values left out are zero).
    pub fn l2_norm(&self) -> f64 {
        self.tensors.iter().flat_map(|t| &t.values).map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    Dense,
    Rows,
    Values,
}

fn layout_of(sparsity: Sparsity, shape: &[usize]) -> Layout {
    match sparsity {
        Sparsity::Dense => Layout::Dense,
        Sparsity::Rows if shape.len() >= 2 => Layout::Rows,
        Sparsity::Rows => Layout::Dense,
        Sparsity::TopK if shape.iter().product::<usize>() >= TOPK_MIN_VALUES => Layout::Values,
        Sparsity::TopK => Layout::Dense,
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

fn cols_of(shape: &[usize]) -> usize {
    let elements: usize = shape.iter().product();
    elements.checked_div(rows_of(shape)).unwrap_or(0)
}

/// Indices of the `k` largest magnitudes, ascending; ties go to the lower index.
///
/// Magnitudes are compared as the bits of `|v|` (for non-negative floats, their order is that of
/// the numbers). A histogram of their top 12 bits (4096 buckets) finds the bucket that holds
/// the k-th largest.
/// One pass in index order then takes every value of a higher bucket, and keeps those of that
/// bucket as candidates; a selection among the candidates finds the k-th largest exactly, and
/// the candidates above it (and, of those equal to it, the first ones) join the others. Two
/// passes over the values, each over chunks on the rayon pool (a large model's on every core);
/// nothing of the tensor's size is allocated or sorted.
fn top_k(data: &[f32], k: usize) -> Vec<usize> {
    use rayon::prelude::*;
    if k >= data.len() {
        return (0..data.len()).collect();
    }
    if k == 0 {
        return Vec::new();
    }
    const LOW_BITS: u32 = 19;
    const BUCKETS: usize = 1 << (31 - LOW_BITS);
    let bucket_of = |v: f32| ((v.to_bits() & 0x7fff_ffff) >> LOW_BITS) as usize;
    // A few chunks per thread, and none so small that handing it over costs more than its pass.
    let chunk = data.len().div_ceil(rayon::current_num_threads() * 4).max(1 << 16);
    let histogram = data
        .par_chunks(chunk)
        .map(|values| {
            // Four interleaved counts per bucket: neighbouring values often share a bucket, and
            // with one count each increment would wait for the one before it.
            let mut counts = vec![[0u32; 4]; BUCKETS];
            let mut quads = values.chunks_exact(4);
            for q in &mut quads {
                for (lane, &v) in q.iter().enumerate() {
                    counts[bucket_of(v)][lane] += 1;
                }
            }
            for &v in quads.remainder() {
                counts[bucket_of(v)][0] += 1;
            }
            counts.iter().map(|c| c.iter().sum::<u32>()).collect::<Vec<u32>>()
        })
        .reduce(
            || vec![0u32; BUCKETS],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        );
    // The bucket of the k-th largest, and how many values lie in the buckets above it.
    let (mut bucket, mut above) = (BUCKETS - 1, 0usize);
    while above + (histogram[bucket] as usize) < k {
        above += histogram[bucket] as usize;
        bucket -= 1;
    }
    // Per chunk, in index order: the values above the bucket, and the bucket's (magnitude, index).
    type Scan = (Vec<u32>, Vec<(u32, u32)>);
    let parts: Vec<Scan> = data
        .par_chunks(chunk)
        .enumerate()
        .map(|(c, values)| {
            let (mut taken, mut candidates) = (Vec::new(), Vec::new());
            for (i, &v) in values.iter().enumerate() {
                let b = bucket_of(v);
                if b >= bucket {
                    let index = (c * chunk + i) as u32;
                    if b > bucket {
                        taken.push(index);
                    } else {
                        candidates.push((v.to_bits() & 0x7fff_ffff, index));
                    }
                }
            }
            (taken, candidates)
        })
        .collect();
    let taken: Vec<u32> = parts.iter().flat_map(|(t, _)| t.iter().copied()).collect();
    let candidates: Vec<(u32, u32)> = parts.iter().flat_map(|(_, c)| c.iter().copied()).collect();
    // The candidates to take: the largest, ties to the lower index (the candidates are in index order).
    let need = k - above;
    let mut magnitudes: Vec<u32> = candidates.iter().map(|&(m, _)| m).collect();
    let (_, &mut threshold, _) = magnitudes.select_nth_unstable_by(need - 1, |a, b| b.cmp(a));
    let mut ties = need - magnitudes.iter().filter(|&&m| m > threshold).count();
    let chosen = candidates.iter().filter(|&&(m, _)| {
        let take = m > threshold || (m == threshold && ties > 0);
        ties -= usize::from(take && m == threshold);
        take
    });
    // Both lists are in index order: merge them.
    let mut out = Vec::with_capacity(k);
    let mut rest = taken.into_iter().peekable();
    for &(_, i) in chosen {
        while let Some(t) = rest.next_if(|&t| t < i) {
            out.push(t as usize);
        }
        out.push(i as usize);
    }
    out.extend(rest.map(|t| t as usize));
    out
}

fn push_indices(out: &mut Vec<u8>, indices: &[usize]) {
    out.extend((indices.len() as u32).to_le_bytes());
    out.extend(indices.iter().flat_map(|&i| (i as u32).to_le_bytes()));
}

fn read_indices(r: &mut Reader<'_>, name: &str, what: &'static str, limit: usize) -> Result<Vec<usize>, CodecError> {
    let count = r.u32("an index count")? as usize;
    if count > limit {
        return Err(CodecError::Tensor {
            index: 0,
            problem: format!("'{name}' claims {count} {what}s, it has {limit}"),
        });
    }
    let raw = r.take(count * 4, "indices")?;
    let mut out = Vec::with_capacity(count);
    for c in raw.chunks_exact(4) {
        let i = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize;
        if i >= limit {
            return Err(CodecError::IndexOutOfRange { name: name.to_string(), index: i as u64, limit });
        }
        if out.last().is_some_and(|&last| i <= last) {
            return Err(CodecError::DuplicateIndex { name: name.to_string(), what, index: i as u64 });
        }
        out.push(i);
    }
    Ok(out)
}

/// A cursor over a payload that reports what it was reading when the bytes ran out.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], CodecError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| CodecError::Truncated(what.into()))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, CodecError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, CodecError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, CodecError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, CodecError> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn codec(name: &str) -> UpdateCodec {
        name.parse().unwrap()
    }

    /// An embedding-like table of `rows` × 4 where only `touched` rows changed, and a bias.
    fn delta(table: Vec<f32>, rows: usize, bias: [f32; 2]) -> TensorSet {
        TensorSet::new(vec![
            NamedTensor { name: "embedding.weight".into(), shape: vec![rows, table.len() / rows], data: table },
            NamedTensor { name: "linear.bias".into(), shape: vec![2], data: bias.to_vec() },
        ])
    }

    fn sparse_table() -> impl Strategy<Value = (Vec<f32>, usize)> {
        (1usize..24).prop_flat_map(|rows| {
            let row = prop_oneof![
                2 => Just(vec![0.0f32; 4]),
                3 => proptest::collection::vec(-3.0f32..3.0, 4),
            ];
            proptest::collection::vec(row, rows).prop_map(move |r| (r.concat(), rows))
        })
    }

    #[test]
    fn every_name_parses_to_itself() {
        for name in CODEC_NAMES {
            assert_eq!(codec(name).name(), name);
        }
        let e = "gzip-f32".parse::<UpdateCodec>().unwrap_err().to_string();
        assert!(e.contains("unknown update codec 'gzip-f32'") && e.contains("sparse-int8"), "{e}");
    }

    #[test]
    fn sparse_sends_only_the_changed_rows() {
        let mut table = vec![0.0f32; 1000 * 4];
        table[7 * 4..8 * 4].copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
        let d = delta(table, 1000, [0.5, 0.0]);
        let sparse = codec("sparse-f32").encode(&d).unwrap();
        let dense = UpdateCodec::EXACT.encode(&d).unwrap();
        assert!(sparse.len() < 120, "{} bytes", sparse.len());
        assert!(dense.len() > 16_000);
        assert_eq!(codec("sparse-f32").decode(&sparse, &d).unwrap(), d);
    }

    proptest! {
        #[test]
        fn f32_codecs_are_exact((table, rows) in sparse_table(), b in -1.0f32..1.0) {
            let d = delta(table, rows, [b, 0.0]);
            for name in [CODEC_SAFETENSORS_F32, "sparse-f32"] {
                let c = codec(name);
                prop_assert_eq!(&c.decode(&c.encode(&d).unwrap(), &d).unwrap(), &d, "{}", name);
            }
        }

        #[test]
        fn f16_is_within_2_pow_minus_11_relative((table, rows) in sparse_table(), b in -1.0f32..1.0) {
            let d = delta(table, rows, [b, 1e-6]);
            for name in ["dense-f16", "sparse-f16"] {
                let c = codec(name);
                let got = c.decode(&c.encode(&d).unwrap(), &d).unwrap();
                for (x, y) in d.tensors.iter().flat_map(|t| &t.data).zip(got.tensors.iter().flat_map(|t| &t.data)) {
                    // Below f16's smallest normal (2^-14) the step is absolute: 2^-24, half of it off.
                    let bound = (x.abs() * 2f32.powi(-11)).max(2f32.powi(-25));
                    prop_assert!((x - y).abs() <= bound, "{}: {} -> {}", name, x, y);
                }
            }
        }

        #[test]
        fn int8_is_within_half_a_scale_of_its_row((table, rows) in sparse_table(), b in -1.0f32..1.0) {
            let d = delta(table, rows, [b, 0.25]);
            for name in ["dense-int8", "sparse-int8"] {
                let c = codec(name);
                let got = c.decode(&c.encode(&d).unwrap(), &d).unwrap();
                for (t, g) in d.tensors.iter().zip(&got.tensors) {
                    let cols = cols_of(&t.shape);
                    for (row, grow) in t.data.chunks(cols).zip(g.data.chunks(cols)) {
                        let scale = row.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0;
                        for (x, y) in row.iter().zip(grow) {
                            prop_assert!((x - y).abs() <= scale / 2.0 * (1.0 + 1e-5), "{}: {} -> {} (scale {})", name, x, y, scale);
                        }
                    }
                }
            }
        }

        #[test]
        fn error_feedback_conserves_the_delta(
            (table, rows) in sparse_table(),
            second in proptest::collection::vec(-1.0f32..1.0, 0..1),
            name in proptest::sample::select(vec!["topk-f32", "topk-f16", "topk-int8", "sparse-int8", "dense-f16"]),
        ) {
            let c = codec(name);
            let first = delta(table.clone(), rows, [0.5, -0.25]);
            let mut feedback = ErrorFeedback::default();
            let payload = c.encode_with_feedback(&first, &mut feedback).unwrap();
            let sent = c.decode(&payload, &first).unwrap();
            let residual = feedback.residual.clone().unwrap();
            for ((t, s), r) in first.tensors.iter().zip(&sent.tensors).zip(&residual.tensors) {
                for ((x, y), z) in t.data.iter().zip(&s.data).zip(&r.data) {
                    prop_assert!((y + z - x).abs() <= 1e-6 * x.abs().max(1.0), "{}: sent {} + residual {} != {}", name, y, z, x);
                }
            }
            // The next round sends its own delta plus the residual, and again keeps what it leaves out.
            let shift = second.first().copied().unwrap_or(0.1);
            let next = delta(table.iter().map(|v| v * shift).collect(), rows, [shift, 0.0]);
            let payload = c.encode_with_feedback(&next, &mut feedback).unwrap();
            let sent = c.decode(&payload, &next).unwrap();
            let new_residual = feedback.residual.clone().unwrap();
            for (((t, old), s), r) in next.tensors.iter().zip(&residual.tensors).zip(&sent.tensors).zip(&new_residual.tensors) {
                for (((x, o), y), z) in t.data.iter().zip(&old.data).zip(&s.data).zip(&r.data) {
                    prop_assert!((y + z - (x + o)).abs() <= 1e-6 * (x + o).abs().max(1.0), "{}: round 2", name);
                }
            }
        }

        #[test]
        fn decoders_never_panic_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..300), name in proptest::sample::select(CODEC_NAMES.to_vec())) {
            let reference = delta(vec![0.0; 16], 4, [0.0, 0.0]);
            let _ = codec(name).decode(&bytes, &reference);
            let mut framed = MAGIC.to_vec();
            framed.extend(&bytes);
            let _ = codec(name).decode(&framed, &reference);
        }

        #[test]
        fn decoders_refuse_any_truncation((table, rows) in sparse_table(), name in proptest::sample::select(CODEC_NAMES[1..].to_vec()), cut in 1usize..64) {
            let d = delta(table, rows, [1.0, 2.0]);
            let c = codec(name);
            let bytes = c.encode(&d).unwrap();
            let cut = cut.min(bytes.len());
            prop_assert!(c.decode(&bytes[..bytes.len() - cut], &d).is_err());
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert!(matches!(c.decode(&longer, &d), Err(CodecError::Trailing(1))));
        }
    }

    /// Offset of the first index of the embedding in a sparse or top-k payload.
    fn first_index_offset() -> usize {
        MAGIC.len() + 2 + 4 + 2 + "embedding.weight".len() + 1 + 2 * 8 + 4
    }

    #[test]
    fn malformed_payloads_are_refused_with_a_reason() {
        let mut table = vec![0.0f32; 8 * 4];
        table[4..8].copy_from_slice(&[1.0, -2.0, 0.5, 0.25]);
        table[20..24].copy_from_slice(&[1.0, 1.0, 1.0, 1.0]);
        let d = delta(table, 8, [0.5, 0.5]);
        let sparse = codec("sparse-int8");
        let good = sparse.encode(&d).unwrap();
        let at = first_index_offset();
        assert_eq!(&good[at..at + 8], &[1, 0, 0, 0, 5, 0, 0, 0], "rows 1 and 5");

        let mut out_of_range = good.clone();
        out_of_range[at + 4..at + 8].copy_from_slice(&8u32.to_le_bytes());
        let e = sparse.decode(&out_of_range, &d).unwrap_err();
        assert!(matches!(e, CodecError::IndexOutOfRange { index: 8, limit: 8, .. }), "{e}");

        let mut duplicate = good.clone();
        duplicate[at + 4..at + 8].copy_from_slice(&1u32.to_le_bytes());
        let e = sparse.decode(&duplicate, &d).unwrap_err();
        assert!(matches!(e, CodecError::DuplicateIndex { index: 1, what: "row", .. }), "{e}");
        assert!(e.to_string().contains("repeats"), "{e}");

        // Two rows kept: the scale count must be 2.
        let scales_at = at + 8;
        let mut scale_count = good.clone();
        scale_count[scales_at..scales_at + 4].copy_from_slice(&3u32.to_le_bytes());
        let e = sparse.decode(&scale_count, &d).unwrap_err();
        assert!(matches!(e, CodecError::ScaleCount { expected: 2, got: 3, .. }), "{e}");

        let mut nan_scale = good.clone();
        nan_scale[scales_at + 4..scales_at + 8].copy_from_slice(&f32::NAN.to_le_bytes());
        let e = sparse.decode(&nan_scale, &d).unwrap_err();
        assert!(matches!(e, CodecError::NonFinite { what: "scale", index: 0, .. }), "{e}");

        let f32s = codec("sparse-f32");
        let mut nan_value = f32s.encode(&d).unwrap();
        let values_at = at + 8;
        nan_value[values_at..values_at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        let e = f32s.decode(&nan_value, &d).unwrap_err();
        assert!(matches!(e, CodecError::NonFinite { what: "value", index: 0, .. }), "{e}");

        let e = codec("sparse-f16").decode(&good, &d).unwrap_err();
        assert!(matches!(e, CodecError::WrongCodec { .. }), "{e}");
        let other = delta(vec![0.0; 9 * 4], 9, [0.0, 0.0]);
        let e = sparse.decode(&good, &other).unwrap_err();
        assert!(e.to_string().contains("shape [8, 4], the model has [9, 4]"), "{e}");

        let topk = codec("topk-f32");
        let big = delta((0..4096).map(|i| i as f32).collect(), 1024, [0.0, 0.0]);
        let good = topk.encode(&big).unwrap();
        let mut past_end = good.clone();
        past_end[at..at + 4].copy_from_slice(&4096u32.to_le_bytes());
        let e = topk.decode(&past_end, &big).unwrap_err();
        assert!(matches!(e, CodecError::IndexOutOfRange { index: 4096, limit: 4096, .. }), "{e}");
        let mut repeated = good.clone();
        let second = good[at + 4..at + 8].to_vec();
        repeated[at..at + 4].copy_from_slice(&second);
        let e = topk.decode(&repeated, &big).unwrap_err();
        assert!(matches!(e, CodecError::DuplicateIndex { what: "value", .. }), "{e}");
    }

    /// A 64 × 64 table of distinct values, and a bias.
    fn big_delta(seed: f32) -> TensorSet {
        let table = (0..4096).map(|i| (i as f32 * 0.37 + seed).sin() * (1.0 + (i % 7) as f32)).collect();
        delta(table, 64, [seed, -seed])
    }

    #[test]
    fn topk_keeps_the_largest_values_of_big_tensors_only() {
        let mut d = big_delta(0.5);
        d.tensors[0].data[300] = -50.0;
        d.tensors[0].data[17] = 40.0;
        let c = codec("topk-f32");
        let got = c.decode(&c.encode(&d).unwrap(), &d).unwrap();
        let kept: Vec<usize> =
            got.tensors[0].data.iter().enumerate().filter(|(_, v)| **v != 0.0).map(|(i, _)| i).collect();
        assert_eq!(kept.len(), 4096 / TOPK_DIVISOR);
        assert!(kept.contains(&17) && kept.contains(&300));
        let smallest_kept = kept.iter().map(|&i| d.tensors[0].data[i].abs()).fold(f32::MAX, f32::min);
        let largest_left =
            (0..4096).filter(|i| !kept.contains(i)).map(|i| d.tensors[0].data[i].abs()).fold(0.0, f32::max);
        assert!(smallest_kept >= largest_left, "{smallest_kept} < {largest_left}");
        assert_eq!(got.tensors[1], d.tensors[1], "the small bias is sent whole");
    }

    #[test]
    fn topk_error_feedback_conserves_over_rounds_and_sends_everything_eventually() {
        for name in ["topk-f32", "topk-f16", "topk-int8"] {
            let c = codec(name);
            let mut feedback = ErrorFeedback::default();
            let mut owed = big_delta(0.0).zeros_like();
            let mut sent_total = big_delta(0.0).zeros_like();
            for round in 0..40 {
                // Only the first round has a delta; later rounds drain the residual.
                let d = if round == 0 { big_delta(1.0) } else { big_delta(0.0).zeros_like() };
                owed.add_scaled(&d, 1.0);
                let sent = c.decode(&c.encode_with_feedback(&d, &mut feedback).unwrap(), &d).unwrap();
                sent_total.add_scaled(&sent, 1.0);
                let residual = feedback.residual.as_ref().unwrap();
                for ((o, s), r) in owed.tensors.iter().zip(&sent_total.tensors).zip(&residual.tensors) {
                    for ((x, y), z) in o.data.iter().zip(&s.data).zip(&r.data) {
                        assert!((y + z - x).abs() <= 1e-4 * x.abs().max(1.0), "{name} round {round}: {y} + {z} != {x}");
                    }
                }
            }
            assert!(feedback.residual.unwrap().l2_norm() < 1e-3 * owed.l2_norm(), "{name}: the residual drains");
        }
    }

    #[test]
    fn residual_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("residual.safetensors");
        assert_eq!(ErrorFeedback::load(&path).unwrap(), ErrorFeedback::default());
        let mut feedback = ErrorFeedback::default();
        let d = delta((0..64).map(|i| i as f32 / 7.0).collect(), 16, [0.1, 0.2]);
        codec("topk-int8").encode_with_feedback(&d, &mut feedback).unwrap();
        feedback.save(&path).unwrap();
        assert_eq!(ErrorFeedback::load(&path).unwrap(), feedback);
        ErrorFeedback::default().save(&path).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn digest_tells_bit_identical_sets_apart() {
        let a = delta(vec![0.0, 1.0, 2.0, 3.0], 2, [0.0, 0.0]);
        let mut b = a.clone();
        assert_eq!(tensor_digest(&a), tensor_digest(&b));
        b.tensors[0].data[1] = f32::from_bits(1.0f32.to_bits() + 1);
        assert_ne!(tensor_digest(&a), tensor_digest(&b));
        let nothing = codec("sparse-f32").encode(&a.zeros_like()).unwrap();
        assert_eq!(codec("sparse-f32").decode_sparse(&nothing, &a).unwrap().applied_to(&a), a);
    }

    /// The definition `top_k` must match: sort every index by magnitude, then by index.
    fn top_k_by_sorting(data: &[f32], k: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..data.len()).collect();
        idx.sort_by(|a, b| data[*b].abs().total_cmp(&data[*a].abs()).then(a.cmp(b)));
        idx.truncate(k);
        idx.sort_unstable();
        idx
    }

    #[test]
    fn top_k_over_several_chunks_is_the_k_largest_with_ties_to_the_lower_index() {
        // Long enough for several chunks on any pool, with few distinct magnitudes: every chunk
        // holds ties of the k-th largest, and the lower indices must win across chunks.
        let data: Vec<f32> =
            (0..700_003u32).map(|i| ((i.wrapping_mul(2_654_435_761) >> 20) % 7) as f32 - 3.0).collect();
        for k in [1, 4_096, 100_000, 350_001, 699_999] {
            assert_eq!(top_k(&data, k), top_k_by_sorting(&data, k), "k = {k}");
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        assert_eq!(pool.install(|| top_k(&data, 123_457)), top_k_by_sorting(&data, 123_457));
    }

    proptest! {
        #[test]
        fn top_k_is_the_k_largest_magnitudes_with_ties_to_the_lower_index(
            // Few distinct magnitudes (and both zeros) make ties the common case.
            data in proptest::collection::vec(prop_oneof![(-3i8..=3).prop_map(f32::from), Just(-0.0f32), -2.0f32..2.0], 0..200),
            k in 0usize..220,
        ) {
            prop_assert_eq!(top_k(&data, k), top_k_by_sorting(&data, k.min(data.len())));
        }

        /// The sparse decoding carries the same values as the dense one, and applying it adds
        /// them where they are and leaves every other value's bits alone.
        #[test]
        fn sparse_decoding_is_the_dense_one_at_its_positions(
            (table, rows) in sparse_table(),
            name in proptest::sample::select(CODEC_NAMES.to_vec()),
        ) {
            let c = codec(name);
            let d = delta(table, rows, [0.5, -0.25]);
            let payload = c.encode(&d).unwrap();
            let (dense, sparse) = (c.decode(&payload, &d).unwrap(), c.decode_sparse(&payload, &d).unwrap());
            prop_assert_eq!(&sparse.to_dense(&d), &dense);
            prop_assert!((sparse.l2_norm() - dense.l2_norm()).abs() <= 1e-9 * dense.l2_norm().max(1.0));
            let mut base = d.clone();
            base.tensors[0].data[0] = -0.0;
            let applied = sparse.applied_to(&base);
            for ((b, a), (s, t)) in base.tensors.iter().zip(&applied.tensors).zip(sparse.tensors.iter().zip(&dense.tensors)) {
                let carried: std::collections::HashSet<usize> = match &s.positions {
                    None => (0..b.data.len()).collect(),
                    Some(p) => p.iter().map(|&p| p as usize).collect(),
                };
                for (i, ((x, y), v)) in b.data.iter().zip(&a.data).zip(&t.data).enumerate() {
                    let want = if carried.contains(&i) { x + v } else { *x };
                    prop_assert_eq!(y.to_bits(), want.to_bits(), "{} at {}", name, i);
                }
            }
        }
    }
}
