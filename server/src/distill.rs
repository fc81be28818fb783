//! Federated distillation (`serve --distill-from TEACHER`): the coordinator ships a trained
//! teacher model to the clients, and each client trains the federation's model (the student) on
//! its own rows against the teacher's softened outputs mixed with the labels. Only the student's
//! delta travels back; the teacher never changes.
//!
//! - The teacher is any model file the clients can run (f32 or a compact export, any
//!   architecture), with exactly the federation's labels; anything else is refused at start.
//! - It is fixed when the federation is created: its bytes are copied to
//!   `STATE/distill-teacher.model` and its SHA-256, temperature and alpha to
//!   `STATE/distill.json`. A restart serves that copy; a restart whose flags would change it (or
//!   turn distillation on or off) is refused.
//! - Each round task names the teacher by its SHA-256 ([`pb::DistillTask`]). A client fetches it
//!   once (`FetchModel` with `teacher`, only while it is sampled, as for the model), checks the
//!   digest and keeps it in its state dir. The bytes it cost are in `metrics.jsonl`
//!   (`teacher_bytes_down`, also counted in `bytes_down`), with the updates that distilled
//!   (`distilled`, from each update's header).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use fl_common::cli::{parse, Permanent};
use fl_common::tensors::sha256_hex;
use fl_common::{ModelSpec, TensorSet};
use fl_proto::pb;
use serde::{Deserialize, Serialize};

use crate::backend::ModelBackend;
use crate::coordinator::{Coordinator, RoundTask};
use crate::error::ServiceError;

/// The `serve` flags of federated distillation.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DistillArgs {
    /// Federated distillation: ship this trained model file (any architecture, f32 or a compact
    /// export, with the federation's labels) to each client once; every client then trains on its
    /// own rows against the teacher's softened outputs mixed with the labels, and only the
    /// student's delta travels. Fixed when the federation is created [default: off].
    #[arg(long = "distill-from", env = "FL_DISTILL_FROM")]
    pub from: Option<PathBuf>,
    /// Temperature T that softens the teacher's outputs [default: 2].
    #[arg(long = "distill-temperature", value_parser = parse::positive(1000.0))]
    pub temperature: Option<f64>,
    /// Weight of the labels' loss in [0, 1]; the rest goes to matching the teacher [default: 0.5].
    #[arg(long = "distill-alpha", value_parser = parse::float_in(0.0, 1.0))]
    pub alpha: Option<f64>,
}

/// The stored setting (`STATE/distill.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// SHA-256 (hex) of the teacher file's bytes.
    pub teacher_sha256: String,
    /// Size of the teacher file.
    pub teacher_bytes: u64,
    /// Temperature T.
    pub temperature: f64,
    /// Weight of the labels' loss.
    pub alpha: f64,
    /// The file the teacher was read from, for the operator.
    pub source: String,
}

const CONFIG_FILE: &str = "distill.json";
const TEACHER_FILE: &str = "distill-teacher.model";
/// The default temperature, as `fl-client distill`'s.
pub const DEFAULT_TEMPERATURE: f64 = 2.0;
/// The default weight of the labels, as `fl-client distill`'s.
pub const DEFAULT_ALPHA: f64 = 0.5;

/// A teacher read and checked, not stored yet.
#[derive(Debug)]
pub struct NewTeacher {
    config: DistillConfig,
    bytes: Vec<u8>,
}

impl DistillArgs {
    fn any_set(&self) -> bool {
        self.temperature.is_some() || self.alpha.is_some()
    }

