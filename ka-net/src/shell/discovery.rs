//! Finding the source of a session by UDP broadcast, as the original did.
//!
//! Nodes often boot before anyone types `ka serve`, and an install image
//! should not need the source's address baked in. A node broadcasts
//! `KA-DISCOVER 1 <session>` to the ka port every second; a source serving
//! that session answers `KA-HERE 1 <session> <tcp port>` from its address.
//! Discovery proves nothing: the join that follows proves the secret.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

const ASK: &str = "KA-DISCOVER 1 ";
const ANSWER: &str = "KA-HERE 1 ";

/// Answers discovery requests for `session` arriving on UDP `bind`, naming
/// `tcp_port`, until the returned task is aborted.
pub async fn answer(
    bind: SocketAddr,
    session: String,
    tcp_port: u16,
) -> std::io::Result<JoinHandle<()>> {
    let socket = UdpSocket::bind(bind).await?;
    Ok(tokio::spawn(async move {
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            let asked = std::str::from_utf8(&buf[..n])
                .ok()
                .and_then(|t| t.strip_prefix(ASK));
            if asked == Some(session.as_str()) {
                let reply = format!("{ANSWER}{session} {tcp_port}");
                let _ = socket.send_to(reply.as_bytes(), from).await;
            }
        }
    }))
}

/// Broadcasts for the source of `session` to `to` (normally the broadcast
/// address and the ka port) every second until a source answers or `wait`
/// passes; returns the source's TCP address.
pub async fn find(session: &str, to: SocketAddr, wait: Duration) -> Result<SocketAddr, String> {
    let socket = UdpSocket::bind(("0.0.0.0", 0))
        .await
        .map_err(|e| format!("opening a UDP socket: {e}"))?;
    socket
        .set_broadcast(true)
        .map_err(|e| format!("enabling broadcast: {e}"))?;
    let ask = format!("{ASK}{session}");
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 512];
    while tokio::time::Instant::now() < deadline {
        if let Err(e) = socket.send_to(ask.as_bytes(), to).await {
            tracing::debug!(error = %e, "discovery broadcast failed; retrying");
        }
        let round = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Ok((n, from))) =
            tokio::time::timeout_at(round.min(deadline), socket.recv_from(&mut buf)).await
        {
            let text = std::str::from_utf8(&buf[..n]).unwrap_or("");
            let Some(rest) = text.strip_prefix(ANSWER) else {
                continue;
            };
            let Some((name, port)) = rest.rsplit_once(' ') else {
                continue;
            };
            if name == session {
                if let Ok(port) = port.parse::<u16>() {
                    return Ok(SocketAddr::new(from.ip(), port));
                }
            }
        }
    }
    Err(format!(
        "no source of session {session:?} answered at {to} within {wait:?}: start `ka serve --session {session}` on this network, or pass --server"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_node_finds_its_session_and_not_another() {
        let port = UdpSocket::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let bind = SocketAddr::from(([127, 0, 0, 1], port));
        let task = answer(bind, "lab".into(), 4321).await.unwrap();
        let found = find("lab", bind, Duration::from_secs(5)).await.unwrap();
        assert_eq!(found, SocketAddr::from(([127, 0, 0, 1], 4321)));
        let err = find("other", bind, Duration::from_millis(1500))
            .await
            .unwrap_err();
        assert!(err.contains("no source of session"), "{err}");
        task.abort();
    }
}
