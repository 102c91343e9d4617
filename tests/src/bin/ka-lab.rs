//! `ka-lab`: builds a network-namespace lab (`ka_tests::lab`) with `ka serve`
//! waiting on its source, prints what it made, and holds it until
//! interrupted; then the lab removes everything it made.
//!
//! For a developer, a lab to look into by hand (`ip netns exec <namespace>
//! …`); for the tests, a lab in a process of its own that they can interrupt
//! or kill (tests/tests/lab_cleanup.rs).
//!
//! Usage: `ka-lab [NODES] [--disk]` (default 2 nodes), as root. It prints
//! one line per item, `netns NAME`, `dir PATH`, `serve-pid PID`, then
//! `ready`. With `--disk`, it also attaches a loop disk in the work
//! directory and mounts an ext4 file system of it there, as a system
//! clone's source does, and prints `loop DEVICE` and `mount PATH`.

use std::time::Duration;

use ka_tests::lab::{Lab, Rate};
use ka_tests::system::{bash, Loop, Mount};

fn main() {
    let mut nodes = 2;
    let mut disk = false;
    for arg in std::env::args().skip(1) {
        if arg == "--disk" {
            disk = true;
        } else {
            nodes = arg.parse().unwrap_or_else(|_| {
                eprintln!("ka-lab: give a number of nodes (1 to 200) and/or --disk, not {arg:?}");
                std::process::exit(2)
            });
        }
    }
    let lab = Lab::new(nodes, Rate::mbit(100));
    // Held until the process ends: only the lab's own removal releases them.
    let _disk = disk.then(|| {
        let dev = Loop::blank(&lab.dir().join("disk.img"), 16 << 20);
        bash(r#"mkfs.ext4 -q -F "$1""#, &[dev.dev()]);
        let mount = Mount::new(dev.dev(), &lab.dir().join("mnt"), &[]);
        println!("loop {}", dev.dev());
        println!("mount {}", mount.0.display());
        (dev, mount)
    });
    let session = lab.session(1 << 20);
    let serve = session.serve(nodes, &[]);
    // Ready only once `ka serve` runs in its namespace: until `ip netns
    // exec` has entered it, the process is in no lab namespace, and an
    // interruption right then would leave it running outside the lab.
    serve.proc.wait_stderr_line(
        "that it is waiting for nodes",
        Duration::from_secs(30),
        |l| l.contains("waiting for"),
    );
    let mut namespaces: Vec<&str> = vec![lab.source().netns.as_str()];
    namespaces.extend(lab.nodes().iter().map(|h| h.netns.as_str()));
    namespaces.push(lab.switch_netns());
    for ns in namespaces {
        println!("netns {ns}");
    }
    println!("dir {}", lab.dir().display());
    println!("serve-pid {}", serve.proc.pid());
    println!("ready");
    eprintln!(
        "ka-lab: holding the lab until interrupted (Ctrl-C); enter a host with `ip netns exec {} bash`",
        lab.source().netns
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
