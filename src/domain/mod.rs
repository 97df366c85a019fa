//! The domain: jobs, triggers, fires and the arithmetic between them.
//!
//! Pure types and functions. Nothing here knows about tokio, gRPC, the store or the clock: every
//! function that depends on time takes `now` as an argument.

pub mod backfill;
pub mod dst;
pub mod fire;
pub mod job;
pub mod ledger;
pub mod overlap;
pub mod packed;
pub mod preview;
pub mod time;
pub mod trace;
pub mod trigger;

pub use dst::{DstEffect, DstGap, DstPolicy, DstRepeat};
pub use fire::{FireId, FireRecord};
pub use job::{
    Advance, Job, JobId, JobSpec, JobState, JobStatus, MisfirePolicy, Transition,
    TransitionRefused, advance, advance_with_room, fire_id,
};
pub use ledger::{Occurrence, Outcome, SkipReason};
pub use overlap::{Disposition, OverlapPolicy, Running};
pub use packed::{JobKey, PackedSpec};
pub use time::{Micros, Timestamp};
pub use trace::TraceContext;
pub use trigger::{Recurrence, TriggerError, TriggerSpec};
