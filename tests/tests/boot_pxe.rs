//! `ka pxe` and the inventory, through the real binary.

use std::fs;

use ka_bin::boot::{BootState, Inventory, Mode};
use ka_tests::{ka, stderr, stdout, write_inventory};

fn example() -> String {
    format!(
        "{}/../docs/examples/cluster.toml",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn the_documented_example_loads() {
    let inv = Inventory::load(example()).unwrap();
    assert_eq!(inv.nodes.len(), 16);
    assert_eq!(
        inv.node("node012").unwrap().ip.to_string(),
        "192.168.10.112"
    );
    assert_eq!(
        inv.node("gpu2").unwrap().mac.to_string(),
        "3c:ec:ef:10:07:42"
    );
    let rack2: Vec<&str> = inv
        .select(&["@rack2"], false)
        .unwrap()
        .iter()
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(
        rack2,
        ["node007", "node008", "node009", "node010", "node011", "node012", "gpu1"]
    );
}

#[test]
fn set_and_show_round_trip_through_the_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let inv = write_inventory(dir.path(), "");
    let (inv_s, state) = (inv.to_str().unwrap(), dir.path().join("state"));
    let state_s = state.to_str().unwrap();
    let o = ka(&[
        "pxe",
        "set",
        "--inventory",
        inv_s,
        "--state-dir",
        state_s,
        "--mode",
        "install",
        "n[01-02]",
        "n04",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("3 node(s) now boot install: n01 n02 n04"),
        "{}",
        stdout(&o)
    );

    let o = ka(&["pxe", "show", "--json", "-i", inv_s, "--state-dir", state_s]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let modes: Vec<(&str, &str)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["mode"].as_str().unwrap()))
        .collect();
    assert_eq!(
        modes,
        [
            ("n01", "install"),
            ("n02", "install"),
            ("n03", "local"),
            ("n04", "install")
        ]
    );
    assert!(rows[0]["since"].as_str().unwrap().ends_with('Z'));
    assert!(rows[2]["since"].is_null());
    assert_eq!(rows[1]["mac"], "52:54:00:09:00:02");
    assert_eq!(rows[1]["ip"], "10.9.0.12");

    let o = ka(&["pxe", "show", "-i", inv_s, "--state-dir", state_s]);
    let table = stdout(&o);
    assert!(
        table.starts_with("NODE  MAC                IP         MODE     SINCE\n"),
        "{table}"
    );
    assert!(
        table.contains("\nn03   52:54:00:09:00:03  10.9.0.13  local    -\n"),
        "{table}"
    );

    // The library sees what the command wrote, and the source's hook flips a node.
    let inventory = Inventory::load(&inv).unwrap();
    let boot = BootState::new(&state);
    assert_eq!(boot.load().unwrap().get("n02").mode, Mode::Install);
    assert_eq!(
        boot.clone_verified(&inventory, "n02").unwrap(),
        Some(Mode::Local)
    );
    let o = ka(&["pxe", "show", "--json", "-i", inv_s, "--state-dir", state_s]);
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows[1]["mode"], "local");
}

#[test]
fn unknown_names_fail_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let inv = write_inventory(dir.path(), "");
    let (inv_s, state) = (inv.to_str().unwrap(), dir.path().join("state"));
    let state_s = state.to_str().unwrap();
    let o = ka(&[
        "pxe",
        "set",
        "-i",
        inv_s,
        "--state-dir",
        state_s,
        "--mode",
        "install",
        "n01",
        "n[04-06]",
        "@nope",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("n05, n06, @nope") && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(
        !state.join("boot-modes.json").exists(),
        "state written despite the error"
    );
    // No node named and no --all: clap refuses before anything happens.
    let o = ka(&[
        "pxe",
        "set",
        "-i",
        inv_s,
        "--state-dir",
        state_s,
        "--mode",
        "install",
    ]);
    assert!(!o.status.success());
}

#[test]
fn a_broken_inventory_is_reported_with_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "\n[[node]]\nname = \"x1\"\nmac = \"52:54:00:09:00:03\"\nip = \"10.9.0.99\"\n";
    let inv = write_inventory(dir.path(), extra);
    let o = ka(&[
        "pxe",
        "show",
        "-i",
        inv.to_str().unwrap(),
        "--state-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    let text = fs::read_to_string(&inv).unwrap();
    let line = text
        .lines()
        .position(|l| l == "mac = \"52:54:00:09:00:03\"")
        .unwrap()
        + 1;
    let want = format!(
        "{}:{line}:7: node.mac: MAC 52:54:00:09:00:03 of `x1` is already used by `n03`",
        inv.display()
    );
    assert!(err.contains(&want), "wanted {want}\ngot {err}");

    let missing = ka(&["pxe", "show", "-i", "/nonexistent/cluster.toml"]);
    assert!(
        stderr(&missing).contains("cannot read inventory /nonexistent/cluster.toml"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn render_prints_what_tftp_serves() {
    let dir = tempfile::tempdir().unwrap();
    let inv = write_inventory(dir.path(), "");
    let (inv_s, state_s) = (inv.to_str().unwrap(), dir.path().to_str().unwrap());
    assert!(ka(&[
        "pxe",
        "set",
        "-i",
        inv_s,
        "--state-dir",
        state_s,
        "-m",
        "install",
        "n03"
    ])
    .status
    .success());
    let o = ka(&["pxe", "render", "-i", inv_s, "--state-dir", state_s, "n03"]);
    assert!(
        stdout(&o).contains("ka.name=n03 ka.target=/dev/vda ka.mode=install"),
        "{}",
        stdout(&o)
    );
    let o = ka(&[
        "pxe",
        "render",
        "--ipxe",
        "-i",
        inv_s,
        "--state-dir",
        state_s,
        "n03",
    ]);
    assert!(stdout(&o).starts_with("#!ipxe\n"), "{}", stdout(&o));
}