    /// Reads and checks the teacher these flags name, for a federation of `spec`: a model file
    /// the backend builds, with `spec`'s labels in the same order. `None` when distillation is off.
    pub fn resolve(&self, spec: &ModelSpec, backend: &dyn ModelBackend) -> Result<Option<NewTeacher>> {
        let Some(path) = &self.from else {
            if self.any_set() {
                return Err(Permanent::error("--distill-temperature and --distill-alpha need --distill-from"));
            }
            return Ok(None);
        };
        let bytes = std::fs::read(path).with_context(|| format!("reading --distill-from {}", path.display()))?;
        let (teacher, weights) = decode_any_model(&bytes)
            .map_err(|e| Permanent::error(format!("--distill-from {}: not a model file: {e}", path.display())))?;
        if teacher.labels != spec.labels {
            return Err(Permanent::error(format!(
                "--distill-from {}: the teacher's labels [{}] differ from the federation's [{}]; a teacher must have the same labels in the same order",
                path.display(),
                teacher.labels.join(","),
                spec.labels.join(",")
            )));
        }
        backend
            .check_weights(&teacher, &weights)
            .map_err(|e| Permanent::error(format!("--distill-from {}: {e:#}", path.display())))?;
        let config = DistillConfig {
            teacher_sha256: sha256_hex(&bytes),
            teacher_bytes: bytes.len() as u64,
            temperature: self.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            alpha: self.alpha.unwrap_or(DEFAULT_ALPHA),
            source: path.display().to_string(),
        };
        Ok(Some(NewTeacher { config, bytes }))
    }

    /// Checks the flags against the stored setting of an existing federation. Without
    /// `--distill-from` the stored setting holds; with it, it must be the same teacher (by
    /// digest), temperature and alpha.
    pub fn settle(&self, root: &Path, spec: &ModelSpec, backend: &dyn ModelBackend) -> Result<()> {
        let stored = DistillConfig::load(root)?;
        let asked = match (&self.from, &stored) {
            (None, _) if self.any_set() => {
                return Err(Permanent::error("--distill-temperature and --distill-alpha need --distill-from"))
            }
            (None, _) => return Ok(()),
            (Some(path), None) => {
                return Err(Permanent::error(format!(
                "--distill-from {}: distillation cannot be turned on for an existing federation; use a new --state-dir",
                path.display()
            )))
            }
            (Some(_), Some(_)) => self.resolve(spec, backend)?.map(|t| t.config),
        };
        if let (Some(asked), Some(stored)) = (asked, stored) {
            let same = asked.teacher_sha256 == stored.teacher_sha256
                && (!self.any_set() || (asked.temperature == stored.temperature && asked.alpha == stored.alpha));
            if !same {
                return Err(Permanent::error(format!(
                    "these flags would change the existing federation's distillation (teacher {} of sha256 {}, temperature {}, alpha {}); use a new --state-dir for a new federation",
                    stored.source, stored.teacher_sha256, stored.temperature, stored.alpha
                )));
            }
        }
        Ok(())
    }
}

impl NewTeacher {
    /// Stores the teacher's copy, then its setting, when the federation is created.
    pub fn save(&self, root: &Path) -> Result<()> {
        let path = root.join(TEACHER_FILE);
        fl_common::files::write_atomic(&path, &self.bytes, 0o644)
            .with_context(|| format!("writing {}", path.display()))?;
        crate::state::write_setting(&root.join(CONFIG_FILE), &self.config)
    }
}

impl DistillConfig {
    /// Reads the stored setting; `None` when the federation does not distill.
    pub fn load(root: &Path) -> Result<Option<DistillConfig>> {
        crate::state::read_setting(&root.join(CONFIG_FILE))
    }
}

/// The teacher a running federation serves.
#[derive(Debug)]
pub struct Teacher {
    /// The stored setting.
    pub config: DistillConfig,
    /// The teacher file, as clients download it.
    pub bytes: Arc<Vec<u8>>,
    /// Teacher bytes sent since the last committed round.
    sent: AtomicU64,
}

impl Teacher {
    /// The stored teacher of the federation in `root`, its copy checked against its digest;
    /// `None` when the federation does not distill.
    pub fn load(root: &Path) -> Result<Option<Teacher>> {
        let Some(config) = DistillConfig::load(root)? else { return Ok(None) };
        let path = root.join(TEACHER_FILE);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if sha256_hex(&bytes) != config.teacher_sha256 {
            return Err(Permanent::error(format!(
                "{}: its SHA-256 is not the one in {CONFIG_FILE} ({}): the teacher's copy was changed",
                path.display(),
                config.teacher_sha256
            )));
        }
        Ok(Some(Teacher { config, bytes: Arc::new(bytes), sent: AtomicU64::new(0) }))
    }

    /// What a round task says of the teacher.
    pub fn task(&self) -> pb::DistillTask {
        pb::DistillTask {
            teacher_sha256: self.config.teacher_sha256.clone(),
            teacher_bytes: self.config.teacher_bytes,
            temperature: self.config.temperature,
            alpha: self.config.alpha,
        }
    }

