//! Each netbooting node's own key, handed out by `ka tftp`.
//!
//! A node in install mode needs a key to join its session. Handing every
//! node the session secret (baked into the image, or one file in the TFTP
//! root) would give it to anyone who can send a TFTP request, and with it
//! the power to pose as the source and as every node. So `ka tftp`, given
//! the secret (`--secret-file`), generates each node's own key
//! ([`ka_net::NodeKey`]) on request, at [`key_path`], and hands it out
//! only:
//!
//! - for a node of the inventory, asked for under its own name;
//! - to that node's inventory address (the request's source address);
//! - while that node is in `install` mode: once its clone is verified and
//!   the source flips it to `local`, or before an administrator sets it to
//!   `install`, its key is not served.
//!
//! Every other request for a path under [`KEYS_DIR`] is refused and
//! logged, and nothing under it is ever read from the TFTP root. What this
//! cannot protect (TFTP has no authentication and no confidentiality) is
//! in `docs/netboot.md`: anyone who can claim an install-mode node's address
//! before the node does, or watch the boot network, can take that node's key
//! — and act as that node, and only as it.

use std::net::{IpAddr, SocketAddr};

use ka_net::shell::{session_key, Secret};
use ka_net::tftp::Generated;

use super::inventory::Inventory;
use super::modes::{Mode, Modes};

/// The TFTP directory the keys are served from (never read from disk).
pub const KEYS_DIR: &str = "ka/keys";

/// The TFTP path of node `name`'s key: what a netbooting node asks for by
/// default (`ka.secret=tftp`).
pub fn key_path(name: &str) -> String {
    format!("{KEYS_DIR}/{name}.key")
}

/// What `ka tftp` answers for `path` asked for by `client`: `FromRoot` for
/// a path outside [`KEYS_DIR`]; the key of the node it names, if every rule
/// of the module holds; a refusal with the reason otherwise. `secret` is
/// `None` when `ka tftp` was started without one.
pub fn answer(
    inv: &Inventory,
    modes: &Modes,
    secret: Option<&Secret>,
    path: &str,
    client: SocketAddr,
) -> Generated {
    let Some(file) = path
        .strip_prefix(KEYS_DIR)
        .and_then(|p| p.strip_prefix('/'))
    else {
        return Generated::FromRoot;
    };
    let Some(node) = file.strip_suffix(".key").and_then(|name| inv.node(name)) else {
        return Generated::Refused(format!(
            "{path} names no node of the inventory (a node's key is {})",
            key_path("NAME")
        ));
    };
    let Some(secret) = secret else {
        return Generated::Refused(format!(
            "{} asked for its key, but ka tftp was started without the session secret: pass --secret-file",
            node.name
        ));
    };
    if client.ip() != IpAddr::V4(node.ip) {
        return Generated::Refused(format!(
            "{}'s key asked for from {}, not from its address {}",
            node.name,
            client.ip(),
            node.ip
        ));
    }
    let mode = modes.get(&node.name).mode;
    if mode != Mode::Install {
        return Generated::Refused(format!(
            "{}'s key asked for while it is in {mode} mode: keys go to install-mode nodes only (ka pxe set --mode install {})",
            node.name, node.name
        ));
    }
    let session = &inv.session.name;
    let key = session_key(secret, session).node_key(session, &node.name);
    Generated::File(key.to_text().into_bytes())
}

