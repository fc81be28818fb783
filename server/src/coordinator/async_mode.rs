//! `--mode async` in the engine: FedBuff's buffered asynchronous steps, with the decisions in
//! [`crate::aggregation::buffered`].
//!
//! A step is an attempt like a synchronous round's (a [`RoundBook`] in `Phase::Collecting`, its
//! [`Accumulator`], committed by [`complete_round`] as one line of `metrics.jsonl`), with other
//! rules for who trains and what is folded:
//! - every connected client without a task gets the step's task on the newest model, unless it
//!   already answered this step (it then waits for the next model);
//! - each client's outstanding task is kept here, with the model it trains on, so a client still
//!   training on an older model downloads that model and uploads against it;
//! - an update is folded into the step collecting when it arrives, its delta scaled by 1/√(1+s)
//!   for staleness s; one staler than `--max-staleness` is refused and counted (`dropped_stale`),
//!   and the tasks that became too stale when a step opens are dropped (the client's heartbeat
//!   then tells it to stop, and it gets a new task);
//! - the step is taken after K updates ([`buffered::should_step`]); as a round, it is committed in
//!   the background while the next step collects.

use super::*;
use crate::aggregation::buffered::{self, Admit, BufferedMode, StepView};

/// A client's task that may still be folded, with the model it trains on.
#[derive(Debug)]
struct Outstanding {
    task: Arc<RoundTask>,
    model: Arc<GlobalModel>,
}

/// Who trains what, across steps.
#[derive(Debug, Default)]
struct AsyncBook {
    /// The outstanding task of each client.
    tasks: HashMap<String, Outstanding>,
    /// Clients that answered the step being collected; they get a task when the next one opens.
    answered: HashSet<String>,
    /// Updates refused, or tasks dropped, for staleness since the last step was taken.
    dropped_stale: usize,
}

/// The state of `--mode async`. Locks: the coordinator's phase before this book, never the other
/// way round.
#[derive(Debug)]
pub(super) struct AsyncEngine {
    mode: BufferedMode,
    book: Mutex<AsyncBook>,
    /// Model bytes sent since the last step was taken.
    bytes_down: Arc<AtomicU64>,
}

/// How a client answered its task, besides an accepted update.
#[derive(Debug)]
pub(super) enum Answer<'a> {
    /// Its update was refused or lost.
    Rejected,
    /// Its training failed, for this reason.
    Failed(&'a str),
}

/// Removes the outstanding task of a client that (re)connects: a new session has nothing of the
/// old one in training. The engine then gives it a task. Called with the phase locked.
pub(super) fn forget_task(coord: &Coordinator, client: &str) -> Option<Arc<RoundTask>> {
    if let Some(engine) = &coord.async_engine {
        lock(&engine.book).tasks.remove(client);
    }
    None
}

impl AsyncEngine {
    pub(super) fn new(mode: BufferedMode) -> AsyncEngine {
        AsyncEngine { mode, book: Mutex::default(), bytes_down: Arc::default() }
    }

    fn refusal(round: u32, attempt: u32) -> UpdateRefusal {
        UpdateRefusal::Stale {
            round,
            attempt,
            open: "no such task of this client: it was answered, or dropped as staler than --max-staleness".into(),
        }
    }

    /// The model of `client`'s outstanding task (round, attempt).
    fn task_model(&self, client: &str, round: u32, attempt: u32) -> Option<Arc<GlobalModel>> {
        let book = lock(&self.book);
        let out = book.tasks.get(client)?;
        (out.task.round == round && out.task.attempt == attempt).then(|| out.model.clone())
    }

    pub(super) fn model_for(
        &self,
        client: &str,
        round: u32,
        attempt: u32,
    ) -> Result<(Arc<GlobalModel>, Arc<AtomicU64>), UpdateRefusal> {
        let model = self.task_model(client, round, attempt).ok_or_else(|| Self::refusal(round, attempt))?;
        Ok((model, self.bytes_down.clone()))
    }

    pub(super) fn begin_upload(&self, client: &str, header: &UpdateHeader) -> Result<UploadTicket, UpdateRefusal> {
        let (round, attempt) = (header.round, header.attempt);
        let model = self.task_model(client, round, attempt).ok_or_else(|| Self::refusal(round, attempt))?;
        // The step an update lands in is chosen when it is folded; the ticket holds only the model.
        Ok(UploadTicket { model, sum: Arc::new(tokio::sync::Mutex::new(Accumulator::unused())) })
    }

    pub(super) fn heartbeat(&self, coord: &Coordinator, client: &str, round: u32, attempt: u32, progress: f32) -> bool {
        let mut phase = lock(&coord.phase);
        if coord.is_finished() || self.task_model(client, round, attempt).is_none() {
            return false;
        }
        if let Phase::Collecting(book) = &mut *phase {
            book.progress.insert(client.to_string(), progress.clamp(0.0, 1.0));
        }
        true
    }