    /// The distillation fields of a round's metrics line; resets the teacher byte count.
    pub fn metrics(&self, distilled: usize) -> DistillMetrics {
        DistillMetrics { distilled, teacher_bytes_down: self.sent.swap(0, Ordering::SeqCst) }
    }
}

/// The distillation fields of a metrics line.
#[derive(Debug, Serialize)]
pub struct DistillMetrics {
    /// Updates of this round whose client trained with the teacher (from their headers).
    pub distilled: usize,
    /// Teacher bytes downloaded since the previous round (also in `bytes_down`).
    pub teacher_bytes_down: u64,
}

impl Coordinator {
    /// Turns on federated distillation with `teacher`.
    pub fn with_distill(mut self, teacher: Teacher) -> Coordinator {
        self.distill = Some(Arc::new(teacher));
        self
    }

    /// The teacher file for `client_id`, sampled in (round, attempt), and the round's download
    /// counter; refused as a model download is, or when the federation does not distill.
    pub fn teacher_for(
        &self,
        client_id: &str,
        round: u32,
        attempt: u32,
    ) -> Result<(Arc<Teacher>, Arc<AtomicU64>), ServiceError> {
        let (_, counter) = self.model_for(client_id, round, attempt)?;
        let teacher = self.distill.clone().ok_or(ServiceError::NoTeacher)?;
        Ok((teacher, counter))
    }
}

/// The task's distillation, for the wire.
pub fn wire(task: &RoundTask) -> Option<pb::DistillTask> {
    task.distill.as_deref().cloned()
}

/// A model file in either format: the plain f32 one or a compact export.
fn decode_any_model(bytes: &[u8]) -> Result<(ModelSpec, TensorSet), String> {
    if fl_common::compact::is_compact(bytes) {
        let model = fl_common::compact::decode_compact(bytes).map_err(|e| e.to_string())?;
        let weights = model.to_tensor_set();
        Ok((model.spec, weights))
    } else {
        fl_common::decode_model(bytes).map_err(|e| e.to_string())
    }
}

