//! The engine driven in process, without the network: `fl-sim`'s virtual clients answer rounds
//! through the same steps as a gRPC client does. A round is opened with the coordinator's own
//! [`Coordinator::open_round`] (strategy, DP wrapper, learning-rate schedule, task seed); each
//! update is checked ([`UpdateHeader::check`]), spooled and folded by
//! [`Coordinator::fold_upload`] (codec decode, shape and norm checks, the strategy's fold); the
//! round is committed by the engine's `complete_round` (server step, DP charge and ledger,
//! evaluation, checkpoint, `metrics.jsonl`, best model, early stop), whose background commit
//! the simulator awaits before the next round. Only the transport and the
//! waiting are left out: the simulator is the clock, so a round closes when every sampled
//! client has answered.

use std::sync::Arc;

use anyhow::{Context, Result};
use fl_common::codec::UpdateCodec;
use fl_common::ModelSpec;
use tokio::time::Instant;

use super::{lock, Coordinator, GlobalModel, RoundSettings, RoundTask, SpooledUpload, UpdateHeader, UpdateRefusal};
use crate::backend::Evaluator;
use crate::dp::Budget;
use crate::registry::{now_unix, ClientRecord, ClientStatus};

/// A federation whose clients live in this process (see the module documentation).
#[derive(Debug)]
pub struct InProcessFederation {
    coord: Arc<Coordinator>,
    eval: Option<Arc<dyn Evaluator>>,
    elapsed_before: f64,
    started: Instant,
}

/// What opening a round gave.
#[derive(Debug)]
pub enum Opened {
    /// The round is open: train on this task.
    Round(Arc<RoundTask>),
    /// The privacy budget is spent before this round: the federation ends (as `serve` ends it).
    BudgetExhausted,
}

impl InProcessFederation {
    /// Drives `coord` (prepared as `serve` prepares it), evaluating with `eval`, with the
    /// virtual clients `clients` enrolled in its registry (so that DP's population is theirs).
    pub(crate) fn new(
        coord: Coordinator,
        eval: Option<Arc<dyn Evaluator>>,
        elapsed_before: f64,
        clients: &[String],
    ) -> Result<InProcessFederation> {
        if coord.secagg.is_some() {
            return Err(fl_common::cli::Permanent::error(
                "fl-sim does not simulate secure aggregation: run the federation without --secure-aggregation",
            ));
        }
        if coord.async_engine.is_some() {
            return Err(fl_common::cli::Permanent::error(
                "fl-sim simulates synchronous rounds: run it without --mode async",
            ));
        }
        let now = now_unix();
        coord.registry.update(|registry| {
            let known: std::collections::HashSet<String> = registry.clients.iter().map(|c| c.id.clone()).collect();
            for id in clients.iter().filter(|id| !known.contains(*id)) {
                registry.clients.push(ClientRecord {
                    id: id.clone(),
                    name: id.clone(),
                    cert_sha256: String::new(),
                    token_id: "fl-sim".into(),
                    enrolled_unix: now,
                    last_seen_unix: now,
                    rounds_joined: 0,
                    status: ClientStatus::Active,
                });
            }
        })?;
        Ok(InProcessFederation { coord: Arc::new(coord), eval, elapsed_before, started: Instant::now() })
    }

