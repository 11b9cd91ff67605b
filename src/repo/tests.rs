//! Unit tests of the repository core, on snapshots fabricated without a VM.

use std::fs;
use std::path::Path;

use super::*;
use crate::config::{KernelConfig, VmConfig};
use crate::snapshot::manifest::{DEFAULT_CHUNK_SIZE, save_memory};
use crate::util::testutil::{Rng, TempDir};

/// A MicrovmState with no vCPU, good enough for everything but restoring.
pub(crate) fn fake_state(created_unix: u64) -> MicrovmState {
    MicrovmState {
        config: VmConfig {
            kernel: KernelConfig {
                path: "/k".into(),
                cmdline: String::new(),
            },
            initrd: None,
            mem_mib: 1,
            vcpus: 1,
            blocks: Vec::new(),
            host_quirks: false,
            cpu_template: Default::default(),
            nets: Vec::new(),
        },
        cmdline: String::new(),
        memory_regions: Vec::new(),
        vcpus: Vec::new(),
        vm: crate::arch::x86_64::vm_state::VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit2: Default::default(),
            clock: Default::default(),
        },
        serial: crate::devices::legacy::SerialDeviceState {
            baud_divisor_low: 0,
            baud_divisor_high: 0,
            interrupt_enable: 0,
            interrupt_identification: 0,
            line_control: 0,
            line_status: 0,
            modem_control: 0,
            modem_status: 0,
            scratch: 0,
            in_buffer: Vec::new(),
        },
        blocks: Vec::new(),
        store: Some(STORE_FROM_SNAPSHOT.into()),
        created_unix,
        cpu: crate::arch::x86_64::cpu_template::CpuRecord {
            features: Default::default(),
            host: "test".into(),
        },
        nets: Vec::new(),
    }
}

/// Commits a snapshot of `mem` (a multiple of the chunk size) into `repo`.
pub(crate) fn fake_snapshot(
    repo: &Repo,
    mem: &[u8],
    created: u64,
    parent: Option<SnapshotId>,
) -> SnapshotId {
    let work = repo.new_work_dir("test").unwrap();
    let store = repo.store().unwrap();
    let (manifest, _) = save_memory(&[(0, mem)], DEFAULT_CHUNK_SIZE, &store).unwrap();
    manifest.write_to(work.join(MEMORY_FILE)).unwrap();
    crate::formats::file::write_state_file(work.join(STATE_FILE), &fake_state(created)).unwrap();
    let (id, new) = repo
        .commit(
            &work,
            CommitMeta {
                parent,
                ..CommitMeta::default()
            },
        )
        .unwrap();
    assert!(new);
    id
}

/// `n` chunks of random memory.
pub(crate) fn random_mem(seed: u64, chunks: usize) -> Vec<u8> {
    let mut v = vec![0u8; chunks * DEFAULT_CHUNK_SIZE];
    Rng::new(seed).fill(&mut v);
    v
}

/// The chunks stored: chunk files and the chunks of every indexed pack.
fn chunk_files(root: &Path) -> BTreeSet<crate::store::ChunkId> {
    let mut out = BTreeSet::new();
    if let Ok(rd) = fs::read_dir(root.join("chunks")) {
        for d in rd {
            for f in fs::read_dir(d.unwrap().path()).unwrap() {
                if let Ok(id) = f.unwrap().file_name().to_string_lossy().parse() {
                    out.insert(id);
                }
            }
        }
    }
    for f in fs::read_dir(root.join("packs")).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "idx") {
            let ix = crate::store::pack::read_index(&p).unwrap();
            out.extend(ix.entries.iter().map(|e| e.id));
        }
    }
    out
}

/// Takes chunk `id` out of the index of the pack holding it (as if it had never been
/// written).
fn drop_from_index(root: &Path, id: &crate::store::ChunkId) {
    for f in fs::read_dir(root.join("packs")).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "idx") {
            let mut ix = crate::store::pack::read_index(&p).unwrap();
            ix.entries.retain(|e| e.id != *id);
            crate::formats::file::write_file(&p, &crate::formats::PACK_INDEX_KIND, &ix).unwrap();
        }
    }
}

