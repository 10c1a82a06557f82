//! Mail the web app sends (sign-in links): over SMTP when `[web.smtp]` is configured (STARTTLS
//! or TLS by rustls, pooled connections), otherwise kept in the outbox for the operator's page.
//! A link is a secret: with SMTP it is never stored or logged.

use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokn_config::control_plane::{SmtpConfig, SmtpTls};

use crate::store::Store;

pub enum Mailer {
    /// Kept in the `outbox` table.
    Outbox,
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        from: Mailbox,
    },
}

/// Why a message did not go out (the details are logged, never shown).
#[derive(Debug)]
pub struct MailError;

impl Mailer {
    pub fn new(smtp: Option<&SmtpConfig>, password: Option<&str>) -> Result<Self, String> {
        let Some(cfg) = smtp else {
            return Ok(Self::Outbox);
        };
        let builder = match cfg.tls {
            SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&cfg.host),
            SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&cfg.host),
            SmtpTls::None => Ok(AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(
                &cfg.host,
            )),
        }
        .map_err(|e| format!("web.smtp: {e}"))?;
        let mut builder = builder
            .port(cfg.port)
            .timeout(Some(std::time::Duration::from_secs(20)));
        if let (Some(user), Some(password)) = (&cfg.username, password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.to_owned()));
        }
        let from = cfg
            .from
            .parse::<Mailbox>()
            .map_err(|e| format!("web.smtp.from: {e}"))?;
        Ok(Self::Smtp {
            transport: builder.build(),
            from,
        })
    }

    /// Whether mail really leaves (else it waits in the outbox).
    pub fn sends(&self) -> bool {
        matches!(self, Self::Smtp { .. })
    }

    /// Sends (or keeps) one plain-text message.
    pub async fn send(
        &self,
        store: &Store,
        to: &str,
        subject: &str,
        body: &str,
    ) -> Result<(), MailError> {
        match self {
            Self::Outbox => store.put_outbox(to, subject, body).await.map_err(|e| {
                tracing::error!(message = "Keeping mail in the outbox failed.", error = %e);
                MailError
            }),
            Self::Smtp { transport, from } => {
                let to: Mailbox = to.parse().map_err(|_| MailError)?;
                let message = Message::builder()
                    .from(from.clone())
                    .to(to)
                    .subject(subject)
                    .body(body.to_owned())
                    .map_err(|e| {
                        tracing::error!(message = "Building mail failed.", error = %e);
                        MailError
                    })?;
                transport.send(message).await.map(|_| ()).map_err(|e| {
                    tracing::warn!(message = "Sending mail failed.", error = %e);
                    MailError
                })
            }
        }
    }
}
