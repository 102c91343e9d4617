//! A whole session on this machine, over loopback: one source and one node
//! per target, each node reading its copy back to check it. `ka demo` runs
//! it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use ka_core::config::{NodeConfig, SourceConfig};
use ka_core::source::{Source, SourceEvent};
use ka_net::shell::{self, ImageInput, NodeOptions, SourceOptions, Target};

use super::runtime;
use super::secret::{self, Secret};
use super::serve::Report;

/// Serves the file `image` to one node per target (named `node00`,
/// `node01`, …) under a fresh secret; `observe` sees the source as in
/// [`super::serve::run`]. Returns the source's report once every node has
/// left.
pub fn run(
    image: &Path,
    targets: &[PathBuf],
    observe: impl FnMut(&Source, Option<&SourceEvent>),
) -> anyhow::Result<Report> {
    let session = "demo".to_string();
    let key = secret::key(&Secret::generate(), &session);
    let rt = runtime()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("listening on loopback")?;
        let addr = listener.local_addr()?;
        let nodes = u32::try_from(targets.len()).context("too many nodes")?;
        let config = SourceConfig::new(session.clone(), nodes, addr);
        let (_go, go_rx) = tokio::sync::mpsc::unbounded_channel();
        let opts = SourceOptions {
            config,
            image: ImageInput::File(image.to_path_buf()),
            key: key.clone(),
            state_dir: None,
            max_rate: None,
        };
        let source = shell::run_source(opts, listener, go_rx, observe);
        let mut nodes = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            let mut config = NodeConfig::new(
                session.clone(),
                format!("node{i:02}"),
                SocketAddr::from(([127, 0, 0, 1], 0)),
            );
            config.verify_readback = true;
            let opts = NodeOptions {
                config,
                server: addr,
                target: Target::File(target.clone()),
                key: key.node_key(&session, &format!("node{i:02}")),
                listen_ip: IpAddr::from([127, 0, 0, 1]),
                data_port: 0,
                wait: Duration::from_secs(30),
                state_dir: None,
                rediscover: None,
                log: None,
                packed_spool: None,
            };
            nodes.push(tokio::spawn(shell::run_node(opts, |_, _| {})));
        }
        let report = source.await.map_err(|e| anyhow!("{e}"))?;
        for n in nodes {
            let _ = n.await;
        }
        anyhow::Ok(report)
    })
}
