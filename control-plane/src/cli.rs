//! The operator's everyday tasks from the command line, over the API (`--url`, the admin token
//! from `TOKN_ADMIN_TOKEN`): accounts, their keys, credit grants, pools, usage, the ledger check, the drain,
//! endpoint approval and a web sign-in link. Tables by default, the API's JSON with `--json`.

use std::io::Write;

use clap::Subcommand;

use crate::units::dollars_to_micros;
use serde_json::{json, Value};

#[derive(Subcommand)]
pub enum Ops {
    /// Accounts: `list`, `show ID`, `create EMAIL ROLE`, `suspend ID`, `resume ID`.
    Accounts {
        #[command(subcommand)]
        what: AccountOps,
    },
    /// An account's API keys; `--revoke KEY_ID` revokes one (a leaked key).
    Keys {
        account_id: String,
        #[arg(long)]
        revoke: Option<String>,
    },
    /// Grants credit to an account (idempotent per reference).
    Grant {
        account_id: String,
        /// Dollars, e.g. 25 or 2.50.
        dollars: String,
        /// The grant's reference: a second grant with it moves nothing.
        #[arg(long)]
        reference: String,
        #[arg(long, default_value = "")]
        memo: String,
    },
    /// Pauses a pool (whatever its seller does) or resumes it.
    Pool {
        pool_id: String,
        /// `pause` or `resume`.
        action: String,
    },
    /// Lets a credential with its seller's own endpoint serve.
    Approve { credential_id: String },
    /// Applied usage, newest first.
    Usage {
        #[arg(long)]
        account: Option<String>,
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// The ledger check (balanced transactions, balances, pools, the usage roll-up).
    Ledger,
    /// What the usage drain last did.
    Drain,
    /// A one-time link that signs the operator in to the web app.
    SigninLink,
}

#[derive(Subcommand)]
pub enum AccountOps {
    List {
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    Show {
        account_id: String,
    },
    Create {
        email: String,
        /// `buyer`, `seller` or `both`.
        role: String,
    },
    Suspend {
        account_id: String,
    },
    Resume {
        account_id: String,
    },
}

/// Runs one task against the control plane at `url`.
pub async fn run(ops: Ops, url: &str, token: &str, as_json: bool) -> Result<(), String> {
    let api = ApiClient::new(url, token);
    let (value, table) = match ops {
        Ops::Accounts { what } => match what {
            AccountOps::List { limit } => {
                let v = api
                    .call("GET", &format!("/v1/admin/accounts?limit={limit}"), None)
                    .await?;
                (v.clone(), rows(&v, &["id", "email", "role", "status"]))
            }
            AccountOps::Show { account_id } => {
                let v = api
                    .call("GET", &format!("/v1/admin/accounts/{account_id}"), None)
                    .await?;
                (v.clone(), fields(&v))
            }
            AccountOps::Create { email, role } => {
                let v = api
                    .call(
                        "POST",
                        "/v1/admin/accounts",
                        Some(json!({"email": email, "role": role})),
                    )
                    .await?;
                // The token is in this answer only.
                (
                    v.clone(),
                    fields(&v["account"]) + &format!("token\t{}\n", text(&v["token"])),
                )
            }
            AccountOps::Suspend { account_id } => {
                let v = set_status(&api, &account_id, "suspended").await?;
                (v.clone(), fields(&v))
            }
            AccountOps::Resume { account_id } => {
                let v = set_status(&api, &account_id, "active").await?;
                (v.clone(), fields(&v))
            }
        },
        Ops::Keys {
            account_id,
            revoke: None,
        } => {
            let v = api
                .call(
                    "GET",
                    &format!("/v1/admin/accounts/{account_id}/keys"),
                    None,
                )
                .await?;
            let t = rows(
                &v,
                &[
                    "id",
                    "name",
                    "lookup_prefix",
                    "spend_cap_micros",
                    "requests_per_minute",
                    "revoked_at_ms",
                ],
            );
            (v, t)
        }
        Ops::Keys {
            account_id,
            revoke: Some(key_id),
        } => {
            let v = api
                .call(
                    "DELETE",
                    &format!("/v1/admin/accounts/{account_id}/keys/{key_id}"),
                    None,
                )
                .await?;
            (v.clone(), fields(&v))
        }
        Ops::Grant {
            account_id,
            dollars,
            reference,
            memo,
        } => {
            let micros = dollars_to_micros(&dollars)?;
            let v = api
                .call(
                    "POST",
                    &format!("/v1/admin/accounts/{account_id}/credits"),
                    Some(json!({"amount_micros": micros, "memo": memo, "reference": reference})),
                )
                .await?;
            (v.clone(), fields(&v))
        }
        Ops::Pool { pool_id, action } => {
            let status = match action.as_str() {
                "pause" => "paused",
                "resume" => "live",
                other => return Err(format!("pool: `{other}` is not pause or resume")),
            };
            let v = api
                .call(
                    "PATCH",
                    &format!("/v1/admin/pools/{pool_id}"),
                    Some(json!({"status": status})),
                )
                .await?;
            (v.clone(), fields(&v))
        }
        Ops::Approve { credential_id } => {
            let v = api
                .call(
                    "POST",
                    &format!("/v1/admin/credentials/{credential_id}/approve"),
                    None,
                )
                .await?;
            (v.clone(), fields(&v))
        }
        Ops::Usage {
            account,
            model,
            limit,
        } => {
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.append_pair("limit", &limit.to_string());
            if let Some(a) = &account {
                query.append_pair("account_id", a);
            }
            if let Some(m) = &model {
                query.append_pair("model", m);
            }
            let v = api
                .call("GET", &format!("/v1/admin/usage?{}", query.finish()), None)
                .await?;
            let t = rows(
                &v,
                &[
                    "request_id",
                    "account_id",
                    "model",
                    "status",
                    "prompt_tokens",
                    "completion_tokens",
                    "buyer_cost_micros",
                ],
            );
            (v, t)
        }
        Ops::Ledger => {
            let v = api.call("GET", "/v1/admin/ledger/check", None).await?;
            (v.clone(), fields(&v))
        }
        Ops::Drain => {
            let v = api.call("GET", "/v1/admin/drain", None).await?;
            (v.clone(), fields(&v))
        }
        Ops::SigninLink => {
            let v = api.call("POST", "/v1/admin/signin-links", None).await?;
            (v.clone(), fields(&v))
        }
    };
    let out = if as_json {
        serde_json::to_string_pretty(&value).unwrap_or_default() + "\n"
    } else {
        table
    };
    // The command's output is its answer: standard output, for people and for scripts.
    std::io::stdout()
        .write_all(out.as_bytes())
        .map_err(|e| format!("stdout: {e}"))
}

async fn set_status(api: &ApiClient, account_id: &str, status: &str) -> Result<Value, String> {
    api.call(
        "PATCH",
        &format!("/v1/admin/accounts/{account_id}"),
        Some(json!({"status": status})),
    )
    .await
}

/// The control plane's API as one caller (the operator's commands, `tokn`'s set-up): JSON in
/// and out, a failure as `{status}: {the API's message}`.
pub struct ApiClient {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl ApiClient {
    /// Calls `url` with bearer `token` (an admin token, unless [`Self::call_as`] says otherwise).
    pub fn new(url: &str, token: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            url: url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        self.call_as(&self.token, method, path, body).await
    }

    /// The same with another bearer token (an account's).
    pub async fn call_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("{}: {}", self.url, e.without_url()))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(v)
        } else {
            Err(format!(
                "{path}: {status}: {}",
                text(&v["error"]["message"])
            ))
        }
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// An object as `field<TAB>value` lines.
fn fields(v: &Value) -> String {
    match v.as_object() {
        Some(o) => o
            .iter()
            .map(|(k, v)| format!("{k}\t{}\n", text(v)))
            .collect(),
        None => format!("{}\n", text(v)),
    }
}

/// An array of objects as a table with aligned columns.
fn rows(v: &Value, columns: &[&str]) -> String {
    let items = v.as_array().cloned().unwrap_or_default();
    let cells: Vec<Vec<String>> = items
        .iter()
        .map(|item| columns.iter().map(|c| text(&item[*c])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |row: Vec<&str>| {
        let padded: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(columns.to_vec());
    for r in &cells {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::rows;
    use serde_json::json;

    #[test]
    fn tables_align_their_columns() {
        let v = json!([{"id": "a", "email": "long@example.com"}, {"id": "bbb", "email": "x"}]);
        assert_eq!(
            rows(&v, &["id", "email"]),
            "id   email\na    long@example.com\nbbb  x\n"
        );
    }
}
