//! Lazy remote disks against a real nginx (Debian's, started by each test on a free
//! loopback port): import, lazy verified reads, the persistent cache, the copy-on-write
//! overlay, server outages, tampered chunks, broken indexes, qcow2 import and prefetch.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::env::{TempDir, temp_dir};
use support::files::{test_image, tree_hashes};
use support::nginx::{Nginx, nginx_available};
use vmm::disk::BlockBackend;
use vmm::disk::http::{
    LazyHttpDisk, LazyHttpOptions, RemoteDiskError, open_remote_disk, read_prefetch_list,
};
use vmm::disk::overlay::OverlayBackend;
use vmm::image::{ImageEntry, ImportOptions, import_image_with};
use vmm::store::http::HttpStoreOptions;
use vmm::util::error_chain;

const CS: u32 = 64 << 10;

/// An archive with image "img" (64 KiB chunks) served by nginx.
struct Setup {
    dir: TempDir,
    data: Vec<u8>,
    nginx: Nginx,
}

impl Setup {
    fn new(tag: &str) -> Option<Setup> {
        if !nginx_available() {
            return None;
        }
        let dir = temp_dir(tag);
        let src = dir.path().join("src.img");
        let data = test_image(&src);
        let archive = dir.path().join("archive");
        let opts = ImportOptions {
            chunk_size: CS,
            progress: Some(false),
        };
        let r = import_image_with(&src, &archive, "img", &opts).unwrap();
        assert_eq!(r.chunks_total, 64);
        assert_eq!(r.chunks_zero, 8 + 4, "{r:?}");
        assert_eq!(r.chunks_reused, 2, "{r:?}");
        let nginx = Nginx::start(dir.path());
        Some(Setup { dir, data, nginx })
    }

    fn archive(&self) -> std::path::PathBuf {
        self.dir.path().join("archive")
    }

    fn url(&self, name: &str) -> String {
        format!("{}/archive/images/{name}", self.nginx.url())
    }

    fn opts(&self, cache: &str) -> LazyHttpOptions {
        LazyHttpOptions {
            cache_dir: Some(self.dir.path().join(cache)),
            ..LazyHttpOptions::default()
        }
    }

    fn open(&self, cache: &str) -> LazyHttpDisk {
        LazyHttpDisk::open(&self.url("img"), self.opts(cache)).unwrap()
    }
}

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn lazy_reads_match_source_fetch_little_and_survive_restart() {
    let Some(s) = Setup::new("reads") else { return };
    let size = s.data.len() as u64;
    let first_chunks;
    {
        let disk = s.open("cache");
        assert_eq!(disk.size(), size);
        assert!(disk.read_only());
        assert_eq!(disk.identity().kind, "http");
        // A partial pattern: 100 random reads within the first MiB.
        let mut seed = 0x1234_5678u64;
        let t = Instant::now();
        for _ in 0..100 {
            let off = (rng(&mut seed) % (1 << 20)) & !511;
            let len = (1 + rng(&mut seed) % 16) as usize * 512;
            let len = len.min((size - off) as usize);
            let mut buf = vec![0u8; len];
            disk.read_at(&mut buf, off).unwrap();
            assert!(
                buf[..] == s.data[off as usize..off as usize + len],
                "at {off}"
            );
        }
        let st = disk.stats();
        println!(
            "partial pattern: {} chunks fetched, {} bytes over HTTP in {} requests, {:?}",
            st.chunks_fetched,
            st.http.bytes_fetched,
            st.http.requests,
            t.elapsed()
        );
        assert!(st.http.bytes_fetched < size / 3, "{st:?}");
        assert!(st.chunks_fetched <= 12, "{st:?}");
        // Cache all of the first MiB for the restart check below.
        let mut mib = vec![0u8; 1 << 20];
        disk.read_at(&mut mib, 0).unwrap();
        assert!(mib[..] == s.data[..1 << 20]);
        first_chunks = disk.stats().chunks_fetched;
        assert_eq!(first_chunks, 8, "non-zero chunks of the first MiB");
        // Unaligned reads straddling chunks.
        let mut buf = vec![0u8; 200_000];
        disk.read_at(&mut buf, 65_000).unwrap();
        assert!(buf[..] == s.data[65_000..265_000]);
        assert!(disk.read_at(&mut [0u8; 2], size - 1).is_err());
        assert!(disk.write_at(&[0u8; 512], 0).is_err());
    }
    // Restart with the same cache: the same reads fetch nothing.
    let disk = s.open("cache");
    assert!(disk.stats().cache.chunks >= first_chunks);
    let mut buf = vec![0u8; 1 << 20];
    disk.read_at(&mut buf, 0).unwrap();
    assert!(buf[..] == s.data[..1 << 20]);
    let st = disk.stats();
    assert_eq!(st.chunks_fetched, 0, "{st:?}");
    assert_eq!(st.http.requests, 1, "only the index: {st:?}");
    // The whole image, cold chunks included; timing of sequential cold fetches.
    let t = Instant::now();
    let mut all = vec![0u8; size as usize];
    disk.read_at(&mut all, 0).unwrap();
    let el = t.elapsed();
    assert!(all == s.data, "whole image");
    let st = disk.stats();
    println!(
        "cold sequential: {} chunks of {} KiB in {:?} ({:.2} ms/chunk)",
        st.chunks_fetched,
        CS >> 10,
        el,
        el.as_secs_f64() * 1000.0 / st.chunks_fetched.max(1) as f64
    );
    // 52 non-zero chunks, 8 of them cached already; the cache is content-addressed, so
    // chunks 32 and 33 (copies of chunks 0 and 1) come from it too: 52 - 8 - 2.
    assert_eq!(st.chunks_fetched, 42, "{st:?}");
    // Keep-alive: all those requests went over very few connections.
    let log = s.nginx.access_log();
    let mut conns: Vec<u64> = log.iter().map(|l| l.0).collect();
    conns.sort();
    conns.dedup();
    println!("{} requests over {} connections", log.len(), conns.len());
    assert!(log.len() > 50 && conns.len() <= 4, "{conns:?}");
}

