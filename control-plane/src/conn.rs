//! The connection a drain statement runs on. The store speaks through sqlx's `Any` driver, which
//! binds every parameter as text; on Postgres the usage drain takes a native connection for its
//! one transaction, so the usage rows' column arrays travel in Postgres's binary format (parsing
//! them from text cost ~5.5 µs of the ~23 µs of Postgres CPU a record took). The statements the
//! drain shares with the rest of the store — running balances, pool consumption, the version
//! bump — are written once and run on either through [`Conn`].

use sqlx::any::AnyRow;
use sqlx::postgres::PgRow;
use sqlx::{Arguments, Database, Encode, FromRow, Type};

/// A parameter of a statement run on either connection.
#[derive(Debug, Clone)]
pub(crate) enum Param {
    Text(String),
    Int(i64),
}

/// `params`, bound in order for database `DB`.
pub(crate) fn arguments<'q, DB>(params: Vec<Param>) -> Result<DB::Arguments<'q>, sqlx::Error>
where
    DB: Database,
    String: Encode<'q, DB> + Type<DB>,
    i64: Encode<'q, DB> + Type<DB>,
{
    let mut args = DB::Arguments::default();
    args.reserve(params.len(), 0);
    for p in params {
        match p {
            Param::Text(s) => args.add(s),
            Param::Int(i) => args.add(i),
        }
        .map_err(sqlx::Error::Encode)?;
    }
    Ok(args)
}

/// A connection inside a writing transaction: the store's own, or the drain's native one.
pub(crate) enum Conn<'a> {
    Any(&'a mut sqlx::AnyConnection),
    Pg(&'a mut sqlx::PgConnection),
}

/// Bind-parameter marks in binding order: `$1`, `$2`, … on Postgres; on SQLite a bare `?` each,
/// bound in order. SQLite finds a numbered parameter by walking the list of them, so binding a
/// statement of P numbered marks costs P² (a 16-row usage insert spent a quarter of the embedded
/// control plane's drain CPU there).
pub(crate) struct Marks {
    numbered: bool,
    n: usize,
}

impl Marks {
    pub(crate) fn sqlite(sqlite: bool) -> Self {
        Self {
            numbered: !sqlite,
            n: 0,
        }
    }

    /// The next parameter's mark.
    pub(crate) fn mark(&mut self) -> String {
        self.n += 1;
        if self.numbered {
            format!("${}", self.n)
        } else {
            "?".to_owned()
        }
    }

    /// `(m, m, …)`: the marks of one row of `width` values.
    pub(crate) fn row(&mut self, width: usize) -> String {
        let marks: Vec<String> = (0..width).map(|_| self.mark()).collect();
        format!("({})", marks.join(", "))
    }
}

impl Conn<'_> {
    /// Marks for one statement on this connection.
    pub(crate) fn marks(&self) -> Marks {
        Marks::sqlite(matches!(self, Self::Any(c) if c.backend_name() == "SQLite"))
    }

    /// Runs `sql` with `params` and decodes every row it returns as a `T` (a tuple, usually).
    pub(crate) async fn fetch_all<T>(
        &mut self,
        sql: &str,
        params: Vec<Param>,
    ) -> Result<Vec<T>, sqlx::Error>
    where
        T: Send + Unpin + for<'r> FromRow<'r, AnyRow> + for<'r> FromRow<'r, PgRow>,
    {
        match self {
            Self::Any(c) => {
                sqlx::query_as_with::<sqlx::Any, T, _>(sql, arguments::<sqlx::Any>(params)?)
                    .fetch_all(&mut **c)
                    .await
            }
            Self::Pg(c) => {
                sqlx::query_as_with::<sqlx::Postgres, T, _>(
                    sql,
                    arguments::<sqlx::Postgres>(params)?,
                )
                .fetch_all(&mut **c)
                .await
            }
        }
    }

    /// Runs `sql` with `params` for its effect.
    pub(crate) async fn execute(
        &mut self,
        sql: &str,
        params: Vec<Param>,
    ) -> Result<(), sqlx::Error> {
        match self {
            Self::Any(c) => {
                sqlx::query_with(sql, arguments::<sqlx::Any>(params)?)
                    .execute(&mut **c)
                    .await?;
            }
            Self::Pg(c) => {
                sqlx::query_with(sql, arguments::<sqlx::Postgres>(params)?)
                    .execute(&mut **c)
                    .await?;
            }
        }
        Ok(())
    }
}
