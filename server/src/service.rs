//! The gRPC handlers of `fl.v1.Federation`. They authenticate the caller by its certificate,
//! check and convert the request, and call the [`Coordinator`].

use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fl_common::tensors::{TensorSet, CODEC_SAFETENSORS_F32};
use fl_common::tls::cert_fingerprint;
use fl_common::token::JoinToken;
use fl_proto::pb;
use sha2::Digest;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::coordinator::{Coordinator, UpdateRefusal};
use crate::registry::{now_unix, AccessError, ClientRecord, ClientStatus};

/// Bytes per chunk of a model download.
pub const MODEL_CHUNK_BYTES: usize = 1 << 20;
/// Largest chunk of an upload that is accepted.
pub const MAX_UPLOAD_CHUNK_BYTES: usize = 4 << 20;

/// The Federation service.
#[derive(Debug, Clone)]
pub struct FederationService {
    coord: Arc<Coordinator>,
}

impl FederationService {
    /// A service over `coord`.
    pub fn new(coord: Arc<Coordinator>) -> Self {
        FederationService { coord }
    }

    /// The enrolled, active client that made this request.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<ClientRecord, Status> {
        let certs =
            request.peer_certs().ok_or_else(|| Status::unauthenticated("client certificate required: enroll first"))?;
        let leaf = certs.first().ok_or_else(|| Status::unauthenticated("client certificate required: enroll first"))?;
        let registry = self.coord.registry.read().map_err(|e| Status::internal(format!("registry: {e}")))?;
        registry.authenticate(&cert_fingerprint(leaf)).cloned().map_err(Status::from)
    }
}

impl From<AccessError> for Status {
    fn from(e: AccessError) -> Status {
        match e {
            AccessError::ClientRevoked(_) | AccessError::TokenRevoked(_) => Status::permission_denied(e.to_string()),
            _ => Status::unauthenticated(e.to_string()),
        }
    }
}

