//! A VM whose disk is a lazy remote image (served by a real nginx) with a persistent overlay:
//! the snapshot captures the overlay's content, so a restore brings the disk back to the
//! snapshot's moment even if the overlay was written after it (the newer overlay is moved
//! aside, not lost), and a clone restored onto a fresh overlay path sees the same disk.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::env::temp_dir;
use support::nginx::{Nginx, nginx_available};
use support::tiny;
use support::tiny::{Scenario, Spec};
use vmm::config::BlockConfig;
use vmm::disk::BlockBackend;
use vmm::disk::http::{LazyHttpOptions, open_remote_disk};

const DISK: usize = 2 << 20;

/// Opens the remote image with `overlay` as the VMM would, outside any VM.
fn open(url: &str, cache: &Path, overlay: &Path) -> std::sync::Arc<dyn BlockBackend> {
    let opts = LazyHttpOptions {
        cache_dir: Some(cache.to_path_buf()),
        ..Default::default()
    };
    open_remote_disk(url, opts, Some(overlay))
        .expect("open remote disk")
        .1
}

fn contents(url: &str, cache: &Path, overlay: &Path) -> Vec<u8> {
    let d = open(url, cache, overlay);
    let mut buf = vec![0u8; DISK];
    d.read_at(&mut buf, 0).expect("read disk");
    buf
}

#[test]
fn snapshot_of_a_vm_on_a_remote_disk_restores_with_its_overlay() {
    if !support::env::kvm_or_skip() || !nginx_available() {
        return;
    }
    let tmp = temp_dir("tiny-remote");
    let src = tmp.join("src.img");
    let base = support::rng::random_bytes(7, DISK);
    std::fs::write(&src, &base).unwrap();
    let archive = tmp.join("archive");
    vmm::image::import_image(&src, &archive, "img", vmm::image::DEFAULT_IMAGE_CHUNK_SIZE)
        .expect("import");
    let nginx = Nginx::start(&archive);
    let url = format!("{}/images/img", nginx.url());
    let cache = tmp.join("cache");
    let disk = |overlay: &str| BlockConfig {
        url: Some(url.clone()),
        cache: Some(cache.clone()),
        overlay: Some(tmp.join(overlay)),
        ..Default::default()
    };
    // Guest writes before the snapshot, as the overlay holds them.
    {
        let d = open(&url, &cache, &tmp.join("a.overlay"));
        d.write_at(b"written before the snapshot", 4096).unwrap();
        d.write_at(&[0xab; 70000], 1 << 20).unwrap();
        d.flush().unwrap();
    }
    let at_snapshot = contents(&url, &cache, &tmp.join("a.overlay"));
    assert_ne!(at_snapshot, base);

    let mut vm = tiny::boot(Spec::new(Scenario::SnapDirty), vec![disk("a.overlay")]).expect("boot");
    support::tiny::snap::wait_dirty_ready(&mut vm, Instant::now() + Duration::from_secs(120))
        .expect("ready");
    let snap = tmp.join("snap");
    let report = vm.snapshot(&snap, None).expect("snapshot");
    let ov = report.overlays[0].expect("overlay captured");
    assert!(ov.chunks_new >= 2, "overlay capture stored {ov:?}");
    drop(vm);

    // Straight back: the overlay already holds the snapshot's content and is kept.
    let r =
        tiny::restore(&snap, None, true).expect("restore with the same remote disk and overlay");
    assert_eq!(
        r.vmm.machine.remote.len(),
        1,
        "the remote disk was not re-attached"
    );
    drop(r);
    assert_eq!(contents(&url, &cache, &tmp.join("a.overlay")), at_snapshot);

    // Written after the snapshot: restoring brings the disk back; the newer overlay is
    // moved aside, intact.
    {
        let d = open(&url, &cache, &tmp.join("a.overlay"));
        d.write_at(b"written after the snapshot", 4096).unwrap();
        d.write_at(&[0xcd; 4096], 1536 << 10).unwrap();
        d.flush().unwrap();
    }
    let after = contents(&url, &cache, &tmp.join("a.overlay"));
    drop(tiny::restore(&snap, None, true).expect("restore over a newer overlay"));
    assert_eq!(
        contents(&url, &cache, &tmp.join("a.overlay")),
        at_snapshot,
        "the restored overlay is not the snapshot's"
    );
    let aside: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with("a.overlay.pre-restore-") && !n.ends_with(".map")
        })
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "expected one moved-aside overlay: {aside:?}"
    );
    assert_eq!(
        contents(&url, &cache, &aside[0]),
        after,
        "the newer overlay was not kept"
    );

    // A clone on a fresh overlay path sees the snapshot's disk; the base is unchanged.
    let r = tiny::restore(&snap, Some(vec![disk("clone.overlay")]), true)
        .expect("restore onto a fresh overlay");
    drop(r);
    assert_eq!(
        contents(&url, &cache, &tmp.join("clone.overlay")),
        at_snapshot
    );
    assert_eq!(std::fs::read(&src).unwrap(), base);
}
