//! A fresh Postgres database per test, on the shared server (127.0.0.1:5432, trust auth), so
//! runs never collide. `TOKN_TEST_POSTGRES` overrides the server URL (no database path).

use sqlx::{Connection, Executor, PgConnection};

pub struct TestDatabase {
    server: String,
    pub name: String,
    /// Connection URL of the fresh database.
    pub url: String,
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
        }
    }

    /// Drops the database (connections still open to it are ended).
    pub async fn drop_db(self) {
        if let Ok(mut admin) = PgConnection::connect(&format!("{}/postgres", self.server)).await {
            let _ = admin
                .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
                .await;
            let _ = admin.close().await;
        }
    }
}
