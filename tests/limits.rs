//! Limits that keep one client or one queue from growing tickd without bound: the per-queue
//! backlog.

mod common;

use common::*;
use tickd::api::pb;

both_backends! {
    /// A queue at --max-queue-backlog takes no new fire: its jobs' further occurrences are skipped
    /// (counted by reason, the job keeps its schedule), Schedule keeps working, other queues keep
    /// firing, and once a fire is acked the next occurrence fires again.
    #[tokio::test]
    async fn a_full_queue_skips_occurrences_and_counts_them(backend) {
        let mut server = backend.manual_with(|c| c.max_queue_backlog = 3).await;
        // Metrics are per process: a queue name per backend.
        let full = &format!("full.{}", backend.name());
        let mut j = job(full, every_trigger(1_000, None));
        j.id = "ticker".into();
        server.schedule(j).await;
        let mut other = job("elsewhere", every_trigger(1_000, None));
        other.id = "other".into();
        server.schedule(other).await;
        for _ in 0..5 {
            server.advance(1_000).await;
        }
        assert_eq!(server.counts(full), (3, 0), "the queue holds its limit");
        assert_eq!(server.counts("elsewhere"), (3, 0));
        let ticker = server.job("ticker").await;
        assert_eq!(ticker.state(), pb::JobState::Scheduled);
        assert_eq!(ticker.fire_count, 3, "skipped occurrences are not fires");
        assert_eq!(
            micros_of(&ticker.next_fire_time),
            MANUAL_START_MICROS + 6_000_000,
            "the job keeps its schedule"
        );
        let text = scrape(server.metrics_addr).await;
        let skipped = |queue: &str| skipped_occurrences(&text, queue, "backlog_full");
        assert_eq!(skipped(full), Some(2.0), "{text}");

        // Schedule still works on a full queue.
        let mut late = job(full, after_trigger(60_000));
        late.id = "late".into();
        server.schedule(late).await;

        // Room again after an ack: the next occurrence fires.
        let mut sub = server.subscribe(full, 1).await;
        let fire = sub.recv().await;
        sub.ack(&[&fire.fire_id]).await;
        server
            .wait_until("the ack applied", |s| s.counts(full) == (1, 1))
            .await;
        server.advance(1_000).await;
        assert_eq!(server.job("ticker").await.fire_count, 4);
        server.stop().await;
    }
}

both_backends! {
    /// At --max-subscribers open streams a new Subscribe is refused with RESOURCE_EXHAUSTED naming
    /// the limit; once one ends, there is room again.
    #[tokio::test]
    async fn subscribers_are_bounded(backend) {
        let mut server = backend.manual_with(|c| c.max_subscribers = 2).await;
        let first = server.subscribe("a", 1).await;
        let _second = server.subscribe("b", 1).await;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(pb::SubscribeRequest {
            request: Some(pb::subscribe_request::Request::Open(pb::SubscribeOpen {
                queue: "c".into(),
                max_in_flight: 1,
            })),
        })
        .await
        .expect("send open");
        let refused = server
            .client
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect_err("a third stream is refused");
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        assert!(
            refused.message().contains("--max-subscribers"),
            "{refused:?}"
        );
        drop(first);
        server
            .wait_until("the first stream ended", |s| s.queue("a").subscribers == 0)
            .await;
        let _third = server.subscribe("c", 1).await;
        server.stop().await;
    }
}

both_backends! {
    /// A Subscribe that never sends its open ends with INVALID_ARGUMENT after
    /// --subscribe-open-timeout, and frees its admission slot.
    #[tokio::test]
    async fn a_subscribe_without_open_times_out_and_frees_its_slot(backend) {
        let mut server = backend.start_with(|c| {
            c.subscribe_open_timeout = std::time::Duration::from_millis(200);
            c.max_concurrent_requests = 1;
        })
        .await;
        let (_hold, rx) = tokio::sync::mpsc::channel::<pb::SubscribeRequest>(1);
        let started = std::time::Instant::now();
        let ended = server
            .client
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect_err("no open");
        assert_eq!(ended.code(), tonic::Code::InvalidArgument, "{ended:?}");
        assert!(ended.message().contains("within 200ms"), "{ended:?}");
        assert!(started.elapsed() >= std::time::Duration::from_millis(200));
        // The only slot is free again.
        expect_code(server.get("nothing").await, tonic::Code::NotFound);
        server.stop().await;
    }
}

both_backends! {
    /// An open Subscribe stream does not hold an admission slot: with one slot, calls still go
    /// through while the stream stays open.
    #[tokio::test]
    async fn an_open_stream_holds_no_admission_slot(backend) {
        let mut server = backend.manual_with(|c| c.max_concurrent_requests = 1).await;
        let _open = server.subscribe("a", 1).await;
        for _ in 0..3 {
            expect_code(server.get("nothing").await, tonic::Code::NotFound);
        }
        server.stop().await;
    }
}

async fn list(server: &mut TestServer, req: pb::ListJobsRequest) -> pb::ListJobsResponse {
    server
        .client
        .list_jobs(req)
        .await
        .expect("list")
        .into_inner()
}

