//! tickctl against a real server: every trigger kind, the job commands, list, subscribe, and
//! a refused request reported with its field and a non-zero exit code.

mod common;

use std::process::Output;

use common::*;
use tickd::api::pb;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Runs tickctl against `server` with `args`, feeding `stdin`.
async fn tickctl(server: &TestServer, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tickctl"))
        .arg("--addr")
        .arg(format!("http://{}", server.addr))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tickctl");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(bytes) = stdin {
        input.write_all(bytes).await.expect("write stdin");
    }
    drop(input);
    tokio::time::timeout(std::time::Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("tickctl finished in time")
        .expect("tickctl ran")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("JSON output")
}

/// schedule, then `subscribe --count 1` prints the fire as a JSON line and acks it; `list`
/// shows the job.
#[tokio::test]
async fn schedule_subscribe_and_list() {
    let server = TestServer::start().await;
    let out = tickctl(
        &server,
        &[
            "schedule",
            "--queue",
            "cli",
            "--id",
            "hello",
            "--after",
            "200ms",
            "--payload",
            "hi",
            "--label",
            "team=ops",
        ],
        None,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout(&out).contains("id:             hello"));

    let out = tickctl(&server, &["subscribe", "cli", "--count", "1"], None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fire: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().next().expect("a line")).expect("JSON line");
    assert_eq!(fire["job_id"], "hello");
    assert_eq!(fire["payload"], "hi");
    assert_eq!(fire["labels"]["team"], "ops");
    assert_eq!(fire["attempt"], 1);

    let table = tickctl(&server, &["list"], None).await;
    let text = stdout(&table);
    assert!(
        text.lines().next().is_some_and(|h| h.starts_with("ID")),
        "{text}"
    );
    assert!(
        text.contains("hello") && text.contains("COMPLETED"),
        "{text}"
    );

    // Acked: nothing comes again.
    let again = tickctl(&server, &["subscribe", "cli", "--count", "1"], None);
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(600), again)
            .await
            .is_err(),
        "an acked fire was delivered again"
    );
    server.stop().await;
}

/// Every trigger kind and option is accepted; get, pause, resume and cancel work; list filters
/// and pages for the user.
#[tokio::test]
async fn every_trigger_and_job_command() {
    let server = TestServer::start().await;
    let cases: [&[&str]; 4] = [
        &["--id", "at", "--at", "2030-01-01T09:00:00Z"],
        &[
            "--id",
            "after",
            "--after",
            "30s",
            "--misfire",
            "skip",
            "--max-attempts",
            "3",
        ],
        &[
            "--id",
            "every",
            "--every",
            "5m",
            "--start",
            "2030-01-01T00:00:00Z",
            "--jitter",
            "10s",
            "--max-fires",
            "4",
            "--end",
            "2031-01-01T00:00:00Z",
        ],
        &[
            "--id",
            "cron",
            "--cron",
            "0 9 * * MON-FRI",
            "--tz",
            "Europe/Berlin",
            "--dst-gap",
            "skip",
            "--dst-repeat",
            "both",
            "--ack-deadline",
            "2m",
            "--dead-letter-queue",
            "cli.dead",
            "--misfire-grace",
            "1m",
            "--overlap",
            "buffer-one",
        ],
    ];
    for case in cases {
        let mut args = vec!["-o", "json", "schedule", "--queue", "cli"];
        args.extend_from_slice(case);
        let job = json(&tickctl(&server, &args, None).await);
        assert_eq!(job["state"], "SCHEDULED", "{job}");
    }
    // Every delivery option reached the server, read back through the API.
    let mut client = server.client.clone();
    let mut get = async |id: &str| {
        client
            .get_job(pb::GetJobRequest { id: id.into() })
            .await
            .expect("get")
            .into_inner()
    };
    let after = get("after").await;
    assert_eq!(after.misfire_policy(), pb::MisfirePolicy::Skip);
    assert_eq!(after.max_attempts, 3);
    let every = get("every").await;
    assert_eq!(every.max_fires, 4);
    assert_eq!(every.end_time.map(|t| t.seconds), Some(1_924_992_000));
    match every.trigger.and_then(|t| t.kind) {
        Some(pb::trigger::Kind::Every(i)) => {
            assert_eq!(i.period, Some(ms(300_000)));
            assert_eq!(i.start_time.map(|t| t.seconds), Some(1_893_456_000));
            assert_eq!(i.jitter, Some(ms(10_000)));
        }
        other => panic!("not an interval: {other:?}"),
    }
    let cron = get("cron").await;
    assert_eq!(cron.ack_deadline, Some(ms(120_000)));
    assert_eq!(cron.misfire_grace_period, Some(ms(60_000)));
    assert_eq!(cron.dead_letter_queue, "cli.dead");
    assert_eq!(cron.overlap_policy(), pb::OverlapPolicy::BufferOne);
    let stdin_job = json(
        &tickctl(
            &server,
            &[
                "-o",
                "json",
                "schedule",
                "--queue",
                "other",
                "--after",
                "1h",
                "--payload-file",
                "-",
            ],
            Some(b"from stdin"),
        )
        .await,
    );
    assert_eq!(stdin_job["payload"], "from stdin");

    let cron = json(&tickctl(&server, &["-o", "json", "get", "cron"], None).await);
    assert_eq!(
        cron["trigger"],
        "cron \"0 9 * * MON-FRI\" in Europe/Berlin, DST gap skip, repeat both"
    );
    assert_eq!(cron["dead_letter_queue"], "cli.dead");
    let paused = json(&tickctl(&server, &["-o", "json", "pause", "cron"], None).await);
    assert_eq!(paused["state"], "PAUSED");
    let resumed = json(&tickctl(&server, &["-o", "json", "resume", "cron"], None).await);
    assert_eq!(resumed["state"], "SCHEDULED");
    let cancelled = json(&tickctl(&server, &["-o", "json", "cancel", "every"], None).await);
    assert_eq!(cancelled["state"], "CANCELLED");
    assert!(cancelled["finish_time"].is_string(), "{cancelled}");
    assert!(cancelled["expire_time"].is_string(), "{cancelled}");
    let stdin_id = stdin_job["id"].as_str().expect("id");
    let deleted = json(&tickctl(&server, &["-o", "json", "delete", stdin_id], None).await);
    assert_eq!(deleted["deleted"], stdin_id);
    let gone = tickctl(&server, &["get", stdin_id], None).await;
    assert!(!gone.status.success(), "a deleted job is gone");

    let listed = json(
        &tickctl(
            &server,
            &[
                "-o",
                "json",
                "list",
                "--queue",
                "cli",
                "--state",
                "scheduled",
                "--page-size",
                "1",
            ],
            None,
        )
        .await,
    );
    let ids: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        vec!["after", "at", "cron"],
        "paged through one job at a time"
    );
    server.stop().await;
}

