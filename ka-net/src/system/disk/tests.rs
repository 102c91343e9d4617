//! `plan_disk` and the other pure parts of disk rebuilding: no root needed.

use super::*;
use crate::system::layout::{MakeOptions, PartitionLayout};

const GIB: u64 = 1 << 30;
const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const SWAP: &str = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";

fn part(number: u32, start: u64, size: u64, type_id: &str, content: Content) -> PartitionLayout {
    PartitionLayout {
        number,
        start,
        size,
        type_id: type_id.into(),
        uuid: Some(format!("00000000-0000-0000-0000-00000000000{number}")),
        name: Some(format!("part{number}")),
        attrs: None,
        bootable: false,
        content,
        device: None,
    }
}

fn tree(kind: FsKind, mountpoint: &str, used: u64) -> Content {
    Content::Tree(FileSystem {
        kind,
        uuid: "uuid".into(),
        label: None,
        mountpoint: mountpoint.into(),
        options: "defaults".into(),
        used,
        excludes: vec![],
        make: MakeOptions::default(),
        mounted_at: None,
    })
}

fn raw() -> Content {
    Content::Raw { why: "test".into() }
}

fn swap() -> Content {
    Content::Swap {
        uuid: None,
        label: None,
    }
}

/// The 1 GiB GPT disk of the loop-device tests: BIOS boot, ESP (raw),
/// / on ext4, /home on xfs, swap last.
fn gpt_disk() -> DiskLayout {
    DiskLayout {
        device: "/dev/sda".into(),
        size: GIB,
        sector_size: 512,
        table: TableKind::Gpt,
        id: "D69ADCA2-FACB-524D-9B76-9B3B7D12BB03".into(),
        first_lba: Some(2048),
        last_lba: Some(2097118),
        partitions: vec![
            part(1, 2048, 2048, BIOS_BOOT, raw()),
            part(2, 4096, 131072, ESP, raw()),
            part(3, 135168, 524288, LINUX, tree(FsKind::Ext4, "/", 50 * MIB)),
            part(
                4,
                659456,
                655360,
                LINUX,
                tree(FsKind::Xfs, "/home", 10 * MIB),
            ),
            part(5, 1314816, 780288, SWAP, swap()),
        ],
    }
}

/// A DOS disk: / primary and bootable, an extended partition with /home
/// and swap as logical partitions.
fn dos_disk() -> DiskLayout {
    let mut root = part(1, 2048, 409600, "83", tree(FsKind::Ext4, "/", 100 * MIB));
    root.bootable = true;
    let mut parts = vec![
        root,
        part(
            2,
            411648,
            600064,
            "5",
            Content::Skipped {
                why: "extended".into(),
            },
        ),
        part(
            5,
            413696,
            204800,
            "83",
            tree(FsKind::Ext4, "/home", 20 * MIB),
        ),
        part(6, 620544, 391168, "82", swap()),
    ];
    for p in &mut parts {
        p.uuid = None;
        p.name = None;
    }
    DiskLayout {
        device: "/dev/vda".into(),
        size: 1011712 * 512,
        sector_size: 512,
        table: TableKind::Dos,
        id: "0x1234abcd".into(),
        first_lba: None,
        last_lba: None,
        partitions: parts,
    }
}

fn spans(plan: &DiskPlan) -> Vec<(u32, u64, u64)> {
    plan.partitions
        .iter()
        .map(|p| (p.number, p.start, p.size))
        .collect()
}

/// Asserts what every plan must be: in order on disk, not overlapping,
/// inside the usable area.
fn assert_sane(plan: &DiskPlan, first: u64, limit: u64) {
    let mut parts: Vec<_> = plan.partitions.clone();
    parts.sort_by_key(|p| p.start);
    for w in parts.windows(2) {
        assert!(w[0].start + w[0].size <= w[1].start, "overlap: {parts:?}");
    }
    assert!(parts[0].start >= first, "{parts:?}");
    let end = parts.iter().map(|p| p.start + p.size).max().unwrap();
    assert!(end <= limit, "ends at {end} past {limit}: {parts:?}");
}

#[test]
fn same_size_disk_gets_the_sources_table() {
    let src = gpt_disk();
    let plan = plan_disk(&src, GIB, 512, None, 0).unwrap();
    let source: Vec<_> = src
        .partitions
        .iter()
        .map(|p| (p.number, p.start, p.size))
        .collect();
    assert_eq!(spans(&plan), source);
    assert_eq!(plan.first_lba, Some(2048));
    assert_eq!(plan.sector_size, 512);
}

