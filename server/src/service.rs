//! The gRPC handlers of `fl.v1.Federation`. They authenticate the caller by its certificate
//! (against the registry copy in memory), convert the request to the engine's types, call the
//! [`Coordinator`], and convert the answer back. Every failure is a [`ServiceError`], turned into
//! a `tonic::Status` in one place.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fl_common::cli::{printable, NAME_CHARS};
use fl_common::tensors::CODEC_SAFETENSORS_F32;
use fl_common::tls::cert_fingerprint;
use fl_common::token::JoinToken;
use fl_proto::pb;
use sha2::Digest;
use tokio::io::AsyncWriteExt;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::coordinator::{Coordinator, InvalidUpdate, RoundTask, SpooledUpload, UpdateHeader, UpdateRefusal, WorkItem};
use crate::error::ServiceError;
use crate::registry::{now_unix, AccessError, ClientRecord, ClientStatus};
use crate::spool::{RemoveOnDrop, Spool};

/// Bytes per chunk of a model download. Each downloading connection holds a few chunks at once
/// (the copy cut from the model, tonic's encode buffer, the HTTP/2 send buffer), so the chunk
/// size is per-client memory (BENCHMARKS.md, "Coordinator memory: 2 against 16 clients").
pub const MODEL_CHUNK_BYTES: usize = 256 << 10;
/// Largest chunk of an upload that is accepted.
pub const MAX_UPLOAD_CHUNK_BYTES: usize = 4 << 20;

/// The Federation service.
#[derive(Debug, Clone)]
pub struct FederationService {
    coord: Arc<Coordinator>,
    spool: Arc<dyn Spool>,
}

impl From<&RoundTask> for pb::RoundTask {
    fn from(task: &RoundTask) -> pb::RoundTask {
        pb::RoundTask {
            round: task.round,
            attempt: task.attempt,
            config: Some(pb::TrainConfig {
                local_epochs: task.local_epochs,
                batch_size: task.batch_size,
                learning_rate: task.learning_rate,
                optimizer: task.optimizer.clone(),
                seed: task.seed,
                proximal_mu: task.proximal_mu,
            }),
            deadline_unix_ms: task.deadline_unix_ms,
            model_bytes: task.model_bytes,
            model_codec: task.model_codec.clone(),
            update_codecs: task.update_codecs.clone(),
            dp_clip_norm: task.dp_clip_norm.unwrap_or(0.0),
            model_digest: task.model_digest.clone(),
            delta_base_digest: task.delta.as_ref().map(|d| d.0.clone()).unwrap_or_default(),
            delta_codec: task.delta.as_ref().map(|d| d.1.clone()).unwrap_or_default(),
            delta_bytes: task.delta.as_ref().map(|d| d.2).unwrap_or_default(),
            secagg: crate::secagg::wire::task(task),
            distill: crate::distill::wire(task),
        }
    }
}

impl From<pb::UpdateHeader> for UpdateHeader {
    fn from(h: pb::UpdateHeader) -> UpdateHeader {
        UpdateHeader {
            round: h.round,
            attempt: h.attempt,
            codec: h.codec,
            total_bytes: h.total_bytes,
            num_examples: h.num_examples,
            train_loss: h.train_loss,
            train_accuracy: h.train_accuracy,
            train_s: h.train_s,
            local_eval: h.local_eval.map(Into::into),
            distilled: h.distilled,
        }
    }
}

/// A work item as the client sees it; a revocation ends the stream with its refusal.
fn instruction(item: WorkItem) -> Result<pb::Instruction, Status> {
    use pb::instruction::Kind;
    let kind = match item {
        WorkItem::Round(task) => Kind::Round(task.as_ref().into()),
        WorkItem::Finished { rounds_completed } => Kind::Finished(pb::FederationFinished { rounds_completed }),
        WorkItem::Revoked { client_id } => return Err(ServiceError::from(AccessError::ClientRevoked(client_id)).into()),
    };
    Ok(pb::Instruction { kind: Some(kind) })
}

