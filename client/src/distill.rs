//! Federated distillation on the client (`fl-coordinator serve --distill-from`): when a round
//! task names a teacher, the client fetches the teacher file once, checks its SHA-256 against
//! the task and keeps it as `STATE/distill/teacher-SHA.model`. It then labels its own rows with
//! the teacher's softened outputs (once per teacher, temperature and model spec, kept in memory
//! across rounds) and trains the federation's model on them with `fl-model`'s distillation loss
//! ([`fl_model::train::train_with`]). Only the student's delta is uploaded, with `distilled` set
//! in its header. The rows never leave the client; the teacher may have another architecture
//! than the federation's model, but the same labels.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use fl_common::tensors::sha256_hex;
use fl_common::ModelSpec;
use fl_model::central::soft_targets;
use fl_model::data::LabelledTexts;
use fl_model::model::{default_device, Classifier};
use fl_model::train::{Distillation, EncodedDataset};
use fl_proto::pb::{self, federation_client::FederationClient};
use tonic::transport::Channel;
use tracing::{info, warn};

/// What a client distils with: its rows as text (the teacher has its own tokenizer) and where
/// teachers are kept.
#[derive(Debug, Clone)]
pub struct DistillSetup {
    /// The local rows, in the order of the encoded dataset.
    pub texts: Arc<LabelledTexts>,
    /// `STATE/distill`.
    pub dir: PathBuf,
}

/// The local rows with a teacher's soft targets, kept between rounds.
#[derive(Debug)]
pub struct Distilled {
    teacher_sha256: String,
    temperature: f64,
    spec: ModelSpec,
    data: Arc<EncodedDataset>,
}

/// The data and distillation of a round: `data` unchanged and `None` when the task does not
/// distil (or this client personalises, whose rounds train on the labels alone); otherwise the
/// rows with the teacher's soft targets. Errors name what failed: the teacher's download, its
/// digest, its labels or a bad setting.
pub async fn prepare(
    client: &mut FederationClient<Channel>,
    task: &pb::RoundTask,
    setup: &DistillSetup,
    (spec, data, threads, personal): (&ModelSpec, Arc<EncodedDataset>, i32, bool),
    kept: &mut Option<Distilled>,
) -> Result<(Arc<EncodedDataset>, Option<Distillation>)> {
    let Some(d) = &task.distill else { return Ok((data, None)) };
    if personal {
        warn!(round = task.round, "this client personalises: it trains on its labels alone, without the teacher");
        return Ok((data, None));
    }
    if !(d.temperature.is_finite() && d.temperature > 0.0 && (0.0..=1.0).contains(&d.alpha)) {
        bail!(
            "the round task's distillation has temperature {} and alpha {}: need T > 0 and alpha in [0, 1]",
            d.temperature,
            d.alpha
        );
    }
    let distillation = Distillation { temperature: d.temperature, alpha: d.alpha };
    if let Some(k) = kept.as_ref() {
        if k.teacher_sha256 == d.teacher_sha256 && k.temperature == d.temperature && &k.spec == spec {
            return Ok((k.data.clone(), Some(distillation)));
        }
    }
    let path = teacher_file(client, task, d, &setup.dir).await?;
    let (texts, student, temperature) = (setup.texts.clone(), spec.clone(), d.temperature);
    let soft = tokio::task::spawn_blocking(move || -> Result<EncodedDataset> {
        tch::set_num_threads(threads);
        let teacher = Classifier::load(&path, default_device())?;
        if teacher.spec.labels != student.labels {
            bail!(
                "the teacher {} has labels [{}], the federation [{}]",
                path.display(),
                teacher.spec.labels.join(","),
                student.labels.join(",")
            );
        }
        let rows: Vec<&str> = texts.texts.iter().map(String::as_str).collect();
        let mut soft = (*data).clone();
        anyhow::ensure!(
            soft.len() == rows.len(),
            "the encoded rows ({}) are not the local rows ({})",
            soft.len(),
            rows.len()
        );
        soft.soft = Some(soft_targets(&teacher, &rows, temperature));
        Ok(soft)
    })
    .await
    .context("labelling the rows with the teacher panicked")??;
    let data = Arc::new(soft);
    info!(
        teacher_sha256 = %d.teacher_sha256,
        rows = data.len(),
        temperature = d.temperature,
        alpha = d.alpha,
        "rows labelled by the federation's teacher: local training distils"
    );
    *kept = Some(Distilled {
        teacher_sha256: d.teacher_sha256.clone(),
        temperature: d.temperature,
        spec: spec.clone(),
        data: data.clone(),
    });
    Ok((data, Some(distillation)))
}

/// The teacher's file in `dir`: the one kept if its digest is the task's, else downloaded (only
/// a client sampled for the round may), checked and kept.
async fn teacher_file(
    client: &mut FederationClient<Channel>,
    task: &pb::RoundTask,
    d: &pb::DistillTask,
    dir: &Path,
) -> Result<PathBuf> {
    let want = &d.teacher_sha256;
    if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("the round task names the teacher by {want:?}, not a SHA-256");
    }
    let path = dir.join(format!("teacher-{want}.model"));
    match tokio::fs::read(&path).await {
        Ok(bytes) if &sha256_hex(&bytes) == want => return Ok(path),
        Ok(_) => warn!("{} does not have the SHA-256 its name says; fetching the teacher again", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!("{}: {e}; fetching the teacher again", path.display()),
    }
    let request =
        pb::FetchModelRequest { round: task.round, attempt: task.attempt, teacher: true, ..Default::default() };
    let download = crate::daemon::fetch_model(client, request).await.context("fetching the teacher")?;
    let got = sha256_hex(&download.bytes);
    if &got != want {
        bail!("the teacher downloaded has SHA-256 {got}, the round task says {want}");
    }
    let (target, bytes) = (path.clone(), download.bytes);
    tokio::task::spawn_blocking(move || -> Result<()> {
        let dir = target.parent().ok_or_else(|| anyhow!("{} has no parent", target.display()))?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fl_common::files::write_atomic(&target, &bytes, 0o600).with_context(|| format!("writing {}", target.display()))
    })
    .await
    .context("keeping the teacher panicked")??;
    info!(bytes = d.teacher_bytes, file = %path.display(), "teacher fetched and kept");
    Ok(path)
}
