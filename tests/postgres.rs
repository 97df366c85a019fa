//! The PostgreSQL schema on a real server: migrations apply on a fresh database, also when
//! several replicas start at once, and applying them again changes nothing.
//!
//! Needs PostgreSQL at `TICKD_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); each test creates a database of its own and
//! drops it. When the server cannot be reached the tests fail, saying how to start it.
//! Built only with `--features postgres-tests` (which `.ci/run` uses), so that `cargo test`
//! needs nothing but Rust.

#![cfg(feature = "postgres-tests")]

use sqlx::Connection;
use sqlx::postgres::PgConnection;

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn admin_url() -> String {
    std::env::var("TICKD_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.into())
}

async fn admin() -> PgConnection {
    let url = admin_url();
    match PgConnection::connect(&url).await {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot reach PostgreSQL at {url}: {e}\n\
             start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n\
             (or point TICKD_TEST_DATABASE_URL at another server)"
        ),
    }
}

/// A database of this test's own, dropped when the guard goes.
struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    async fn create() -> TestDatabase {
        let name = format!(
            "tickd_test_{}_{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        );
        let mut conn = admin().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create the test database");
        let _ = conn.close().await;
        let base = admin_url();
        let url = match base.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("TICKD_TEST_DATABASE_URL {base} names no database"),
        };
        TestDatabase { name, url }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // A runtime of its own: Drop cannot await, and the test's runtime may be gone.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&admin_url()).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                    let _ = conn.close().await;
                }
            });
        })
        .join();
    }
}

async fn tables(url: &str) -> Vec<String> {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let names: Vec<(String,)> = sqlx::query_as(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' ORDER BY table_name",
    )
    .fetch_all(&mut conn)
    .await
    .expect("list tables");
    names.into_iter().map(|(n,)| n).collect()
}

/// Three replicas starting at once on a fresh database: every one succeeds, the schema is
/// there once, and the migration is recorded once.
#[tokio::test]
async fn replicas_starting_at_once_migrate_once() {
    let db = TestDatabase::create().await;
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { tickd::store::postgres::migrate(&url).await })
        })
        .collect();
    for run in runs {
        run.await.expect("task").expect("migrate");
    }
    assert_eq!(
        tables(&db.url).await,
        vec!["_sqlx_migrations", "tickd_fires", "tickd_jobs"]
    );
    let mut conn = PgConnection::connect(&db.url).await.expect("connect");
    let applied: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .expect("read migrations");
    assert_eq!(
        applied,
        vec![(tickd::store::postgres::schema_version(), true)]
    );
    let _ = conn.close().await;

    // Once more (a restart): nothing to do, nothing changed.
    tickd::store::postgres::migrate(&db.url)
        .await
        .expect("migrate again");
    assert_eq!(tables(&db.url).await.len(), 3);
}

/// A database that cannot be reached is a clear error, not a hang or a panic.
#[tokio::test]
async fn an_unreachable_database_is_a_clear_error() {
    let err = tickd::store::postgres::migrate("postgres://postgres@127.0.0.1:9/nowhere")
        .await
        .expect_err("nothing listens on port 9");
    assert!(
        err.to_string().contains("cannot connect to PostgreSQL"),
        "{err}"
    );
}
