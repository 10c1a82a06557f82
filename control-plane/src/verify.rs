//! Credential verification: one cheap authenticated read per provider (its model list), so a
//! seller learns at once whether the credential works. Nothing about the credential is logged.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokn_config::addr::is_internal;
use tracing::warn;

use tokn_config::control_plane::VerifyConfig;
use tokn_config::credential::{BedrockAuth, VertexCredential};
use tokn_config::google::CLOUD_PLATFORM_SCOPE;
use tokn_config::Credential;
use tokn_sigv4 as sigv4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Valid,
    /// The provider refused it (401/403).
    Invalid,
    /// No answer, or an answer that says nothing about the credential (5xx, 429).
    Unreachable,
    /// Nothing to say: Bedrock keys that authenticate but may not list models (their first
    /// request through a pool tells).
    Unchecked,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Valid => "valid",
            Self::Invalid => "invalid",
            Self::Unreachable => "unreachable",
            Self::Unchecked => "unchecked",
        }
    }
}

pub struct Verifier {
    http: reqwest::Client,
    config: VerifyConfig,
}

impl Verifier {
    pub fn new(config: VerifyConfig, timeout: Duration) -> Result<Self, String> {
        let mut http = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none());
        if !config.allow_internal_endpoints {
            http = http.dns_resolver(Arc::new(PublicOnly));
        }
        let http = http.build().map_err(|e| format!("http client: {e}"))?;
        Ok(Self { http, config })
    }

    /// Sends a check, unless its URL names an internal address literally (names are filtered
    /// by the resolver; literals never reach it).
    async fn send(&self, request: reqwest::RequestBuilder) -> Option<reqwest::Response> {
        let request = request.build().ok()?;
        // The URL parser has already normalised every IPv4 spelling (decimal, hex, `127.1`).
        let literal = request
            .url()
            .host_str()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .and_then(|h| h.parse::<IpAddr>().ok());
        if !self.config.allow_internal_endpoints && literal.is_some_and(is_internal) {
            warn!(message = "A credential check named an internal address; not sent.");
            return None;
        }
        self.http.execute(request).await.ok()
    }

    pub async fn verify(&self, credential: &Credential) -> Outcome {
        let trim = |s: &str| s.trim_end_matches('/').to_owned();
        let request = match credential {
            Credential::Openai(c) => {
                let base = trim(
                    c.base_url
                        .as_deref()
                        .unwrap_or(&self.config.openai_base_url),
                );
                self.http
                    .get(format!("{base}/models"))
                    .bearer_auth(c.api_key.expose())
            }
            Credential::Anthropic(c) => {
                let base = trim(
                    c.base_url
                        .as_deref()
                        .unwrap_or(&self.config.anthropic_base_url),
                );
                self.http
                    .get(format!("{base}/v1/models"))
                    .header("x-api-key", c.api_key.expose())
                    .header("anthropic-version", "2023-06-01")
            }
            Credential::Gemini(c) => {
                let base = trim(
                    c.base_url
                        .as_deref()
                        .unwrap_or(&self.config.gemini_base_url),
                );
                self.http
                    .get(format!("{base}/v1beta/models"))
                    .header("x-goog-api-key", c.api_key.expose())
            }
            Credential::Azure(c) => self
                .http
                .get(format!("{}/openai/models", trim(&c.endpoint)))
                .query(&[("api-version", c.api_version())])
                .header("api-key", c.api_key.expose()),
            Credential::Vertex(c) => match self.vertex_token_request(c) {
                Some(r) => r,
                None => return Outcome::Invalid,
            },
            Credential::Mock(_) => return Outcome::Valid,
            Credential::Bedrock(c) => {
                let base = self.config.bedrock_base_url.as_deref().map_or_else(
                    || format!("https://bedrock.{}.amazonaws.com", c.region),
                    trim,
                );
                let url = format!("{base}/foundation-models");
                match c.auth() {
                    Some(BedrockAuth::ApiKey(key)) => self.http.get(url).bearer_auth(key.expose()),
                    Some(BedrockAuth::AccessKeys {
                        access_key_id,
                        secret_access_key,
                        session_token,
                    }) => {
                        let keys = sigv4::Credentials {
                            access_key_id: access_key_id.to_owned(),
                            secret_access_key: secret_access_key.expose().to_owned(),
                            session_token: session_token.map(|t| t.expose().to_owned()),
                        };
                        match signed_get(&self.http, &url, &c.region, &keys) {
                            Some(r) => r,
                            None => return Outcome::Invalid,
                        }
                    }
                    None => return Outcome::Invalid,
                }
            }
        };
        let Some(response) = self.send(request).await else {
            return Outcome::Unreachable;
        };
        match response.status().as_u16() {
            200..=299 => Outcome::Valid,
            // Keys that authenticate but may not list models (least-privilege IAM policies
            // grant inference only) say nothing about inference: unchecked, not invalid.
            403 if aws_error_type(&response) == Some("AccessDeniedException") => Outcome::Unchecked,
            401 | 403 => Outcome::Invalid,
            // Gemini refuses a bad key with 400 `API_KEY_INVALID`; Google's token endpoint a
            // bad service account with 400 `invalid_grant`.
            400 => {
                let body = read_bounded(response).await;
                let text = String::from_utf8_lossy(&body);
                if text.contains("API_KEY_INVALID") || text.contains("invalid_grant") {
                    Outcome::Invalid
                } else {
                    Outcome::Unreachable
                }
            }
            _ => Outcome::Unreachable,
        }
    }

    /// The token request a Vertex service account is verified with: the JWT assertion the
    /// proxies send, posted to the key file's `token_uri`. `None`: the key cannot sign.
    fn vertex_token_request(&self, c: &VertexCredential) -> Option<reqwest::RequestBuilder> {
        let sa = c.service_account().ok()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let body = sa.token_request_body(CLOUD_PLATFORM_SCOPE, now).ok()?;
        Some(
            self.http
                .post(&sa.token_uri)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body),
        )
    }
}

