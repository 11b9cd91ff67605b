//! Tests of the local chunk store, in both layouts.
use super::*;
use crate::util::testutil::{Rng, TempDir};

fn open(dir: &TempDir, compression: Compression) -> LocalStore {
    LocalStore::open(
        dir.path().join("store"),
        LocalStoreOptions {
            compression,
            ..Default::default()
        },
    )
    .unwrap()
}

fn samples() -> Vec<Vec<u8>> {
    let mut random = vec![0u8; 16384];
    Rng::new(11).fill(&mut random);
    let text: Vec<u8> = b"guest kernel text "
        .iter()
        .cycle()
        .take(16384)
        .copied()
        .collect();
    vec![random, text, vec![1u8; 4096], Vec::new()]
}

#[test]
fn put_get_round_trip_both_encodings() {
    let dir = TempDir::new("local-rt");
    for compression in [Compression::None, Compression::Zstd { level: 3 }] {
        let store = open(&dir, compression);
        for data in samples() {
            let id = store.put(&data).unwrap();
            assert_eq!(id, ChunkId::of(&data));
            assert!(store.contains(&id).unwrap());
            assert!(store.chunk_path(&id).ends_with(id.relative_path()));
            assert_eq!(store.get(&id).unwrap(), data);
            let mut buf = vec![0xAAu8; data.len()];
            store.get_into(&id, &mut buf).unwrap();
            assert_eq!(buf, data);
        }
        store.sync().unwrap();
        let _ = fs::remove_dir_all(store.root());
    }
}

#[test]
fn compression_is_used_only_when_it_pays() {
    let dir = TempDir::new("local-comp");
    let store = open(&dir, Compression::Zstd { level: 1 });
    let s = samples();
    let random = store.put(&s[0]).unwrap();
    let text = store.put(&s[1]).unwrap();
    let head = |id: &ChunkId| {
        let f = fs::read(store.chunk_path(id)).unwrap();
        ChunkHeader::parse(id, &f).unwrap().encoding
    };
    assert_eq!(head(&random), Encoding::Raw);
    assert_eq!(head(&text), Encoding::Zstd);
    let st = store.stats();
    assert_eq!(st.chunks_written, 2);
    assert_eq!(st.raw_bytes_written, 32768);
    assert!(st.bytes_written < 16384 + 16 + 2000, "{st:?}");
}

#[test]
fn put_is_idempotent_and_counted() {
    let dir = TempDir::new("local-dedup");
    let store = open(&dir, Compression::None);
    let data = vec![5u8; 8192];
    let id = store.put(&data).unwrap();
    let mtime = fs::metadata(store.chunk_path(&id))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(store.put(&data).unwrap(), id);
    assert_eq!(
        fs::metadata(store.chunk_path(&id))
            .unwrap()
            .modified()
            .unwrap(),
        mtime
    );
    assert_eq!(
        store.stats(),
        StoreStats {
            chunks_written: 1,
            chunks_deduped: 1,
            bytes_written: 8192 + HEADER_LEN as u64,
            raw_bytes_written: 8192,
        }
    );
    // No temp files are left behind.
    let dir_entries: Vec<_> = fs::read_dir(store.chunk_path(&id).parent().unwrap())
        .unwrap()
        .collect();
    assert_eq!(dir_entries.len(), 1);
    // Reopening sees the chunk.
    let again = open(&dir, Compression::None);
    assert!(again.contains(&id).unwrap());
    assert_eq!(again.get(&id).unwrap(), data);
}

#[test]
fn missing_corrupt_and_truncated_chunks_are_errors() {
    let dir = TempDir::new("local-bad");
    for compression in [Compression::None, Compression::Zstd { level: 3 }] {
        let store = open(&dir, compression);
        for data in &samples()[..3] {
            let id = store.put(data).unwrap();
            let path = store.chunk_path(&id);
            let good = fs::read(&path).unwrap();
            let check = |what: &str| {
                let e1 = store.get(&id).unwrap_err();
                let mut buf = vec![0u8; data.len()];
                let e2 = store.get_into(&id, &mut buf).unwrap_err();
                for e in [e1, e2] {
                    assert!(e.to_string().contains(&id.to_hex()), "{what}: {e}");
                }
            };
            // Flip a selection of bytes (every header byte, then a stride).
            let stride = (good.len() / 64).max(1);
            for i in (0..HEADER_LEN).chain((HEADER_LEN..good.len()).step_by(stride)) {
                let mut bad = good.clone();
                bad[i] ^= 0x80;
                fs::write(&path, &bad).unwrap();
                check(&format!("flip {i}"));
            }
            for len in [0, 3, HEADER_LEN, good.len() / 2, good.len() - 1] {
                fs::write(&path, &good[..len]).unwrap();
                check(&format!("truncate {len}"));
            }
            let mut longer = good.clone();
            longer.extend_from_slice(b"junk");
            fs::write(&path, &longer).unwrap();
            check("trailing junk");
            fs::remove_file(&path).unwrap();
            assert!(matches!(store.get(&id), Err(StoreError::NotFound { .. })));
            assert!(!store.contains(&id).unwrap());
            check("missing");
            fs::write(&path, &good).unwrap();
            assert_eq!(&store.get(&id).unwrap(), data);
        }
        let _ = fs::remove_dir_all(store.root());
    }
}

#[test]
fn get_into_wrong_length_is_refused() {
    let dir = TempDir::new("local-len");
    let store = open(&dir, Compression::None);
    let id = store.put(b"abcd").unwrap();
    let mut buf = [0u8; 5];
    assert!(matches!(
        store.get_into(&id, &mut buf),
        Err(StoreError::LengthMismatch { .. })
    ));
}

