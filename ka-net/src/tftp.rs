//! A read-only TFTP server for network boot, on top of `async-tftp`.
//!
//! It serves the files of one directory (pxelinux.0, ldlinux.c32, kernels,
//! initramfs, iPXE binaries) plus files generated per request by a
//! [`GeneratedFiles`] provider — in ka, the per-node pxelinux configs and iPXE
//! scripts rendered from the inventory and the current boot modes. Generated
//! files are never written to disk, so a mode change is served on the very
//! next request.
//!
//! Safety: write requests are refused; a requested path must be relative and
//! free of `..`, and after symlinks are resolved it must still lie inside the
//! root, so nothing outside the root can be read.
//!
//! Options: `blksize` (RFC 2348), `tsize` and `timeout` (RFC 2349), and
//! `windowsize` (RFC 7440) are negotiated by `async-tftp`; ka reports every
//! file's size, so `tsize` always works.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_tftp::packet;
use futures_lite::AsyncRead;

/// Files a TFTP server generates instead of reading them from its root.
pub trait GeneratedFiles: Send + Sync + 'static {
    /// The content of `path` (relative, `/`-separated, already checked to be
    /// free of `..`) for `client`, or `None` to serve the file from the root.
    fn generate(&self, path: &str, client: SocketAddr) -> Option<Vec<u8>>;
}

impl<F> GeneratedFiles for F
where
    F: Fn(&str, SocketAddr) -> Option<Vec<u8>> + Send + Sync + 'static,
{
    fn generate(&self, path: &str, client: SocketAddr) -> Option<Vec<u8>> {
        self(path, client)
    }
}

/// No generated files: a plain read-only directory server.
pub fn no_generated_files() -> Arc<dyn GeneratedFiles> {
    Arc::new(|_: &str, _: SocketAddr| None)
}

/// How to run the server.
#[derive(Debug, Clone)]
pub struct TftpConfig {
    /// Address to listen on; port 69 is the TFTP port.
    pub listen: SocketAddr,
    /// Directory served.
    pub root: PathBuf,
    /// Retransmission timeout (clients may negotiate their own).
    pub timeout: Duration,
    /// Largest block size granted, if limited (some networks cannot carry
    /// fragmented UDP, and blocks above MTU-32 fragment).
    pub block_size_limit: Option<u16>,
    /// Largest window granted, if limited.
    pub window_size_limit: Option<u16>,
}

