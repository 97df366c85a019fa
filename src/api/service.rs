//! The `tickd.v1.Scheduler` service: validates each request, calls the core, converts the
//! answer. No scheduling logic lives here.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use super::auth::{Auth, Caller, Verb};
use super::convert;
use super::pb;
use super::pb::subscribe_request::Request as SubReq;
use super::tls::TlsPeer;
use super::validate::{self, Limits, Violations};
use crate::domain::job::{JobSpec, etag};
use crate::domain::{Disposition, Micros, preview};
use crate::scheduler::{Scheduler, SchedulerError, SubscriberHandle, Subscription};
use crate::telemetry;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The gRPC face of the core.
#[derive(Debug, Clone)]
pub struct SchedulerService {
    core: Scheduler,
    limits: Limits,
    auth: Auth,
}

impl SchedulerService {
    /// Every caller may do everything; see [`SchedulerService::with_auth`].
    pub fn new(core: Scheduler, limits: Limits) -> Self {
        SchedulerService {
            core,
            limits,
            auth: Auth::open(),
        }
    }

    /// Checks every call against `auth`.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// Who sent `request` (UNAUTHENTICATED if the auth file knows no credential of it); the
    /// principal's name goes on the call's span.
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let caller = self
            .auth
            .authenticate(request.metadata(), request.extensions().get::<TlsPeer>())?;
        if let Some(name) = caller.name() {
            tracing::Span::current().record("tickd.principal", name);
        }
        Ok(caller)
    }

    /// For calls that create a job: `manage` on its queue and on its dead-letter queue (its
    /// fires can end up there).
    fn check_new(&self, caller: &Caller, spec: &JobSpec) -> Result<(), Status> {
        caller.check(Verb::Manage, &spec.queue)?;
        match spec.dead_letter_queue.as_deref() {
            Some(dlq) if !dlq.is_empty() => caller.check(Verb::Manage, dlq),
            _ => Ok(()),
        }
    }

    /// For calls that name a job: PERMISSION_DENIED unless `caller` may `verb` on the job's
    /// queue (NOT_FOUND if there is no such job). Reads the job only when an auth file is on.
    async fn check_job(&self, caller: &Caller, verb: Verb, id: &str) -> Result<(), Status> {
        if let Caller::Open = caller {
            return Ok(());
        }
        let job = self.core.get(id).await.map_err(convert::status)?;
        caller.check(verb, job.spec.queue())
    }
}

/// What a Subscribe call presented, kept to check its grant again when the auth file changes.
struct Credentials {
    changes: tokio::sync::watch::Receiver<u64>,
    metadata: tonic::metadata::MetadataMap,
    peer: Option<TlsPeer>,
}

/// Ends a subscription through `errors` with the auth file's refusal (UNAUTHENTICATED or
/// PERMISSION_DENIED) once a changed auth file no longer lets the credentials it was opened
/// with consume `queue`. Returns when that happens or the subscription's response ends.
async fn end_when_revoked(
    auth: Auth,
    mut credentials: Credentials,
    caller: Caller,
    queue: String,
    errors: mpsc::Sender<Status>,
) {
    loop {
        tokio::select! {
            changed = credentials.changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = errors.closed() => return,
        }
        let verdict = auth
            .authenticate(&credentials.metadata, credentials.peer.as_ref())
            .and_then(|now| now.check(Verb::Consume, &queue));
        if let Err(status) = verdict {
            warn!(
                principal = caller.name().unwrap_or_default(),
                %queue,
                "subscription ended: the changed auth file no longer lets its caller consume the queue"
            );
            // A full channel means the stream is already ending with another error.
            let _ = errors.try_send(status);
            return;
        }
    }
}

/// The response of Subscribe: fires until the subscription ends (UNAVAILABLE, at shutdown),
/// a bad request arrives (INVALID_ARGUMENT) or the auth file withdraws its grant
/// (PERMISSION_DENIED, UNAUTHENTICATED).
struct FireStream {
    subscription: Subscription,
    errors: mpsc::Receiver<Status>,
    /// Dropped (which the reader notices) when the response ends.
    done: Option<oneshot::Sender<()>>,
}

