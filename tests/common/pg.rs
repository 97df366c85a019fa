//! A PostgreSQL database of a test's own, on the server at `TICKD_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`): created empty, dropped when the guard goes, so
//! tests run in parallel and leave nothing behind. When the server cannot be reached the test
//! fails, saying how to start it.

#![allow(dead_code)]

use sqlx::Connection;
use sqlx::postgres::PgConnection;

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub fn admin_url() -> String {
    std::env::var("TICKD_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.into())
}

pub async fn admin() -> PgConnection {
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
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> TestDatabase {
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
