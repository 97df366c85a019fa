//! Security: TLS and mutual TLS on the gRPC port (plaintext and certificate-less clients
//! refused, a rotated certificate picked up without a restart, the plaintext health port), and
//! the auth file's per-queue access (every verb granted on its queues only, refused calls
//! change nothing, ListJobs shows only what the caller may read, the file re-read on change).
//! Certificates are made by the tests with rcgen: no key is committed.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tickd::api::pb;
use tickd::api::pb::scheduler_client::SchedulerClient;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How often the tests' servers look at their files.
const RELOAD: Duration = Duration::from_millis(50);
/// Longest a test waits for a file change to be picked up.
const RELOAD_PATIENCE: Duration = Duration::from_secs(10);

/// A certificate authority of the test's own.
struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A PEM certificate and its key.
struct Leaf {
    cert: String,
    key: String,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = params.self_signed(&key).expect("CA certificate");
        Pki {
            ca_pem: ca.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `localhost` with subject CN `cn`, signed by this CA.
    fn leaf(&self, cn: &str) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Writes `text` to `path` the way a rotation does: whole, by renaming a finished file.
fn put(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// The server's TLS files in a directory of the test's.
struct TlsFiles {
    dir: tempfile::TempDir,
}

impl TlsFiles {
    fn new(server: &Leaf, client_ca: Option<&Pki>) -> TlsFiles {
        let files = TlsFiles { dir: tempdir() };
        files.install(server);
        if let Some(ca) = client_ca {
            put(&files.path("client-ca.pem"), &ca.ca_pem);
        }
        files
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn install(&self, server: &Leaf) {
        put(&self.path("tls.key"), &server.key);
        put(&self.path("tls.crt"), &server.cert);
    }

    fn configure(&self, c: &mut tickd::config::Config, mutual: bool) {
        c.tls_cert = Some(self.path("tls.crt"));
        c.tls_key = Some(self.path("tls.key"));
        c.tls_client_ca = mutual.then(|| self.path("client-ca.pem"));
        c.reload_interval = RELOAD;
    }
}

/// A TLS channel to `addr` trusting `ca`, with a client certificate if given.
async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &Pki,
    identity: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.ca_pem))
        .domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Whether a ListJobs call over a new TLS connection succeeds.
async fn tls_call_works(addr: std::net::SocketAddr, ca: &Pki, identity: Option<&Leaf>) -> bool {
    let Ok(channel) = tls_channel(addr, ca, identity).await else {
        return false;
    };
    SchedulerClient::new(channel)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .is_ok()
}

/// Waits until `check` holds, polling; fails the test after RELOAD_PATIENCE.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + RELOAD_PATIENCE;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {RELOAD_PATIENCE:?}"
        );
        tokio::time::sleep(RELOAD).await;
    }
}

