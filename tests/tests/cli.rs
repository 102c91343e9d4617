//! The `ka` command line as an administrator meets it: `ka --version`
//! naming exactly what runs, the environment variables behind every
//! `--inventory` and `--secret-file`, and `ka tftp` telling systemd it is
//! ready (the packaged ka-tftp.service is `Type=notify`).

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ka_tests::{ka_bin, run, stderr, stdout, write_inventory, write_secret, ChildGuard};

/// Runs `ka args` with `env` set, and KA_INVENTORY and KA_SECRET_FILE
/// otherwise unset (whatever the shell running the tests exported).
fn ka_with_env(args: &[&str], env: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = Command::new(ka_bin());
    cmd.args(args)
        .env_remove("KA_INVENTORY")
        .env_remove("KA_SECRET_FILE");
    for (name, value) in env {
        cmd.env(name, value);
    }
    run(&mut cmd, Duration::from_secs(60))
}

#[test]
fn version_names_the_crate_the_protocol_and_the_commit() {
    let head = Command::new("git")
        .args(["rev-parse", "--short=7", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git is needed to know which commit ka --version must name");
    assert!(
        head.status.success(),
        "the tests run in a git checkout: {}",
        stderr(&head)
    );
    let o = ka_with_env(&["--version"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim_end(),
        format!(
            "ka {} (protocol {}, revision {})",
            env!("CARGO_PKG_VERSION"),
            ka_core::codec::PROTOCOL_VERSION,
            stdout(&head).trim()
        )
    );
}

#[test]
fn the_inventory_comes_from_ka_inventory_unless_given() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = write_inventory(dir.path(), "");
    let state = dir.path().join("state");
    let missing = dir.path().join("missing.toml");
    let show = ["pxe", "show", "--state-dir", state.to_str().unwrap()];

    let o = ka_with_env(&show, &[("KA_INVENTORY", &inventory)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("n01") && stdout(&o).contains("n04"),
        "{}",
        stdout(&o)
    );

    let o = ka_with_env(&show, &[("KA_INVENTORY", &missing)]);
    assert!(!o.status.success(), "a missing inventory was accepted");
    assert!(stderr(&o).contains("missing.toml"), "{}", stderr(&o));

    // The flag wins over the variable.
    let mut with_flag = show.to_vec();
    with_flag.extend(["-i", inventory.to_str().unwrap()]);
    let o = ka_with_env(&with_flag, &[("KA_INVENTORY", &missing)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("n01"), "{}", stdout(&o));
}

#[test]
fn the_secret_file_comes_from_ka_secret_file_unless_given() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    write_secret(&secret, 71);
    let missing = dir.path().join("missing.secret");
    let derive = ["key", "derive", "--session", "t", "--name", "n01"];

    let o = ka_with_env(&derive, &[("KA_SECRET_FILE", &secret)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let from_env = stdout(&o);
    assert!(from_env.starts_with("ka-node-key"), "{from_env}");

    let mut with_flag = derive.to_vec();
    with_flag.extend(["--secret-file", secret.to_str().unwrap()]);
    let o = ka_with_env(&with_flag, &[("KA_SECRET_FILE", &missing)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        from_env,
        "the flag and the variable name one file"
    );

    let o = ka_with_env(&derive, &[("KA_SECRET_FILE", &missing)]);
    assert!(!o.status.success(), "a missing secret file was accepted");
    assert!(stderr(&o).contains("missing.secret"), "{}", stderr(&o));
}

#[test]
fn tftp_tells_systemd_it_is_ready_once_its_socket_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = write_inventory(dir.path(), "");
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("binding the notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let child = Command::new(ka_bin())
        .arg("tftp")
        .arg("-i")
        .arg(&inventory)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting ka tftp");
    let mut server = ChildGuard {
        child,
        what: "ka tftp".into(),
    };
    let mut buf = [0u8; 256];
    let n = notify
        .recv(&mut buf)
        .expect("ka tftp sent nothing to NOTIFY_SOCKET within 20 s");
    let message = String::from_utf8_lossy(&buf[..n]);
    assert!(
        message.lines().any(|l| l == "READY=1"),
        "not a readiness notice: {message:?}"
    );
    // Ready means serving: the address it listens on is already out.
    let mut first_line = String::new();
    let stdout = server.child.stdout.as_mut().unwrap();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut first_line).unwrap();
    assert!(
        first_line.contains("127.0.0.1:"),
        "ka tftp said {first_line:?}"
    );
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "ka tftp ended after saying it was ready"
    );
}
