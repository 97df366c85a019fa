//! Trace context as the core carries it: the W3C `traceparent` and `tracestate` strings of a
//! span, stored with a job (its Schedule call) and with each fire. The core never reads them;
//! the telemetry layer makes and reads them.

use serde::{Deserialize, Serialize};

/// The W3C trace context of one span.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: String,
}