/// A refused request exits non-zero and names the field; so does an unknown job.
#[tokio::test]
async fn errors_name_the_field_and_exit_non_zero() {
    let server = TestServer::start().await;
    let out = tickctl(
        &server,
        &["schedule", "--queue", "cli", "--cron", "not a cron"],
        None,
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("InvalidArgument"), "{err}");
    assert!(err.contains("job.trigger.cron.expression"), "{err}");

    let out = tickctl(&server, &["get", "missing"], None).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"));

    let out = Command::new(env!("CARGO_BIN_EXE_tickctl"))
        .args(["--addr", "127.0.0.1:9", "get", "x"])
        .output()
        .await
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach tickd"));
    server.stop().await;
}

/// `schedule --from-file` creates every job of a JSON Lines file (flags as keys, labels as an
/// object or repeated) through BatchSchedule; a file with a bad line is refused naming the
/// line before anything is sent, and one the server refuses creates none of its jobs.
#[tokio::test]
async fn schedule_from_a_json_lines_file() {
    let mut server = TestServer::start().await;
    let lines = concat!(
        r#"{"queue": "bulk", "id": "a", "after": "1h", "label": ["team=web"]}"#,
        "\n\n",
        r#"{"queue": "bulk", "id": "b", "cron": "0 9 * * *", "tz": "Europe/Berlin", "labels": {"k": "v"}, "max_attempts": 3}"#,
        "\n",
    );
    let out = tickctl(
        &server,
        &["schedule", "--from-file", "-"],
        Some(lines.as_bytes()),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout(&out).trim(), "scheduled 2 job(s)");
    let a = server.job("a").await;
    assert_eq!(a.labels.get("team").map(String::as_str), Some("web"));
    let b = server.job("b").await;
    assert_eq!(
        (b.labels.get("k").map(String::as_str), b.max_attempts),
        (Some("v"), 3)
    );

    let bad_line = concat!(
        r#"{"queue": "bulk", "id": "c", "after": "1h"}"#,
        "\n",
        r#"{"queue": "bulk", "id": "d", "after": "soon"}"#,
        "\n",
    );
    let out = tickctl(
        &server,
        &["schedule", "--from-file", "-"],
        Some(bad_line.as_bytes()),
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2") && err.contains("--after"), "{err}");

    let refused = concat!(
        r#"{"queue": "bulk", "id": "e", "after": "1h"}"#,
        "\n",
        r#"{"queue": "bulk", "id": "f", "cron": "nope"}"#,
        "\n",
    );
    let out = tickctl(
        &server,
        &["schedule", "--from-file", "-"],
        Some(refused.as_bytes()),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("requests[1].job.trigger.cron.expression"),
        "{err}"
    );
    for id in ["c", "d", "e", "f"] {
        expect_code(server.get(id).await, tonic::Code::NotFound);
    }
    server.stop().await;
}

/// `preview` shows a proposed cron job's DST day (the skipped slot included) and an existing
/// job's next occurrences with the fire ids it will carry.
#[tokio::test]
async fn preview_proposed_and_existing_jobs() {
    let server = TestServer::manual().await;
    let proposed = json(
        &tickctl(
            &server,
            &[
                "-o",
                "json",
                "preview",
                "--cron",
                "30 2 * * *",
                "--tz",
                "Europe/Berlin",
                "--dst-gap",
                "skip",
                "--from",
                "2026-03-28T00:00:00Z",
                "--count",
                "3",
            ],
            None,
        )
        .await,
    );
    let rows: Vec<(String, bool, String)> = proposed["occurrences"]
        .as_array()
        .expect("occurrences")
        .iter()
        .map(|o| {
            (
                o["local_time"].as_str().unwrap_or_default().to_string(),
                o["skipped"].as_bool().unwrap_or_default(),
                o["dst"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("2026-03-28T02:30:00".into(), false, String::new()),
            (
                "2026-03-29T02:30:00".into(),
                true,
                "does not exist: skipped".into()
            ),
            ("2026-03-30T02:30:00".into(), false, String::new()),
        ]
    );
    assert_eq!(proposed["more"], true);

    let created = json(
        &tickctl(
            &server,
            &[
                "-o", "json", "schedule", "--queue", "cli", "--id", "tick", "--every", "1m",
            ],
            None,
        )
        .await,
    );
    let existing = json(
        &tickctl(
            &server,
            &["-o", "json", "preview", "--job", "tick", "--count", "2"],
            None,
        )
        .await,
    );
    assert!(created["next_fire_time"].is_string(), "{created}");
    let first = &existing["occurrences"][0];
    assert_eq!(first["scheduled_time"], created["next_fire_time"]);
    assert_eq!(
        first["fire_id"].as_str(),
        created["next_fire_time"]
            .as_str()
            .map(|t| format!("tick@{t}"))
            .as_deref()
    );
    let text = stdout(&tickctl(&server, &["preview", "--job", "tick", "--count", "1"], None).await);
    assert!(text.starts_with("SCHEDULED"), "{text}");
    assert!(text.contains("more follow"), "{text}");
    let missing = tickctl(&server, &["preview", "--job", "nope"], None).await;
    assert!(!missing.status.success());
    server.stop().await;
}

/// `schedule --request-id` run twice creates one job: the retry prints the same job.
#[tokio::test]
async fn schedule_with_a_request_id_twice_creates_one_job() {
    let server = TestServer::manual().await;
    let args = [
        "-o",
        "json",
        "schedule",
        "--queue",
        "cli",
        "--after",
        "1h",
        "--request-id",
        "deploy-2026-11-30",
    ];
    let first = json(&tickctl(&server, &args, None).await);
    let again = json(&tickctl(&server, &args, None).await);
    assert_eq!(first["id"], again["id"]);
    assert_eq!(first["create_time"], again["create_time"]);
    server.stop().await;
}

/// `update` changes only what its flags give; a stale `--etag` is refused; no flag is an error.
#[tokio::test]
async fn update_changes_what_its_flags_give() {
    let server = TestServer::manual().await;
    let created = json(
        &tickctl(
            &server,
            &[
                "-o",
                "json",
                "schedule",
                "--queue",
                "cli",
                "--id",
                "u",
                "--every",
                "1m",
                "--payload",
                "old",
                "--max-attempts",
                "4",
            ],
            None,
        )
        .await,
    );
    let etag = created["etag"].as_str().expect("etag").to_string();
    let updated = json(
        &tickctl(
            &server,
            &[
                "-o",
                "json",
                "update",
                "u",
                "--etag",
                &etag,
                "--payload",
                "new",
                "--cron",
                "0 9 * * *",
            ],
            None,
        )
        .await,
    );
    assert_eq!(updated["payload"], "new");
    assert_eq!(updated["trigger"], "cron \"0 9 * * *\" in UTC");
    assert_eq!(updated["max_attempts"], 4, "not given, not changed");
    assert_ne!(updated["etag"], created["etag"]);
    let stale = tickctl(
        &server,
        &["update", "u", "--etag", &etag, "--payload", "x"],
        None,
    )
    .await;
    assert_eq!(stale.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&stale.stderr).contains("Aborted"),
        "{stale:?}"
    );
    let shown = stdout(&tickctl(&server, &["get", "u"], None).await);
    let etag_line = format!(
        "etag:           {}",
        updated["etag"].as_str().unwrap_or_default()
    );
    assert!(shown.contains(&etag_line), "{shown}");
    let nothing = tickctl(&server, &["update", "u"], None).await;
    assert_eq!(nothing.status.code(), Some(2));
    server.stop().await;
}

/// `trigger` releases one extra fire and prints its id.
#[tokio::test]
async fn trigger_prints_the_fire_id() {
    let server = TestServer::manual().await;
    json(
        &tickctl(
            &server,
            &[
                "-o", "json", "schedule", "--queue", "cli", "--id", "t", "--every", "1h",
            ],
            None,
        )
        .await,
    );
    let fired = json(&tickctl(&server, &["-o", "json", "trigger", "t"], None).await);
    let id = fired["fire_id"].as_str().expect("fire_id");
    assert!(id.starts_with("t@") && id.ends_with("#trigger"), "{fired}");
    server.settle().await;
    assert_eq!(server.counts("cli"), (1, 0));
    let text = stdout(&tickctl(&server, &["trigger", "nope"], None).await);
    assert!(text.is_empty(), "errors go to stderr: {text}");

    // `--overlap skip`, set by update: a trigger while the first fire runs is skipped.
    let updated = json(
        &tickctl(
            &server,
            &["-o", "json", "update", "t", "--overlap", "skip"],
            None,
        )
        .await,
    );
    assert_eq!(
        updated["overlap_policy"], "OVERLAP_POLICY_SKIP",
        "{updated}"
    );
    server.manual_clock().advance(1_000);
    let skipped = json(&tickctl(&server, &["-o", "json", "trigger", "t"], None).await);
    assert_eq!(skipped["outcome"], "TRIGGER_OUTCOME_SKIPPED", "{skipped}");
    assert_eq!(skipped["fire_id"], "", "{skipped}");
    server.manual_clock().advance(1_000);
    let text = stdout(&tickctl(&server, &["trigger", "t"], None).await);
    assert!(
        text.starts_with("skipped: a fire of the job is still running"),
        "{text}"
    );
    server.stop().await;
}

/// `occurrences` (alias `ledger`) shows a job's ledger: a triggered fire acked, newest first.
#[tokio::test]
async fn occurrences_show_the_ledger() {
    let mut server = TestServer::manual().await;
    json(
        &tickctl(
            &server,
            &[
                "-o", "json", "schedule", "--queue", "cli", "--id", "l", "--every", "1h",
            ],
            None,
        )
        .await,
    );
    let empty = stdout(&tickctl(&server, &["occurrences", "l"], None).await);
    assert!(empty.contains("no occurrence"), "{empty}");
    let fired = json(&tickctl(&server, &["-o", "json", "trigger", "l"], None).await);
    let id = fired["fire_id"].as_str().expect("fire_id");
    server.settle().await;
    assert_eq!(server.ack("cli", &[id]).await, 1);
    let listed = json(&tickctl(&server, &["-o", "json", "ledger", "l"], None).await);
    let first = &listed["occurrences"][0];
    assert_eq!(first["fire_id"].as_str(), Some(id), "{listed}");
    assert_eq!(first["outcome"], "OCCURRENCE_OUTCOME_DELIVERED");
    assert_eq!(first["triggered"], true);
    assert_eq!(listed["more"], false);
    let text = stdout(&tickctl(&server, &["occurrences", "l"], None).await);
    assert!(text.starts_with("SCHEDULED"), "{text}");
    assert!(text.contains("delivered (triggered)"), "{text}");
    let missing = tickctl(&server, &["occurrences", "nope"], None).await;
    assert!(!missing.status.success());
    server.stop().await;
}

/// `backfill` prints what it released and what it left alone.
#[tokio::test]
async fn backfill_prints_what_it_released() {
    let mut server = TestServer::manual().await;
    let t0 = server.now();
    let mut j = job("cli", every_trigger(1_000, Some(ts_micros(t0 + 1_000_000))));
    j.id = "bf".into();
    j.misfire_policy = pb::MisfirePolicy::Skip.into();
    j.misfire_grace_period = Some(ms(500));
    server.schedule(j).await;
    server.pause("bf").await.expect("pause");
    server.advance(3_500).await;
    server.resume("bf").await.expect("resume");
    server.settle().await;
    let start = chrono::DateTime::from_timestamp_micros(t0)
        .expect("time")
        .to_rfc3339();
    let done = json(
        &tickctl(
            &server,
            &["-o", "json", "backfill", "bf", "--start", &start],
            None,
        )
        .await,
    );
    assert_eq!(
        done["fire_ids"].as_array().map(|a| a.len()),
        Some(3),
        "{done}"
    );
    server.settle().await;
    let text = stdout(&tickctl(&server, &["backfill", "bf", "--start", &start], None).await);
    assert!(
        text.ends_with("0 released; left alone: 0 delivered, 3 still out\n"),
        "{text}"
    );
    server.stop().await;
}
