//! Entry points for fuzzers: every decoder of ka-net that reads bytes from
//! outside, driven from arbitrary bytes.
//!
//! Nothing a peer, a client or a file sends may panic ka (DESIGN.md,
//! "Trust"). Each function here feeds `data` to one decoder the way ka
//! does and ignores the result: an error is a fine answer to garbage, a
//! panic (or an allocation out of proportion to the input) is a bug. The
//! integration tests run them under proptest on every build and under a
//! coverage-guided fuzzer where one is installed (`scripts/fuzz`).

use std::time::Duration;

use crate::system::{disk, layout_file::LayoutFile, stream, Plan};
use crate::tftp::packet;
use crate::tftp::transfer::{self, Limits};

/// A TFTP datagram as the server's listener reads it, and the options of a
/// request as the server negotiates them for a file of every size class.
pub fn tftp_packet(data: &[u8]) {
    let Some(packet::Packet::Request(req)) = packet::parse(data) else {
        return;
    };
    let limits = Limits {
        timeout: Duration::from_secs(2),
        max_client_timeout: 5,
        block_size: 1468,
        window_size: 16,
        retries: 5,
        lifetime: Duration::from_secs(600),
    };
    for size in [0, 1, 511, 512, 1 << 20, u64::MAX] {
        let _ = transfer::negotiate(&req.options, &limits, size);
    }
    let _ = crate::tftp::clean_path(std::path::Path::new(&req.filename));
}

/// A system stream as a node's decoder reads it, in pieces cut where the
/// first byte says, as the network would deliver them.
pub fn system_stream(data: &[u8]) {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(cut).max(1);
    let mut decoder = stream::Decoder::new();
    let mut on = |event: stream::Event<'_>| {
        if let stream::Event::Plan(json) = event {
            system_plan(&json);
        }
        Ok(())
    };
    for chunk in rest.chunks(piece) {
        if decoder.feed(chunk, &mut on).is_err() {
            return;
        }
    }
}

/// A system plan (the JSON a system stream starts with), read and checked
/// as a node does before it touches a disk: its layout file parsed and
/// checked against the layout, and every disk planned onto a 64 GiB target
/// with 512-byte sectors.
pub fn system_plan(json: &[u8]) {
    let Ok(plan) = serde_json::from_slice::<Plan>(json) else {
        return;
    };
    let layout_file = match plan.layout_file.as_deref().map(LayoutFile::parse) {
        Some(Ok(lf)) => Some(lf),
        Some(Err(_)) => return,
        None => None,
    };
    if let Some(lf) = &layout_file {
        if lf.check(&plan.layout).is_err() {
            return;
        }
    }
    for (i, src) in plan.layout.disks.iter().enumerate() {
        let _ = disk::plan_disk(src, 64 << 30, 512, layout_file.as_ref(), i);
    }
}

/// A layout file (`ka serve --system --layout FILE`), as text.
pub fn layout_file(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = LayoutFile::parse(text);
    }
}