    /// Records that `client` answered its task (round, attempt) other than with an accepted
    /// update; it waits for the next step. Returns whether the task was outstanding.
    pub(super) fn answered(
        &self,
        coord: &Coordinator,
        client: &str,
        round: u32,
        attempt: u32,
        answer: Answer<'_>,
    ) -> bool {
        let outstanding = {
            let mut phase = lock(&coord.phase);
            let mut book = lock(&self.book);
            let outstanding =
                book.tasks.get(client).is_some_and(|out| out.task.round == round && out.task.attempt == attempt);
            if outstanding {
                book.tasks.remove(client);
                book.answered.insert(client.to_string());
            }
            if let Phase::Collecting(step) = &mut *phase {
                match answer {
                    // Also an update whose fold failed after it was counted as accepted.
                    Answer::Rejected if outstanding || step.accepted.remove(client) => {
                        step.rejected.insert(client.to_string());
                    }
                    Answer::Failed(reason) if outstanding => {
                        step.rejected.insert(client.to_string());
                        step.training_failures.insert(client.to_string(), reason.to_string());
                    }
                    _ => {}
                }
            }
            outstanding
        };
        coord.changed();
        outstanding
    }

    /// Decides, with the step collecting now, whether `client`'s update of (round, attempt) is
    /// folded (its staleness and weight), refused, or waits for the next step (`None`: this one
    /// is full or no longer open).
    fn admit(
        &self,
        coord: &Coordinator,
        client: &str,
        (round, attempt): (u32, u32),
        sum: &Arc<tokio::sync::Mutex<Accumulator>>,
    ) -> Result<Option<(u32, f32)>, UpdateRefusal> {
        let mut phase = lock(&coord.phase);
        let Phase::Collecting(step) = &mut *phase else { return Ok(None) };
        if !Arc::ptr_eq(&step.sum, sum) || step.accepted.len() >= self.mode.buffer_size {
            return Ok(None);
        }
        let mut book = lock(&self.book);
        let task_step = match book.tasks.get(client) {
            Some(out) if out.task.round == round && out.task.attempt == attempt => out.task.round,
            _ => return Err(Self::refusal(round, attempt)),
        };
        book.tasks.remove(client);
        match buffered::admit(task_step, step.task.round, &self.mode) {
            Admit::Fold { staleness, weight } => {
                book.answered.insert(client.to_string());
                step.accepted.insert(client.to_string());
                Ok(Some((staleness, weight)))
            }
            Admit::TooStale { staleness } => {
                book.dropped_stale += 1;
                step.rejected.insert(client.to_string());
                Err(UpdateRefusal::Stale {
                    round,
                    attempt,
                    open: format!(
                        "step {} collects; staleness {staleness} exceeds --max-staleness {}",
                        step.task.round, self.mode.max_staleness
                    ),
                })
            }
        }
    }