/// Schedules `n` jobs (due in an hour) on `queue` with ids `{prefix}{i:05}`, concurrently.
async fn many(server: &TestServer, queue: &str, prefix: &str, n: usize, payload: usize) {
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let mut client = server.client.clone();
            let mut j = job(queue, after_trigger(3_600_000));
            j.id = format!("{prefix}{i:05}");
            j.payload = vec![b'p'; payload].into();
            tokio::spawn(async move { schedule(&mut client, j).await })
        })
        .collect();
    for call in calls {
        call.await.expect("task");
    }
}

both_backends! {
    /// One ListJobs call looks at a bounded number of jobs: on the embedded store a filter that
    /// matches only the last of 1,200 jobs gets an empty first page with a continuation; on both,
    /// the pages together hold exactly that job. A queue filter looks only at that queue's jobs.
    #[tokio::test]
    async fn list_jobs_does_bounded_work_per_call(backend) {
        let mut server = backend.manual().await;
        many(&server, "bulk", "a", 1_200, 0).await;
        let mut rare = job("rare", after_trigger(3_600_000));
        rare.id = "b-rare".into();
        rare.labels.insert("needle".into(), "yes".into());
        server.schedule(rare).await;

        let by_label = |token: String| pb::ListJobsRequest {
            labels: [("needle".to_string(), "yes".to_string())].into(),
            page_size: 1,
            page_token: token,
            ..Default::default()
        };
        let first = list(&mut server, by_label(String::new())).await;
        if backend == Backend::Embedded {
            assert!(first.jobs.is_empty(), "the scan stopped at its budget");
            assert!(!first.next_page_token.is_empty());
        }
        // (PostgreSQL finds it at once, through the labels' index.)
        let mut found: Vec<String> = first.jobs.into_iter().map(|j| j.id).collect();
        let mut token = first.next_page_token;
        let mut calls = 1;
        while !token.is_empty() {
            let page = list(&mut server, by_label(token)).await;
            found.extend(page.jobs.into_iter().map(|j| j.id));
            token = page.next_page_token;
            calls += 1;
            assert!(calls < 10, "paging does not end");
        }
        assert_eq!(found, vec!["b-rare"]);

        let on_queue = list(
            &mut server,
            pb::ListJobsRequest {
                queue: "rare".into(),
                page_size: 1,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(
            on_queue.jobs.len(),
            1,
            "found through the queue's own index"
        );
        assert!(on_queue.next_page_token.is_empty());
        server.stop().await;
    }
}

both_backends! {
    /// A `states` filter naming a state 200,000 times is the same filter as naming it once.
    #[tokio::test]
    async fn repeated_states_count_once(backend) {
        let mut server = backend.manual().await;
        many(&server, "s", "j", 3, 0).await;
        let page = list(
            &mut server,
            pb::ListJobsRequest {
                states: vec![pb::JobState::Scheduled.into(); 200_000],
                ..Default::default()
            },
        )
        .await;
        assert_eq!(page.jobs.len(), 3);
        server.stop().await;
    }
}

both_backends! {
    /// Payloads are left out of ListJobs unless JOB_VIEW_FULL asks for them, and a page never
    /// outgrows the response size limit: with ~200 KB payloads a full page holds one job and
    /// continues.
    #[tokio::test]
    async fn list_pages_leave_payloads_out_and_fit_the_message_limit(backend) {
        let mut server = backend.manual().await;
        many(&server, "big", "big", 3, 200_000).await;
        let basic = list(&mut server, pb::ListJobsRequest::default()).await;
        assert_eq!(basic.jobs.len(), 3);
        assert!(basic.jobs.iter().all(|j| j.payload.is_empty()));
        assert_eq!(
            server.job("big00000").await.payload.len(),
            200_000,
            "GetJob is whole"
        );

        let mut token = String::new();
        let mut pages = Vec::new();
        loop {
            let page = list(
                &mut server,
                pb::ListJobsRequest {
                    view: pb::JobView::Full.into(),
                    page_token: token,
                    ..Default::default()
                },
            )
            .await;
            assert!(page.jobs.iter().all(|j| j.payload.len() == 200_000));
            pages.push(page.jobs.len());
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        assert_eq!(pages.iter().sum::<usize>(), 3);
        assert!(pages.iter().all(|n| *n <= 1), "pages {pages:?}");
        server.stop().await;
    }
}

both_backends! {
    /// An error quotes at most a couple of hundred characters of what the client sent.
    #[tokio::test]
    async fn errors_quote_little_of_the_input(backend) {
        let mut server = backend.manual().await;
        let huge = "x".repeat(100_000);
        let mut j = job("q", cron_trigger(&huge, &huge));
        j.labels.insert(huge.clone(), "v".into());
        let refused = server
            .client
            .schedule(pb::ScheduleRequest { job: Some(j), ..Default::default() })
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(
            refused.message().len() < 2_500,
            "{} bytes of message",
            refused.message().len()
        );
        server.stop().await;
    }
}