#[test]
fn larger_disk_grows_the_last_partition_to_a_mib_boundary() {
    let src = gpt_disk();
    let plan = plan_disk(&src, 2 * GIB, 512, None, 0).unwrap();
    let limit = 2 * GIB / 512 - 33; // backup header and 128 entries
    assert_sane(&plan, 2048, limit);
    // Everything but the last keeps its place.
    assert_eq!(
        spans(&plan)[..4],
        spans(&plan_disk(&src, GIB, 512, None, 0).unwrap())[..4]
    );
    let last = plan.partitions[4];
    assert_eq!(last.start, 1314816);
    let end = last.start + last.size;
    assert_eq!(end % 2048, 0, "ends on a MiB boundary");
    assert!(
        limit - end < 2048,
        "uses the disk: ends at {end}, limit {limit}"
    );
    assert!(last.size > 780288);
}

#[test]
fn fill_from_the_layout_file_grows_that_partition_and_moves_the_rest() {
    let src = gpt_disk();
    let file = LayoutFile::parse("[disk.0]\n3 = \"fill\"\n2 = \"128MiB\"\n").unwrap();
    let plan = plan_disk(&src, 4 * GIB, 512, Some(&file), 0).unwrap();
    let limit = 4 * GIB / 512 - 33;
    assert_sane(&plan, 2048, limit);
    let by = |n: u32| {
        plan.partitions
            .iter()
            .find(|p| p.number == n)
            .copied()
            .unwrap()
    };
    assert_eq!((by(1).start, by(1).size), (2048, 2048));
    assert_eq!(by(2).size, 128 * MIB / 512, "the file's size");
    for n in [2, 3, 4, 5] {
        assert_eq!(
            by(n).start % 2048,
            0,
            "partition {n} starts on a MiB boundary"
        );
    }
    // 4 and 5 keep their sizes, packed after 3, which takes the rest.
    assert_eq!(by(4).size, 655360);
    assert_eq!(by(5).size, 780288);
    assert_eq!(by(4).start, by(3).start + by(3).size);
    let end = by(5).start + by(5).size;
    assert!(limit - end < 2048, "the disk is used: {end} of {limit}");
    assert!(by(3).size > 3 * GIB / 512);
}

#[test]
fn a_listed_last_partition_without_fill_does_not_grow() {
    let src = gpt_disk();
    let file = LayoutFile::parse("[disk.0]\n5 = \"100MiB\"\n").unwrap();
    let plan = plan_disk(&src, 4 * GIB, 512, Some(&file), 0).unwrap();
    assert_eq!(plan.partitions[4].size, 100 * MIB / 512);
    // Other disks of the layout are not this file's business.
    let plan1 = plan_disk(&src, 4 * GIB, 512, Some(&file), 1).unwrap();
    assert!(plan1.partitions[4].size > 3 * GIB / 512);
}

#[test]
fn smaller_disk_shrinks_the_last_partition_while_its_data_fits() {
    let mut src = gpt_disk();
    src.partitions.truncate(3);
    // / last, 256 MiB with 50 MiB used: may shrink to 50 + 5 + 64 MiB.
    let plan = plan_disk(&src, 200 * MIB, 512, None, 0).unwrap();
    let root = plan.partitions[2];
    assert!(root.size < 524288, "shrunk: {root:?}");
    assert!(root.size * 512 >= min_tree_bytes(50 * MIB));
    assert_sane(&plan, 2048, 200 * MIB / 512 - 33);
}

#[test]
fn xfs_shrinks_no_smaller_than_mkfs_makes_it() {
    let mut src = gpt_disk();
    src.partitions.truncate(4);
    // /home last, 320 MiB with 10 MiB used: xfs needs 300 MB all the same.
    let msg = plan_disk(&src, 500 * MIB, 512, None, 0)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("partition 4 (xfs /home)") && msg.contains("smallest xfs"),
        "{msg}"
    );
    let plan = plan_disk(&src, 620 * MIB, 512, None, 0).unwrap();
    assert!(plan.partitions[3].size * 512 >= 300_000_000);
    assert!(plan.partitions[3].size < 655360);
}

/// The exact byte count in a message's "needs at least X (N bytes)".
fn needed_in(msg: &str) -> u64 {
    let rest = &msg[msg.find("needs at least").expect(msg)..];
    let open = rest.find('(').unwrap();
    let close = rest.find(" bytes)").unwrap();
    rest[open + 1..close].parse().unwrap()
}

