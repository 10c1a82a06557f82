//! A fake SMTP server (RFC 5321, plain, loopback): it speaks the submission dialogue a client
//! meets — greeting, EHLO, optional AUTH PLAIN, MAIL FROM, RCPT TO, DATA with dot-stuffing,
//! QUIT — refuses commands out of order, and keeps what it received.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One message as received.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    /// The DATA section, dot-stuffing undone, CRLF line ends.
    pub data: String,
    /// `user` of AUTH PLAIN, when the client authenticated.
    pub user: Option<String>,
}

pub struct FakeSmtp {
    pub port: u16,
    received: Arc<Mutex<Vec<Mail>>>,
    errors: Arc<Mutex<Vec<String>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl FakeSmtp {
    /// Listens on `127.0.0.1:0`; `credentials`: the (user, password) AUTH PLAIN must present.
    pub async fn start(credentials: Option<(&str, &str)>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let creds = credentials.map(|(u, p)| (u.to_owned(), p.to_owned()));
        let (r, e) = (received.clone(), errors.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (r, e, creds) = (r.clone(), e.clone(), creds.clone());
                tokio::spawn(async move {
                    if let Err(why) = session(stream, &r, creds).await {
                        crate::serve::lock(&e).push(why);
                    }
                });
            }
        });
        Ok(Self {
            port,
            received,
            errors,
            _task: task,
        })
    }

    pub fn received(&self) -> Vec<Mail> {
        crate::serve::lock(&self.received).clone()
    }

    /// Protocol errors the fake saw (a test asserts there are none).
    pub fn errors(&self) -> Vec<String> {
        crate::serve::lock(&self.errors).clone()
    }
}

async fn session(
    stream: tokio::net::TcpStream,
    received: &Mutex<Vec<Mail>>,
    creds: Option<(String, String)>,
) -> Result<(), String> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    reply(&mut write, "220 fake-smtp ESMTP ready").await?;
    let (mut helo, mut user, mut from, mut to) =
        (false, None::<String>, None::<String>, Vec::new());
    while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("EHLO ") || upper.starts_with("HELO ") {
            helo = true;
            write
                .write_all(b"250-fake-smtp\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n")
                .await
                .map_err(|e| e.to_string())?;
        } else if upper.starts_with("AUTH PLAIN ") {
            let encoded = line[11..].trim();
            let decoded = base64_decode(encoded).ok_or("AUTH PLAIN: not base64")?;
            let parts: Vec<&[u8]> = decoded.split(|b| *b == 0).collect();
            let (u, p) = match parts.as_slice() {
                [_, u, p] => (String::from_utf8_lossy(u), String::from_utf8_lossy(p)),
                _ => return Err("AUTH PLAIN: not authzid\\0user\\0password".to_owned()),
            };
            if creds.as_ref().is_some_and(|(cu, cp)| *cu == u && *cp == p) {
                user = Some(u.into_owned());
                reply(&mut write, "235 2.7.0 Authentication successful").await?;
            } else {
                reply(&mut write, "535 5.7.8 Authentication credentials invalid").await?;
            }
        } else if upper.starts_with("MAIL FROM:") {
            if !helo || (creds.is_some() && user.is_none()) {
                reply(&mut write, "503 5.5.1 EHLO and AUTH first").await?;
                return Err(format!("MAIL before EHLO/AUTH: {line}"));
            }
            from = Some(address(&line[10..]));
            to.clear();
            reply(&mut write, "250 2.1.0 OK").await?;
        } else if upper.starts_with("RCPT TO:") {
            if from.is_none() {
                reply(&mut write, "503 5.5.1 MAIL first").await?;
                return Err("RCPT before MAIL".to_owned());
            }
            to.push(address(&line[8..]));
            reply(&mut write, "250 2.1.5 OK").await?;
        } else if upper == "DATA" {
            if to.is_empty() {
                reply(&mut write, "503 5.5.1 RCPT first").await?;
                return Err("DATA before RCPT".to_owned());
            }
            reply(&mut write, "354 End data with <CR><LF>.<CR><LF>").await?;
            let mut data = String::new();
            loop {
                let l = lines
                    .next_line()
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("the connection ended inside DATA")?;
                if l == "." {
                    break;
                }
                data.push_str(l.strip_prefix('.').unwrap_or(&l));
                data.push_str("\r\n");
            }
            crate::serve::lock(received).push(Mail {
                from: from.take().unwrap_or_default(),
                to: std::mem::take(&mut to),
                data,
                user: user.clone(),
            });
            reply(&mut write, "250 2.0.0 OK queued").await?;
        } else if upper == "QUIT" {
            reply(&mut write, "221 2.0.0 Bye").await?;
            return Ok(());
        } else if upper == "RSET" || upper == "NOOP" {
            from = None;
            to.clear();
            reply(&mut write, "250 2.0.0 OK").await?;
        } else {
            reply(&mut write, "502 5.5.2 Command not recognized").await?;
            return Err(format!("unknown command: {line}"));
        }
    }
    Ok(())
}

async fn reply(w: &mut tokio::net::tcp::OwnedWriteHalf, text: &str) -> Result<(), String> {
    w.write_all(format!("{text}\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())
}

/// `<a@b>` (with any parameters after it) as `a@b`.
fn address(arg: &str) -> String {
    let arg = arg.trim();
    arg.strip_prefix('<')
        .and_then(|a| a.split_once('>'))
        .map_or(arg, |(a, _)| a)
        .to_owned()
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}