/// Streams the teacher file in chunks of [`crate::service::MODEL_CHUNK_BYTES`], counted as
/// download bytes of the round and of the teacher.
pub fn teacher_chunks(teacher: Arc<Teacher>, counter: Arc<AtomicU64>) -> impl Iterator<Item = pb::ModelChunk> {
    let total = teacher.bytes.len();
    let chunk = crate::service::MODEL_CHUNK_BYTES;
    (0..total.div_ceil(chunk)).map(move |i| {
        let (start, end) = (i * chunk, ((i + 1) * chunk).min(total));
        counter.fetch_add((end - start) as u64, Ordering::Relaxed);
        teacher.sent.fetch_add((end - start) as u64, Ordering::Relaxed);
        pb::ModelChunk {
            offset: start as u64,
            data: teacher.bytes[start..end].to_vec(),
            total_bytes: total as u64,
            codec: "teacher".into(),
            delta: false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fl_common::{encode_model, ModelKind, NamedTensor};

    #[derive(Debug)]
    struct Backend;

    impl ModelBackend for Backend {
        fn initial_weights(&self, _: &ModelSpec, _: u64) -> Result<TensorSet> {
            unreachable!()
        }
        fn check_weights(&self, _: &ModelSpec, weights: &TensorSet) -> Result<()> {
            anyhow::ensure!(weights.tensors.len() == 1, "one tensor expected");
            Ok(())
        }
        fn labels_of(&self, _: &Path) -> Result<Vec<String>> {
            unreachable!()
        }
        fn evaluator(&self, _: &Path, _: &ModelSpec) -> Result<Arc<dyn crate::Evaluator>> {
            unreachable!()
        }
    }

    fn spec(labels: &[&str]) -> ModelSpec {
        ModelSpec::with_defaults(ModelKind::Fasttext, labels.iter().map(|l| l.to_string()).collect())
    }

    fn teacher_file(dir: &Path, name: &str, labels: &[&str], value: f32) -> PathBuf {
        let weights = TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![2], data: vec![value, 1.0] }]);
        let path = dir.join(name);
        std::fs::write(&path, encode_model(&spec(labels), &weights)).unwrap();
        path
    }

    fn args(from: Option<PathBuf>, temperature: Option<f64>) -> DistillArgs {
        DistillArgs { from, temperature, alpha: None }
    }

    #[test]
    fn a_teacher_is_checked_stored_and_fixed_for_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let federation = spec(&["a", "b"]);
        let good = teacher_file(dir.path(), "good.safetensors", &["a", "b"], 0.5);
        let other = teacher_file(dir.path(), "other.safetensors", &["a", "b"], 0.25);
        let swapped = teacher_file(dir.path(), "swapped.safetensors", &["b", "a"], 0.5);

        let err = args(Some(swapped.clone()), None).resolve(&federation, &Backend).unwrap_err();
        assert!(err.is::<Permanent>() && err.to_string().contains("labels [b,a] differ"), "{err:#}");
        std::fs::write(dir.path().join("junk.safetensors"), b"not a model").unwrap();
        let err = args(Some(dir.path().join("junk.safetensors")), None).resolve(&federation, &Backend).unwrap_err();
        assert!(err.to_string().contains("not a model file"), "{err:#}");
        assert!(args(None, Some(2.0)).resolve(&federation, &Backend).is_err());
        assert!(args(None, None).resolve(&federation, &Backend).unwrap().is_none());

        let root = dir.path().join("state");
        std::fs::create_dir(&root).unwrap();
        assert!(Teacher::load(&root).unwrap().is_none());
        // Turning distillation on for an existing federation is refused.
        assert!(args(Some(good.clone()), None).settle(&root, &federation, &Backend).is_err());
        let new = args(Some(good.clone()), Some(3.0)).resolve(&federation, &Backend).unwrap().unwrap();
        new.save(&root).unwrap();
        let teacher = Teacher::load(&root).unwrap().unwrap();
        assert_eq!(teacher.bytes.as_slice(), std::fs::read(&good).unwrap().as_slice());
        assert_eq!((teacher.config.temperature, teacher.config.alpha), (3.0, DEFAULT_ALPHA));

        // A restart keeps it: no flags, or the same teacher; another teacher or temperature is refused.
        args(None, None).settle(&root, &federation, &Backend).unwrap();
        args(Some(good.clone()), None).settle(&root, &federation, &Backend).unwrap();
        args(Some(good.clone()), Some(3.0)).settle(&root, &federation, &Backend).unwrap();
        let err = args(Some(other), None).settle(&root, &federation, &Backend).unwrap_err();
        assert!(err.is::<Permanent>() && err.to_string().contains("would change"), "{err:#}");
        assert!(args(Some(good), Some(2.0)).settle(&root, &federation, &Backend).is_err());

        // The stored copy is checked against its digest.
        std::fs::write(root.join(TEACHER_FILE), b"changed").unwrap();
        assert!(Teacher::load(&root).unwrap_err().to_string().contains("was changed"));
    }

    #[test]
    fn the_teacher_streams_in_chunks_and_is_counted_once() {
        let bytes: Vec<u8> = (0..crate::service::MODEL_CHUNK_BYTES * 2 + 5).map(|i| i as u8).collect();
        let config = DistillConfig {
            teacher_sha256: sha256_hex(&bytes),
            teacher_bytes: bytes.len() as u64,
            temperature: 2.0,
            alpha: 0.5,
            source: "t".into(),
        };
        let teacher = Arc::new(Teacher { config, bytes: Arc::new(bytes.clone()), sent: AtomicU64::new(0) });
        let counter = Arc::new(AtomicU64::new(7));
        let chunks: Vec<_> = teacher_chunks(teacher.clone(), counter.clone()).collect();
        assert_eq!(chunks.len(), 3);
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.iter().copied()).collect();
        assert_eq!(joined, bytes);
        assert!(chunks.iter().all(|c| c.codec == "teacher" && c.total_bytes == bytes.len() as u64));
        assert_eq!(counter.load(Ordering::SeqCst), 7 + bytes.len() as u64);
        let metrics = teacher.metrics(2);
        assert_eq!((metrics.distilled, metrics.teacher_bytes_down), (2, bytes.len() as u64));
        assert_eq!(teacher.metrics(0).teacher_bytes_down, 0, "counted once, for one round");
    }
}