#[test]
fn init_open_and_refuse_foreign_dirs() {
    let t = TempDir::new("repo-init");
    let p = t.path().join("r");
    assert!(matches!(Repo::open(&p), Err(RepoError::NotARepo { .. })));
    let r = Repo::open_or_init(&p).unwrap();
    assert!(p.join(MARKER_FILE).is_file() && p.join("packs").is_dir());
    assert_eq!(Repo::open(&p).unwrap().root(), r.root());
    let other = t.path().join("other");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("x"), b"x").unwrap();
    assert!(matches!(
        Repo::open_or_init(&other),
        Err(RepoError::NotARepo { .. })
    ));
    fs::write(p.join(MARKER_FILE), b"{garbage").unwrap();
    assert!(matches!(Repo::open(&p), Err(RepoError::BadMarker { .. })));
}

/// Creation publishes a complete repository with one rename (over an empty directory too),
/// leaves no temporary directory, and removes those of creators that died.
#[test]
fn init_is_atomic_and_cleans_up_after_dead_creators() {
    let t = TempDir::new("repo-init-atomic");
    // A temporary repository left by a process that no longer exists (pid beyond pid_max).
    let stale = t.path().join(".r.vmm-repo-new-4194305-0");
    fs::create_dir_all(stale.join("snapshots")).unwrap();
    let p = t.path().join("r");
    Repo::open_or_init(&p).unwrap();
    let mut names: Vec<String> = fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["r".to_string()], "temporary directories left");
    // An empty directory (e.g. made by the user) becomes a repository.
    let empty = t.path().join("empty");
    fs::create_dir(&empty).unwrap();
    Repo::open_or_init(&empty).unwrap();
    assert!(empty.join(MARKER_FILE).is_file() && empty.join("tmp").is_dir());
    // A path whose parents do not exist yet.
    let deep = t.path().join("a/b/c");
    Repo::open_or_init(&deep).unwrap();
    assert!(Repo::open(&deep).is_ok());
}

/// A repository whose creation an older build left half-made (layout, no marker, nothing in
/// it) is finished by any command that opens it; the layout with something in it is not.
#[test]
fn half_made_repository_is_finished() {
    let t = TempDir::new("repo-half-made");
    let half = |name: &str| {
        let p = t.path().join(name);
        for d in ["snapshots", "names", "tmp", "chunks/ab"] {
            fs::create_dir_all(p.join(d)).unwrap();
        }
        p
    };
    let a = half("a");
    assert_eq!(init::classify(&a).unwrap(), init::Found::HalfMade);
    let r = Repo::open_or_init(&a).unwrap();
    assert!(a.join(MARKER_FILE).is_file());
    assert!(r.list().unwrap().is_empty());
    // Read-only commands open it too (e.g. `snapshot ls`).
    let b = half("b");
    assert!(Repo::open(&b).unwrap().list().unwrap().is_empty());
    assert!(b.join(MARKER_FILE).is_file());
    // Only the layout's names, and all of them empty.
    for (name, extra) in [
        ("c", "snapshots/x"),
        ("d", "chunks/ab/chunk"),
        ("e", "names/n"),
        ("f", "other"),
    ] {
        let p = half(name);
        fs::write(p.join(extra), b"x").unwrap();
        assert_eq!(init::classify(&p).unwrap(), init::Found::Foreign, "{extra}");
        let e = Repo::open_or_init(&p).unwrap_err();
        assert!(e.to_string().contains("refusing"), "{extra}: {e}");
        assert!(matches!(Repo::open(&p), Err(RepoError::NotARepo { .. })));
        assert!(!p.join(MARKER_FILE).exists());
    }
}