/// Resolves names to their public addresses only: a name that leads only inside (however it
/// is spelled, and whatever it resolved to before) fails to resolve.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let public: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|a| !is_internal(a.ip()))
                .collect();
            if public.is_empty() {
                return Err("the name resolves only to internal addresses".into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// AWS's exception name from `x-amzn-ErrorType` (`AccessDeniedException:http://…`).
fn aws_error_type(response: &reqwest::Response) -> Option<&str> {
    let value = response.headers().get("x-amzn-errortype")?.to_str().ok()?;
    value.split(':').next()
}

/// A GET of `url` signed with SigV4 for Bedrock in `region`, as the proxies sign Converse.
fn signed_get(
    http: &reqwest::Client,
    url: &str,
    region: &str,
    keys: &sigv4::Credentials,
) -> Option<reqwest::RequestBuilder> {
    let parsed = tokn_config::UpstreamUrl::parse(url).ok()?;
    let host = parsed.host_header();
    let signed = sigv4::sign(
        &sigv4::Request {
            method: "GET",
            host: &host,
            path: &parsed.base_path,
            query: "",
            headers: &[],
            payload: sigv4::Payload::Bytes(b""),
        },
        keys,
        &sigv4::Params {
            region,
            service: "bedrock",
            time: sigv4::AmzDate::from_system_time(std::time::SystemTime::now()).ok()?,
            path_encoding: sigv4::PathEncoding::Double,
            content_sha256_header: false,
        },
    )
    .ok()?;
    let mut request = http.get(url);
    for (name, value) in signed.headers() {
        request = request.header(name, value);
    }
    Some(request)
}

/// The start of an error body (the URL is the seller's: its answer is not read whole).
async fn read_bounded(mut response: reqwest::Response) -> Vec<u8> {
    const MAX: usize = 64 * 1024;
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() >= MAX {
            break;
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokn_testkit::{Behavior, FakeUpstream};

    fn verifier(allow_internal_endpoints: bool) -> Verifier {
        let config = VerifyConfig {
            allow_internal_endpoints,
            ..VerifyConfig::default()
        };
        Verifier::new(config, Duration::from_secs(5)).unwrap()
    }

    fn openai_at(base_url: String) -> Credential {
        serde_json::from_value(serde_json::json!({
            "provider": "openai", "api_key": "sk-a", "base_url": base_url
        }))
        .unwrap()
    }

    /// A listener that counts the connections made to it: its port and the count.
    async fn counting_listener() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((_socket, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        (port, connections)
    }

    /// A seller's endpoint on the operator's own network is never called, however its host is
    /// spelled, unless the operator allows internal endpoints.
    #[tokio::test]
    async fn a_check_never_reaches_an_internal_address_unless_allowed() {
        let (port, connections) = counting_listener().await;
        let refused = verifier(false);
        let spellings = [
            "127.0.0.1",
            "2130706433",
            "0x7f000001",
            "127.1",
            "localhost",
            "[::ffff:127.0.0.1]",
            "[::ffff:7f00:1]",
        ];
        for host in spellings {
            let c = openai_at(format!("http://{host}:{port}/v1"));
            assert_eq!(refused.verify(&c).await, Outcome::Unreachable, "{host}");
        }
        let connections = connections.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(connections, 0, "a check reached the internal endpoint");
        // Allowed, the same check goes through.
        let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
        let c = openai_at(fake.base_url());
        assert_eq!(verifier(true).verify(&c).await, Outcome::Valid);
        assert_eq!(refused.verify(&c).await, Outcome::Unreachable);
    }

    /// A redirect is never followed: an endpoint that answers 302 to another address does not
    /// get the check sent there (nor the credential), and does not verify.
    #[tokio::test]
    async fn a_check_never_follows_a_redirect() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (target_port, reached) = counting_listener().await;
        let redirecting = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = redirecting.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = redirecting.accept().await {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:{target_port}/v1/models\r\ncontent-length: 0\r\n\r\n"
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        let c = openai_at(format!("http://127.0.0.1:{port}/v1"));
        assert_ne!(verifier(true).verify(&c).await, Outcome::Valid);
        let reached = reached.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(reached, 0, "the redirect was followed");
    }
}
