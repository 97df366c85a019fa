//! The Prometheus endpoint: a scrape shows the fire, lateness, delivery, RPC and store metrics
//! move as a run proceeds.

mod common;

use common::*;

/// Fires, lateness, redeliveries, RPC durations, commits and gauges show up and move.
#[tokio::test]
async fn metrics_move_as_a_run_proceeds() {
    let mut server = TestServer::manual().await;
    let q = "tickd_queue=\"metered\"";
    let before = scrape(server.metrics_addr).await;
    assert_eq!(sample(&before, "tickd_fires_total", &[q]), None, "{before}");

    let mut sub = server.subscribe("metered", 10).await;
    let at = server.ts_in(0);
    server.schedule(job("metered", at_trigger(at))).await;
    server
        .schedule(job("metered", after_trigger(3_600_000)))
        .await;
    server.settle().await;
    let fire = sub.recv().await;
    sub.nack(&[&fire.fire_id], None).await;
    server.settle().await;
    let again = sub.recv().await;
    server.settle().await;

    let during = scrape(server.metrics_addr).await;
    assert_eq!(
        sample(&during, "tickd_fires_total", &[q]),
        Some(1.0),
        "{during}"
    );
    assert_eq!(
        sample(&during, "tickd_fire_lateness_seconds_count", &[q]),
        Some(2.0),
        "the first delivery and the redelivery: {during}"
    );
    assert_eq!(
        sample(
            &during,
            "tickd_redeliveries_total",
            &[q, "tickd_redelivery_reason=\"nack\""]
        ),
        Some(1.0),
        "{during}"
    );
    assert_eq!(
        sample(&during, "tickd_deliveries_in_flight", &[q]),
        Some(1.0)
    );
    assert_eq!(sample(&during, "tickd_queue_subscribers", &[q]), Some(1.0));
    assert_eq!(
        sample(
            &during,
            "rpc_server_call_duration_seconds_count",
            &["rpc_method=\"Schedule\"", "rpc_grpc_status_code=\"0\""]
        ),
        Some(2.0),
        "{during}"
    );
    assert!(
        sample(&during, "tickd_store_commit_duration_seconds_count", &[]).unwrap_or(0.0) >= 1.0
    );
    assert!(sample(&during, "tickd_store_commit_writes_count", &[]).unwrap_or(0.0) >= 1.0);
    assert_eq!(
        sample(&during, "tickd_jobs", &["tickd_job_state=\"scheduled\""]),
        Some(1.0),
        "{during}"
    );
    assert_eq!(
        sample(&during, "tickd_jobs", &["tickd_job_state=\"completed\""]),
        Some(1.0),
        "{during}"
    );

    sub.ack(&[&again.fire_id]).await;
    server.wait_in_flight("metered", 0).await;
    // Each scrape counts the core afresh.
    let after = scrape(server.metrics_addr).await;
    assert_eq!(
        sample(&after, "tickd_deliveries_in_flight", &[q]),
        Some(0.0),
        "{after}"
    );

    // Its last subscriber leaves: the core no longer counts the queue, and the gauges report
    // it at 0 rather than dropping it (a rule over a range must see that it emptied).
    drop(sub);
    server
        .wait_until("the subscriber is gone", |s| {
            s.queue("metered").subscribers == 0
        })
        .await;
    assert!(
        !server
            .core
            .stats()
            .queues
            .iter()
            .any(|(name, _)| name == "metered"),
        "the core still counts the queue: the test checks nothing"
    );
    let emptied = scrape(server.metrics_addr).await;
    for gauge in [
        "tickd_queue_backlog",
        "tickd_deliveries_in_flight",
        "tickd_queue_subscribers",
    ] {
        assert_eq!(
            sample(&emptied, gauge, &[q]),
            Some(0.0),
            "{gauge}: {emptied}"
        );
    }
    server.stop().await;
}