#[test]
fn ids_are_content_derived_and_resolve_by_name_and_prefix() {
    let t = TempDir::new("repo-ids");
    let r = Repo::open_or_init(&t.path().join("r")).unwrap();
    let mem = random_mem(1, 3);
    let a = fake_snapshot(&r, &mem, 100, None);
    assert_eq!(SnapshotId::of_dir(&r.snapshot_dir(&a)).unwrap(), a);
    // The same content again is the same snapshot.
    let work = r.new_work_dir("again").unwrap();
    for f in [STATE_FILE, MEMORY_FILE] {
        fs::copy(r.snapshot_dir(&a).join(f), work.join(f)).unwrap();
    }
    assert_eq!(r.commit(&work, CommitMeta::default()).unwrap(), (a, false));
    assert!(!work.exists());
    let b = fake_snapshot(&r, &mem, 101, Some(a));
    assert_ne!(a, b);
    assert_eq!(r.read_meta(&b).unwrap().parent, Some(a));
    assert_eq!(r.resolve(&a.to_string()).unwrap(), a);
    assert_eq!(r.resolve(&b.short()).unwrap(), b);
    assert_eq!(r.resolve(&b.to_string()[..8].to_uppercase()).unwrap(), b);
    assert!(matches!(r.resolve("zzzz"), Err(RepoError::Unknown(_))));
    assert!(matches!(r.resolve("ab"), Err(RepoError::Unknown(_))));
    r.set_name("base", &a).unwrap();
    assert_eq!(r.resolve("base").unwrap(), a);
    r.set_name("base", &b).unwrap();
    assert_eq!(r.resolve("base").unwrap(), b);
    assert!(matches!(r.set_name("../x", &a), Err(RepoError::BadName(_))));
    assert!(!valid_name(&"ab".repeat(32)));
    assert!(valid_name("v1.2_final-ok"));
    // Ambiguity: find two ids sharing a first hex digit among a few snapshots.
    let mut ids = vec![a, b];
    for i in 0..40 {
        ids.push(fake_snapshot(&r, &mem, 200 + i, None));
    }
    let mut by_first: BTreeMap<char, usize> = BTreeMap::new();
    for id in &ids {
        *by_first
            .entry(id.to_string().chars().next().unwrap())
            .or_default() += 1;
    }
    assert_eq!(r.list().unwrap().len(), ids.len());
    // Prefixes shorter than MIN_PREFIX_LEN are refused even when unique.
    let (c, _) = by_first.iter().find(|(_, n)| **n >= 2).unwrap();
    assert!(matches!(
        r.resolve(&c.to_string()),
        Err(RepoError::Unknown(_))
    ));
}

#[test]
fn ambiguous_prefix_is_an_error() {
    let t = TempDir::new("repo-amb");
    let r = Repo::open_or_init(&t.path().join("r")).unwrap();
    // Two fake snapshot directories whose names share a long prefix (resolve only looks at
    // the listing).
    let x: SnapshotId = format!("abcd{}", "0".repeat(60)).parse().unwrap();
    let y: SnapshotId = format!("abcd{}", "1".repeat(60)).parse().unwrap();
    fs::create_dir_all(r.snapshot_dir(&x)).unwrap();
    fs::create_dir_all(r.snapshot_dir(&y)).unwrap();
    assert!(matches!(
        r.resolve("abcd"),
        Err(RepoError::Ambiguous { .. })
    ));
    assert_eq!(r.resolve("abcd0").unwrap(), x);
}

