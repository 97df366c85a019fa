//! The Prometheus endpoint: a scrape shows the fire, lateness, delivery, RPC and store metrics
//! move as a run proceeds.

mod common;

use common::*;

/// Fires, lateness, redeliveries, RPC durations, commits and gauges show up and move.
#[tokio::test]
async fn metrics_move_as_a_run_proceeds() {
    let mut server = TestServer::start().await;
    let before = scrape(server.metrics_addr).await;
    let fires_before =
        sample(&before, "tickd_fires_total", &["tickd_queue=\"metered\""]).unwrap_or(0.0);

    let mut sub = Sub::open(&mut server.client, "metered", 10).await;
    schedule(&mut server.client, job("metered", at_trigger(ts_in(-1)))).await;
    schedule(&mut server.client, job("metered", after_trigger(3_600_000))).await;
    let fire = sub.next(2_000).await;
    sub.nack(&[&fire.fire_id], None).await;
    let again = sub.next(2_000).await;

    // Counters are recorded right after the writer applies a change, which can be a moment
    // after the subscriber sees its effect: wait until the redelivery is counted.
    let q = "tickd_queue=\"metered\"";
    let redelivered = [q, "tickd_redelivery_reason=\"nack\""];
    let mut during = scrape(server.metrics_addr).await;
    for _ in 0..40 {
        if sample(&during, "tickd_redeliveries_total", &redelivered).is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        during = scrape(server.metrics_addr).await;
    }
    assert_eq!(
        sample(&during, "tickd_fires_total", &[q]),
        Some(fires_before + 1.0),
        "{during}"
    );
    assert!(sample(&during, "tickd_fire_lateness_seconds_count", &[q]).unwrap_or(0.0) >= 2.0);
    assert_eq!(
        sample(
            &during,
            "tickd_redeliveries_total",
            &[q, "tickd_redelivery_reason=\"nack\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&during, "tickd_deliveries_in_flight", &[q]),
        Some(1.0)
    );
    assert_eq!(sample(&during, "tickd_queue_subscribers", &[q]), Some(1.0));
    assert!(
        sample(
            &during,
            "rpc_server_call_duration_seconds_count",
            &["rpc_method=\"Schedule\"", "rpc_grpc_status_code=\"0\""]
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{during}"
    );
    assert!(
        sample(&during, "tickd_store_commit_duration_seconds_count", &[]).unwrap_or(0.0) >= 1.0
    );
    assert!(sample(&during, "tickd_store_commit_writes_count", &[]).unwrap_or(0.0) >= 1.0);
    assert!(
        sample(&during, "tickd_jobs", &["tickd_job_state=\"scheduled\""]).unwrap_or(0.0) >= 1.0
    );
    assert!(
        sample(&during, "tickd_jobs", &["tickd_job_state=\"completed\""]).unwrap_or(0.0) >= 1.0
    );

    sub.ack(&[&again.fire_id]).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let after = scrape(server.metrics_addr).await;
    assert_eq!(
        sample(&after, "tickd_deliveries_in_flight", &[q]),
        Some(0.0),
        "{after}"
    );
    server.stop().await;
}