impl FederationService {
    /// A service over `coord` that spools uploads with `spool`.
    pub fn new(coord: Arc<Coordinator>, spool: Arc<dyn Spool>) -> Self {
        FederationService { coord, spool }
    }

    /// The enrolled, active client that made this request.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<ClientRecord, ServiceError> {
        let certs = request.peer_certs().ok_or(ServiceError::NoCertificate)?;
        let leaf = certs.first().ok_or(ServiceError::NoCertificate)?;
        Ok(self.coord.registry.authenticate(&cert_fingerprint(leaf))?)
    }

    fn welcome(&self, client_id: &str) -> Result<pb::Instruction, ServiceError> {
        Ok(pb::Instruction {
            kind: Some(pb::instruction::Kind::Welcome(pb::Welcome {
                client_id: client_id.to_string(),
                model_spec_json: serde_json::to_string(&self.coord.spec)
                    .map_err(|e| ServiceError::Internal(e.to_string()))?,
                rounds_total: self.coord.settings.rounds,
                rounds_completed: self.coord.completed_rounds(),
            })),
        })
    }

    async fn enroll(&self, req: pb::EnrollRequest) -> Result<pb::EnrollResponse, ServiceError> {
        let token = JoinToken::parse(&req.token)?;
        if token.ca_fingerprint != self.coord.spec.federation {
            return Err(ServiceError::OtherFederation);
        }
        let client_id = format!("c-{}", hex::encode(rand::random::<[u8; 6]>()));
        let cert_pem = self.coord.ca.sign_client_csr(&req.csr_pem, &client_id).map_err(ServiceError::BadCsr)?;
        let der = fl_common::tls::parse_certs(&cert_pem).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let fingerprint = cert_fingerprint(&der[0]);
        let now = now_unix();
        let name: String = req.name.chars().filter(|c| !c.is_control()).take(64).collect();
        let record = ClientRecord {
            id: client_id.clone(),
            name: name.clone(),
            cert_sha256: fingerprint,
            token_id: token.id.clone(),
            enrolled_unix: now,
            last_seen_unix: now,
            rounds_joined: 0,
            status: ClientStatus::Active,
        };
        let registry = self.coord.registry.clone();
        // Enrollments that arrive together share one write of the registry.
        let redeemed = tokio::task::spawn_blocking(move || {
            registry.update_batched(move |reg| {
                reg.redeem(&token, now)?;
                reg.clients.push(record);
                Ok::<_, AccessError>(token.id.clone())
            })
        })
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))?
        .map_err(ServiceError::Registry)?;
        let token_id = redeemed.inspect_err(|e| warn!("enrollment refused: {e}"))?;
        info!(client = %client_id, name = %printable(&name, NAME_CHARS), token = %token_id, "client enrolled");
        Ok(pb::EnrollResponse { client_id, certificate_pem: cert_pem, ca_pem: self.coord.ca.cert_pem.clone() })
    }

    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<InstructionStream, ServiceError> {
        let client = self.authenticate(&request)?;
        let welcome = self.welcome(&client.id)?;
        if self.coord.is_finished() {
            let finished = instruction(WorkItem::Finished { rounds_completed: self.coord.completed_rounds() });
            return Ok(Box::pin(tokio_stream::iter([Ok(welcome), finished])));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let connection = self.coord.connect(&client.id, tx.clone());
        info!(client = %client.id, name = %printable(&request.get_ref().name, NAME_CHARS), examples = request.get_ref().num_examples, "client connected");
        // Written with every other client's in one update a second later: no write per join.
        self.coord.registry.note_seen(&client.id, now_unix());
        let coord = self.coord.clone();
        tokio::spawn(async move {
            tx.closed().await;
            coord.disconnect(&client.id, connection);
        });
        let work = tokio_stream::wrappers::ReceiverStream::new(rx).map(instruction);
        Ok(Box::pin(tokio_stream::once(Ok(welcome)).chain(work)))
    }

    async fn fetch_model(
        &self,
        client: &ClientRecord,
        req: pb::FetchModelRequest,
    ) -> Result<ModelStream, ServiceError> {
        if req.teacher {
            let (teacher, counter) = self.coord.teacher_for(&client.id, req.round, req.attempt)?;
            return Ok(Box::pin(tokio_stream::iter(crate::distill::teacher_chunks(teacher, counter).map(Ok))));
        }
        let (model, counter) = match crate::personal::final_model(&self.coord, req.round) {
            Some(last) => last,
            None => self.coord.model_for(&client.id, req.round, req.attempt)?,
        };
        // A client that holds the previous global model gets only the round's aggregate.
        let (bytes, codec, delta) = match &model.delta {
            Some(d) if !req.have_digest.is_empty() && d.base_digest == req.have_digest => {
                (d.bytes.clone(), d.codec.name().to_string(), true)
            }
            // A round's model file is built when first needed: here, or by the round's commit.
            _ => {
                let file = model.file_async().await.map_err(|e| ServiceError::Internal(format!("model file: {e}")))?;
                (file, CODEC_SAFETENSORS_F32.to_string(), false)
            }
        };
        let total = bytes.len();
        let count = total.div_ceil(MODEL_CHUNK_BYTES);
        let (coord, client_id) = (self.coord.clone(), client.id.clone());
        // Chunks are cut from the shared model as the stream is polled: one chunk per client in flight.
        let chunks = (0..count).map(move |i| {
            let start = i * MODEL_CHUNK_BYTES;
            let end = (start + MODEL_CHUNK_BYTES).min(total);
            counter.fetch_add((end - start) as u64, Ordering::Relaxed);
            if i + 1 == count {
                coord.note_download(&client_id, req.round, req.attempt);
            }
            Ok(pb::ModelChunk {
                offset: start as u64,
                data: bytes[start..end].to_vec(),
                total_bytes: total as u64,
                codec: codec.clone(),
                delta,
            })
        });
        Ok(Box::pin(tokio_stream::iter(chunks)))
    }

    /// Refuses an upload that started: the client counts as having answered.
    fn refuse(&self, client_id: &str, header: &UpdateHeader, why: InvalidUpdate) -> ServiceError {
        warn!(client = client_id, round = header.round, attempt = header.attempt, "update rejected: {why}");
        self.coord.record_rejection(client_id, header.round, header.attempt);
        let refusal = UpdateRefusal::Invalid(why);
        self.coord.count_refusal(&refusal);
        refusal.into()
    }

    /// An upload that cannot be stored: not the client's fault, but the update is lost; count it
    /// so the round does not wait for it.
    fn spool_failed(&self, client_id: &str, header: &UpdateHeader, e: std::io::Error) -> ServiceError {
        let dir = self.coord.state.spool_dir();
        tracing::error!(client = client_id, round = header.round, "cannot spool the upload in {}: {e}", dir.display());
        self.coord.record_rejection(client_id, header.round, header.attempt);
        self.coord.record_spool_failure(format!(
            "cannot spool the upload of {client_id} for round {} attempt {} in {}: {e}",
            header.round,
            header.attempt,
            dir.display()
        ));
        ServiceError::Spool(e)
    }

    async fn submit_update(
        &self,
        client: &ClientRecord,
        mut stream: Streaming<pb::UpdateChunk>,
    ) -> Result<pb::SubmitAck, ServiceError> {
        let id = client.id.as_str();
        let header: UpdateHeader = match stream.next().await {
            Some(Ok(pb::UpdateChunk { kind: Some(pb::update_chunk::Kind::Header(h)) })) => h.into(),
            Some(Ok(_)) => return Err(ServiceError::NoHeader),
            Some(Err(status)) => return Err(ServiceError::Stream(status)),
            None => return Err(ServiceError::EmptyUpload),
        };
        let ticket = self.coord.begin_upload(id, &header).inspect_err(|e| {
            warn!(client = id, round = header.round, attempt = header.attempt, "update refused: {e}");
            self.coord.count_refusal(e);
        })?;
        header
            .check(ticket.model.file_len(), &self.coord.settings.accepted_codecs())
            .map_err(|why| self.refuse(id, &header, why))?;

        // Spool the upload, checking order, size and digest as it arrives.
        let spool_dir = self.coord.state.spool_dir();
        let spool_path = spool_dir.join(format!("{id}-r{}-a{}.part", header.round, header.attempt));
        let _cleanup = RemoveOnDrop(spool_path.clone());
        let opened = async {
            tokio::fs::create_dir_all(&spool_dir).await?;
            self.spool.create(spool_path.clone()).await
        };
        let mut spool = opened.await.map_err(|e| self.spool_failed(id, &header, e))?;
        let mut received: u64 = 0;
        let mut digest = sha2::Sha256::new();
        let mut trailer = None;
        while let Some(message) = stream.next().await {
            let invalid = |why| Err(self.refuse(id, &header, why));
            let chunk = match message {
                Ok(c) => c,
                Err(status) => return invalid(InvalidUpdate::BrokeOff(status.message().to_string())),
            };
            match chunk.kind {
                Some(pb::update_chunk::Kind::Data(data)) => {
                    if trailer.is_some() {
                        return invalid(InvalidUpdate::DataAfterTrailer);
                    }
                    if data.offset != received {
                        return invalid(InvalidUpdate::OutOfOrder { offset: data.offset, received });
                    }
                    if data.data.len() > MAX_UPLOAD_CHUNK_BYTES {
                        return invalid(InvalidUpdate::ChunkTooLarge(data.data.len()));
                    }
                    received += data.data.len() as u64;
                    if received > header.total_bytes {
                        return invalid(InvalidUpdate::LongerThanDeclared(header.total_bytes));
                    }
                    digest.update(&data.data);
                    spool.write_all(&data.data).await.map_err(|e| self.spool_failed(id, &header, e))?;
                }
                Some(pb::update_chunk::Kind::Trailer(t)) => {
                    if trailer.is_some() {
                        return invalid(InvalidUpdate::SecondTrailer);
                    }
                    trailer = Some(t);
                }
                Some(pb::update_chunk::Kind::Header(_)) => return invalid(InvalidUpdate::SecondHeader),
                None => return invalid(InvalidUpdate::EmptyChunk),
            }
        }
        let Some(trailer) = trailer else {
            return Err(self.refuse(id, &header, InvalidUpdate::NoTrailer { received, total: header.total_bytes }));
        };
        if received != header.total_bytes {
            return Err(self.refuse(id, &header, InvalidUpdate::Truncated { received, total: header.total_bytes }));
        }
        if hex::encode(digest.finalize()) != trailer.sha256.to_lowercase() {
            return Err(self.refuse(id, &header, InvalidUpdate::DigestMismatch));
        }
        spool.shutdown().await.map_err(|e| self.spool_failed(id, &header, e))?;
        drop(spool);

        let (round, attempt, examples) = (header.round, header.attempt, header.num_examples);
        let upload = SpooledUpload { header, path: spool_path, bytes: received };
        self.coord.fold_upload(id, ticket, upload).await.inspect_err(|e| {
            warn!(client = id, round, attempt, "update refused: {e}");
            self.coord.count_refusal(e);
        })?;
        info!(client = id, round, attempt, examples, bytes = received, "update folded");
        Ok(pb::SubmitAck { accepted: true, message: String::new() })
    }
}