#[test]
fn concurrent_readers_of_a_chunk_fetch_it_once() {
    let Some(s) = Setup::new("coalesce") else {
        return;
    };
    let disk = Arc::new(s.open("cache"));
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let handles: Vec<_> = (0..8u64)
        .map(|i| {
            let (disk, barrier) = (disk.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                barrier.wait();
                disk.read_at(&mut buf, (1 << 20) + i * 4096).unwrap();
                buf
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let off = (1 << 20) + i * 4096;
        assert!(h.join().unwrap()[..] == s.data[off..off + 4096]);
    }
    let st = disk.stats();
    assert_eq!(st.chunks_fetched, 1, "{st:?}");
    assert_eq!(st.http.chunks_fetched, 1, "{st:?}");
    // The store coalesces too: concurrent fetches of one chunk share requests.
    let store = Arc::new(
        vmm::store::http::HttpStore::new(
            &format!("{}/archive", s.nginx.url()),
            HttpStoreOptions::default(),
        )
        .unwrap(),
    );
    let ImageEntry::Chunk(id) = disk.index().entries[40] else {
        panic!("chunk 40 is zero")
    };
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (store, barrier) = (store.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                store.fetch_chunk(&id, Some(CS as usize)).unwrap()
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap()[..] == s.data[40 * CS as usize..41 * CS as usize]);
    }
    let st = store.stats();
    println!("8 concurrent fetches of one chunk: {st:?}");
    assert_eq!(st.chunks_fetched + st.coalesced, 8, "{st:?}");
    // The ChunkRead view: HEAD for contains, get verifies; put is refused at compile
    // time (HttpStore is no ChunkWrite: the `compile_fail` example on `ChunkRead`), and
    // the store says it retries itself, so no caller retries on top.
    use vmm::store::ChunkRead;
    assert!(store.contains(&id).unwrap());
    assert!(!store.contains(&vmm::store::ChunkId::of(b"absent")).unwrap());
    assert_eq!(store.get(&id).unwrap().len(), CS as usize);
    assert!(store.retries());
}

#[test]
fn overlay_writes_persist_and_served_files_stay_unchanged() {
    let Some(s) = Setup::new("overlay") else {
        return;
    };
    let before = tree_hashes(&s.archive());
    let ov_path = s.dir.path().join("disk.overlay");
    let text = b"written at the end of the remote disk";
    let end = s.data.len() as u64 - 4096;
    {
        let (remote, ov) =
            open_remote_disk(&s.url("img"), s.opts("cache"), Some(&ov_path)).unwrap();
        assert!(!ov.read_only());
        ov.write_at(text, end + 100).unwrap();
        ov.write_at(&[0xab; 8192], 4096).unwrap();
        ov.flush().unwrap();
        let id = ov.identity();
        assert_eq!(id.kind, "overlay");
        assert_eq!(id.inner.unwrap().kind, "http");
        // The partial-block write read its block from the image; the aligned one did not.
        assert_eq!(remote.stats().chunks_fetched, 1, "{:?}", remote.stats());
    }
    // Reopened (with a cold cache, even): the writes are there, the rest is the image.
    let base: Arc<dyn BlockBackend> = Arc::new(s.open("cache2"));
    let ov = OverlayBackend::open(&ov_path, base.clone()).unwrap();
    let mut buf = vec![0u8; 4096];
    ov.read_at(&mut buf, end).unwrap();
    assert_eq!(&buf[100..100 + text.len()], text);
    assert!(buf[..100] == s.data[end as usize..end as usize + 100]);
    let mut buf = vec![0u8; 16384];
    ov.read_at(&mut buf, 0).unwrap();
    assert!(buf[..4096] == s.data[..4096]);
    assert!(buf[4096..12288].iter().all(|&b| b == 0xab));
    assert!(buf[12288..] == s.data[12288..16384]);
    // The remote image is unchanged.
    let mut img = vec![0u8; 4096];
    base.read_at(&mut img, end).unwrap();
    assert!(img[..] == s.data[end as usize..end as usize + 4096]);
    drop(ov);
    assert_eq!(tree_hashes(&s.archive()), before, "served files changed");
    // An overlay is tied to its base image: another image is refused.
    let src2 = s.dir.path().join("other.img");
    std::fs::write(&src2, vec![1u8; s.data.len()]).unwrap();
    let opts = ImportOptions {
        chunk_size: CS,
        progress: Some(false),
    };
    import_image_with(&src2, &s.archive(), "other", &opts).unwrap();
    let other: Arc<dyn BlockBackend> =
        Arc::new(LazyHttpDisk::open(&s.url("other"), s.opts("cache3")).unwrap());
    let e = OverlayBackend::open(&ov_path, other).unwrap_err();
    assert!(e.to_string().contains("was created over"), "{e}");
}

#[test]
fn server_outage_fails_reads_in_bounded_time_then_recovers() {
    let Some(mut s) = Setup::new("outage") else {
        return;
    };
    let disk = s.open("cache");
    let mut buf = vec![0u8; 4096];
    disk.read_at(&mut buf, 0).unwrap();
    s.nginx.stop();
    // Cached chunks still read.
    disk.read_at(&mut buf, 0).unwrap();
    assert!(buf[..] == s.data[..4096]);
    // So does another chunk with the same bytes (the cache is content-addressed: chunk
    // 32, at 2 MiB, is a copy of chunk 0).
    disk.read_at(&mut buf, 2 << 20).unwrap();
    assert!(buf[..] == s.data[2 << 20..(2 << 20) + 4096]);
    // Uncached ones fail after the retries (default options), without hanging.
    let t = Instant::now();
    let e = disk.read_at(&mut buf, (2 << 20) + (256 << 10)).unwrap_err();
    let el = t.elapsed();
    let msg = error_chain(&e);
    println!("outage: error after {el:?}: {msg}");
    // The retries' back-off sleeps add up to more than a second (a loaded host only makes
    // them longer); the ceiling only catches a hang (e.g. one request timeout per attempt),
    // not slowness. The attempts themselves are counted below.
    assert!(
        el >= Duration::from_millis(1000) && el < Duration::from_secs(40),
        "{el:?}"
    );
    assert!(msg.contains("gave up after 5 attempts"), "{msg}");
    let st = disk.stats();
    assert_eq!(st.read_errors, 1);
    assert_eq!(st.http.retries, 4, "{st:?}");
    // Back on the same port: reads work again.
    s.nginx.restart();
    let off = (2 << 20) + (256 << 10);
    disk.read_at(&mut buf, off).unwrap();
    assert!(buf[..] == s.data[off as usize..off as usize + 4096]);
}

#[test]
fn the_shared_cache_stays_within_its_size_limit() {
    let Some(s) = Setup::new("limit") else {
        return;
    };
    // Room for about 8 of the 50 distinct chunks (64 KiB + a small header each).
    let limit = 8 * (u64::from(CS) + 64);
    let opts = LazyHttpOptions {
        cache_max_bytes: Some(limit),
        ..s.opts("cache")
    };
    let root = s.dir.path().join("cache/chunks");
    {
        let disk = LazyHttpDisk::open(&s.url("img"), opts.clone()).unwrap();
        let mut all = vec![0u8; s.data.len()];
        disk.read_at(&mut all, 0).unwrap();
        assert!(all == s.data);
        let st = disk.stats();
        assert!(st.cache.evicted > 0, "{st:?}");
        let u = vmm::store::evict::usage(&root).unwrap();
        assert!(u.bytes <= limit && u.chunks > 0, "{u:?} over {limit}");
    }
    // Reopened: the newest chunks are still cached and served without a fetch.
    let disk = LazyHttpDisk::open(&s.url("img"), opts).unwrap();
    let mut buf = vec![0u8; 4096];
    let last = s.data.len() - 4096;
    disk.read_at(&mut buf, last as u64).unwrap();
    assert!(buf[..] == s.data[last..]);
    assert_eq!(disk.stats().chunks_fetched, 0, "{:?}", disk.stats());
}

#[test]
fn tampered_chunks_are_rejected() {
    let Some(s) = Setup::new("tamper") else {
        return;
    };
    let opts = LazyHttpOptions {
        http: HttpStoreOptions {
            first_backoff: Duration::from_millis(10),
            ..HttpStoreOptions::default()
        },
        ..s.opts("cache")
    };
    let disk = LazyHttpDisk::open(&s.url("img"), opts).unwrap();
    let chunk_file = |idx: usize| {
        let ImageEntry::Chunk(id) = disk.index().entries[idx] else {
            panic!("chunk {idx} is zero")
        };
        (id, s.archive().join(id.relative_path()))
    };
    // Same length, one byte changed.
    let (id, path) = chunk_file(1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[5000] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let mut buf = vec![0u8; 512];
    let retries_before = disk.stats().http.retries;
    let e = error_chain(&disk.read_at(&mut buf, u64::from(CS)).unwrap_err());
    // A damaged answer may have been damaged on the way (a confused proxy, a cut
    // connection), so it is asked for again, every answer verified; the server keeps
    // sending the same wrong bytes, so the read fails once the attempts are used up.
    let attempts = HttpStoreOptions::default().attempts.max(1);
    assert_eq!(
        disk.stats().http.retries - retries_before,
        u64::from(attempts - 1),
        "a chunk whose bytes do not match its hash is asked for {attempts} times in all"
    );
    assert!(e.contains(&format!("{attempts} attempts")), "{e}");
    assert!(
        e.contains(&id.to_hex()) && e.contains("contents hash to"),
        "{e}"
    );
    assert!(
        e.contains(&format!("/archive/{}", id.relative_path())),
        "{e}"
    );
    // Truncated, and oversized (a hostile answer larger than any chunk).
    let (id, path) = chunk_file(2);
    let good = std::fs::read(&path).unwrap();
    std::fs::write(&path, &good[..1000]).unwrap();
    let e = error_chain(&disk.read_at(&mut buf, 2 * u64::from(CS)).unwrap_err());
    assert!(e.contains(&id.to_hex()) && e.contains("corrupt"), "{e}");
    std::fs::write(&path, vec![0u8; 8 << 20]).unwrap();
    let e = error_chain(&disk.read_at(&mut buf, 2 * u64::from(CS)).unwrap_err());
    assert!(e.contains("larger than the limit"), "{e}");
    // Missing on the server.
    std::fs::remove_file(&path).unwrap();
    let e = error_chain(&disk.read_at(&mut buf, 2 * u64::from(CS)).unwrap_err());
    assert!(e.contains("404"), "{e}");
    // Restored: read fine, nothing bad was cached.
    std::fs::write(&path, &good).unwrap();
    disk.read_at(&mut buf, 2 * u64::from(CS)).unwrap();
    assert!(buf[..] == s.data[2 * CS as usize..2 * CS as usize + 512]);
}

#[test]
fn missing_truncated_or_corrupt_index_fails_at_open() {
    let Some(s) = Setup::new("index") else { return };
    let fast = || LazyHttpOptions {
        http: HttpStoreOptions {
            first_backoff: Duration::from_millis(10),
            ..HttpStoreOptions::default()
        },
        ..s.opts("cache")
    };
    let e = LazyHttpDisk::open(&s.url("nope"), fast()).unwrap_err();
    assert!(matches!(e, RemoteDiskError::IndexNotFound { .. }), "{e}");
    assert!(e.to_string().contains("/archive/images/nope"), "{e}");
    let index = std::fs::read(s.archive().join("images/img")).unwrap();
    let broken = s.archive().join("images/broken");
    for (bytes, want) in [
        (index[..index.len() / 2].to_vec(), "truncated"),
        (b"<html>not an index</html>".to_vec(), "bad magic"),
        (Vec::new(), "bad magic"),
    ] {
        std::fs::write(&broken, &bytes).unwrap();
        let e = LazyHttpDisk::open(&s.url("broken"), fast()).unwrap_err();
        let msg = error_chain(&e);
        assert!(matches!(e, RemoteDiskError::Index { .. }), "{msg}");
        assert!(msg.contains(want) && msg.contains("images/broken"), "{msg}");
    }
    let mut flipped = index.clone();
    flipped[40] ^= 0xff;
    std::fs::write(&broken, &flipped).unwrap();
    let msg = error_chain(&LazyHttpDisk::open(&s.url("broken"), fast()).unwrap_err());
    assert!(msg.contains("checksum mismatch"), "{msg}");
    for bad in ["http://h/x", "https://h/images/a"] {
        assert!(matches!(
            LazyHttpDisk::open(bad, fast()),
            Err(RemoteDiskError::BadUrl { .. })
        ));
    }
}

#[test]
fn mirrors_are_tried_in_turn() {
    let Some(s) = Setup::new("mirror") else {
        return;
    };
    // The main URL points at a dead port; the mirror is the real server.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = LazyHttpOptions {
        http: HttpStoreOptions {
            mirrors: vec![format!("{}/archive", s.nginx.url())],
            ..HttpStoreOptions::default()
        },
        ..s.opts("cache")
    };
    let disk =
        LazyHttpDisk::open(&format!("http://127.0.0.1:{dead}/archive/images/img"), opts).unwrap();
    let mut buf = vec![0u8; 4096];
    let off = (3 << 20) + (512 << 10);
    disk.read_at(&mut buf, off as u64).unwrap();
    assert!(buf[..] == s.data[off as usize..off as usize + 4096]);
    // The first use also looks for the archive's pack list, which the dead main URL makes
    // retry (the mirror's 404 alone is not taken as "no packs"); after that, chunks come
    // from the mirror in the first round, without retries.
    let after_first = disk.stats().http.retries;
    let off = 1 << 20;
    disk.read_at(&mut buf, off as u64).unwrap();
    assert!(buf[..] == s.data[off as usize..off as usize + 4096]);
    assert_eq!(disk.stats().http.retries, after_first);
}

#[test]
fn qcow2_import_reuses_the_raw_import_chunks() {
    let Some(s) = Setup::new("qcow2") else { return };
    if Command::new("qemu-img").arg("--version").output().is_err() {
        let msg = "qemu-img is missing (apt-get install qemu-utils)";
        assert!(std::env::var("CI").is_err(), "{msg}");
        println!("SKIP: {msg}");
        return;
    }
    let src = s.dir.path().join("src.img");
    let qcow = s.dir.path().join("src.qcow2");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&src)
        .arg(&qcow)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let opts = ImportOptions {
        chunk_size: CS,
        progress: Some(false),
    };
    let raw = vmm::image::read_index(&s.archive().join("images/img")).unwrap();
    let r = import_image_with(&qcow, &s.archive(), "from-qcow2", &opts).unwrap();
    assert_eq!(r.format, vmm::image::SourceFormat::Qcow2);
    assert_eq!((r.chunks_new, r.image_id), (0, raw.id()), "{r:?}");
    // Served and readable like the raw import.
    let disk = LazyHttpDisk::open(&s.url("from-qcow2"), s.opts("c")).unwrap();
    let mut all = vec![0u8; s.data.len()];
    disk.read_at(&mut all, 0).unwrap();
    assert!(all == s.data);
    // A garbage "qcow2" fails with qemu-img's message.
    let bad = s.dir.path().join("bad.qcow2");
    std::fs::write(&bad, b"QFI\xfb garbage").unwrap();
    let e = import_image_with(&bad, &s.archive(), "bad", &opts).unwrap_err();
    assert!(e.to_string().contains("qemu-img convert"), "{e}");
}

