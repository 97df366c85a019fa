//! Log output of the real binary: `--log-format json` writes one JSON object per line, and a
//! line logged inside a traced call carries that call's trace_id and span_id.

mod common;

use std::time::Duration;

use common::*;

/// JSON lines parse, and lines inside the Subscribe call's span carry its trace ids.
#[tokio::test]
async fn json_logs_carry_trace_ids() {
    let dir = tempdir();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let tickd = TickdProcess::start_in(
        dir.path(),
        &[
            ("TICKD_LOG_FORMAT", "json"),
            ("TICKD_LOG", "info,tickd=debug"),
            // Spans need an exporter to get ids; nothing listens here and that is fine.
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9"),
        ],
        Some(lines_tx),
    );
    let mut client = tickd.client().await;
    let _sub = Sub::open(&mut client, "logged", 1).await;
    let mut traced = None;
    let mut parsed = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while traced.is_none() && std::time::Instant::now() < deadline {
        let Ok(line) = lines.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        let value: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        parsed += 1;
        assert!(value.get("timestamp").is_some() && value.get("level").is_some());
        if value.get("message").and_then(|m| m.as_str()) == Some("subscriber opened") {
            traced = Some(value);
        }
    }
    let line = traced.expect("the Subscribe handler logged 'subscriber opened'");
    assert!(parsed >= 2);
    let trace_id = line["trace_id"].as_str().expect("trace_id");
    let span_id = line["span_id"].as_str().expect("span_id");
    assert_eq!(trace_id.len(), 32);
    assert_eq!(span_id.len(), 16);
    assert_eq!(line["queue"], "logged");
}