/// Whether a file of the TFTP root holds a key (the session secret, or a
/// node's key), which `ka tftp` then refuses to serve: anything in the root
/// goes to whoever asks. `content` is the file's first bytes.
pub fn is_key_file(content: &[u8]) -> bool {
    std::str::from_utf8(content).is_ok_and(|text| ka_net::shell::KeyFile::from_text(text).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::modes::BootState;
    use ka_net::shell::KeyFile;
    use proptest::prelude::*;

    fn inventory(dir: &std::path::Path) -> Inventory {
        let text = r#"
[network]
subnet = "10.0.0.0/24"
[boot]
server = "10.0.0.1"
tftp_root = "tftp"
kernel = "ka/vmlinuz"
initramfs = "ka/initramfs.img"
[session]
name = "lab"
source = "10.0.0.1:4715"
disk = "/dev/vda"
[[node]]
name = "n1"
mac = "52:54:00:00:00:01"
ip = "10.0.0.11"
[[node]]
name = "n2"
mac = "52:54:00:00:00:02"
ip = "10.0.0.12"
"#;
        let path = dir.join("cluster.toml");
        std::fs::write(&path, text).unwrap();
        Inventory::load(&path).unwrap()
    }

    fn from(ip: [u8; 4]) -> SocketAddr {
        SocketAddr::from((ip, 2000))
    }

    #[test]
    fn a_node_in_install_mode_gets_its_own_key_at_its_own_address_only() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory(dir.path());
        let state = BootState::new(dir.path().join("state"));
        state
            .set_modes(&inv, &["n1", "n2"], false, Mode::Install)
            .unwrap();
        let modes = state.load().unwrap();
        let secret = Secret([7; 32]);
        let ask = |path: &str, client| answer(&inv, &modes, Some(&secret), path, client);
        let Generated::File(text) = ask("ka/keys/n1.key", from([10, 0, 0, 11])) else {
            panic!("n1 was refused its key");
        };
        let key = KeyFile::from_text(std::str::from_utf8(&text).unwrap()).unwrap();
        let want = session_key(&secret, "lab").node_key("lab", "n1");
        assert_eq!(key, KeyFile::Node(want));
        // Another node's key, asked for from n1's address.
        assert!(matches!(
            ask("ka/keys/n2.key", from([10, 0, 0, 11])),
            Generated::Refused(why) if why.contains("not from its address")
        ));
        // From an address no node has.
        assert!(matches!(
            ask("ka/keys/n1.key", from([10, 0, 0, 99])),
            Generated::Refused(_)
        ));
        // Names that are not nodes, and paths that try to be clever.
        for path in [
            "ka/keys/n3.key",
            "ka/keys/n1",
            "ka/keys/",
            "ka/keys/n1.key.key",
        ] {
            assert!(
                matches!(ask(path, from([10, 0, 0, 11])), Generated::Refused(_)),
                "{path}"
            );
        }
        assert_eq!(ask("ka/vmlinuz", from([10, 0, 0, 11])), Generated::FromRoot);
        // Without the secret, nothing.
        assert!(matches!(
            answer(&inv, &modes, None, "ka/keys/n1.key", from([10, 0, 0, 11])),
            Generated::Refused(why) if why.contains("--secret-file")
        ));
    }

    #[test]
    fn a_node_that_left_install_mode_gets_no_key() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory(dir.path());
        let state = BootState::new(dir.path().join("state"));
        let secret = Secret([7; 32]);
        // n1 asks for its key from its own address, in its mode of the moment.
        let n1_asks = || {
            let modes = state.load().unwrap();
            answer(
                &inv,
                &modes,
                Some(&secret),
                "ka/keys/n1.key",
                from([10, 0, 0, 11]),
            )
        };
        // Never set: it boots local, and gets nothing.
        assert!(matches!(
            n1_asks(),
            Generated::Refused(why) if why.contains("local mode")
        ));
        state
            .set_modes(&inv, &["n1"], false, Mode::Install)
            .unwrap();
        assert!(matches!(n1_asks(), Generated::File(_)));
        // Its clone verified: flipped to local, no key any more.
        state.set_modes(&inv, &["n1"], false, Mode::Local).unwrap();
        assert!(matches!(n1_asks(), Generated::Refused(_)));
        // A shell is for repairs, not for joining.
        state.set_modes(&inv, &["n1"], false, Mode::Shell).unwrap();
        assert!(matches!(n1_asks(), Generated::Refused(_)));
    }

    #[test]
    fn key_files_are_recognised_and_other_files_are_not() {
        assert!(is_key_file(Secret([1; 32]).to_hex().as_bytes()));
        let node = session_key(&Secret([1; 32]), "s").node_key("s", "n");
        assert!(is_key_file(node.to_text().as_bytes()));
        assert!(!is_key_file(b"DEFAULT ka\n"));
        assert!(!is_key_file(&[0xff, 0xfe]));
    }

    proptest! {
        #[test]
        fn any_path_under_the_keys_directory_is_answered_without_panic(rest in "[ -~]{0,80}") {
            let dir = tempfile::tempdir().unwrap();
            let inv = inventory(dir.path());
            let modes = Modes::default();
            let path = format!("{KEYS_DIR}/{rest}");
            let answer = answer(&inv, &modes, Some(&Secret([7; 32])), &path, from([10, 0, 0, 11]));
            // Nobody is in install mode: nothing is ever handed out.
            prop_assert!(matches!(answer, Generated::Refused(_)));
        }
    }
}
