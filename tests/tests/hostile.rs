//! Hostile and broken input against a real coordinator process: every bad upload is refused with a
//! reason, never touches the running sum, and the coordinator keeps serving.

use std::io::{Read, Write};
use std::time::Duration;

use fl_client::identity::{ClientState, Identity};
use fl_common::decode_model;
use fl_proto::pb;
use fl_tests::*;

#[test]
fn hostile_uploads_are_refused_and_never_folded() {
    fl_common::tls::install_crypto_provider();
    let root = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(
        &root.path().join("coordinator"),
        &[
            "--labels",
            "a,b",
            "--buckets",
            "64",
            "--embed-dim",
            "4",
            "--rounds",
            "1",
            "--min-clients",
            "3",
            "--round-timeout",
            "20",
            "--max-update-norm",
            "50",
        ],
    );
    let url = coordinator.url();
    let identities: Vec<Identity> = (0..4)
        .map(|i| {
            let dir = root.path().join(format!("raw-{i}"));
            let out = enroll(&url, &coordinator.token(), &dir, &format!("raw-{i}"));
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            ClientState::new(&dir).load().unwrap()
        })
        .collect();
    let initial = std::fs::read(coordinator.state_dir.join("model/initial.safetensors")).unwrap();
    let (_, initial) = decode_model(&initial).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut a = RawClient::join(&url, &identities[0]).await;
        let mut b = RawClient::join(&url, &identities[1]).await;
        let mut c = RawClient::join(&url, &identities[2]).await;

        // Attempt 0: oversized chunk, chunks out of order, truncated upload.
        let task = a.next_task().await;
        let (_, _) = (b.next_task().await, c.next_task().await);
        let global = a.global(&task).await;
        assert_eq!(global, initial);
        let good = upload(&task, &filled(&global, 0.1), 10);
        let mut huge = good.clone();
        huge.insert(
            1,
            pb::UpdateChunk {
                kind: Some(pb::update_chunk::Kind::Data(pb::UpdateData { offset: 0, data: vec![0; 5 << 20] })),
            },
        );
        let status = a.submit(huge).await.expect_err("oversized message refused");
        assert!(
            matches!(
                status.code(),
                tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
            ),
            "{status:?}"
        );
        let mut shuffled = upload(&task, &filled(&global, 0.1), 10);
        if let Some(pb::update_chunk::Kind::Data(d)) = &mut shuffled[1].kind {
            d.offset = 7;
        }
        expect_refused(b.submit(shuffled).await, tonic::Code::InvalidArgument, "out of order");
        let mut truncated = upload(&task, &filled(&global, 0.1), 10);
        truncated.pop();
        expect_refused(c.submit(truncated).await, tonic::Code::InvalidArgument, "truncated");

        // Attempt 1: non-finite values, wrong shapes, a norm above the bound.
        let task = a.next_task().await;
        let (_, _) = (b.next_task().await, c.next_task().await);
        assert_eq!(task.attempt, 1, "a round without enough good updates is retried");
        let mut nan = filled(&global, 0.0);
        nan.tensors[0].data[0] = f32::NAN;
        expect_refused(a.submit(upload(&task, &nan, 10)).await, tonic::Code::InvalidArgument, "non-finite");
        let mut wrong_shape = filled(&global, 0.0);
        wrong_shape.tensors[0].data.push(0.0);
        wrong_shape.tensors[0].shape = vec![wrong_shape.tensors[0].data.len()];
        expect_refused(b.submit(upload(&task, &wrong_shape, 10)).await, tonic::Code::InvalidArgument, "shape");
        expect_refused(
            c.submit(upload(&task, &filled(&global, 100.0), 10)).await,
            tonic::Code::InvalidArgument,
            "exceeds the bound",
        );

        // Attempt 2: a declared size beyond the limit, a digest mismatch, an unknown codec.
        let task = a.next_task().await;
        let (_, _) = (b.next_task().await, c.next_task().await);
        let mut oversized = upload(&task, &filled(&global, 0.1), 10);
        if let Some(pb::update_chunk::Kind::Header(h)) = &mut oversized[0].kind {
            h.total_bytes = 1 << 40;
        }
        expect_refused(a.submit(oversized).await, tonic::Code::InvalidArgument, "exceeds the limit");
        let mut forged = upload(&task, &filled(&global, 0.1), 10);
        if let Some(pb::update_chunk::Kind::Trailer(t)) = &mut forged.last_mut().unwrap().kind {
            t.sha256 = "00".repeat(32);
        }
        expect_refused(b.submit(forged).await, tonic::Code::InvalidArgument, "SHA-256");
        let mut codec = upload(&task, &filled(&global, 0.1), 10);
        if let Some(pb::update_chunk::Kind::Header(h)) = &mut codec[0].kind {
            h.codec = "zip-bomb".into();
        }
        expect_refused(c.submit(codec).await, tonic::Code::InvalidArgument, "unsupported codec");

        // Attempt 3: three good updates, plus a replay, a stale attempt and an unsampled client.
        let task = a.next_task().await;
        let (_, _) = (b.next_task().await, c.next_task().await);
        let mut stale = task.clone();
        stale.attempt = 2;
        expect_refused(
            a.submit(upload(&stale, &filled(&global, 0.1), 10)).await,
            tonic::Code::FailedPrecondition,
            "stale",
        );
        let mut late = RawClient::join(&url, &identities[3]).await;
        expect_refused(
            late.submit(upload(&task, &filled(&global, 0.1), 10)).await,
            tonic::Code::PermissionDenied,
            "not sampled",
        );
        let fetch = late
            .client
            .fetch_model(pb::FetchModelRequest { round: task.round, attempt: task.attempt, ..Default::default() })
            .await;
        assert_eq!(fetch.err().map(|s| s.code()), Some(tonic::Code::PermissionDenied), "only sampled clients fetch");
        let first = upload(&task, &filled(&global, 0.1), 10);
        assert!(a.submit(first.clone()).await.unwrap().accepted);
        expect_refused(a.submit(first).await, tonic::Code::FailedPrecondition, "duplicate");
        // Garbage on the port while the round is open: plain HTTP, then random bytes.
        for garbage in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], &[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3][..]] {
            let addr = url.trim_start_matches("https://localhost:");
            let mut tcp = std::net::TcpStream::connect(format!("127.0.0.1:{addr}")).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            tcp.write_all(garbage).unwrap();
            let mut sink = Vec::new();
            let _ = tcp.read_to_end(&mut sink);
        }
        assert!(b.submit(upload(&task, &filled(&global, 0.2), 30)).await.unwrap().accepted);
        assert!(c.submit(upload(&task, &filled(&global, -0.1), 10)).await.unwrap().accepted);
        println!("reliability: hostile requests: 13 (12 uploads, 1 model fetch), refused: 13, garbage connections: 2");
    });

    let mut coordinator = coordinator;
    let status = coordinator.wait(Duration::from_secs(60));
    assert!(status.success(), "{}", coordinator.log_text());
    let metrics = coordinator.metrics();
    assert_eq!(metrics.len(), 1, "one line for the completed round, none for the failed attempts");
    assert_eq!(metrics[0]["round"], 1);
    assert_eq!(metrics[0]["attempt"], 3);
    assert_eq!(metrics[0]["participants"], 3);
    // Only the good updates were folded: global + (10*0.1 + 30*0.2 + 10*-0.1) / 50 = global + 0.12.
    let (_, after) =
        decode_model(&std::fs::read(coordinator.state_dir.join("model/round-0001.safetensors")).unwrap()).unwrap();
    assert_moved_by(&initial, &after, 0.12);
    let status = coordinator.status();
    assert!(status.failed_handshakes >= 2, "both garbage connections are refused handshakes: {status:?}");
    assert_eq!((status.phase, status.completed_rounds, status.failed_attempts), (Phase::Finished, 1, 3));
}

#[test]
fn tls_1_2_is_refused() {
    fl_common::tls::install_crypto_provider();
    let root = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(&root.path().join("c"), &["--labels", "a,b", "--rounds", "1"]);
    let ca = std::fs::read_to_string(coordinator.state_dir.join("ca.pem")).unwrap();
    let port: u16 = coordinator.url().rsplit(':').next().unwrap().parse().unwrap();
    let handshake = |versions: &[&'static rustls::SupportedProtocolVersion]| {
        let mut roots = rustls::RootCertStore::empty();
        for cert in fl_common::tls::parse_certs(&ca).unwrap() {
            roots.add(cert).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(fl_common::tls::crypto_provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        tokio::runtime::Runtime::new().unwrap().block_on(async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            connector.connect("localhost".try_into().unwrap(), tcp).await.map(|_| ())
        })
    };
    assert!(handshake(&[&rustls::version::TLS13]).is_ok(), "TLS 1.3 is served");
    let err = handshake(&[&rustls::version::TLS12]).expect_err("TLS 1.2 is refused");
    assert!(err.to_string().contains("ProtocolVersion") || err.to_string().contains("protocol"), "{err}");
}