#[test]
fn rm_and_gc_free_exactly_the_unreferenced_chunks() {
    let t = TempDir::new("repo-gc");
    let r = Repo::open_or_init(&t.path().join("r")).unwrap();
    let mut mem = random_mem(7, 8);
    let mut ids = Vec::new();
    for i in 0..4u64 {
        // Each snapshot changes two chunks.
        let cs = DEFAULT_CHUNK_SIZE;
        Rng::new(100 + i).fill(&mut mem[(i as usize * 2) * cs..(i as usize * 2 + 2) * cs]);
        ids.push(fake_snapshot(&r, &mem, 10 + i, ids.last().copied()));
    }
    r.set_name("second", &ids[1]).unwrap();
    let before = chunk_files(r.root());
    let rep = gc::rm(&r, &[ids[1], ids[2]]).unwrap();
    assert_eq!(rep.removed.len(), 2);
    assert_eq!(rep.removed[0].names.len() + rep.removed[1].names.len(), 1);
    assert!(r.names().unwrap().is_empty());
    let keep: BTreeSet<_> = [ids[0], ids[3]]
        .iter()
        .flat_map(|i| r.refs(i).unwrap())
        .collect();
    let expect_freed = before.difference(&keep).count() as u64;
    assert_eq!(rep.chunks_freed, expect_freed);
    // A leftover temp index and work dir are cleaned too.
    fs::write(r.root().join("packs/.deadbeef.idx.tmp.1.2"), b"x").unwrap();
    fs::create_dir_all(r.tmp_dir().join("create-1-1")).unwrap();
    let g = gc::gc(&r, Some(false)).unwrap();
    assert_eq!(g.chunks_deleted, expect_freed);
    assert_eq!(g.leftovers_deleted, 2);
    assert_eq!(chunk_files(r.root()), keep);
    assert_eq!(r.list().unwrap(), {
        let mut v = vec![ids[0], ids[3]];
        v.sort();
        v
    });
    let v = verify::verify(&r, None, Some(false)).unwrap();
    assert!(v.ok, "{v:?}");
    // Usage: unique + shared covers every chunk.
    let refs = r.all_refs().unwrap();
    let u = gc::usage(&r, &refs);
    assert!(
        u.values()
            .all(|x| x.chunks_missing == 0 && x.bytes_unique > 0)
    );
}

#[test]
fn gc_refuses_to_sweep_when_a_snapshot_is_unreadable() {
    let t = TempDir::new("repo-gc-bad");
    let r = Repo::open_or_init(&t.path().join("r")).unwrap();
    let a = fake_snapshot(&r, &random_mem(1, 2), 1, None);
    let b = fake_snapshot(&r, &random_mem(2, 2), 2, None);
    gc::rm(&r, &[a]).unwrap();
    let n = chunk_files(r.root()).len();
    fs::write(r.snapshot_dir(&b).join(MEMORY_FILE), b"junk").unwrap();
    assert!(gc::gc(&r, Some(false)).is_err());
    assert_eq!(chunk_files(r.root()).len(), n, "nothing deleted");
}

#[test]
fn verify_reports_missing_corrupt_and_bad_meta() {
    let t = TempDir::new("repo-verify");
    let r = Repo::open_or_init(&t.path().join("r")).unwrap();
    let a = fake_snapshot(&r, &random_mem(3, 4), 1, None);
    assert!(verify::verify(&r, None, Some(false)).unwrap().ok);
    let refs: Vec<_> = r.refs(&a).unwrap().into_iter().collect();
    let store = r.store().unwrap();
    let loc = store.location(&refs[1]).unwrap().unwrap();
    drop_from_index(r.root(), &refs[0]);
    let mut bytes = fs::read(&loc.path).unwrap();
    let last = (loc.offset + loc.len - 1) as usize;
    bytes[last] ^= 0xff;
    fs::write(&loc.path, bytes).unwrap();
    fs::write(r.snapshot_dir(&a).join(META_FILE), b"{").unwrap();
    let v = verify::verify(&r, None, Some(false)).unwrap();
    assert!(!v.ok);
    let c = &v.snapshots[0];
    assert_eq!(c.missing, vec![refs[0]]);
    assert_eq!(c.corrupt.len(), 1);
    assert_eq!(c.corrupt[0].0, refs[1]);
    assert_eq!(c.errors.len(), 1, "{:?}", c.errors);
    // ls still lists it, with the error.
    let cat = cli::catalogue(&r).unwrap();
    assert_eq!(cat.snapshots.len(), 1);
    assert!(cat.snapshots[0].meta.is_none() && !cat.snapshots[0].errors.is_empty());
    assert_eq!(cat.snapshots[0].usage.unwrap().chunks_missing, 1);
}