    /// The model spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.coord.spec
    }

    /// The round settings.
    pub fn settings(&self) -> &RoundSettings {
        &self.coord.settings
    }

    /// Rounds committed so far.
    pub fn completed_rounds(&self) -> u32 {
        self.coord.completed_rounds()
    }

    /// The current global model.
    pub fn global(&self) -> Arc<GlobalModel> {
        self.coord.global()
    }

    /// The state directory.
    pub fn state(&self) -> &crate::state::StateDir {
        &self.coord.state
    }

    /// True once every round is done, or early stopping or the privacy budget ended the run.
    pub fn is_over(&self) -> bool {
        self.coord.completed_rounds() >= self.coord.settings.rounds
            || self.coord.early_stopped()
            || self.coord.budget_exhausted()
    }

    /// The codec clients encode their update with: the coordinator's most preferred.
    pub fn update_codec(&self) -> UpdateCodec {
        self.coord.settings.accepted_codecs()[0]
    }

    /// Opens `round` for `sampled`, after the privacy-budget check `serve` makes.
    pub fn open_round(&self, round: u32, sampled: Vec<String>) -> Opened {
        if let Some(dp) = &self.coord.dp {
            let budget = lock(&dp.ledger).check_budget(sampled.len(), self.coord.enrolled_clients());
            if let Budget::Exhausted { epsilon_after, max_epsilon } = budget {
                tracing::info!(round, epsilon_after, max_epsilon, "the privacy budget is spent: the federation ends");
                self.coord.budget_exhausted.store(true, std::sync::atomic::Ordering::SeqCst);
                return Opened::BudgetExhausted;
            }
        }
        let target = sampled.len();
        Opened::Round(self.coord.open_round(round, 0, sampled, target, None))
    }

    /// Hands in `client`'s encoded update, as an upload: the header is checked, the payload is
    /// spooled and folded by the engine. A refused update counts as the client's rejection.
    pub async fn submit(&self, client: &str, header: UpdateHeader, payload: &[u8]) -> Result<(), UpdateRefusal> {
        let ticket = self.coord.begin_upload(client, &header)?;
        header.check(ticket.model.file_len(), &self.coord.settings.accepted_codecs())?;
        let dir = self.coord.state.spool_dir();
        let path = dir.join(format!("{client}-r{}-a{}.part", header.round, header.attempt));
        let _cleanup = crate::spool::RemoveOnDrop(path.clone());
        let written = {
            let (path, payload) = (path.clone(), payload.to_vec());
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dir)?;
                std::fs::write(&path, payload)
            })
            .await
        };
        if let Err(e) = written.map_err(std::io::Error::other).and_then(|r| r) {
            self.coord.record_spool_failure(format!("cannot spool the update of {client}: {e}"));
            self.coord.record_rejection(client, header.round, header.attempt);
            return Err(UpdateRefusal::FoldFailed(e.to_string()));
        }
        let upload = SpooledUpload { header, path, bytes: payload.len() as u64 };
        self.coord.fold_upload(client, ticket, upload).await
    }

    /// Records that `client`'s local training failed this round.
    pub fn training_failed(&self, client: &str, round: u32, reason: &str) {
        self.coord.record_training_failure(client, round, 0, reason);
    }

    /// Closes the open round and commits it as `serve` does; fails when fewer than
    /// `--min-clients` updates were folded (the simulator does not retry: its clients would
    /// answer the same way).
    pub async fn commit(&self) -> Result<()> {
        let book = self.coord.close_round().context("no round is open")?;
        let sum = book.sum.clone().lock_owned().await;
        let needed = self.coord.settings.min_clients.max(1);
        if sum.folding || sum.folded.len() < needed {
            let failures: Vec<String> =
                book.training_failures.iter().take(3).map(|(c, why)| format!("{c}: {why}")).collect();
            // The simulator does not retry: its clients would answer the same way again.
            return Err(fl_common::cli::Permanent::error(format!(
                "round {}: {} of {} sampled updates folded, {needed} needed ({} refused; {})",
                book.task.round,
                sum.folded.len(),
                book.sampled.len(),
                book.rejected.len(),
                if failures.is_empty() { "see the log".to_string() } else { failures.join("; ") }
            )));
        }
        let elapsed = self.elapsed_before + self.started.elapsed().as_secs_f64();
        super::complete_round(&self.coord, self.eval.clone(), *book, sum, elapsed, false).await?;
        // The simulator waits for the round's commit (which `serve` lets run while the next
        // round collects): its early stop then acts at once, and its runs stay deterministic.
        super::settle_commits(&self.coord).await
    }

    /// Writes the final model, as `serve` does at the end.
    pub async fn finish(&self) -> Result<()> {
        super::finish(&self.coord).await
    }
}
