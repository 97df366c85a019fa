//! tickd: a durable job scheduler served over gRPC.
//!
//! Services schedule jobs (once at a time, once after a delay, every interval, or on a cron
//! expression in a time zone); when a job falls due, tickd streams a *fire* to one worker
//! subscribed to the job's queue, and the worker acks it.
//!
//! # Layout
//! - [`domain`]: jobs, triggers, fires and the arithmetic between them. Pure; no I/O, no clock.
//! - [`store`]: the storage trait, the embedded redb store, an in-memory one for tests, and
//!   the PostgreSQL tables and statements shared by replicas.
//! - [`scheduler`]: the core, on one of two engines: embedded (one timer loop, per-queue
//!   delivery with acks and redelivery, and the writer thread that group-commits every
//!   durable change) or replicated (a replica's loops on PostgreSQL).
//! - [`api`]: the only module that speaks gRPC: validation, conversions, status mapping, the
//!   server and its graceful shutdown.
//! - [`telemetry`]: logs and OpenTelemetry traces; turns the core's fire events into spans.
//! - [`config`]: command-line and environment configuration.
//!
//! Dependencies point one way: `domain ← store ← scheduler ← telemetry ← api ← main`.

pub mod api;
pub mod config;
pub mod domain;
pub mod scheduler;
pub mod store;
pub mod telemetry;
