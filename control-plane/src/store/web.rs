//! The web app's rows: one-time sign-in links, browser sessions, the outbox, the playground's key.
//! Links and sessions are stored as digests of their secrets; each is accepted by one statement
//! (no read-then-write), so two uses at once never both succeed.

use sqlx::Row;

use std::collections::BTreeMap;

use super::{
    decode_all, now_ms, parse_json, parse_text, Account, Credential, Role, Store, StoreError,
    StoreResult, SERVABLE_POOLS,
};
use crate::sealing::Sealed;

/// Who a link or a session is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visitor {
    /// A person, by email (their account is made on first sign-in).
    Person { email: String, role: Role },
    /// The operator (the admin token's holder).
    Operator,
}

/// An accepted sign-in link.
#[derive(Debug, Clone)]
pub struct AcceptedLink {
    pub visitor: Visitor,
    /// Where the browser goes after signing in (checked to be a local path when made).
    pub return_to: String,
}

/// A sign-in with GitHub or Google between its redirect and its callback.
#[derive(Debug, Clone)]
pub struct SigninFlow {
    /// `github` or `google`.
    pub provider: String,
    /// The role of an account made by this sign-in.
    pub role: Role,
    /// Where the browser goes after signing in (a local path).
    pub return_to: String,
    pub pkce_verifier: String,
    /// The OpenID nonce (empty for GitHub, which is OAuth only).
    pub nonce: String,
}

/// A live session.
#[derive(Debug, Clone)]
pub struct Session {
    pub id_sha256: String,
    /// The person signed in; `None` for the operator.
    pub account: Option<Account>,
    pub csrf: String,
    pub expires_at_ms: i64,
}

/// One row of the daily usage roll-up.
#[derive(Debug, Clone)]
pub struct DailyUsage {
    /// 00:00 UTC of the day, Unix ms.
    pub day_ms: i64,
    pub model: String,
    pub key_id: String,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_micros: i64,
}

/// A message the embedded mode keeps instead of sending.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub id: String,
    pub recipient: String,
    pub subject: String,
    pub body: String,
    pub created_at_ms: i64,
}

