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

impl Conn<'_> {
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