type InstructionStream = Pin<Box<dyn Stream<Item = Result<pb::Instruction, Status>> + Send>>;
type ModelStream = Pin<Box<dyn Stream<Item = Result<pb::ModelChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::federation_server::Federation for FederationService {
    #[tracing::instrument(skip_all, fields(name = %printable(&request.get_ref().name, NAME_CHARS)))]
    async fn enroll(&self, request: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        Ok(Response::new(FederationService::enroll(self, request.into_inner()).await?))
    }

    type JoinStream = InstructionStream;

    #[tracing::instrument(skip_all)]
    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<Self::JoinStream>, Status> {
        Ok(Response::new(FederationService::join(self, request).await?))
    }

    type FetchModelStream = ModelStream;

    #[tracing::instrument(skip_all, fields(round = request.get_ref().round))]
    async fn fetch_model(
        &self,
        request: Request<pb::FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let client = self.authenticate(&request)?;
        Ok(Response::new(FederationService::fetch_model(self, &client, request.into_inner()).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn submit_update(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::SubmitAck>, Status> {
        let client = self.authenticate(&request)?;
        Ok(Response::new(FederationService::submit_update(self, &client, request.into_inner()).await?))
    }

    async fn withdraw_enrollment(
        &self,
        request: Request<pb::WithdrawEnrollmentRequest>,
    ) -> Result<Response<pb::WithdrawEnrollmentAck>, Status> {
        let client = self.authenticate(&request)?;
        let reason = printable(&request.get_ref().reason, 200);
        let (registry, id) = (self.coord.registry.clone(), client.id.clone());
        tokio::task::spawn_blocking(move || {
            registry.update(|reg| {
                reg.clients.iter_mut().filter(|c| c.id == id).for_each(|c| c.status = ClientStatus::Revoked)
            })
        })
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))?
        .map_err(ServiceError::Registry)?;
        let _ = self.coord.drop_revoked();
        warn!(client = %client.id, %reason, "client withdrew its enrollment: revoked");
        Ok(Response::new(pb::WithdrawEnrollmentAck { client_id: client.id }))
    }

    async fn report_training_failure(
        &self,
        request: Request<pb::TrainingFailureReport>,
    ) -> Result<Response<pb::TrainingFailureAck>, Status> {
        let client = self.authenticate(&request)?;
        let req = request.into_inner();
        let reason = printable(&req.reason, 300);
        let counted = self.coord.record_training_failure(&client.id, req.round, req.attempt, &reason);
        warn!(client = %client.id, round = req.round, attempt = req.attempt, counted, %reason, "local training failed");
        Ok(Response::new(pb::TrainingFailureAck { counted }))
    }

    async fn heartbeat(&self, request: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatAck>, Status> {
        let client = self.authenticate(&request)?;
        let req = request.into_inner();
        let open = self.coord.heartbeat(&client.id, req.round, req.attempt, req.progress);
        Ok(Response::new(pb::HeartbeatAck { round_open: open }))
    }

    #[tracing::instrument(skip_all, fields(round = request.get_ref().round))]
    async fn sec_agg_advertise_keys(
        &self,
        request: Request<pb::SecAggAdvertiseKeysRequest>,
    ) -> Result<Response<pb::SecAggKeyDirectory>, Status> {
        let client = self.authenticate(&request)?;
        Ok(Response::new(crate::secagg::wire::advertise(&self.coord, &client.id, request.into_inner()).await?))
    }

    #[tracing::instrument(skip_all, fields(round = request.get_ref().round))]
    async fn sec_agg_share_keys(
        &self,
        request: Request<pb::SecAggShareKeysRequest>,
    ) -> Result<Response<pb::SecAggShareInbox>, Status> {
        let client = self.authenticate(&request)?;
        Ok(Response::new(crate::secagg::wire::share(&self.coord, &client.id, request.into_inner()).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn sec_agg_masked_input(
        &self,
        request: Request<Streaming<pb::SecAggMaskedInputChunk>>,
    ) -> Result<Response<pb::SecAggUnmaskRequest>, Status> {
        let client = self.authenticate(&request)?;
        Ok(Response::new(crate::secagg::wire::masked(&self.coord, &client.id, request.into_inner()).await?))
    }

    #[tracing::instrument(skip_all, fields(round = request.get_ref().round))]
    async fn sec_agg_unmask(
        &self,
        request: Request<pb::SecAggUnmaskResponse>,
    ) -> Result<Response<pb::SecAggAck>, Status> {
        let client = self.authenticate(&request)?;
        Ok(Response::new(crate::secagg::wire::unmask(&self.coord, &client.id, request.into_inner())?))
    }
}
