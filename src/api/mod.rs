//! The gRPC layer: the only module that speaks tonic and prost. It validates requests,
//! converts between protobuf and domain types, maps core errors to statuses in one place
//! ([`convert::status`]), and runs the server.

mod admission;
pub mod auth;
mod convert;
mod metrics_http;
mod reload;
mod rpc_span;
mod server;
mod service;
pub mod tls;
pub mod validate;

pub use server::{
    LIVENESS_SERVICE_NAME, Listeners, ServerError, run, run_with, serve, start_core, start_replica,
};
pub use service::SchedulerService;

/// Code generated from `proto/tickd/v1/scheduler.proto`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tickd.v1");

    /// The encoded descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tickd_descriptor");
}
