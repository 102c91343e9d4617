//! `ka demo`: the whole job on this machine: a generated image cloned onto
//! local nodes over loopback, every copy checked independently of the
//! protocol's digests, and the report.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::display::{human, print_report, Display};
use super::serve::exit_status;
use super::ExitStatus;
use crate::session::local;

/// `ka demo`: the whole job on this machine.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 4)]
    pub nodes: u32,
    /// Image size (e.g. 256MiB, 1GiB).
    #[arg(long, default_value = "256MiB", value_parser = ka_core::units::parse_size)]
    pub size: u64,
    /// Keep the work directory (image and copies) instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

/// Runs `ka demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<ExitStatus> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let dir = tempfile::Builder::new()
        .prefix("ka-demo-")
        .tempdir()
        .context("creating a work directory")?;
    let image = dir.path().join("image.img");
    crate::errln!(
        "ka demo: writing a {} image with data, zero runs and a sparse hole to {}",
        human(args.size),
        image.display()
    );
    make_demo_image(&image, args.size)?;
    let targets: Vec<PathBuf> = (0..args.nodes)
        .map(|i| dir.path().join(format!("node{i:02}.img")))
        .collect();
    let mut display = Display::new(false);
    let report = local::run(&image, &targets, |s, e| display.update(s, e));
    display.finish();
    let report = report?;
    print_report(&report, false);
    // Check every copy ourselves, independently of the protocol's digests.
    let want = file_digest(&image)?;
    let mut identical = 0;
    for t in &targets {
        match file_digest(t) {
            Ok(d) if d == want => identical += 1,
            Ok(_) => crate::errln!("ka demo: {} differs from the image", t.display()),
            Err(e) => crate::errln!("ka demo: {}: {e:#}", t.display()),
        }
    }
    let allocated = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap_or(0)
    };
    crate::outln!(
        "independent check: {identical}/{} copies byte-identical to the image ({} on disk each of {} logical: zeros were never written)",
        targets.len(),
        human(allocated(&targets[0])),
        human(args.size)
    );
    if args.keep {
        let kept = dir.keep();
        crate::outln!("kept the image and copies in {}", kept.display());
    }
    Ok(
        if identical == targets.len() && exit_status(&report) == ExitStatus::Success {
            ExitStatus::Success
        } else {
            ExitStatus::SomeFailed
        },
    )
}

/// A demo image like a used disk: stretches of incompressible data, stretches
/// of text, runs of written zeros, and a never-written hole in the middle.
fn make_demo_image(path: &Path, size: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    let chunk = 1u64 << 20;
    let mut buf = vec![0u8; chunk as usize];
    let mut xof = blake3::Hasher::new()
        .update(b"ka demo image")
        .finalize_xof();
    let hole = (size / 2)..(size / 2 + size / 8);
    let mut off = 0u64;
    let mut i = 0u64;
    while off < size {
        let len = chunk.min(size - off) as usize;
        if !hole.contains(&off) {
            match i % 8 {
                // Zeros written as bytes: the source finds them by scanning.
                3 => buf[..len].fill(0),
                5 => {
                    let line =
                        format!("ka demo block {i}: the quick brown fox jumps over the lazy dog\n");
                    for (j, b) in buf[..len].iter_mut().enumerate() {
                        *b = line.as_bytes()[j % line.len()];
                    }
                }
                _ => xof.fill(&mut buf[..len]),
            }
            f.write_all_at(&buf[..len], off)?;
        }
        off += len as u64;
        i += 1;
    }
    f.sync_all()?;
    Ok(())
}

fn file_digest(path: &Path) -> anyhow::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    h.update_mmap(path)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(*h.finalize().as_bytes())
}
