//! Token files: rewritten atomically, with the configured mode, every time
//! the credential gets a new token.

use std::sync::Arc;

use secrecy::ExposeSecret;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use crate::config::{SinkConfig, SinkFormat};
use crate::fsutil;
use crate::token::Token;

/// The file content for `token` in `format`.
pub fn render(token: &Token, format: SinkFormat) -> Vec<u8> {
    let value = token.access_token.expose_secret();
    match format {
        SinkFormat::Raw => value.as_bytes().to_vec(),
        SinkFormat::Header => format!("Authorization: Bearer {value}\n").into_bytes(),
        SinkFormat::Json => {
            let doc = serde_json::json!({
                "access_token": value,
                "token_type": token.token_type,
                "expires_at": humantime::format_rfc3339_seconds(token.expires_at_wall()).to_string(),
            });
            let mut bytes = serde_json::to_vec(&doc).expect("json serializes");
            bytes.push(b'\n');
            bytes
        }
    }
}

/// Writes every new token of one credential to its sinks until shutdown.
/// Runs apart from the token engine so a slow disk never delays a refresh.
pub async fn run(
    name: String,
    sinks: Vec<SinkConfig>,
    mut tokens: watch::Receiver<Option<Arc<Token>>>,
    shutdown: CancellationToken,
) {
    if sinks.is_empty() {
        return;
    }
    let span = info_span!("credential", name = %name);
    async move {
        loop {
            let token = tokens.borrow_and_update().clone();
            if let Some(token) = token {
                write_all(&sinks, &token).await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = tokens.changed() => if changed.is_err() { break },
            }
        }
    }
    .instrument(span)
    .await
}

async fn write_all(sinks: &[SinkConfig], token: &Arc<Token>) {
    for sink in sinks {
        let content = render(token, sink.format);
        let path = sink.path.clone();
        let mode = sink.mode;
        // The write finishes even if shutdown arrives meanwhile: a file is
        // never left half-written (it is atomic anyway, but the fsync counts).
        let result =
            tokio::task::spawn_blocking(move || fsutil::write_atomic(&path, &content, mode)).await;
        match result {
            Ok(Ok(())) => debug!(step = "sink", path = %sink.path.display(), "token file written"),
            Ok(Err(e)) => {
                warn!(step = "sink", path = %sink.path.display(), error = %e, "cannot write token file")
            }
            Err(e) => {
                warn!(step = "sink", path = %sink.path.display(), error = %e, "token file writer failed")
            }
        }
    }
}