#[test]
fn prefetch_record_and_replay() {
    let Some(s) = Setup::new("prefetch") else {
        return;
    };
    let list = s.dir.path().join("boot.prefetch");
    let reads: [u64; 5] = [(2 << 20) + 65536, 0, 1 << 20, (2 << 20) + 70000, 4096];
    {
        let opts = LazyHttpOptions {
            record_prefetch: Some(list.clone()),
            ..s.opts("rec")
        };
        let disk = LazyHttpDisk::open(&s.url("img"), opts).unwrap();
        let mut buf = vec![0u8; 512];
        for off in reads {
            disk.read_at(&mut buf, off).unwrap();
        }
    }
    let image = vmm::image::read_index(&s.archive().join("images/img")).unwrap();
    let recorded = read_prefetch_list(&list, &image.id()).unwrap();
    let cs = u64::from(CS);
    let idx = |off: u64| (off / cs) as u32;
    assert_eq!(recorded, vec![idx((2 << 20) + 65536), 0, idx(1 << 20)]);
    // A cold cache replays the list in the background; the reads then fetch nothing.
    let opts = LazyHttpOptions {
        prefetch: Some(list.clone()),
        ..s.opts("cold")
    };
    let disk = LazyHttpDisk::open(&s.url("img"), opts).unwrap();
    disk.wait_prefetch();
    assert_eq!(disk.stats().chunks_prefetched, 3);
    let mut buf = vec![0u8; 512];
    for off in reads {
        disk.read_at(&mut buf, off).unwrap();
        assert!(buf[..] == s.data[off as usize..off as usize + 512]);
    }
    assert_eq!(disk.stats().chunks_fetched, 0);
    // A list recorded for another image is refused.
    let other = vmm::store::ChunkId::of(b"other image");
    assert!(read_prefetch_list(&list, &other).is_err());
    // Starting a prefetch explicitly works too: chunk 0 is cached, and so is chunk 1
    // (the cache is content-addressed, and chunk 33, prefetched above, is a copy of it);
    // 2 and 63 are fetched; 1000 is past the end.
    disk.start_prefetch(vec![0, 1, 2, 63, 1000]);
    disk.wait_prefetch();
    assert_eq!(disk.stats().chunks_prefetched, 3 + 2);
}