#[test]
fn too_small_a_disk_is_refused_with_the_sizes() {
    let mut src = gpt_disk();
    src.partitions.truncate(3);
    // / last, 150 MiB used: needs 150 + 15 + 64 = 229 MiB at least.
    if let Content::Tree(fs) = &mut src.partitions[2].content {
        fs.used = 150 * MIB;
    }
    let err = plan_disk(&src, 200 * MIB, 512, None, 0).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Plan(_)), "{msg}");
    assert!(
        msg.contains("a disk of 200.0 MiB"),
        "the disk's size: {msg}"
    );
    assert!(msg.contains("partition 3 (ext4 /)"), "the partition: {msg}");
    assert!(msg.contains("needs 229.0 MiB"), "what it needs: {msg}");
    assert!(msg.contains("150.0 MiB used"), "why: {msg}");
    // The size it says the disk needs is enough, and a MiB less is not.
    let needed = needed_in(&msg);
    assert!(needed > 66 * MIB + 229 * MIB, "{msg}");
    plan_disk(&src, needed, 512, None, 0).unwrap();
    plan_disk(&src, needed - MIB, 512, None, 0).unwrap_err();
}

#[test]
fn partitions_before_the_fill_past_the_end_are_refused() {
    // BIOS boot, ESP, / and /home end at 642 MiB; the disk has 400.
    let src = gpt_disk();
    let msg = plan_disk(&src, 400 * MIB, 512, None, 0)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("a disk of 400.0 MiB"), "{msg}");
    assert!(
        msg.contains("partition 4 (xfs /home) would end past the usable end"),
        "{msg}"
    );
    let needed = needed_in(&msg);
    assert!(needed >= 643 * MIB, "{msg}");
    plan_disk(&src, needed, 512, None, 0).unwrap();
}

#[test]
fn raw_partitions_keep_their_size() {
    let src = gpt_disk();
    let file =
        LayoutFile::parse("[disk.0]\n# too small for the ESP's bytes\n2 = \"32MiB\"\n").unwrap();
    let msg = plan_disk(&src, 2 * GIB, 512, Some(&file), 0)
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("layout file line 3:"), "{msg}");
    assert!(msg.contains("partition 2 (sent as bytes)"), "{msg}");
    assert!(msg.contains("64.0 MiB"), "{msg}");
}

#[test]
fn a_tree_sized_below_its_data_is_refused_naming_the_line() {
    let src = gpt_disk();
    let file = LayoutFile::parse("[disk.0]\n3 = \"64MiB\"\n").unwrap();
    let msg = plan_disk(&src, 2 * GIB, 512, Some(&file), 0)
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("layout file line 2:"), "{msg}");
    assert!(
        msg.contains("partition 3 (ext4 /) would get 64.0 MiB"),
        "{msg}"
    );
    assert!(msg.contains("(50.0 MiB used + 10 % + 64 MiB)"), "{msg}");
}

#[test]
fn a_layout_file_naming_a_missing_partition_is_refused() {
    let src = gpt_disk();
    let file = LayoutFile::parse("[disk.0]\n\n9 = \"1GiB\"\n").unwrap();
    let msg = plan_disk(&src, 2 * GIB, 512, Some(&file), 0)
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("layout file line 3: disk.0.9"), "{msg}");
    let layout = crate::system::Layout {
        disks: vec![src],
        ignored: vec![],
    };
    let msg = file.check(&layout).unwrap_err().to_string();
    assert!(
        msg.contains("line 3") && msg.contains("no partition 9"),
        "{msg}"
    );
    let msg = LayoutFile::parse("[disk.1]\n1 = \"fill\"\n")
        .unwrap()
        .check(&layout)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("line 1") && msg.contains("no disk 1") && msg.contains("/dev/sda"),
        "{msg}"
    );
}

#[test]
fn dos_logical_partition_grows_with_its_extended_partition() {
    let src = dos_disk();
    let plan = plan_disk(&src, 2 * GIB, 512, None, 0).unwrap();
    let by = |n: u32| {
        plan.partitions
            .iter()
            .find(|p| p.number == n)
            .copied()
            .unwrap()
    };
    assert_eq!((by(1).start, by(1).size), (2048, 409600));
    assert_eq!((by(5).start, by(5).size), (413696, 204800));
    let swap = by(6);
    assert_eq!(swap.start, 620544);
    let end = swap.start + swap.size;
    assert!(2 * GIB / 512 - end < 2048 && end % 2048 == 0, "{end}");
    assert_eq!(by(2).start, 411648);
    assert_eq!(
        by(2).start + by(2).size,
        end,
        "the extended partition holds the grown one"
    );
}