#[test]
fn export_import_round_trip_and_damaged_files() {
    let t = TempDir::new("repo-export");
    let r = Repo::open_or_init(&t.path().join("r")).unwrap();
    let mem = random_mem(5, 6);
    let a = fake_snapshot(&r, &mem, 1, None);
    let mut mem2 = mem.clone();
    mem2[0] ^= 1;
    let b = fake_snapshot(&r, &mem2, 2, Some(a));
    let file = t.path().join("b.vmmsnap");
    let e = export::export(&r, &b, &file, Some(false)).unwrap();
    assert_eq!(e.chunks, r.refs(&b).unwrap().len() as u64);
    assert_eq!(e.file_bytes, fs::metadata(&file).unwrap().len());

    let r2 = Repo::open_or_init(&t.path().join("elsewhere/r2")).unwrap();
    let i = export::import(&r2, &file, Some("imported"), Some(false)).unwrap();
    assert_eq!(i.id, b);
    assert!(i.new);
    assert_eq!(i.chunks_new, e.chunks);
    assert_eq!(r2.resolve("imported").unwrap(), b);
    assert_eq!(r2.read_meta(&b).unwrap().parent, Some(a));
    assert!(verify::verify(&r2, None, Some(false)).unwrap().ok);
    assert_eq!(chunk_files(r2.root()), r.refs(&b).unwrap());
    // Again: nothing new.
    let again = export::import(&r2, &file, None, Some(false)).unwrap();
    assert!(!again.new && again.chunks_new == 0);

    let bytes = fs::read(&file).unwrap();
    let r3 = Repo::open_or_init(&t.path().join("r3")).unwrap();
    for (what, damaged) in [
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("truncated", bytes[..bytes.len() - 1].to_vec()),
        ("truncated", bytes[..10].to_vec()),
        ("bad magic", b"NOTANEXPORT.....".to_vec()),
        ("checksum", {
            let mut d = bytes.clone();
            let n = d.len() - 5;
            d[n] ^= 1;
            d
        }),
        ("unexpected data", {
            let mut d = bytes.clone();
            d.push(0);
            d
        }),
        ("corrupt", {
            // Flip a byte inside the last chunk's body.
            let mut d = bytes.clone();
            let n = d.len() - 32 - 8 - 3;
            d[n] ^= 0x55;
            d
        }),
    ] {
        let f = t.path().join("damaged");
        fs::write(&f, &damaged).unwrap();
        let err = export::import(&r3, &f, None, Some(false)).unwrap_err();
        let msg = crate::util::error_chain(&err);
        assert!(msg.contains(what) || msg.contains("hash"), "{what}: {msg}");
        assert!(r3.list().unwrap().is_empty());
    }
}

#[test]
fn origin_of_snapshot_dir_finds_the_repo() {
    let t = TempDir::new("repo-origin");
    let r = Repo::open_or_init(&t.path().join("r")).unwrap();
    let a = fake_snapshot(&r, &random_mem(9, 1), 1, None);
    let o = origin_of_snapshot_dir(&r.snapshot_dir(&a)).unwrap();
    assert_eq!((o.repo.as_path(), o.id), (r.root(), a));
    assert!(origin_of_snapshot_dir(t.path()).is_none());
    // The relative store holds after moving the repository.
    let moved = t.path().join("moved");
    fs::rename(r.root(), &moved).unwrap();
    let r = Repo::open(&moved).unwrap();
    let st = MicrovmState::read(&r.snapshot_dir(&a).join(STATE_FILE)).unwrap();
    assert_eq!(
        fs::canonicalize(st.store_dir(&r.snapshot_dir(&a))).unwrap(),
        r.root()
    );
    assert!(verify::verify(&r, None, Some(false)).unwrap().ok);
}
