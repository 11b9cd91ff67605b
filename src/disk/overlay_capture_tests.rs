use std::sync::Arc;

use super::*;
use crate::disk::BlockBackend;
use crate::disk::mem::MemBackend;
use crate::store::local::{LocalStore, LocalStoreOptions};
use crate::util::testutil::{Rng, TempDir};

const DISK: usize = 1 << 20;

fn base() -> Arc<dyn BlockBackend> {
    let mut data = vec![0u8; DISK];
    Rng::new(7).fill(&mut data);
    Arc::new(
        MemBackend::from_vec(data)
            .with_read_only(true)
            .with_name("base"),
    )
}

fn disk_bytes(b: &dyn BlockBackend) -> Vec<u8> {
    let mut out = vec![0u8; b.size() as usize];
    b.read_at(&mut out, 0).unwrap();
    out
}

#[test]
fn capture_then_prepare_reproduces_the_disk() {
    let dir = TempDir::new("ovcap");
    let store = LocalStore::open(dir.path().join("store"), LocalStoreOptions::default()).unwrap();
    let base = base();
    let ov = OverlayBackend::open(&dir.path().join("a"), base.clone()).unwrap();
    ov.write_at(&[1u8; 100], 5000).unwrap(); // partial block: merged with the base
    ov.write_at(&[0u8; 8192], 200 << 10).unwrap(); // zeros: bitmap only, no chunk
    ov.write_at(&[9u8; 70000], 900 << 10).unwrap(); // spans two chunks
    ov.flush().unwrap();
    let (m, touched, stats) = capture(&ov, &store, None).unwrap();
    assert!(touched.iter().any(|&w| w != 0));
    assert_eq!(stats.chunks_read, 4);
    assert_eq!(m.chunks.len(), 3, "the all-zero span is not stored");
    let want = disk_bytes(&ov);

    let b_path = dir.path().join("b");
    let p = prepare(&b_path, &ov.identity().inner.unwrap(), &m, &store).unwrap();
    assert_eq!(p, Prepared::Written { moved_aside: None });
    let ov_b = OverlayBackend::open(&b_path, base.clone()).unwrap();
    assert_eq!(disk_bytes(&ov_b), want);
    assert_eq!(ov_b.bitmap(), m.bitmap);
    drop(ov_b);
    // Preparing again finds it already right.
    let p = prepare(&b_path, &ov.identity().inner.unwrap(), &m, &store).unwrap();
    assert_eq!(p, Prepared::Kept);
}

#[test]
fn incremental_capture_reads_only_written_spans() {
    let dir = TempDir::new("ovinc");
    let store = LocalStore::open(dir.path().join("store"), LocalStoreOptions::default()).unwrap();
    let ov = OverlayBackend::open(&dir.path().join("a"), base()).unwrap();
    for i in 0..8u64 {
        ov.write_at(&[i as u8 + 1; 4096], i * (64 << 10)).unwrap();
    }
    let (m1, t1, _) = capture(&ov, &store, None).unwrap();
    ov.clear_touched(&t1);
    ov.write_at(&[0xee; 512], 3 * (64 << 10) + 512).unwrap();
    let (m2, t2, s2) = capture(&ov, &store, Some(&m1)).unwrap();
    assert_eq!(s2.chunks_read, 1);
    assert_eq!(s2.chunks_reused, 7);
    assert_eq!(s2.chunks_new, 1);
    // The same as a full capture.
    let (full, _, _) = capture(&ov, &store, None).unwrap();
    assert_eq!(m2, full);
    assert_ne!(m1, m2);
    ov.clear_touched(&t2);
    assert!(ov.touched().iter().all(|&w| w == 0));
}

#[test]
fn a_differing_overlay_is_moved_aside_not_lost() {
    let dir = TempDir::new("ovaside");
    let store = LocalStore::open(dir.path().join("store"), LocalStoreOptions::default()).unwrap();
    let base = base();
    let path = dir.path().join("a");
    let ov = OverlayBackend::open(&path, base.clone()).unwrap();
    ov.write_at(&[5u8; 4096], 0).unwrap();
    ov.flush().unwrap();
    let (m, _, _) = capture(&ov, &store, None).unwrap();
    let snap_bytes = disk_bytes(&ov);
    ov.write_at(&[6u8; 4096], 4096).unwrap(); // after the snapshot
    ov.flush().unwrap();
    let later = disk_bytes(&ov);
    let id = ov.identity().inner.unwrap();
    drop(ov);
    let Prepared::Written {
        moved_aside: Some(aside),
    } = prepare(&path, &id, &m, &store).unwrap()
    else {
        panic!("expected the overlay to be moved aside")
    };
    let restored = OverlayBackend::open(&path, base.clone()).unwrap();
    assert_eq!(disk_bytes(&restored), snap_bytes);
    let old = OverlayBackend::open(&aside, base.clone()).unwrap();
    assert_eq!(disk_bytes(&old), later);
}

#[test]
fn bad_manifests_and_missing_chunks_are_errors() {
    let dir = TempDir::new("ovbad");
    let store = LocalStore::open(dir.path().join("store"), LocalStoreOptions::default()).unwrap();
    let base = base();
    let ov = OverlayBackend::open(&dir.path().join("a"), base.clone()).unwrap();
    ov.write_at(&[5u8; 4096], 0).unwrap();
    let (m, _, _) = capture(&ov, &store, None).unwrap();
    let id = ov.identity().inner.unwrap();
    let mut bad = m.clone();
    bad.bitmap.pop();
    assert!(matches!(
        prepare(&dir.path().join("x"), &id, &bad, &store),
        Err(CaptureError::Invalid(_))
    ));
    let mut bad = m.clone();
    bad.chunks.push((1 << 40, m.chunks[0].1));
    assert!(matches!(
        prepare(&dir.path().join("x"), &id, &bad, &store),
        Err(CaptureError::Invalid(_))
    ));
    let empty = LocalStore::open(dir.path().join("empty"), LocalStoreOptions::default()).unwrap();
    let e = prepare(&dir.path().join("y"), &id, &m, &empty).unwrap_err();
    assert!(matches!(e, CaptureError::Store(_)), "{e:?}");
}