    /// Decodes an upload against the model of its task and folds it into the step collecting
    /// when it is admitted, waiting for the next step while this one is full or being taken.
    pub(super) async fn fold_upload(
        &self,
        coord: &Coordinator,
        client: &str,
        codec: UpdateCodec,
        ticket: UploadTicket,
        upload: SpooledUpload,
    ) -> Result<(), UpdateRefusal> {
        let (round, attempt) = (upload.header.round, upload.header.attempt);
        let decoded =
            decode_update(codec, upload.path.clone(), ticket.model.tensors.clone(), coord.settings.max_update_norm)
                .await;
        let mut delta = match decoded {
            // Staleness weights scale the dense delta.
            Ok(delta) => delta.to_dense(&ticket.model.tensors),
            Err(refusal) => {
                coord.record_rejection(client, round, attempt);
                return Err(refusal);
            }
        };
        loop {
            let notified = coord.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let current = match &*lock(&coord.phase) {
                Phase::Collecting(step) => Some(step.sum.clone()),
                _ => None,
            };
            if let Some(current) = current {
                // One fold at a time into a step's sum; the engine takes the sum only after it.
                let mut sum = current.clone().lock_owned().await;
                let admitted = self.admit(coord, client, (round, attempt), &current);
                if admitted.is_err() {
                    coord.changed();
                }
                if let Some((staleness, weight)) = admitted? {
                    coord.changed();
                    let id = client.to_string();
                    let folded = tokio::task::spawn_blocking(move || {
                        if weight != 1.0 {
                            scale(&mut delta, weight);
                        }
                        sum.add(id, Values::Dense(&delta), &upload.header, upload.bytes)?;
                        sum.buffered.get_or_insert_default().record(staleness);
                        Ok(())
                    })
                    .await;
                    return coord.fold_outcome(client, round, attempt, folded);
                }
            }
            if coord.is_finished() || coord.early_stopped() || coord.aggregated_rounds() >= coord.settings.rounds {
                return Err(Self::refusal(round, attempt));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Opens `step`: drops the tasks that can no longer be folded, and lets every client train
    /// for it.
    fn start_step(&self, step: u32) {
        let mut book = lock(&self.book);
        let before = book.tasks.len();
        book.tasks.retain(|_, out| !buffered::is_too_stale(out.task.round, step, &self.mode));
        book.dropped_stale += before - book.tasks.len();
        book.answered.clear();
    }

    /// Gives the step's task to each connected client that [`buffered::gets_task`]; returns what
    /// [`buffered::should_step`] needs: (updates buffered, connected clients in training), and
    /// whether a task went out.
    fn assign(&self, coord: &Coordinator, connected: &[String]) -> (usize, usize, bool) {
        let mut phase = lock(&coord.phase);
        let Phase::Collecting(step) = &mut *phase else { return (0, 0, false) };
        let mut book = lock(&self.book);
        let mut sent = false;
        for client in connected {
            let gets = buffered::gets_task(
                book.tasks.contains_key(client),
                book.answered.contains(client),
                connected.len(),
                coord.settings.min_clients,
            );
            if !gets {
                continue;
            }
            let tx = lock(&coord.connections).get(client).map(|c| c.tx.clone());
            if tx.is_some_and(|tx| tx.try_send(WorkItem::Round(step.task.clone())).is_ok()) {
                book.tasks.insert(client.clone(), Outstanding { task: step.task.clone(), model: step.model.clone() });
                step.sampled.insert(client.clone());
                sent = true;
            }
        }
        let in_flight = book.tasks.keys().filter(|c| connected.contains(c)).count();
        (step.accepted.len(), in_flight, sent)
    }
}

impl Accumulator {
    /// The sum of an upload ticket in async mode, where the step is chosen at fold time.
    fn unused() -> Accumulator {
        Accumulator {
            strategy: Box::new(FedAvg::default()),
            folded: Vec::new(),
            examples: 0,
            weighted_loss: 0.0,
            weighted_accuracy: 0.0,
            bytes_up: 0,
            train_s: 0.0,
            folding: false,
            secagg: None,
            buffered: None,
            local_evals: Vec::new(),
            distilled: 0,
        }
    }
}

/// Multiplies every value of `delta` by `weight`.
fn scale(delta: &mut TensorSet, weight: f32) {
    for v in delta.tensors.iter_mut().flat_map(|t| t.data.iter_mut()) {
        *v *= weight;
    }
}

/// Runs the remaining steps of `--mode async`; returns when all are done or `shutdown` fires.
pub(super) async fn run_steps(rounds: &mut RoundLoop) -> Result<()> {
    let coord = rounds.coord.clone();
    let shutdown = rounds.shutdown.clone();
    let engine = coord.async_engine.as_ref().expect("async mode");
    let settings = coord.settings.clone();
    while coord.aggregated_rounds() < settings.rounds && !coord.early_stopped() {
        let step = coord.aggregated_rounds() + 1;
        let mut attempt = 0;
        loop {
            coord.set_phase(Phase::Waiting { round: step, attempt });
            let enough = coord.wait_for(Instant::now() + Duration::from_secs(1), &shutdown, || {
                policy::should_start(coord.drop_revoked().len(), settings.min_clients).then_some(())
            });
            if enough.await.is_none() {
                return Ok(());
            }
            // Before the step opens: no update can be folded into it while its book is reset.
            engine.start_step(step);
            coord.open_round(step, attempt, Vec::new(), engine.mode.buffer_size, None);
            info!(step, attempt, buffer_size = engine.mode.buffer_size, "async step collecting");
            let deadline = Instant::now() + settings.round_timeout;
            let close = coord.wait_for(deadline, &shutdown, || {
                let connected = coord.drop_revoked();
                let (buffered, in_flight, sent) = engine.assign(&coord, &connected);
                if sent {
                    coord.changed();
                }
                let view = StepView {
                    buffered,
                    in_flight,
                    min_clients: settings.min_clients,
                    deadline_passed: Instant::now() >= deadline,
                };
                Some(buffered::should_step(&view, &engine.mode)).filter(|close| *close != Close::Open)
            });
            let Some(close) = close.await else {
                coord.close_round();
                coord.set_phase(Phase::Waiting { round: step, attempt });
                return Ok(());
            };
            let Some(book) = coord.close_round() else { return Ok(()) };
            let too_few = |sum: &Accumulator, book: &RoundBook| {
                format!(
                    "too few good updates for step {step}: {} folded of --buffer-size {} ({} refused or lost)",
                    sum.folded.len(),
                    engine.mode.buffer_size,
                    book.rejected.len()
                )
            };
            let step_counts = |sum: &mut Accumulator, book: &RoundBook| {
                sum.buffered.get_or_insert_default().dropped_stale =
                    std::mem::take(&mut lock(&engine.book).dropped_stale);
                book.bytes_down.store(engine.bytes_down.swap(0, Ordering::SeqCst), Ordering::SeqCst);
            };
            match rounds.conclude(book, close, 1, too_few, step_counts).await? {
                Concluded::Completed => break,
                Concluded::Retry => attempt += 1,
                Concluded::Stopped => return Ok(()),
            }
        }
    }
    Ok(())
}