#[test]
fn guest_artifact_disk_image_round_trips() {
    let img = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/out/disk.img");
    if !img.exists() || !nginx_available() {
        println!("SKIP: {} missing", img.display());
        return;
    }
    let dir = temp_dir("artifact");
    let archive = dir.path().join("archive");
    let r = vmm::image::import_image(&img, &archive, "disk", vmm::image::DEFAULT_IMAGE_CHUNK_SIZE)
        .unwrap();
    let nginx = Nginx::start(dir.path());
    let disk = LazyHttpDisk::open(
        &format!("{}/archive/images/disk", nginx.url()),
        LazyHttpOptions {
            cache_dir: Some(dir.path().join("cache")),
            ..LazyHttpOptions::default()
        },
    )
    .unwrap();
    let want = std::fs::read(&img).unwrap();
    let mut got = vec![0u8; r.size as usize];
    disk.read_at(&mut got, 0).unwrap();
    assert!(got[..want.len()] == want[..]);
}

/// Byte ranges of a boot-like read pattern of the guest rootfs (superblock and group
/// descriptors, the inode table blocks and data of /, /bin, /init and busybox), from
/// debugfs; None if debugfs is missing.
fn boot_like_pattern(img: &Path) -> Option<Vec<(u64, u64)>> {
    let debugfs = |req: &str| -> Option<String> {
        let out = Command::new("/sbin/debugfs")
            .args(["-R", req])
            .arg(img)
            .output()
            .ok()?;
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let bs = 1024u64;
    let mut ranges = vec![(0, 16 * bs)];
    for path in ["/", "/bin", "/init", "/bin/busybox", "/etc", "/sbin"] {
        let imap = debugfs(&format!("imap {path}"))?;
        if let Some(b) = imap
            .split("located at block ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.trim().parse::<u64>().ok())
        {
            ranges.push((b * bs, bs));
        }
        for b in debugfs(&format!("blocks {path}"))?.split_whitespace() {
            if let Ok(b) = b.parse::<u64>() {
                ranges.push((b * bs, bs));
            }
        }
    }
    Some(ranges)
}

/// Chunk size measurement (run by hand: `cargo test --test remote_disk -- --ignored
/// --nocapture measure_chunk_sizes`); figures are in docs/REMOTE_IMAGES.md.
#[test]
#[ignore]
fn measure_chunk_sizes() {
    let img = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/out/rootfs.ext4");
    if !img.exists() || !nginx_available() {
        println!("SKIP: {} missing", img.display());
        return;
    }
    let pattern = boot_like_pattern(&img).expect("debugfs");
    let wanted: u64 = pattern.iter().map(|r| r.1).sum();
    let dir = temp_dir("measure");
    let nginx = Nginx::start(dir.path());
    println!(
        "rootfs.ext4 {} MiB; boot-like pattern: {} reads, {} KiB",
        std::fs::metadata(&img).unwrap().len() >> 20,
        pattern.len(),
        wanted >> 10
    );
    for cs in [64u32 << 10, 256 << 10, 1 << 20] {
        let archive = dir.path().join(format!("a{cs}"));
        let opts = ImportOptions {
            chunk_size: cs,
            progress: Some(false),
        };
        let r = import_image_with(&img, &archive, "root", &opts).unwrap();
        let url = format!("{}/a{cs}/images/root", nginx.url());
        let open = |cache: &str| {
            LazyHttpDisk::open(
                &url,
                LazyHttpOptions {
                    cache_dir: Some(dir.path().join(format!("{cache}{cs}"))),
                    ..LazyHttpOptions::default()
                },
            )
            .unwrap()
        };
        let disk = open("boot");
        let t = Instant::now();
        for &(off, len) in &pattern {
            let mut buf = vec![0u8; len as usize];
            disk.read_at(&mut buf, off).unwrap();
        }
        let boot_time = t.elapsed();
        let st = disk.stats();
        let disk = open("full");
        let t = Instant::now();
        let mut all = vec![0u8; r.size as usize];
        disk.read_at(&mut all, 0).unwrap();
        let full = t.elapsed();
        let fs = disk.stats();
        println!(
            "chunk {:>4} KiB: import {:>5.1} ms, {} chunks stored ({} zero) = {:.1} MiB; \
             boot-like: {} fetches, {:.2} MiB, amplification {:.1}x, {:.1} ms; \
             full cold read {:.1} ms = {:.3} ms/chunk, {:.0} MiB/s",
            cs >> 10,
            r.elapsed.as_secs_f64() * 1e3,
            r.chunks_new,
            r.chunks_zero,
            r.bytes_written as f64 / (1 << 20) as f64,
            st.chunks_fetched,
            st.http.bytes_fetched as f64 / (1 << 20) as f64,
            st.http.bytes_fetched as f64 / wanted as f64,
            boot_time.as_secs_f64() * 1e3,
            full.as_secs_f64() * 1e3,
            full.as_secs_f64() * 1e3 / fs.chunks_fetched.max(1) as f64,
            fs.http.bytes_fetched as f64 / (1 << 20) as f64 / full.as_secs_f64()
        );
    }
    // Fetch latency of incompressible chunks over loopback keep-alive, no cache.
    let src = dir.path().join("random.img");
    std::fs::write(&src, support::rng::random_bytes(77, 32 << 20)).unwrap();
    for cs in [64u32 << 10, 256 << 10, 1 << 20] {
        let archive = dir.path().join(format!("r{cs}"));
        let opts = ImportOptions {
            chunk_size: cs,
            progress: Some(false),
        };
        import_image_with(&src, &archive, "r", &opts).unwrap();
        let index = vmm::image::read_index(&archive.join("images/r")).unwrap();
        let store = vmm::store::http::HttpStore::new(
            &format!("{}/r{cs}", nginx.url()),
            HttpStoreOptions::default(),
        )
        .unwrap();
        let mut lat: Vec<f64> = Vec::new();
        let t = Instant::now();
        for e in &index.entries {
            if let ImageEntry::Chunk(id) = e {
                let t = Instant::now();
                store.fetch_chunk(id, Some(cs as usize)).unwrap();
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let total = t.elapsed().as_secs_f64();
        lat.sort_by(f64::total_cmp);
        println!(
            "fetch {:>4} KiB chunks: {} fetches, median {:.3} ms, p90 {:.3} ms, {:.0} MiB/s, {} requests",
            cs >> 10,
            lat.len(),
            lat[lat.len() / 2],
            lat[lat.len() * 9 / 10],
            32.0 / total,
            store.stats().requests
        );
    }
}
