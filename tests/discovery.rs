//! Generic clients can find tickd: grpc.health.v1 reports SERVING, and gRPC reflection (v1 and
//! v1alpha) lists the Scheduler service.

mod common;

use common::*;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// Health reports SERVING for the server and for tickd.v1.Scheduler.
#[tokio::test]
async fn health_reports_serving() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(channel(server.addr).await);
    for service in ["", "tickd.v1.Scheduler"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("check")
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }
    server.stop().await;
}

/// Reflection lists tickd.v1.Scheduler, and its file describes every RPC.
#[tokio::test]
async fn reflection_lists_the_scheduler() {
    let server = TestServer::start().await;
    let mut client = ServerReflectionClient::new(channel(server.addr).await);
    let requests = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "tickd.v1.Scheduler".into(),
            )),
        },
    ];
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection")
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = responses
        .message()
        .await
        .expect("first response")
        .and_then(|r| r.message_response)
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"tickd.v1.Scheduler"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    let Some(MessageResponse::FileDescriptorResponse(files)) = responses
        .message()
        .await
        .expect("second response")
        .and_then(|r| r.message_response)
    else {
        panic!("expected a file descriptor");
    };
    let bytes: Vec<u8> = files.file_descriptor_proto.concat();
    let text = String::from_utf8_lossy(&bytes);
    for method in [
        "Schedule",
        "CancelJob",
        "GetJob",
        "ListJobs",
        "PauseJob",
        "ResumeJob",
        "PreviewOccurrences",
        "ListOccurrences",
        "UpdateJob",
        "TriggerJob",
        "Subscribe",
        "Ack",
    ] {
        assert!(
            text.contains(method),
            "reflection does not describe {method}"
        );
    }
    server.stop().await;
}

/// At the concurrency limit, calls are refused at once with RESOURCE_EXHAUSTED, while health
/// checks are still answered.
#[tokio::test]
async fn overload_refuses_calls_but_not_health_checks() {
    let mut server = TestServer::start_with(|c| c.max_concurrent_requests = 1).await;
    // A Subscribe call that never sends its open holds the only slot.
    let (_hold, rx) = tokio::sync::mpsc::channel::<tickd::api::pb::SubscribeRequest>(1);
    let mut holder = server.client.clone();
    let held = tokio::spawn(async move {
        holder
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    // The holder's call reaches the server on its own schedule: poll until its slot is taken.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match server
            .client
            .get_job(tickd::api::pb::GetJobRequest { id: "x".into() })
            .await
        {
            Err(status) if status.code() == tonic::Code::ResourceExhausted => break,
            other => {
                assert_eq!(
                    other.expect_err("no job x").code(),
                    tonic::Code::NotFound,
                    "before the slot is taken"
                );
                assert!(
                    std::time::Instant::now() < deadline,
                    "the open Subscribe never took the only slot"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }

    let mut health = HealthClient::new(channel(server.addr).await);
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health is always admitted")
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);
    held.abort();
    server.stop().await;
}
