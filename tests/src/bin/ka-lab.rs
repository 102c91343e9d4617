//! `ka-lab`: builds a network-namespace lab (`ka_tests::lab`) with `ka serve`
//! waiting on its source, prints what it made, and holds it until
//! interrupted; then the lab removes everything it made.
//!
//! For a developer, a lab to look into by hand (`ip netns exec <namespace>
//! …`); for the tests, a lab in a process of its own that they can interrupt
//! or kill (tests/tests/lab_cleanup.rs).
//!
//! Usage: `ka-lab [NODES]` (default 2), as root. It prints one line per item,
//! `netns NAME`, `dir PATH`, `serve-pid PID`, then `ready`.

use std::time::Duration;

use ka_tests::lab::{Lab, Rate};

fn main() {
    let nodes: usize = match std::env::args().nth(1) {
        None => 2,
        Some(n) => n.parse().unwrap_or_else(|_| {
            eprintln!("ka-lab: NODES must be a number of nodes, 1 to 200, not {n:?}");
            std::process::exit(2)
        }),
    };
    let lab = Lab::new(nodes, Rate::mbit(100));
    let session = lab.session(1 << 20);
    let serve = session.serve(nodes, &[]);
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
