//! The PostgreSQL schema: versioned migrations embedded in the binary (`migrations/`), applied
//! at start.
//!
//! Several replicas may start at once: sqlx takes an advisory lock around the migrations, on a
//! connection of their own that is closed whatever the outcome (a session lock left on a
//! pooled connection after a failed migration would block every other replica).
//!
//! This is the groundwork of the multi-replica backend; the engine that runs on it is not
//! written yet, and nothing in the server uses this module.

use sqlx::Connection;
use sqlx::postgres::PgConnection;

use super::StoreError;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Applies every migration `url`'s database does not have yet.
pub async fn migrate(url: &str) -> Result<(), StoreError> {
    let mut conn = PgConnection::connect(url)
        .await
        .map_err(|e| StoreError::Io(format!("cannot connect to PostgreSQL: {e}")))?;
    let result = MIGRATOR.run_direct(None, &mut conn, false).await;
    let _ = conn.close().await;
    result.map_err(|e| StoreError::Io(format!("database migration failed: {e}")))
}

/// The newest migration version in this binary.
pub fn schema_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}