type InstructionStream = Pin<Box<dyn Stream<Item = Result<pb::Instruction, Status>> + Send>>;
type ModelStream = Pin<Box<dyn Stream<Item = Result<pb::ModelChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::federation_server::Federation for FederationService {
    #[tracing::instrument(skip_all, fields(name = %request.get_ref().name))]
    async fn enroll(&self, request: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        let req = request.into_inner();
        let token = JoinToken::parse(&req.token).map_err(|e| Status::unauthenticated(e.to_string()))?;
        if token.ca_fingerprint != self.coord.spec.federation {
            return Err(Status::unauthenticated("join token is for another federation (CA fingerprint differs)"));
        }
        let client_id = format!("c-{}", hex::encode(rand::random::<[u8; 6]>()));
        let cert_pem = self
            .coord
            .ca
            .sign_client_csr(&req.csr_pem, &client_id)
            .map_err(|e| Status::invalid_argument(format!("bad certificate signing request: {e}")))?;
        let der = fl_common::tls::parse_certs(&cert_pem).map_err(|e| Status::internal(e.to_string()))?;
        let fingerprint = cert_fingerprint(&der[0]);
        let now = now_unix();
        let name: String = req.name.chars().filter(|c| !c.is_control()).take(64).collect();
        self.coord
            .registry
            .update(|reg| {
                reg.redeem(&token, now)?;
                reg.clients.push(ClientRecord {
                    id: client_id.clone(),
                    name: name.clone(),
                    cert_sha256: fingerprint,
                    token_id: token.id.clone(),
                    enrolled_unix: now,
                    last_seen_unix: now,
                    rounds_joined: 0,
                    status: ClientStatus::Active,
                });
                Ok::<_, AccessError>(())
            })
            .map_err(|e| Status::internal(format!("registry: {e}")))?
            .inspect_err(|e| warn!("enrollment refused: {e}"))?;
        info!(client = %client_id, name = %name, token = %token.id, "client enrolled");
        Ok(Response::new(pb::EnrollResponse {
            client_id,
            certificate_pem: cert_pem,
            ca_pem: self.coord.ca.cert_pem.clone(),
        }))
    }

    type JoinStream = InstructionStream;

    #[tracing::instrument(skip_all)]
    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<Self::JoinStream>, Status> {
        let client = self.authenticate(&request)?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(Ok(self.coord.welcome(&client.id))).await.map_err(|_| Status::cancelled("client went away"))?;
        if self.coord.is_finished() {
            let _ = tx.send(Ok(self.coord.finished_message())).await;
            return Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))));
        }
        let connection = self.coord.connect(&client.id, tx.clone());
        info!(client = %client.id, name = %request.get_ref().name, examples = request.get_ref().num_examples, "client connected");
        let now = now_unix();
        let id = client.id.clone();
        let _ = self.coord.registry.update(|reg| {
            if let Some(c) = reg.clients.iter_mut().find(|c| c.id == id) {
                c.last_seen_unix = now;
            }
        });
        let coord = self.coord.clone();
        tokio::spawn(async move {
            tx.closed().await;
            coord.disconnect(&client.id, connection);
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    type FetchModelStream = ModelStream;

    #[tracing::instrument(skip_all, fields(round = request.get_ref().round))]
    async fn fetch_model(
        &self,
        request: Request<pb::FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let client = self.authenticate(&request)?;
        let req = request.into_inner();
        let (model, counter) = self.coord.model_for(&client.id, req.round, req.attempt)?;
        let bytes = model.bytes.clone();
        let total = bytes.len();
        // Chunks are cut from the shared model as the stream is polled: one chunk per client in flight.
        let chunks = (0..total.div_ceil(MODEL_CHUNK_BYTES)).map(move |i| {
            let start = i * MODEL_CHUNK_BYTES;
            let end = (start + MODEL_CHUNK_BYTES).min(total);
            counter.fetch_add((end - start) as u64, Ordering::Relaxed);
            Ok(pb::ModelChunk {
                offset: start as u64,
                data: bytes[start..end].to_vec(),
                total_bytes: total as u64,
                codec: CODEC_SAFETENSORS_F32.to_string(),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    #[tracing::instrument(skip_all)]
    async fn submit_update(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::SubmitAck>, Status> {
        let client = self.authenticate(&request)?;
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::UpdateChunk { kind: Some(pb::update_chunk::Kind::Header(h)) })) => h,
            Some(Ok(_)) => return Err(Status::invalid_argument("an upload must start with a header")),
            Some(Err(status)) => return Err(status),
            None => return Err(Status::invalid_argument("empty upload")),
        };
        let (round, attempt) = (header.round, header.attempt);
        let refuse = |coord: &Coordinator, reason: String| {
            warn!(client = %client.id, round, attempt, "update rejected: {reason}");
            coord.record_rejection(&client.id, round, attempt);
            Status::from(UpdateRefusal::Invalid(reason))
        };
        let model = self.coord.check_may_submit(&client.id, round, attempt).inspect_err(|e| {
            warn!(client = %client.id, round, attempt, "update refused: {e}");
        })?;
        if header.codec != CODEC_SAFETENSORS_F32 {
            return Err(refuse(&self.coord, format!("unsupported codec '{}'", header.codec)));
        }
        let limit = model.bytes.len() as u64 + (1 << 20);
        if header.total_bytes > limit {
            return Err(refuse(
                &self.coord,
                format!("upload of {} bytes exceeds the limit of {limit}", header.total_bytes),
            ));
        }
        if header.num_examples == 0 {
            return Err(refuse(&self.coord, "update reports 0 examples".into()));
        }
        if !header.train_loss.is_finite() || !header.train_accuracy.is_finite() {
            return Err(refuse(&self.coord, "non-finite training metrics".into()));
        }

        // Spool the upload to disk, checking order, size and digest as it arrives.
        let spool_dir = self.coord.state.spool_dir();
        let spool_failed = |coord: &Coordinator, e: std::io::Error| {
            // Not the client's fault, but the update is lost: count it so the round does not wait for it.
            tracing::error!(client = %client.id, round, "cannot spool the upload in {}: {e}", spool_dir.display());
            coord.record_rejection(&client.id, round, attempt);
            Status::unavailable(format!("coordinator cannot store the upload: {e}"))
        };
        std::fs::create_dir_all(&spool_dir).map_err(|e| spool_failed(&self.coord, e))?;
        let spool_path = spool_dir.join(format!("{}-r{round}-a{attempt}.part", client.id));
        let mut spool = std::fs::File::create(&spool_path).map_err(|e| spool_failed(&self.coord, e))?;
        let _cleanup = RemoveOnDrop(spool_path.clone());
        let mut received: u64 = 0;
        let mut digest = sha2::Sha256::new();
        let mut trailer = None;
        while let Some(message) = stream.next().await {
            let chunk = match message {
                Ok(c) => c,
                Err(status) => return Err(refuse(&self.coord, format!("upload broke off: {}", status.message()))),
            };
            match chunk.kind {
                Some(pb::update_chunk::Kind::Data(data)) => {
                    if trailer.is_some() {
                        return Err(refuse(&self.coord, "data after the trailer".into()));
                    }
                    if data.offset != received {
                        return Err(refuse(
                            &self.coord,
                            format!("chunk out of order: offset {} after {received} bytes", data.offset),
                        ));
                    }
                    if data.data.len() > MAX_UPLOAD_CHUNK_BYTES {
                        return Err(refuse(
                            &self.coord,
                            format!("chunk of {} bytes exceeds {MAX_UPLOAD_CHUNK_BYTES}", data.data.len()),
                        ));
                    }
                    received += data.data.len() as u64;
                    if received > header.total_bytes {
                        return Err(refuse(
                            &self.coord,
                            format!("upload exceeds its declared {} bytes", header.total_bytes),
                        ));
                    }
                    digest.update(&data.data);
                    spool.write_all(&data.data).map_err(|e| spool_failed(&self.coord, e))?;
                }
                Some(pb::update_chunk::Kind::Trailer(t)) => {
                    if trailer.is_some() {
                        return Err(refuse(&self.coord, "second trailer".into()));
                    }
                    trailer = Some(t);
                }
                Some(pb::update_chunk::Kind::Header(_)) => return Err(refuse(&self.coord, "second header".into())),
                None => return Err(refuse(&self.coord, "empty chunk".into())),
            }
        }
        let Some(trailer) = trailer else {
            return Err(refuse(
                &self.coord,
                format!("truncated upload: no trailer after {received} of {} bytes", header.total_bytes),
            ));
        };
        if received != header.total_bytes {
            return Err(refuse(&self.coord, format!("truncated upload: {received} of {} bytes", header.total_bytes)));
        }
        if hex::encode(digest.finalize()) != trailer.sha256.to_lowercase() {
            return Err(refuse(&self.coord, "SHA-256 of the payload does not match the trailer".into()));
        }
        drop(spool);

        // Validate the whole update, then fold it; one at a time.
        let _gate = self.coord.fold_gate.lock().await;
        let max_norm = self.coord.settings.max_update_norm;
        let reference = model.tensors.clone();
        let path = spool_path.clone();
        let decoded = tokio::task::spawn_blocking(move || -> Result<TensorSet, String> {
            let bytes = std::fs::read(&path).map_err(|e| format!("reading spool: {e}"))?;
            let (delta, _) = TensorSet::decode(&bytes).map_err(|e| e.to_string())?;
            delta.check_matches(&reference).map_err(|e| e.to_string())?;
            let norm = delta.l2_norm();
            if norm > max_norm {
                return Err(format!("L2 norm {norm:.3} exceeds the bound {max_norm}"));
            }
            Ok(delta)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let delta = match decoded {
            Ok(d) => d,
            Err(reason) => return Err(refuse(&self.coord, reason)),
        };
        let coord = self.coord.clone();
        let id = client.id.clone();
        tokio::task::spawn_blocking(move || {
            coord.fold(
                &id,
                round,
                attempt,
                &delta,
                header.num_examples,
                header.train_loss,
                header.train_accuracy,
                received,
            )
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .inspect_err(|e| warn!(client = %client.id, round, attempt, "update refused: {e}"))?;
        info!(client = %client.id, round, attempt, examples = header.num_examples, bytes = received, "update folded");
        Ok(Response::new(pb::SubmitAck { accepted: true, message: String::new() }))
    }

    async fn heartbeat(&self, request: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatAck>, Status> {
        let client = self.authenticate(&request)?;
        let req = request.into_inner();
        let open = self.coord.heartbeat(&client.id, req.round, req.attempt, req.progress);
        Ok(Response::new(pb::HeartbeatAck { round_open: open }))
    }
}

/// Removes a file when dropped (the spool file of an upload, whatever the outcome).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