impl TftpConfig {
    /// Defaults for serving `root` on `listen`.
    pub fn new(listen: SocketAddr, root: impl Into<PathBuf>) -> TftpConfig {
        TftpConfig {
            listen,
            root: root.into(),
            timeout: Duration::from_secs(2),
            block_size_limit: None,
            window_size_limit: None,
        }
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum TftpError {
    /// The root is not a readable directory.
    #[error("TFTP root {}: {source} (create it or point boot.tftp_root at it)", path.display())]
    Root {
        /// The root given.
        path: PathBuf,
        /// Why it is unusable.
        source: std::io::Error,
    },
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source} (port 69 needs root or CAP_NET_BIND_SERVICE; is another TFTP server running?)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("TFTP server: {0}")]
    Serve(#[from] async_tftp::Error),
}

/// A bound, not yet running TFTP server.
pub struct TftpServer {
    inner: async_tftp::server::TftpServer<Handler>,
    addr: SocketAddr,
}

impl TftpServer {
    /// Binds the socket and checks the root; [`TftpServer::serve`] runs it.
    pub async fn bind(
        config: TftpConfig,
        generated: Arc<dyn GeneratedFiles>,
    ) -> Result<TftpServer, TftpError> {
        let root = std::fs::canonicalize(&config.root).map_err(|source| TftpError::Root {
            path: config.root.clone(),
            source,
        })?;
        if !root.is_dir() {
            return Err(TftpError::Root {
                path: config.root,
                source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        let socket =
            std::net::UdpSocket::bind(config.listen).map_err(|source| TftpError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = socket.local_addr().map_err(|source| TftpError::Bind {
            addr: config.listen,
            source,
        })?;
        let mut builder =
            async_tftp::server::TftpServerBuilder::with_handler(Handler { root, generated })
                .std_socket(socket)?
                .timeout(config.timeout);
        if let Some(b) = config.block_size_limit {
            builder = builder.block_size_limit(b);
        }
        if let Some(w) = config.window_size_limit {
            builder = builder.window_size_limit(w);
        }
        Ok(TftpServer {
            inner: builder.build().await?,
            addr,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves requests until an unrecoverable socket error. Each transfer
    /// runs in its own task with its own socket, so clients do not wait on
    /// each other.
    pub async fn serve(self) -> Result<(), TftpError> {
        self.inner.serve().await?;
        Ok(())
    }
}

struct Handler {
    /// Canonical root: every served file must resolve inside it.
    root: PathBuf,
    generated: Arc<dyn GeneratedFiles>,
}

/// The request path as a clean relative `/`-separated path, or why not.
pub fn clean_path(path: &Path) -> Result<String, &'static str> {
    let s = path.to_str().ok_or("not UTF-8")?;
    if s.is_empty() {
        return Err("empty path");
    }
    if s.starts_with('/') {
        // tftpd-hpa without -s would read /etc/… here; a boot server never
        // needs that, so absolute paths are refused outright.
        return Err("absolute path");
    }
    if s.contains('\\') || s.contains('\0') {
        return Err("backslash or NUL in path");
    }
    let mut parts = Vec::new();
    for c in Path::new(s).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str().ok_or("not UTF-8")?),
            Component::CurDir => {}
            Component::ParentDir => return Err("`..` in path"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    if parts.is_empty() {
        return Err("empty path");
    }
    Ok(parts.join("/"))
}

type Reader = Box<dyn AsyncRead + Unpin + Send>;

impl async_tftp::server::Handler for Handler {
    type Reader = Reader;
    type Writer = futures_lite::io::Sink;

    async fn read_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
    ) -> Result<(Reader, Option<u64>), packet::Error> {
        let rel = clean_path(path).map_err(|why| {
            tracing::warn!(%client, path = %path.display(), why, "TFTP request refused");
            packet::Error::PermissionDenied
        })?;
        if let Some(data) = self.generated.generate(&rel, *client) {
            tracing::info!(%client, path = rel, bytes = data.len(), "TFTP generated");
            let len = data.len() as u64;
            return Ok((Box::new(futures_lite::io::Cursor::new(data)), Some(len)));
        }
        let root = self.root.clone();
        let opened =
            blocking::unblock(move || open_inside(&root, &rel).map(|(f, len)| (f, len, rel))).await;
        match opened {
            Ok((file, len, rel)) => {
                tracing::info!(%client, path = rel, bytes = len, "TFTP file");
                Ok((Box::new(blocking::Unblock::new(file)), Some(len)))
            }
            Err(e) => {
                tracing::info!(%client, path = %path.display(), error = ?e, "TFTP request failed");
                Err(e)
            }
        }
    }

    async fn write_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
        _size: Option<u64>,
    ) -> Result<Self::Writer, packet::Error> {
        tracing::warn!(%client, path = %path.display(), "TFTP write refused: the server is read-only");
        Err(packet::Error::Msg("read-only server".into()))
    }
}

/// Opens `rel` under `root` for reading, refusing anything that resolves
/// (through symlinks) outside the root or is not a regular file.
fn open_inside(root: &Path, rel: &str) -> Result<(std::fs::File, u64), packet::Error> {
    let real = std::fs::canonicalize(root.join(rel)).map_err(|_| packet::Error::FileNotFound)?;
    if !real.starts_with(root) {
        return Err(packet::Error::PermissionDenied);
    }
    let file = std::fs::File::open(&real).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => packet::Error::PermissionDenied,
        _ => packet::Error::FileNotFound,
    })?;
    let meta = file.metadata().map_err(|_| packet::Error::FileNotFound)?;
    if !meta.is_file() {
        return Err(packet::Error::FileNotFound);
    }
    Ok((file, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_path_accepts_relative_and_refuses_escapes() {
        assert_eq!(clean_path(Path::new("pxelinux.0")).unwrap(), "pxelinux.0");
        assert_eq!(clean_path(Path::new("./a//b/./c")).unwrap(), "a/b/c");
        for bad in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/..",
            "",
            ".",
            "a\\..\\b",
        ] {
            assert!(clean_path(Path::new(bad)).is_err(), "{bad}");
        }
    }

    /// Starts a server for `root` with one generated file on its own thread
    /// (the server is executor-agnostic) and returns its address.
    fn start(root: &Path) -> SocketAddr {
        let root = root.to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            futures_lite::future::block_on(async move {
                let generated: Arc<dyn GeneratedFiles> =
                    Arc::new(|path: &str, client: SocketAddr| {
                        (path == "gen/hello").then(|| format!("hello {}", client.ip()).into_bytes())
                    });
                let config = TftpConfig::new("127.0.0.1:0".parse().unwrap(), root);
                let server = TftpServer::bind(config, generated).await.unwrap();
                tx.send(server.local_addr()).unwrap();
                server.serve().await.unwrap();
            })
        });
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    /// Sends a request (`opcode` 1 read, 2 write) and returns the first reply.
    fn request(
        server: SocketAddr,
        opcode: u8,
        path: &str,
    ) -> (std::net::UdpSocket, SocketAddr, Vec<u8>) {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut pkt = vec![0, opcode];
        pkt.extend_from_slice(path.as_bytes());
        pkt.extend_from_slice(b"\0octet\0");
        sock.send_to(&pkt, server).unwrap();
        let mut buf = [0u8; 1024];
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        (sock, from, buf[..n].to_vec())
    }

    #[test]
    fn serves_generated_and_disk_files_and_refuses_the_rest() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("disk.txt"), "on disk").unwrap();
        let server = start(root.path());

        let (sock, from, reply) = request(server, 1, "gen/hello");
        assert_eq!(reply, b"\0\x03\0\x01hello 127.0.0.1", "one DATA block");
        sock.send_to(&[0, 4, 0, 1], from).unwrap();

        let (sock, from, reply) = request(server, 1, "./disk.txt");
        assert_eq!(reply, b"\0\x03\0\x01on disk");
        sock.send_to(&[0, 4, 0, 1], from).unwrap();

        for (opcode, path, code) in [
            (1, "../etc/passwd", 2),
            (1, "/etc/passwd", 2),
            (1, "missing", 1),
            (2, "upload", 0),
        ] {
            let (_, _, reply) = request(server, opcode, path);
            assert_eq!(&reply[..4], &[0, 5, 0, code], "{path}: {reply:?}");
        }
    }

    #[test]
    fn open_inside_refuses_symlinks_out_and_directories() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "x").unwrap();
        std::fs::write(root.path().join("ok"), "hello").unwrap();
        std::fs::create_dir(root.path().join("dir")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("leak"))
            .unwrap();
        std::os::unix::fs::symlink("ok", root.path().join("alias")).unwrap();
        let root = std::fs::canonicalize(root.path()).unwrap();
        assert_eq!(open_inside(&root, "ok").unwrap().1, 5);
        assert_eq!(open_inside(&root, "alias").unwrap().1, 5);
        assert!(matches!(
            open_inside(&root, "leak"),
            Err(packet::Error::PermissionDenied)
        ));
        assert!(matches!(
            open_inside(&root, "dir"),
            Err(packet::Error::FileNotFound)
        ));
        assert!(matches!(
            open_inside(&root, "nope"),
            Err(packet::Error::FileNotFound)
        ));
    }
}
