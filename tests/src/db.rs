//! A fresh Postgres database per test, on the shared server (127.0.0.1:5432, trust auth), so
//! runs never collide. `TOKN_TEST_POSTGRES` overrides the server URL (no database path).

use sqlx::{Connection, Executor, PgConnection};

pub struct TestDatabase {
    server: String,
    pub name: String,
    /// Connection URL of the fresh database.
    pub url: String,
    /// Dropped already (by `drop_db`); otherwise `Drop` drops it, a failed test's included.
    dropped: bool,
}

fn server() -> String {
    std::env::var("TOKN_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

impl TestDatabase {
    pub async fn create(tag: &str) -> Self {
        let server = server();
        // Postgres cuts names at 63 bytes: a long tag would cut off the unique suffix, and a
        // database left by an earlier run would then collide.
        let tag: String = tag.chars().take(28).collect();
        let name = format!(
            "tokn_{tag}_{}_{:x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let mut admin = PgConnection::connect(&format!("{server}/postgres"))
            .await
            .unwrap_or_else(|e| panic!("Postgres at {server}: {e}"));
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let _ = admin.close().await;
        Self {
            url: format!("{server}/{name}"),
            server,
            name,
            dropped: false,
        }
    }

    /// Drops the database (connections still open to it are ended).
    pub async fn drop_db(mut self) {
        drop_database(&self.server, &self.name).await;
        self.dropped = true;
    }
}

async fn drop_database(server: &str, name: &str) {
    if let Ok(mut admin) = PgConnection::connect(&format!("{server}/postgres")).await {
        let _ = admin
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await;
        let _ = admin.close().await;
    }
}

/// A test that failed (panicked) before `drop_db` leaves no database behind: dropped on a thread
/// of its own, with its own runtime (the test's may be shutting down).
impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (server, name) = (self.server.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(drop_database(&server, &name));
            }
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_its_test_did_not_drop_is_dropped_anyway() {
        let db = TestDatabase::create("dropped_anyway").await;
        let name = db.name.clone();
        drop(db);
        let mut admin = PgConnection::connect(&format!("{}/postgres", server()))
            .await
            .unwrap();
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_database WHERE datname = $1")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        assert_eq!(left, 0);
    }
}