#[tokio::test]
async fn a_tls_server_refuses_plaintext_and_serves_tls() {
    let ca = Pki::new("server CA");
    let files = TlsFiles::new(&ca.leaf("localhost"), None);
    let server = TestServer::start_with(|c| files.configure(c, false)).await;

    // A plaintext client gets no answer to any call.
    let plain = Channel::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .connect_lazy();
    let refused = SchedulerClient::new(plain)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect_err("plaintext refused");
    assert!(
        matches!(
            refused.code(),
            Code::Unavailable | Code::Unknown | Code::Internal
        ),
        "{refused:?}"
    );

    // A client that trusts another CA refuses the server.
    assert!(!tls_call_works(server.addr, &Pki::new("other CA"), None).await);

    // Over TLS everything works, health included.
    let channel = tls_channel(server.addr, &ca, None)
        .await
        .expect("TLS connect");
    let mut client = SchedulerClient::new(channel.clone());
    let job = schedule(&mut client, job("tls", after_trigger(3_600_000))).await;
    let got = client
        .get_job(pb::GetJobRequest { id: job.id.clone() })
        .await
        .expect("get over TLS")
        .into_inner();
    assert_eq!(got.id, job.id);
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health over TLS")
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);
    server.stop().await;
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_of_its_ca() {
    let server_ca = Pki::new("server CA");
    let client_ca = Pki::new("client CA");
    let files = TlsFiles::new(&server_ca.leaf("localhost"), Some(&client_ca));
    let server = TestServer::start_with(|c| files.configure(c, true)).await;

    assert!(
        !tls_call_works(server.addr, &server_ca, None).await,
        "no client certificate"
    );
    let stranger = Pki::new("someone else's CA").leaf("worker");
    assert!(
        !tls_call_works(server.addr, &server_ca, Some(&stranger)).await,
        "a certificate of another CA"
    );
    assert!(
        tls_call_works(server.addr, &server_ca, Some(&client_ca.leaf("worker"))).await,
        "a certificate of the client CA"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let old_ca = Pki::new("old CA");
    let new_ca = Pki::new("new CA");
    let files = TlsFiles::new(&old_ca.leaf("localhost"), None);
    let server = TestServer::start_with(|c| files.configure(c, false)).await;
    assert!(tls_call_works(server.addr, &old_ca, None).await);
    let kept = tls_channel(server.addr, &old_ca, None)
        .await
        .expect("connect");

    // A broken file (a rotation half done, a wrong key) leaves the certificate in force.
    put(&files.path("tls.crt"), "not a certificate");
    tokio::time::sleep(RELOAD * 4).await;
    assert!(
        tls_call_works(server.addr, &old_ca, None).await,
        "kept after a bad file"
    );

    files.install(&new_ca.leaf("localhost"));
    eventually("the new certificate is served", || {
        tls_call_works(server.addr, &new_ca, None)
    })
    .await;
    assert!(
        !tls_call_works(server.addr, &old_ca, None).await,
        "old certificate retired"
    );
    // A connection opened before the rotation keeps working.
    SchedulerClient::new(kept)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("an open connection outlives the rotation");
    // Both reloads are counted, and the served certificate's expiry is exported (metrics
    // are process-wide: other tests' servers count here too).
    let text = scrape(server.metrics_addr).await;
    let reloads = |result: &str| {
        let labels = [
            r#"tickd_setting="tls""#,
            &format!(r#"tickd_result="{result}""#),
        ];
        sample(&text, "tickd_config_reloads_total", &labels).unwrap_or(0.0)
    };
    assert!(reloads("failed") >= 1.0 && reloads("ok") >= 1.0, "{text}");
    let not_after = sample(&text, "tickd_tls_certificate_not_after_seconds", &[])
        .expect("certificate expiry exported");
    assert!(not_after > (now_micros() / 1_000_000) as f64, "{not_after}");
    server.stop().await;
}

#[tokio::test]
async fn the_plaintext_health_port_serves_health_only() {
    let ca = Pki::new("server CA");
    let files = TlsFiles::new(&ca.leaf("localhost"), None);
    let server = TestServer::start_with(|c| {
        files.configure(c, false);
        c.health_listen = Some(([127, 0, 0, 1], 0).into());
    })
    .await;
    let health_addr = server.health_addr.expect("a health port");
    let channel = channel(health_addr).await;
    for service in ["", "liveness", "tickd.v1.Scheduler"] {
        let status = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health on the plaintext port")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let scheduler = SchedulerClient::new(channel)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect_err("no Scheduler service on the health port");
    assert_eq!(scheduler.code(), Code::Unimplemented);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// The auth file.

const ADMIN: &str = "admin-token";
const BILLING_API: &str = "billing-api-token";
const BILLING_WORKER: &str = "billing-worker-token";
const PAYROLL_READER: &str = "payroll-reader-token";

fn sha256_hex(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// The auth file of the tests; `billing_api_queues` are the queues billing-api manages and
/// reads.
fn auth_file(billing_api_queues: &[&str]) -> String {
    let queues = billing_api_queues
        .iter()
        .map(|q| format!("\"{q}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "principals:
  - name: admin
    token_sha256: {}
    rules:
      - {{verbs: [manage, read, consume], queues: [\"*\"]}}
  - name: billing-api
    token_sha256: {}
    rules:
      - {{verbs: [manage, read], queues: [{queues}]}}
  - name: billing-worker
    token_sha256: {}
    mtls_subject: billing-worker
    rules:
      - {{verbs: [consume], queues: [\"billing.*\"]}}
  - name: payroll-reader
    token_sha256: {}
    rules:
      - {{verbs: [read], queues: [payroll]}}
",
        sha256_hex(ADMIN),
        sha256_hex(BILLING_API),
        sha256_hex(BILLING_WORKER),
        sha256_hex(PAYROLL_READER),
    )
}

/// `message` sent with `token` as its bearer token.
fn by<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    request
}

fn schedule_req(queue: &str, id: &str) -> pb::ScheduleRequest {
    pb::ScheduleRequest {
        job: Some(pb::Job {
            id: id.into(),
            ..job(queue, after_trigger(3_600_000))
        }),
        ..Default::default()
    }
}

/// An UpdateJob that sets job `id`'s labels to `owner=billing`.
fn relabel_req(id: String) -> pb::UpdateJobRequest {
    pb::UpdateJobRequest {
        job: Some(pb::Job {
            id,
            labels: [("owner".to_string(), "billing".to_string())].into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["labels".into()],
        }),
    }
}

fn open_req(queue: &str) -> ReceiverStream<pb::SubscribeRequest> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.try_send(pb::SubscribeRequest {
        request: Some(pb::subscribe_request::Request::Open(pb::SubscribeOpen {
            queue: queue.into(),
            max_in_flight: 8,
        })),
    })
    .expect("send open");
    // The sender is dropped: the stream half-closes after the open, which is allowed.
    ReceiverStream::new(rx)
}

/// Asserts PERMISSION_DENIED naming `queue`.
fn denied<T: std::fmt::Debug>(result: Result<T, tonic::Status>, queue: &str) {
    let status = expect_code(result, Code::PermissionDenied);
    assert!(
        status.message().contains("may not")
            && status.message().contains(&format!("queue {queue:?}")),
        "names the queue {queue}: {status:?}"
    );
}

/// A server on a manual clock whose auth file grants billing-api `billing_api_queues`; returns the file's
/// directory (kept alive by the caller) too.
async fn secured(b: Backend, billing_api_queues: &[&str]) -> (TestServer, tempfile::TempDir) {
    let dir = tempdir();
    let path = dir.path().join("auth.yaml");
    put(&path, &auth_file(billing_api_queues));
    let server = b
        .manual_with(|c| {
            c.auth_file = Some(path);
            c.reload_interval = RELOAD;
        })
        .await;
    (server, dir)
}

both_backends! {
    #[tokio::test]
    async fn callers_need_credentials_the_auth_file_knows(b) {
        let (server, _dir) = secured(b, &["billing.*"]).await;
        let mut c = server.client.clone();
        let none = c.schedule(schedule_req("billing.eu", "")).await;
        expect_code(none, Code::Unauthenticated);
        expect_code(c.list_jobs(pb::ListJobsRequest::default()).await, Code::Unauthenticated);
        let guess = c.list_jobs(by("guess", pb::ListJobsRequest::default())).await;
        let status = expect_code(guess, Code::Unauthenticated);
        assert!(!status.message().contains("guess"), "the token is not echoed: {status:?}");
        let mut basic = Request::new(pb::ListJobsRequest::default());
        basic.metadata_mut().insert("authorization", "Basic YTpi".parse().expect("ascii"));
        expect_code(c.list_jobs(basic).await, Code::Unauthenticated);
        // Nothing was created by the refused Schedule.
        let all = c
            .list_jobs(by(ADMIN, pb::ListJobsRequest::default()))
            .await
            .expect("admin lists")
            .into_inner();
        assert!(all.jobs.is_empty(), "{:?}", all.jobs);
        let text = scrape(server.metrics_addr).await;
        let refusals = sample(&text, "tickd_auth_refusals_total", &[r#"tickd_reason="unauthenticated""#]);
        assert!(refusals.unwrap_or(0.0) >= 4.0, "{text}");

        // Health and reflection stay open.
        let health = HealthClient::new(channel(server.addr).await)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .expect("health without credentials")
            .into_inner();
        assert_eq!(health.status, ServingStatus::Serving as i32);
        server.stop().await;
    }

    #[tokio::test]
    async fn manage_and_read_are_granted_on_their_queues_only(b) {
        let (server, _dir) = secured(b, &["billing.*"]).await;
        let mut c = server.client.clone();
        let payroll = c
            .schedule(by(ADMIN, schedule_req("payroll", "salaries")))
            .await
            .expect("admin schedules payroll")
            .into_inner();

        // billing-api may do nothing to payroll's job, and each refusal changes nothing.
        let id = || payroll.id.clone();
        denied(c.schedule(by(BILLING_API, schedule_req("payroll", "sneaky"))).await, "payroll");
        // Nor reach payroll through a dead-letter queue: on a new job, in a batch, or by
        // moving an existing job's.
        let with_dlq = |id: &str| {
            let mut req = schedule_req("billing.eu", id);
            if let Some(job) = req.job.as_mut() {
                job.max_attempts = 1;
                job.dead_letter_queue = "payroll".into();
            }
            req
        };
        denied(c.schedule(by(BILLING_API, with_dlq("dlq-one"))).await, "payroll");
        denied(
            c.batch_schedule(by(BILLING_API, pb::BatchScheduleRequest {
                requests: vec![with_dlq("dlq-two")],
            }))
            .await,
            "payroll",
        );
        c.schedule(by(BILLING_API, schedule_req("billing.eu", "dlq-three"))).await.expect("schedule");
        denied(
            c.update_job(by(BILLING_API, pb::UpdateJobRequest {
                job: Some(pb::Job {
                    id: "dlq-three".into(),
                    dead_letter_queue: "payroll".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths: vec!["dead_letter_queue".into()] }),
            }))
            .await,
            "payroll",
        );
        let kept = c.get_job(by(BILLING_API, pb::GetJobRequest { id: "dlq-three".into() }))
            .await
            .expect("get")
            .into_inner();
        assert_eq!(kept.dead_letter_queue, "", "the refused update changed the job");
        denied(
            c.batch_schedule(by(BILLING_API, pb::BatchScheduleRequest {
                requests: vec![schedule_req("billing.eu", "ok-one"), schedule_req("payroll", "bad-one")],
            }))
            .await,
            "payroll",
        );
        denied(c.cancel_job(by(BILLING_API, pb::CancelJobRequest { id: id() })).await, "payroll");
        denied(c.pause_job(by(BILLING_API, pb::PauseJobRequest { id: id() })).await, "payroll");
        denied(c.resume_job(by(BILLING_API, pb::ResumeJobRequest { id: id() })).await, "payroll");
        denied(c.trigger_job(by(BILLING_API, pb::TriggerJobRequest { id: id() })).await, "payroll");
        denied(
            c.backfill_job(by(BILLING_API, pb::BackfillJobRequest {
                id: id(),
                start_time: Some(ts_in(-60_000)),
                end_time: Some(ts_in(0)),
            }))
            .await,
            "payroll",
        );
        denied(
            c.update_job(by(BILLING_API, relabel_req(id()))).await,
            "payroll",
        );
        denied(c.delete_job(by(BILLING_API, pb::DeleteJobRequest { id: id() })).await, "payroll");
        denied(c.get_job(by(BILLING_API, pb::GetJobRequest { id: id() })).await, "payroll");
        denied(
            c.list_occurrences(by(BILLING_API, pb::ListOccurrencesRequest {
                job_id: id(),
                ..Default::default()
            }))
            .await,
            "payroll",
        );
        denied(
            c.preview_occurrences(by(BILLING_API, pb::PreviewOccurrencesRequest {
                subject: Some(pb::preview_occurrences_request::Subject::JobId(id())),
                ..Default::default()
            }))
            .await,
            "payroll",
        );
        denied(
            c.preview_occurrences(by(BILLING_API, pb::PreviewOccurrencesRequest {
                subject: Some(pb::preview_occurrences_request::Subject::Job(job(
                    "payroll",
                    every_trigger(60_000, None),
                ))),
                ..Default::default()
            }))
            .await,
            "payroll",
        );
        denied(
            c.list_jobs(by(BILLING_API, pb::ListJobsRequest {
                queue: "payroll".into(),
                ..Default::default()
            }))
            .await,
            "payroll",
        );
        server.settle().await;
        let after = c
            .get_job(by(ADMIN, pb::GetJobRequest { id: id() }))
            .await
            .expect("the payroll job is still there")
            .into_inner();
        assert_eq!(after, payroll, "a refused call changed the job");
        let text = scrape(server.metrics_addr).await;
        let labels = [r#"tickd_reason="permission_denied""#, r#"tickd_principal="billing-api""#];
        let refusals = sample(&text, "tickd_auth_refusals_total", &labels);
        assert!(refusals.unwrap_or(0.0) >= 14.0, "{text}");
        assert_eq!(server.counts("payroll"), (0, 0), "a refused trigger released a fire");
        for absent in ["sneaky", "ok-one", "bad-one", "dlq-one", "dlq-two"] {
            expect_code(
                c.get_job(by(ADMIN, pb::GetJobRequest { id: absent.into() })).await,
                Code::NotFound,
            );
        }
        // A job that does not exist is NOT_FOUND, not a refusal.
        expect_code(
            c.cancel_job(by(BILLING_API, pb::CancelJobRequest { id: "nobody".into() })).await,
            Code::NotFound,
        );

        // On its own queues billing-api may do all of it.
        let mine = c
            .schedule(by(BILLING_API, schedule_req("billing.eu", "invoices")))
            .await
            .expect("schedule on billing.eu")
            .into_inner();
        let id = || mine.id.clone();
        c.batch_schedule(by(BILLING_API, pb::BatchScheduleRequest {
            requests: vec![schedule_req("billing.us", "statements")],
        }))
        .await
        .expect("batch on billing.*");
        c.pause_job(by(BILLING_API, pb::PauseJobRequest { id: id() })).await.expect("pause");
        c.resume_job(by(BILLING_API, pb::ResumeJobRequest { id: id() })).await.expect("resume");
        c.update_job(by(BILLING_API, relabel_req(id()))).await.expect("update");
        c.trigger_job(by(BILLING_API, pb::TriggerJobRequest { id: id() })).await.expect("trigger");
        c.get_job(by(BILLING_API, pb::GetJobRequest { id: id() })).await.expect("get");
        c.list_occurrences(by(BILLING_API, pb::ListOccurrencesRequest {
            job_id: id(),
            ..Default::default()
        }))
        .await
        .expect("ledger");
        c.preview_occurrences(by(BILLING_API, pb::PreviewOccurrencesRequest {
            subject: Some(pb::preview_occurrences_request::Subject::JobId(id())),
            ..Default::default()
        }))
        .await
        .expect("preview");
        // A proposed job without a queue reads no queue: anyone may preview it.
        let mut queueless = job("", every_trigger(60_000, None));
        queueless.queue.clear();
        c.preview_occurrences(by(PAYROLL_READER, pb::PreviewOccurrencesRequest {
            subject: Some(pb::preview_occurrences_request::Subject::Job(queueless)),
            ..Default::default()
        }))
        .await
        .expect("preview of a job without a queue");
        c.cancel_job(by(BILLING_API, pb::CancelJobRequest { id: id() })).await.expect("cancel");
        c.delete_job(by(BILLING_API, pb::DeleteJobRequest { id: "statements".into() }))
            .await
            .expect("delete");
        server.stop().await;
    }

    #[tokio::test]
    async fn consume_is_granted_on_its_queues_only(b) {
        let (server, _dir) = secured(b, &["billing.*"]).await;
        let mut c = server.client.clone();
        let mine = c
            .schedule(by(BILLING_API, schedule_req("billing.eu", "invoices")))
            .await
            .expect("schedule")
            .into_inner();
        c.trigger_job(by(BILLING_API, pb::TriggerJobRequest { id: mine.id.clone() }))
            .await
            .expect("trigger");

        // A token for billing.* cannot subscribe to payroll, nor ack there; billing-api,
        // which manages billing.*, cannot consume it.
        denied(c.subscribe(by(BILLING_WORKER, open_req("payroll"))).await, "payroll");
        denied(c.subscribe(by(BILLING_API, open_req("billing.eu"))).await, "billing.eu");
        denied(
            c.schedule(by(BILLING_WORKER, schedule_req("billing.eu", "worker-made"))).await,
            "billing.eu",
        );

        let mut fires = c
            .subscribe(by(BILLING_WORKER, open_req("billing.eu")))
            .await
            .expect("the worker subscribes to billing.eu")
            .into_inner();
        let fire = tokio::time::timeout(Duration::from_secs(20), fires.message())
            .await
            .expect("a fire in time")
            .expect("stream ok")
            .expect("a fire");
        let ack = |token: &str, queue: &str| {
            by(token, pb::AckRequest {
                queue: queue.into(),
                fire_ids: vec![fire.fire_id.clone()],
            })
        };
        denied(c.ack(ack(BILLING_API, "billing.eu")).await, "billing.eu");
        denied(c.ack(ack(BILLING_WORKER, "payroll")).await, "payroll");
        server.settle().await;
        assert_eq!(server.counts("billing.eu").1, 1, "the refused acks acked nothing");
        let acked = c.ack(ack(BILLING_WORKER, "billing.eu")).await.expect("ack").into_inner();
        assert_eq!(acked.acked_count, 1);
        server.stop().await;
    }

    #[tokio::test]
    async fn list_jobs_shows_only_what_the_caller_may_read(b) {
        let (server, _dir) = secured(b, &["billing.*"]).await;
        let mut c = server.client.clone();
        for (queue, id) in [("payroll", "p1"), ("billing.eu", "b1"), ("payroll", "p2"), ("billing.us", "b2")] {
            c.schedule(by(ADMIN, schedule_req(queue, id))).await.expect("admin schedules");
        }
        let ids = |r: pb::ListJobsResponse| {
            let mut ids: Vec<String> = r.jobs.into_iter().map(|j| j.id).collect();
            ids.sort();
            ids
        };
        let payroll = c
            .list_jobs(by(PAYROLL_READER, pb::ListJobsRequest::default()))
            .await
            .expect("list")
            .into_inner();
        assert_eq!(ids(payroll), ["p1", "p2"]);
        let billing = c
            .list_jobs(by(BILLING_API, pb::ListJobsRequest::default()))
            .await
            .expect("list")
            .into_inner();
        assert_eq!(ids(billing), ["b1", "b2"]);
        let worker = c
            .list_jobs(by(BILLING_WORKER, pb::ListJobsRequest::default()))
            .await
            .expect("list")
            .into_inner();
        assert!(worker.jobs.is_empty(), "consume grants no read: {:?}", worker.jobs);
        // Paging walks past what cannot be read.
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = c
                .list_jobs(by(PAYROLL_READER, pb::ListJobsRequest {
                    page_size: 1,
                    page_token: token,
                    ..Default::default()
                }))
                .await
                .expect("page")
                .into_inner();
            seen.extend(page.jobs.into_iter().map(|j| j.id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(seen, ["p1", "p2"]);
        denied(
            c.list_jobs(by(PAYROLL_READER, pb::ListJobsRequest {
                queue: "billing.eu".into(),
                ..Default::default()
            }))
            .await,
            "billing.eu",
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn the_auth_file_is_read_again_when_it_changes(b) {
        let (server, dir) = secured(b, &["billing.*"]).await;
        let mut c = server.client.clone();
        let list_payroll = || by(BILLING_API, pb::ListJobsRequest {
            queue: "payroll".into(),
            ..Default::default()
        });
        denied(c.list_jobs(list_payroll()).await, "payroll");

        let path = dir.path().join("auth.yaml");
        put(&path, &auth_file(&["billing.*", "payroll"]));
        eventually("the new grant is in force", || {
            let mut c = c.clone();
            async move { c.list_jobs(list_payroll()).await.is_ok() }
        })
        .await;

        // A file that cannot be used leaves the last good one in force.
        put(&path, "principals: [{name: broken}]");
        tokio::time::sleep(RELOAD * 4).await;
        c.list_jobs(list_payroll()).await.expect("the last good file stays in force");

        put(&path, &auth_file(&["billing.*"]));
        eventually("the grant is withdrawn", || {
            let mut c = c.clone();
            async move {
                c.list_jobs(list_payroll()).await.err().map(|s| s.code())
                    == Some(Code::PermissionDenied)
            }
        })
        .await;
        server.stop().await;
    }

    #[tokio::test]
    async fn a_withdrawn_grant_ends_the_subscriptions_it_opened(b) {
        let (server, dir) = secured(b, &["billing.*"]).await;
        let mut c = server.client.clone();
        let mut worker = c
            .subscribe(by(BILLING_WORKER, open_req("billing.eu")))
            .await
            .expect("the worker subscribes to billing.eu")
            .into_inner();
        let mut admin = c
            .subscribe(by(ADMIN, open_req("billing.eu")))
            .await
            .expect("admin subscribes to billing.eu")
            .into_inner();

        // billing-worker may now consume billing.us only.
        let narrowed = auth_file(&["billing.*"]).replace(
            "{verbs: [consume], queues: [\"billing.*\"]}",
            "{verbs: [consume], queues: [\"billing.us\"]}",
        );
        assert_ne!(narrowed, auth_file(&["billing.*"]));
        put(&dir.path().join("auth.yaml"), &narrowed);
        let ended = tokio::time::timeout(Duration::from_secs(20), worker.message())
            .await
            .expect("the withdrawn subscription ends in time");
        denied(ended, "billing.eu");
        denied(c.subscribe(by(BILLING_WORKER, open_req("billing.eu"))).await, "billing.eu");
        c.subscribe(by(BILLING_WORKER, open_req("billing.us")))
            .await
            .expect("the grant that is left");

        // The reload ended only what it withdrew: admin's stream still receives.
        let mine = c
            .schedule(by(ADMIN, schedule_req("billing.eu", "after-reload")))
            .await
            .expect("schedule")
            .into_inner();
        c.trigger_job(by(ADMIN, pb::TriggerJobRequest { id: mine.id }))
            .await
            .expect("trigger");
        let fire = tokio::time::timeout(Duration::from_secs(20), admin.message())
            .await
            .expect("a fire in time")
            .expect("admin's stream is still open")
            .expect("a fire");
        assert!(fire.fire_id.starts_with("after-reload@"), "{fire:?}");
        server.stop().await;
    }
}

#[tokio::test]
async fn a_client_certificate_names_its_principal() {
    let server_ca = Pki::new("server CA");
    let client_ca = Pki::new("client CA");
    let files = TlsFiles::new(&server_ca.leaf("localhost"), Some(&client_ca));
    let dir = tempdir();
    let auth = dir.path().join("auth.yaml");
    put(&auth, &auth_file(&["billing.*"]));
    let server = TestServer::start_with(|c| {
        files.configure(c, true);
        c.auth_file = Some(auth);
    })
    .await;
    let worker = client_ca.leaf("billing-worker");
    let mut c = SchedulerClient::new(
        tls_channel(server.addr, &server_ca, Some(&worker))
            .await
            .expect("mTLS connect"),
    );
    c.subscribe(Request::new(open_req("billing.eu")))
        .await
        .expect("the certificate's principal consumes billing.eu");
    denied(
        c.subscribe(Request::new(open_req("payroll"))).await,
        "payroll",
    );

    // A certificate the CA signed but the auth file does not name: no principal.
    let mut stranger = SchedulerClient::new(
        tls_channel(server.addr, &server_ca, Some(&client_ca.leaf("stranger")))
            .await
            .expect("mTLS connect"),
    );
    let refused = stranger.list_jobs(pb::ListJobsRequest::default()).await;
    expect_code(refused, Code::Unauthenticated);
    // A bearer token speaks for its principal whatever the certificate.
    stranger
        .schedule(by(ADMIN, schedule_req("payroll", "by-token")))
        .await
        .expect("the token's principal");
    server.stop().await;
}

/// tickctl speaks TLS and mutual TLS and sends a token when told to.
#[tokio::test]
async fn tickctl_speaks_tls_with_a_client_certificate_and_a_token() {
    let server_ca = Pki::new("server CA");
    let client_ca = Pki::new("client CA");
    let files = TlsFiles::new(&server_ca.leaf("localhost"), Some(&client_ca));
    let auth = files.path("auth.yaml");
    put(&auth, &auth_file(&["billing.*"]));
    let server = TestServer::start_with(|c| {
        files.configure(c, true);
        c.auth_file = Some(auth);
    })
    .await;
    let ca = files.path("ca.pem");
    put(&ca, &server_ca.ca_pem);
    let me = client_ca.leaf("someone");
    put(&files.path("me.crt"), &me.cert);
    put(&files.path("me.key"), &me.key);
    let tickctl = async |token: Option<&str>, args: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tickctl"));
        cmd.arg("--addr")
            .arg(format!("127.0.0.1:{}", server.addr.port()))
            .arg("--ca-file")
            .arg(&ca)
            .arg("--tls-server-name")
            .arg("localhost")
            .arg("--cert")
            .arg(files.path("me.crt"))
            .arg("--key")
            .arg(files.path("me.key"))
            .args(args)
            .env_remove("TICKD_TOKEN");
        if let Some(t) = token {
            cmd.env("TICKD_TOKEN", t);
        }
        tokio::time::timeout(Duration::from_secs(20), cmd.output())
            .await
            .expect("tickctl finished in time")
            .expect("tickctl ran")
    };
    let schedule = [
        "schedule",
        "--queue",
        "billing.eu",
        "--id",
        "cli",
        "--after",
        "1h",
    ];
    let out = tickctl(Some(BILLING_API), &schedule).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let anonymous = tickctl(None, &["get", "cli"]).await;
    let said = String::from_utf8_lossy(&anonymous.stderr);
    assert!(
        !anonymous.status.success() && said.contains("Unauthenticated"),
        "{said}"
    );

    let payroll = ["schedule", "--queue", "payroll", "--after", "1h"];
    let elsewhere = tickctl(Some(BILLING_API), &payroll).await;
    let said = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(
        !elsewhere.status.success()
            && said.contains("PermissionDenied")
            && said.contains("payroll"),
        "{said}"
    );
    server.stop().await;
}