#[test]
fn dos_logical_partitions_laid_out_anew_leave_room_for_their_table_sectors() {
    let src = dos_disk();
    let file = LayoutFile::parse("[disk.0]\n1 = \"1GiB\"\n5 = \"fill\"\n").unwrap();
    let plan = plan_disk(&src, 4 * GIB, 512, Some(&file), 0).unwrap();
    let by = |n: u32| {
        plan.partitions
            .iter()
            .find(|p| p.number == n)
            .copied()
            .unwrap()
    };
    assert_eq!(by(1).size, GIB / 512);
    let ext = by(2);
    assert_eq!(
        ext.start,
        by(1).start + by(1).size,
        "the extended partition follows /"
    );
    assert!(
        by(5).start > ext.start,
        "a table sector before the first logical"
    );
    let home_end = by(5).start + by(5).size;
    assert!(by(6).start > home_end, "a table sector between logicals");
    assert_eq!(by(6).size, 391168);
    assert_eq!(ext.start + ext.size, by(6).start + by(6).size);
    assert!(ext.start + ext.size <= 4 * GIB / 512);
}

#[test]
fn dos_stops_at_two_tib() {
    let src = dos_disk();
    let plan = plan_disk(&src, 4 << 40, 512, None, 0).unwrap();
    let swap = plan.partitions[3];
    assert!(swap.start + swap.size <= 1 << 32, "{swap:?}");
}

#[test]
fn four_kib_sectors_convert_sizes_and_keep_alignment() {
    let src = gpt_disk();
    let plan = plan_disk(&src, 2 * GIB, 4096, None, 0).unwrap();
    assert_eq!(plan.sector_size, 4096);
    assert_eq!(plan.first_lba, Some(256));
    let limit = 2 * GIB / 4096 - 5;
    assert_sane(&plan, 256, limit);
    for (p, s) in plan.partitions.iter().zip(&src.partitions).take(4) {
        assert_eq!(
            p.size * 4096,
            s.size * 512,
            "partition {} keeps its bytes",
            p.number
        );
        assert_eq!(p.start % 256, 0);
    }
}

#[test]
fn bad_sector_sizes_are_refused() {
    assert!(plan_disk(&gpt_disk(), GIB, 1000, None, 0).is_err());
    let mut src = gpt_disk();
    src.sector_size = 0;
    assert!(plan_disk(&src, GIB, 512, None, 0).is_err());
}

#[test]
fn partition_paths_follow_the_kernels_names() {
    for (disk, n, want) in [
        ("/dev/sda", 1, "/dev/sda1"),
        ("/dev/vdb", 12, "/dev/vdb12"),
        ("/dev/nvme0n1", 1, "/dev/nvme0n1p1"),
        ("/dev/loop0", 3, "/dev/loop0p3"),
        ("/dev/mmcblk0", 2, "/dev/mmcblk0p2"),
    ] {
        assert_eq!(partition_path(Path::new(disk), n), PathBuf::from(want));
    }
}

#[test]
fn sfdisk_script_carries_ids_names_attributes_and_boot_flag() {
    let mut src = gpt_disk();
    src.partitions[0].attrs = Some("LegacyBIOSBootable GUID:63".into());
    let plan = plan_disk(&src, 2 * GIB, 512, None, 0).unwrap();
    let script = sfdisk_script(Path::new("/dev/loop7"), &src, &plan).unwrap();
    assert!(
        script.starts_with(
            "label: gpt\nlabel-id: D69ADCA2-FACB-524D-9B76-9B3B7D12BB03\nfirst-lba: 2048\n"
        ),
        "{script}"
    );
    assert!(script.contains(&format!(
        "/dev/loop7p1 : start=2048, size=2048, type={BIOS_BOOT}, uuid=00000000-0000-0000-0000-000000000001, name=\"part1\", attrs=\"LegacyBIOSBootable GUID:63\"\n"
    )), "{script}");
    assert!(
        !script.contains("last-lba"),
        "sfdisk computes it for the node's disk: {script}"
    );

    let dos = dos_disk();
    let plan = plan_disk(&dos, 2 * GIB, 512, None, 0).unwrap();
    let script = sfdisk_script(Path::new("/dev/sdb"), &dos, &plan).unwrap();
    assert!(
        script.starts_with("label: dos\nlabel-id: 0x1234abcd\nunit: sectors\n"),
        "{script}"
    );
    assert!(
        script.contains("/dev/sdb1 : start=2048, size=409600, type=83, bootable\n"),
        "{script}"
    );
    assert!(script.contains("/dev/sdb5 : start=413696"), "{script}");

    src.partitions[1].name = Some("a \"quoted\" name".into());
    let msg = sfdisk_script(
        Path::new("/dev/sda"),
        &src,
        &plan_disk(&src, GIB, 512, None, 0).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("partition 2") && msg.contains("quote"),
        "{msg}"
    );
}

#[test]
fn option_words_from_a_layout_are_checked() {
    assert!(is_option_word("metadata_csum"));
    assert!(is_option_word("crc=1"));
    assert!(!is_option_word("-O"));
    assert!(!is_option_word("crc=1,x"));
    assert!(!is_option_word("a b"));
    assert!(!is_option_word("crc="));
}