impl Store {
    /// Stores a sign-in link valid for `ttl_ms`.
    pub async fn create_signin_link(
        &self,
        token_sha256: &str,
        visitor: &Visitor,
        return_to: &str,
        ttl_ms: i64,
    ) -> StoreResult<()> {
        let now = now_ms();
        let (kind, email, role) = match visitor {
            Visitor::Person { email, role } => ("person", email.as_str(), role.as_str()),
            Visitor::Operator => ("operator", "", ""),
        };
        sqlx::query(
            "INSERT INTO signin_links (token_sha256, kind, email, role, return_to, created_at, \
             expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(token_sha256)
        .bind(kind)
        .bind(email)
        .bind(role)
        .bind(return_to)
        .bind(now)
        .bind(now.saturating_add(ttl_ms))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Accepts a sign-in link once: `NotFound` if it never existed, expired or was used.
    pub async fn use_signin_link(&self, token_sha256: &str) -> StoreResult<AcceptedLink> {
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE signin_links SET used_at = $1 \
             WHERE token_sha256 = $2 AND used_at IS NULL AND expires_at > $1 \
             RETURNING kind, email, role, return_to",
        )
        .bind(now)
        .bind(token_sha256)
        .fetch_optional(&self.writer)
        .await?
        .ok_or(StoreError::NotFound)?;
        let kind: String = r.try_get("kind")?;
        let visitor = if kind == "operator" {
            Visitor::Operator
        } else {
            Visitor::Person {
                email: r.try_get("email")?,
                role: parse_text(&r.try_get::<String, _>("role")?)?,
            }
        };
        // Expired and used links are of no more use: dropped as others are made.
        sqlx::query("DELETE FROM signin_links WHERE expires_at < $1")
            .bind(now - 86_400_000)
            .execute(&self.writer)
            .await?;
        Ok(AcceptedLink {
            visitor,
            return_to: r.try_get("return_to")?,
        })
    }

    /// Stores a sign-in flow under its state's digest, valid for `ttl_ms`.
    pub async fn create_signin_flow(
        &self,
        state_sha256: &str,
        flow: &SigninFlow,
        ttl_ms: i64,
    ) -> StoreResult<()> {
        let now = now_ms();
        // Flows nobody finished go as new ones start (each start is throttled per address).
        sqlx::query("DELETE FROM signin_flows WHERE expires_at < $1")
            .bind(now)
            .execute(&self.writer)
            .await?;
        sqlx::query(
            "INSERT INTO signin_flows (state_sha256, provider, role, return_to, pkce_verifier, \
             nonce, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(state_sha256)
        .bind(&flow.provider)
        .bind(flow.role.as_str())
        .bind(&flow.return_to)
        .bind(&flow.pkce_verifier)
        .bind(&flow.nonce)
        .bind(now)
        .bind(now.saturating_add(ttl_ms))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Takes a sign-in flow once (one statement deletes it): `NotFound` if it never existed,
    /// expired or was taken.
    pub async fn take_signin_flow(&self, state_sha256: &str) -> StoreResult<SigninFlow> {
        let now = now_ms();
        let r = sqlx::query(
            "DELETE FROM signin_flows WHERE state_sha256 = $1 \
             RETURNING provider, role, return_to, pkce_verifier, nonce, expires_at",
        )
        .bind(state_sha256)
        .fetch_optional(&self.writer)
        .await?
        .ok_or(StoreError::NotFound)?;
        if r.try_get::<i64, _>("expires_at")? <= now {
            return Err(StoreError::NotFound);
        }
        Ok(SigninFlow {
            provider: r.try_get("provider")?,
            role: parse_text(&r.try_get::<String, _>("role")?)?,
            return_to: r.try_get("return_to")?,
            pkce_verifier: r.try_get("pkce_verifier")?,
            nonce: r.try_get("nonce")?,
        })
    }

    pub async fn account_by_email(&self, email: &str) -> StoreResult<Account> {
        let r = sqlx::query("SELECT * FROM accounts WHERE email = $1")
            .bind(email)
            .fetch_one(&self.pool)
            .await?;
        Ok(Account::from_row(&r)?)
    }

    /// Starts a session for `account` (`None`: the operator).
    pub async fn create_session(
        &self,
        id_sha256: &str,
        account: Option<&str>,
        csrf: &str,
        ttl_ms: i64,
    ) -> StoreResult<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO web_sessions (id_sha256, kind, account_id, csrf, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id_sha256)
        .bind(if account.is_some() {
            "person"
        } else {
            "operator"
        })
        .bind(account)
        .bind(csrf)
        .bind(now)
        .bind(now.saturating_add(ttl_ms))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// A session that is neither revoked nor expired, with its account (one query: every page
    /// asks).
    pub async fn session(&self, id_sha256: &str) -> StoreResult<Option<Session>> {
        let Some(r) = sqlx::query(
            "SELECT s.account_id AS session_account, s.csrf, s.expires_at, a.* \
             FROM web_sessions s LEFT JOIN accounts a ON a.id = s.account_id \
             WHERE s.id_sha256 = $1 AND s.revoked_at IS NULL AND s.expires_at > $2",
        )
        .bind(id_sha256)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let account = match r.try_get::<Option<String>, _>("session_account")? {
            Some(_) => Some(Account::from_row(&r)?),
            None => None,
        };
        Ok(Some(Session {
            id_sha256: id_sha256.to_owned(),
            account,
            csrf: r.try_get("csrf")?,
            expires_at_ms: r.try_get("expires_at")?,
        }))
    }

    /// Ends one session (sign-out).
    pub async fn revoke_session(&self, id_sha256: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE web_sessions SET revoked_at = $1 WHERE id_sha256 = $2 AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(id_sha256)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Ends every session of an account (sign out everywhere); how many were live.
    pub async fn revoke_sessions_of(&self, account_id: &str) -> StoreResult<u64> {
        Ok(sqlx::query(
            "UPDATE web_sessions SET revoked_at = $1 WHERE account_id = $2 AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(account_id)
        .execute(&self.writer)
        .await?
        .rows_affected())
    }

    /// Keeps a message instead of sending it.
    pub async fn put_outbox(&self, recipient: &str, subject: &str, body: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO outbox (id, recipient, subject, body, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(crate::ids::new("mail"))
        .bind(recipient)
        .bind(subject)
        .bind(body)
        .bind(now_ms())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// The newest kept messages first.
    pub async fn outbox(&self, limit: u32) -> StoreResult<Vec<OutboxMessage>> {
        let rows = sqlx::query(
            "SELECT id, recipient, subject, body, created_at FROM outbox \
             ORDER BY created_at DESC, id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxMessage {
                    id: r.try_get("id")?,
                    recipient: r.try_get("recipient")?,
                    subject: r.try_get("subject")?,
                    body: r.try_get("body")?,
                    created_at_ms: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// The playground's key of an account, if it has one that is still live: (key id, sealed).
    pub async fn playground_key(&self, account_id: &str) -> StoreResult<Option<(String, Sealed)>> {
        let Some(r) = sqlx::query(
            "SELECT p.key_id, p.kek_version, p.wrapped_dek, p.ciphertext FROM playground_keys p \
             JOIN api_keys k ON k.id = p.key_id \
             WHERE p.account_id = $1 AND k.revoked_at IS NULL",
        )
        .bind(account_id)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let hex_col = |name: &str| -> Result<Vec<u8>, sqlx::Error> {
            hex::decode(r.try_get::<String, _>(name)?).map_err(|e| sqlx::Error::Decode(Box::new(e)))
        };
        let kek_version: i64 = r.try_get("kek_version")?;
        Ok(Some((
            r.try_get("key_id")?,
            Sealed {
                kek_version: u32::try_from(kek_version).unwrap_or(0),
                wrapped_dek: hex_col("wrapped_dek")?,
                ciphertext: hex_col("ciphertext")?,
            },
        )))
    }

    /// Records (or replaces) the playground's key of an account.
    pub async fn set_playground_key(
        &self,
        account_id: &str,
        key_id: &str,
        sealed: &Sealed,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO playground_keys (account_id, key_id, kek_version, wrapped_dek, ciphertext) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (account_id) DO UPDATE SET key_id = excluded.key_id, \
             kek_version = excluded.kek_version, wrapped_dek = excluded.wrapped_dek, \
             ciphertext = excluded.ciphertext",
        )
        .bind(account_id)
        .bind(key_id)
        .bind(i64::from(sealed.kek_version))
        .bind(hex::encode(&sealed.wrapped_dek))
        .bind(hex::encode(&sealed.ciphertext))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Where each servable pool stands in the queue of each model it lists: pool id → model →
    /// (position from 1, pools in that queue). One pass over the servable pools in FIFO order.
    pub async fn fifo_positions(
        &self,
        now_ms: i64,
    ) -> StoreResult<BTreeMap<String, BTreeMap<String, (usize, usize)>>> {
        let rows = sqlx::query(&format!(
            "SELECT p.id, p.models {SERVABLE_POOLS} ORDER BY p.listed_seq"
        ))
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut queues: BTreeMap<String, usize> = BTreeMap::new();
        let mut out: BTreeMap<String, BTreeMap<String, (usize, usize)>> = BTreeMap::new();
        for r in &rows {
            let id: String = r.try_get(0)?;
            let models: Vec<String> = parse_json(&r.try_get::<String, _>(1)?)?;
            for m in models {
                let n = queues.entry(m.clone()).or_default();
                *n += 1;
                out.entry(id.clone()).or_default().insert(m, (*n, 0));
            }
        }
        for positions in out.values_mut() {
            for (model, (_, of)) in positions.iter_mut() {
                *of = queues.get(model).copied().unwrap_or(0);
            }
        }
        Ok(out)
    }

    /// Credentials whose endpoint their seller chose, waiting for the operator's approval,
    /// oldest first.
    pub async fn awaiting_approval(&self, limit: u32) -> StoreResult<Vec<Credential>> {
        let rows = sqlx::query(
            "SELECT * FROM credentials WHERE custom_endpoint <> 0 AND approved_at IS NULL \
             AND deleted_at IS NULL ORDER BY created_at, id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        decode_all(&rows, Credential::from_row)
    }

    /// An account's daily usage from `since_ms` on (the roll-up's primary key leads with the
    /// account and the day: an index range, however long the journal).
    pub async fn daily_usage(
        &self,
        account_id: &str,
        since_ms: i64,
    ) -> StoreResult<Vec<DailyUsage>> {
        let rows = sqlx::query(
            "SELECT day, model, key_id, requests, input_tokens, output_tokens, cost_micros \
             FROM usage_daily WHERE account_id = $1 AND day >= $2 ORDER BY day",
        )
        .bind(account_id)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DailyUsage {
                    day_ms: r.try_get(0)?,
                    model: r.try_get(1)?,
                    key_id: r.try_get(2)?,
                    requests: r.try_get(3)?,
                    input_tokens: r.try_get(4)?,
                    output_tokens: r.try_get(5)?,
                    cost_micros: r.try_get(6)?,
                })
            })
            .collect()
    }
}
