//! How a node or `ka go` reaches a session's source: by name, or found by
//! UDP broadcast (the original Ka's way, for nodes that boot before the
//! source).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context};
use ka_core::auth::{Asker, Mac};
use ka_net::shell::discovery;
use ka_net::{NodeKey, SessionKey};

use super::{secret, DEFAULT_PORT};

/// Where discovery broadcasts go unless told otherwise.
pub const DEFAULT_DISCOVER_TO: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::BROADCAST), DEFAULT_PORT);

/// A session, its secret, and how to reach its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    /// The source, HOST or HOST:PORT; `None`: found by broadcast.
    pub server: Option<String>,
    /// Where discovery broadcasts go when `server` is `None`.
    pub discover_to: SocketAddr,
    /// The session's name.
    pub session: String,
    /// The file holding the session secret, or a node's own key.
    pub secret_file: PathBuf,
}

impl Reach {
    /// The session's root key, from the secret file: what the operator
    /// holds (`ka go`). A node's key does not give it.
    pub(crate) fn root_key(&self) -> anyhow::Result<SessionKey> {
        let secret = secret::load(&self.secret_file)?;
        Ok(secret::key(&secret, &self.session))
    }

    /// What node `name` holds, from the key file: derived from the secret,
    /// or the node's own key.
    pub(crate) fn node_key(&self, name: &str) -> anyhow::Result<NodeKey> {
        secret::node_key(&self.secret_file, &self.session, name)
    }

    /// The source's address: as given, or found by broadcast within `wait`,
    /// believing only an answer that proves `key`, the key of `asker`.
    pub(crate) fn locate(
        &self,
        rt: &tokio::runtime::Runtime,
        wait: Duration,
        asker: Asker<'_>,
        key: Box<dyn Mac>,
    ) -> anyhow::Result<SocketAddr> {
        if let Some(s) = &self.server {
            return resolve(s);
        }
        crate::errln!(
            "ka: looking for the source of session {:?} by broadcast to {}",
            self.session,
            self.discover_to
        );
        let found = rt
            .block_on(discovery::find(
                &self.session,
                asker,
                key,
                self.discover_to,
                wait,
            ))
            .map_err(|e| anyhow!(e))?;
        crate::errln!("ka: found the source at {found}");
        Ok(found)
    }

    /// Where to look for the source again once it is lost: the broadcast
    /// address when it was found that way, `None` when it was named.
    pub(crate) fn rediscover(&self) -> Option<SocketAddr> {
        self.server.is_none().then_some(self.discover_to)
    }
}

/// The address of `server` (HOST or HOST:PORT; the port defaults to
/// [`DEFAULT_PORT`]).
pub fn resolve(server: &str) -> anyhow::Result<SocketAddr> {
    let with_port = if server.contains(':') {
        server.to_string()
    } else {
        format!("{server}:{DEFAULT_PORT}")
    };
    with_port
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {server}"))?
        .next()
        .ok_or_else(|| anyhow!("{server} has no address"))
}
