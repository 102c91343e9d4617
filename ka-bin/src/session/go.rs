//! Starting a waiting session now, with the nodes present (the original
//! Ka's `-g`).

use std::time::Duration;

use anyhow::anyhow;

use super::reach::Reach;
use super::runtime;

/// What the source answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    /// Whether this request started the session (`false`: it was already
    /// running, or no node has joined yet).
    pub now: bool,
    /// How many nodes it runs with.
    pub nodes: u32,
}

/// Asks the source of `reach`'s session to start now; it is looked for by
/// broadcast for up to 10 s when not named.
pub fn start(reach: &Reach) -> anyhow::Result<Started> {
    let key = reach.root_key()?;
    let rt = runtime()?;
    let operator = ka_core::auth::operator_key(&key);
    let asker = ka_core::auth::Asker::Operator;
    let server = reach.locate(&rt, Duration::from_secs(10), asker, operator)?;
    let (now, nodes) = rt
        .block_on(ka_net::shell::go(server, &reach.session, &key))
        .map_err(|e| anyhow!(e))?;
    Ok(Started { now, nodes })
}