#[test]
fn concurrent_puts_of_the_same_chunk() {
    let dir = TempDir::new("local-conc");
    let store = open(&dir, Compression::Zstd { level: 1 });
    let data = vec![9u8; 65536];
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..20 {
                    store.put(&data).unwrap();
                }
            });
        }
    });
    store.sync().unwrap();
    assert_eq!(store.get(&ChunkId::of(&data)).unwrap(), data);
    let st = store.stats();
    assert_eq!(st.chunks_written + st.chunks_deduped, 80);
}

fn packed(dir: &Path) -> LocalStore {
    LocalStore::open(dir, LocalStoreOptions::packs()).unwrap()
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    Rng::new(seed).fill(&mut data);
    data
}

#[test]
fn packs_publish_at_sync_and_discard_unsynced_chunks() {
    let dir = TempDir::new("store-packs");
    let root = dir.path().join("s");
    let store = packed(&root);
    let data = random(5, 65536);
    let id = store.put(&data).unwrap();
    // Pending: visible to this instance, not to another one.
    assert!(store.contains(&id).unwrap());
    assert_eq!(store.get(&id).unwrap(), data);
    let other = LocalStore::open(&root, LocalStoreOptions::default()).unwrap();
    assert!(!other.contains(&id).unwrap());
    assert_eq!(
        store.put_hashed(&id, &data).unwrap(),
        PutOutcome::Present,
        "a pending chunk is not written twice"
    );
    store.sync().unwrap();
    // Another instance (opened before) finds it by reloading the indexes.
    assert_eq!(other.get(&id).unwrap(), data);
    assert!(!store.chunk_path(&id).exists());
    let loc = other.location(&id).unwrap().unwrap();
    assert_eq!(loc.path.extension().unwrap(), "pack");

    // Dropped without sync: the pack is gone, and no index was written.
    let data2 = random(6, 65536);
    let store = packed(&root);
    let id2 = store.put(&data2).unwrap();
    drop(store);
    assert!(!other.contains(&id2).unwrap());
    let names: Vec<String> = fs::read_dir(root.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "one pack and its index: {names:?}");
}

#[test]
fn packs_read_both_layouts_and_copy_records() {
    let dir = TempDir::new("store-both");
    let root = dir.path().join("s");
    let old = open_at(&root, Layout::Files);
    let a = old.put(&random(1, 40000)).unwrap();
    old.sync().unwrap();
    let store = packed(&root);
    let b = store.put(&random(2, 40000)).unwrap();
    let text = samples()[1].clone();
    let c = store.put(&text).unwrap();
    store.sync().unwrap();
    let fresh = LocalStore::open(&root, LocalStoreOptions::default()).unwrap();
    for id in [a, b, c] {
        assert!(fresh.contains(&id).unwrap());
        let data = fresh.get(&id).unwrap();
        let mut buf = vec![0u8; data.len()];
        fresh.get_into(&id, &mut buf).unwrap();
        assert_eq!(buf, data);
        assert_eq!(
            fresh.stored_len(&id).unwrap(),
            Some(fresh.read_stored(&id).unwrap().len() as u64)
        );
    }
    // Copying records between stores keeps their encoding.
    let dest = packed(&dir.path().join("d"));
    for id in [a, b, c] {
        let rec = fresh.read_stored(&id).unwrap();
        assert!(matches!(
            dest.put_stored(&id, &rec).unwrap(),
            PutOutcome::Written { .. }
        ));
        assert_eq!(dest.put_stored(&id, &rec).unwrap(), PutOutcome::Present);
    }
    dest.sync().unwrap();
    assert_eq!(dest.get(&c).unwrap(), text);
    // A record that does not decode to its id is refused.
    let rec = fresh.read_stored(&a).unwrap();
    assert!(dest.put_stored(&ChunkId::of(b"other"), &rec).is_err());
}

#[test]
fn damaged_pack_records_are_errors_naming_the_chunk() {
    let dir = TempDir::new("store-pack-bad");
    let store = packed(dir.path());
    let data = random(3, 20000);
    let id = store.put(&data).unwrap();
    store.sync().unwrap();
    let loc = store.location(&id).unwrap().unwrap();
    let good = fs::read(&loc.path).unwrap();
    for i in (loc.offset..loc.offset + loc.len).step_by(997) {
        let mut bad = good.clone();
        bad[i as usize] ^= 0x40;
        fs::write(&loc.path, &bad).unwrap();
        let fresh = LocalStore::open(dir.path(), LocalStoreOptions::default()).unwrap();
        let e = fresh.get(&id).unwrap_err();
        assert!(e.to_string().contains(&id.to_hex()), "{e}");
        let mut buf = vec![0u8; data.len()];
        assert!(fresh.get_into(&id, &mut buf).is_err());
    }
}

#[test]
fn concurrent_pack_writers_do_not_collide() {
    let dir = TempDir::new("store-pack-conc");
    let datas: Vec<Vec<u8>> = (0..40).map(|i| random(100 + i, 16384)).collect();
    std::thread::scope(|s| {
        for half in datas.chunks(20) {
            let root = dir.path().to_path_buf();
            s.spawn(move || {
                let store = packed(&root);
                for d in half {
                    store.put(d).unwrap();
                }
                store.sync().unwrap();
            });
        }
    });
    let fresh = LocalStore::open(dir.path(), LocalStoreOptions::default()).unwrap();
    for d in &datas {
        assert_eq!(&fresh.get(&ChunkId::of(d)).unwrap(), d);
    }
}

fn open_at(root: &Path, layout: Layout) -> LocalStore {
    LocalStore::open(
        root,
        LocalStoreOptions {
            layout,
            ..Default::default()
        },
    )
    .unwrap()
}