impl Stream for FireStream {
    type Item = Result<pb::Fire, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done.is_none() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(Some(status)) = self.errors.poll_recv(cx) {
            self.done = None;
            return Poll::Ready(Some(Err(status)));
        }
        match Pin::new(&mut self.subscription).poll_next(cx) {
            Poll::Ready(Some(delivery)) => Poll::Ready(Some(Ok(convert::fire(delivery)))),
            Poll::Ready(None) => {
                self.done = None;
                Poll::Ready(Some(Err(Status::unavailable(
                    "subscription closed (tickd is shutting down); reconnect to receive fires",
                ))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

type BoxFireStream = Pin<Box<dyn Stream<Item = Result<pb::Fire, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::scheduler_server::Scheduler for SchedulerService {
    async fn schedule(
        &self,
        request: Request<pb::ScheduleRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&request)?;
        let spec = validate::schedule_request(request.into_inner(), self.limits, self.core.now())?;
        self.check_new(&caller, &spec)?;
        let span = tracing::Span::current();
        span.record("tickd.queue", spec.queue.as_str());
        // The job remembers this call's span, so that each of its fires can link back to it.
        let trace = telemetry::trace_context_of(&tracing::Span::current().context());
        let job = self
            .core
            .schedule_traced(spec, trace)
            .await
            .map_err(convert::status)?;
        span.record("tickd.job.id", job.spec.id());
        Ok(Response::new(convert::job(&job, self.core.retention())))
    }

    async fn batch_schedule(
        &self,
        request: Request<pb::BatchScheduleRequest>,
    ) -> Result<Response<pb::BatchScheduleResponse>, Status> {
        let caller = self.caller(&request)?;
        let specs =
            validate::batch_schedule_request(request.into_inner(), self.limits, self.core.now())?;
        for spec in &specs {
            self.check_new(&caller, spec)?;
        }
        let trace = telemetry::trace_context_of(&tracing::Span::current().context());
        let jobs = self
            .core
            .schedule_batch(specs, trace)
            .await
            .map_err(convert::status)?;
        let retention = self.core.retention();
        Ok(Response::new(pb::BatchScheduleResponse {
            jobs: jobs.iter().map(|j| convert::job(j, retention)).collect(),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&request)?;
        let id = request.into_inner().id;
        validate::job_id(&id)?;
        tracing::Span::current().record("tickd.job.id", id.as_str());
        self.check_job(&caller, Verb::Manage, &id).await?;
        let job = self.core.cancel(&id).await.map_err(convert::status)?;
        Ok(Response::new(convert::job(&job, self.core.retention())))
    }

    async fn delete_job(
        &self,
        request: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = self.caller(&request)?;
        let id = request.into_inner().id;
        validate::job_id(&id)?;
        tracing::Span::current().record("tickd.job.id", id.as_str());
        self.check_job(&caller, Verb::Manage, &id).await?;
        let dropped = self.core.delete(&id).await.map_err(convert::status)?;
        tracing::info!(job_id = %id, dropped_fires = dropped, principal = caller.name(), "job deleted");
        Ok(Response::new(()))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&request)?;
        let id = request.into_inner().id;
        validate::job_id(&id)?;
        tracing::Span::current().record("tickd.job.id", id.as_str());
        let job = self.core.get(&id).await.map_err(convert::status)?;
        caller.check(Verb::Read, job.spec.queue())?;
        Ok(Response::new(convert::job(&job, self.core.retention())))
    }

    async fn backfill_job(
        &self,
        request: Request<pb::BackfillJobRequest>,
    ) -> Result<Response<pb::BackfillJobResponse>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        let (start, end) = validate::backfill_request(&req)?;
        tracing::Span::current().record("tickd.job.id", req.id.as_str());
        self.check_job(&caller, Verb::Manage, &req.id).await?;
        let done = self
            .core
            .backfill(&req.id, start, end)
            .await
            .map_err(convert::status)?;
        tracing::info!(
            job_id = %req.id,
            principal = caller.name(),
            released = done.fires.len(),
            delivered = done.delivered,
            outstanding = done.outstanding,
            "job backfilled"
        );
        Ok(Response::new(pb::BackfillJobResponse {
            fire_ids: done.fires.iter().map(|f| f.fire_id.to_string()).collect(),
            delivered_count: done.delivered,
            outstanding_count: done.outstanding,
        }))
    }

    async fn trigger_job(
        &self,
        request: Request<pb::TriggerJobRequest>,
    ) -> Result<Response<pb::TriggerJobResponse>, Status> {
        let caller = self.caller(&request)?;
        let id = request.into_inner().id;
        validate::job_id(&id)?;
        tracing::Span::current().record("tickd.job.id", id.as_str());
        self.check_job(&caller, Verb::Manage, &id).await?;
        let t = self.core.trigger(&id).await.map_err(convert::status)?;
        let outcome = match t.disposition {
            Disposition::Released => pb::TriggerOutcome::Released,
            Disposition::Held => pb::TriggerOutcome::Held,
            Disposition::Skipped => pb::TriggerOutcome::Skipped,
        };
        let fire_id = match t.disposition {
            Disposition::Skipped => String::new(),
            _ => t.fire.fire_id.to_string(),
        };
        tracing::info!(
            job_id = %id,
            fire_id = %fire_id,
            outcome = outcome.as_str_name(),
            principal = caller.name(),
            "job triggered"
        );
        Ok(Response::new(pb::TriggerJobResponse {
            fire_id,
            scheduled_time: Some(convert::timestamp(t.fire.scheduled_time)),
            outcome: outcome.into(),
        }))
    }

    async fn update_job(
        &self,
        request: Request<pb::UpdateJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        let target = validate::update_target(&req)?;
        tracing::Span::current().record("tickd.job.id", target.id.as_str());
        let asked = req.job.unwrap_or_default();
        let retention = self.core.retention();
        // Read, merge, write if unchanged since read. Without an etag of the caller's, a
        // change that slipped in between is merged with and retried a few times.
        let mut attempt = 0;
        loop {
            let current = self.core.get(&target.id).await.map_err(convert::status)?;
            // A job's queue never changes, so the first read's check holds for the retries.
            caller.check(Verb::Manage, current.spec.queue())?;
            let read = etag(&current.spec);
            if target.etag.as_ref().is_some_and(|e| *e != read) {
                return Err(Status::aborted(format!(
                    "job {} changed since it was read (etag {} is not the job's {read}); read \
                     it again and retry",
                    target.id,
                    validate::clip(target.etag.clone().unwrap_or_default(), 64)
                )));
            }
            let spec = validate::updated_spec(
                convert::job(&current, retention),
                &asked,
                &target.paths,
                self.limits,
                self.core.now(),
            )?;
            // A new dead-letter queue is one more queue the job's fires can reach.
            if let Some(dlq) = spec.dead_letter_queue.as_deref()
                && !dlq.is_empty()
                && current.spec.dead_letter_queue() != Some(dlq)
            {
                caller.check(Verb::Manage, dlq)?;
            }
            match self.core.update(spec, read).await {
                Err(SchedulerError::Aborted(_)) if target.etag.is_none() && attempt < 3 => {
                    attempt += 1;
                }
                result => {
                    let job = result.map_err(convert::status)?;
                    return Ok(Response::new(convert::job(&job, retention)));
                }
            }
        }
    }

    async fn preview_occurrences(
        &self,
        request: Request<pb::PreviewOccurrencesRequest>,
    ) -> Result<Response<pb::PreviewOccurrencesResponse>, Status> {
        let caller = self.caller(&request)?;
        let now = self.core.now();
        let q = validate::preview_request(request.into_inner(), self.limits, now)?;
        let (job, id_known) = match q.subject {
            validate::PreviewSubject::Existing(id) => {
                tracing::Span::current().record("tickd.job.id", id.as_str());
                let job = self.core.get(&id).await.map_err(convert::status)?;
                caller.check(Verb::Read, job.spec.queue())?;
                (job, true)
            }
            validate::PreviewSubject::Proposed(spec) => {
                // A proposed job without a queue reads nothing of any queue.
                if !spec.queue.is_empty() {
                    caller.check(Verb::Read, &spec.queue)?;
                }
                let id_known = !spec.id.is_empty();
                // Validation resolved the trigger already; this cannot fail on a valid spec.
                // As if scheduled at the range's start, so that a range in the past (last
                // year's DST days) can be previewed too.
                let job = preview::proposed(spec, q.from.unwrap_or(now))
                    .map_err(|e| Status::invalid_argument(format!("job.trigger: {e}")))?;
                (job, id_known)
            }
        };
        let p = preview::preview(&job, q.from, q.to, q.max);
        Ok(Response::new(convert::preview(&p, &job, id_known)))
    }

    async fn list_occurrences(
        &self,
        request: Request<pb::ListOccurrencesRequest>,
    ) -> Result<Response<pb::ListOccurrencesResponse>, Status> {
        let caller = self.caller(&request)?;
        let q = validate::occurrences_request(request.into_inner())?;
        tracing::Span::current().record("tickd.job.id", q.job_id.as_str());
        self.check_job(&caller, Verb::Read, &q.job_id).await?;
        let (records, more) = self
            .core
            .occurrences(&q.job_id, q.after, q.page_size)
            .await
            .map_err(convert::status)?;
        let next_page_token = match records.last() {
            Some(last) if more => validate::encode_occurrence_token(last.key()),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListOccurrencesResponse {
            occurrences: records
                .iter()
                .map(|o| convert::occurrence(&q.job_id, o))
                .collect(),
            next_page_token,
        }))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let caller = self.caller(&request)?;
        let q = validate::list_request(request.into_inner())?;
        if let Some(queue) = &q.filter.queue {
            caller.check(Verb::Read, queue)?;
        }
        let (jobs, mut next) = self
            .core
            .list(&q.filter, q.page_size, q.after.as_deref())
            .await
            .map_err(convert::status)?;
        // A page stops before it would outgrow the response size limit; the rest follows.
        let mut page = Vec::with_capacity(jobs.len());
        let mut bytes = 0;
        // Only what the caller may read is shown; a page may come out short (even empty) with
        // a next_page_token, as AIP-158 allows.
        for job in jobs
            .iter()
            .filter(|j| caller.may(Verb::Read, j.spec.queue()))
        {
            let mut shown = convert::job(job, self.core.retention());
            if !q.with_payload {
                shown.payload = Default::default();
            }
            let size = prost::Message::encoded_len(&shown) + 8;
            if !page.is_empty() && bytes + size > self.limits.max_list_response_bytes {
                next = page.last().map(|j: &pb::Job| j.id.clone());
                break;
            }
            bytes += size;
            page.push(shown);
        }
        Ok(Response::new(pb::ListJobsResponse {
            jobs: page,
            next_page_token: next
                .map(|id| validate::encode_page_token(&id))
                .unwrap_or_default(),
        }))
    }

    async fn pause_job(
        &self,
        request: Request<pb::PauseJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&request)?;
        let id = request.into_inner().id;
        validate::job_id(&id)?;
        tracing::Span::current().record("tickd.job.id", id.as_str());
        self.check_job(&caller, Verb::Manage, &id).await?;
        let job = self.core.pause(&id).await.map_err(convert::status)?;
        Ok(Response::new(convert::job(&job, self.core.retention())))
    }

    async fn resume_job(
        &self,
        request: Request<pb::ResumeJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&request)?;
        let id = request.into_inner().id;
        validate::job_id(&id)?;
        tracing::Span::current().record("tickd.job.id", id.as_str());
        self.check_job(&caller, Verb::Manage, &id).await?;
        let job = self.core.resume(&id).await.map_err(convert::status)?;
        Ok(Response::new(convert::job(&job, self.core.retention())))
    }

    type SubscribeStream = BoxFireStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<BoxFireStream>, Status> {
        let caller = self.caller(&request)?;
        // With an auth file, what the grant is checked against again when the file changes.
        let credentials = self.auth.changes().map(|changes| Credentials {
            changes,
            metadata: request.metadata().clone(),
            peer: request.extensions().get::<TlsPeer>().cloned(),
        });
        let mut inbound = request.into_inner();
        let timeout = self.limits.subscribe_open_timeout;
        let first = tokio::time::timeout(timeout, inbound.message())
            .await
            .map_err(|_| {
                let mut v = Violations::default();
                v.add(
                    "request",
                    format!(
                        "the first SubscribeRequest must be an open, sent within {} of the call",
                        humantime::format_duration(timeout)
                    ),
                );
                v.into_status()
            })??;
        let Some(SubReq::Open(open)) = first.and_then(|m| m.request) else {
            let mut v = Violations::default();
            v.add("request", "the first SubscribeRequest must be an open");
            return Err(v.into_status());
        };
        let mut v = Violations::default();
        validate::check_name(&mut v, "open.queue", &open.queue, true);
        let max_in_flight = match open.max_in_flight {
            0 => validate::DEFAULT_MAX_IN_FLIGHT,
            n if n > validate::MAX_MAX_IN_FLIGHT => {
                v.add(
                    "open.max_in_flight",
                    format!("must be at most {}", validate::MAX_MAX_IN_FLIGHT),
                );
                n
            }
            n => n,
        };
        v.into_result()?;
        tracing::Span::current().record("tickd.queue", open.queue.as_str());
        caller.check(Verb::Consume, &open.queue)?;

        let subscription = self
            .core
            .subscribe(&open.queue, max_in_flight as usize)
            .map_err(convert::status)?;
        debug!(queue = %open.queue, max_in_flight, "subscriber opened");

        // Bad messages later in the stream end it with INVALID_ARGUMENT through `errors`;
        // `done` tells the reader that the response has ended, so it drops the request stream
        // and the RPC can finish (graceful shutdown waits for that).
        let (errors_tx, errors) = mpsc::channel::<Status>(1);
        let (done_tx, done) = oneshot::channel::<()>();
        if let Some(credentials) = credentials {
            tokio::spawn(end_when_revoked(
                self.auth.clone(),
                credentials,
                caller,
                open.queue.clone(),
                errors_tx.clone(),
            ));
        }
        tokio::spawn(read_requests(
            inbound,
            subscription.handle(),
            errors_tx,
            done,
        ));
        Ok(Response::new(Box::pin(FireStream {
            subscription,
            errors,
            done: Some(done_tx),
        })))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        let mut v = Violations::default();
        validate::check_name(&mut v, "queue", &req.queue, true);
        validate::fire_ids(&mut v, "fire_ids", &req.fire_ids);
        v.into_result()?;
        tracing::Span::current().record("tickd.queue", req.queue.as_str());
        caller.check(Verb::Consume, &req.queue)?;
        let acked_count = self
            .core
            .ack(&req.queue, &req.fire_ids)
            .await
            .map_err(convert::status)?;
        Ok(Response::new(pb::AckResponse { acked_count }))
    }
}

/// Reads acks, nacks and extensions from a subscriber until it half-closes (the subscription
/// stays open) or its stream fails (the subscription ends, and its fires go to others).
async fn read_requests(
    mut inbound: Streaming<pb::SubscribeRequest>,
    handle: SubscriberHandle,
    errors: mpsc::Sender<Status>,
    mut done: oneshot::Receiver<()>,
) {
    loop {
        let next = tokio::select! {
            next = inbound.message() => next,
            _ = &mut done => return,
        };
        let msg = match next {
            Ok(Some(msg)) => msg,
            // Half-closed: the worker sends nothing more but still receives fires.
            Ok(None) => {
                let _ = done.await;
                return;
            }
            Err(status) => {
                debug!(%status, "subscriber stream failed; ending the subscription");
                handle.close();
                return;
            }
        };
        match check_request(msg) {
            Ok(StreamRequest::Ack(ids)) => handle.ack(&ids),
            Ok(StreamRequest::Nack(ids, delay)) => handle.nack(&ids, delay),
            Ok(StreamRequest::Extend(ids, extension)) => handle.extend(&ids, extension),
            Err(status) => {
                let _ = errors.send(status).await;
                handle.close();
                return;
            }
        }
    }
}

/// A validated message after the open, with its durations in microseconds.
enum StreamRequest {
    Ack(Vec<String>),
    Nack(Vec<String>, Micros),
    Extend(Vec<String>, Micros),
}

/// Validates one message after the open and converts its durations.
fn check_request(msg: pb::SubscribeRequest) -> Result<StreamRequest, Status> {
    let mut v = Violations::default();
    let request = match msg.request {
        Some(SubReq::Open(_)) => {
            v.add("open", "may only be sent once, as the first message");
            None
        }
        Some(SubReq::Ack(a)) => {
            validate::fire_ids(&mut v, "ack.fire_ids", &a.fire_ids);
            Some(StreamRequest::Ack(a.fire_ids))
        }
        Some(SubReq::Nack(n)) => {
            validate::fire_ids(&mut v, "nack.fire_ids", &n.fire_ids);
            let delay = match &n.retry_delay {
                Some(d) => validate::duration(
                    &mut v,
                    "nack.retry_delay",
                    d,
                    0,
                    validate::MAX_RETRY_DELAY_MICROS,
                ),
                None => Some(0),
            };
            delay.map(|d| StreamRequest::Nack(n.fire_ids, d))
        }
        Some(SubReq::Extend(e)) => {
            validate::fire_ids(&mut v, "extend.fire_ids", &e.fire_ids);
            let extension = match &e.ack_deadline {
                Some(d) => validate::duration(
                    &mut v,
                    "extend.ack_deadline",
                    d,
                    validate::MIN_ACK_DEADLINE_MICROS,
                    validate::MAX_ACK_DEADLINE_MICROS,
                ),
                None => {
                    v.add("extend.ack_deadline", "is required");
                    None
                }
            };
            extension.map(|d| StreamRequest::Extend(e.fire_ids, d))
        }
        None => {
            v.add("request", "is empty: set ack, nack or extend");
            None
        }
    };
    match request {
        Some(request) if v.is_empty() => Ok(request),
        _ => Err(v.into_status()),
    }
}
