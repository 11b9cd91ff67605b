//! Host limits, measured by the snapshot bench itself: memcpy, BLAKE3 (one thread, all
//! cores), zstd level 1, write + fsync to the bench directory (`host.csv`).

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::memory::{CHUNK, PAGE, Pattern, cores};
use crate::support::bench::{Csv, f, fs_type, load1, min_median, ms};
use crate::support::mapping::Mapping;
use crate::support::rng::Rng;

/// What the host allows, as the create figures need it.
pub struct Limits {
    /// Sequential write + fsync bandwidth to the bench directory, bytes/s.
    pub fsync_bw: f64,
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn best<F: FnMut() -> Duration>(n: usize, mut f: F) -> Duration {
    (0..n).map(|_| f()).min().unwrap()
}

/// Writes `data` to a new file at `path` in 1 MiB writes, fsyncs it, removes it: the time.
pub fn write_fsync_file(path: &Path, data: &[u8]) -> Duration {
    let t = Instant::now();
    let mut f = fs::File::create(path).expect("create bench file");
    for b in data.chunks(1 << 20) {
        f.write_all(b).expect("write bench file");
    }
    f.sync_all().expect("fsync bench file");
    let d = t.elapsed();
    drop(f);
    let _ = fs::remove_file(path);
    d
}

/// `n` files of `CHUNK` bytes written like the chunk store does (create, write, fsync,
/// rename) by `threads` threads, then the directory fsynced.
fn chunk_files(dir: &Path, data: &[u8], threads: usize) -> Duration {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    let chunks: Vec<&[u8]> = data.chunks(CHUNK).collect();
    let per = chunks.len().div_ceil(threads);
    let t = Instant::now();
    std::thread::scope(|s| {
        for (ti, part) in chunks.chunks(per).enumerate() {
            s.spawn(move || {
                for (i, c) in part.iter().enumerate() {
                    let tmp = dir.join(format!(".t{ti}-{i}"));
                    let mut f = fs::File::create(&tmp).unwrap();
                    f.write_all(c).unwrap();
                    f.sync_all().unwrap();
                    fs::rename(&tmp, dir.join(format!("c{ti}-{i}"))).unwrap();
                }
            });
        }
    });
    fs::File::open(dir).unwrap().sync_all().unwrap();
    let d = t.elapsed();
    let _ = fs::remove_dir_all(dir);
    d
}

/// Median latencies (ms) of a new 4 KiB file's fsync and of a directory fsync.
fn fsync_latency(dir: &Path) -> (f64, f64) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    let page = [0x5au8; PAGE];
    for i in 0..64 {
        let t = Instant::now();
        let mut f = fs::File::create(dir.join(format!("f{i}"))).unwrap();
        f.write_all(&page).unwrap();
        f.sync_all().unwrap();
        files.push(ms(t.elapsed()));
        let t = Instant::now();
        fs::File::open(dir).unwrap().sync_all().unwrap();
        dirs.push(ms(t.elapsed()));
    }
    let _ = fs::remove_dir_all(dir);
    (min_median(&files).1, min_median(&dirs).1)
}

/// One `host.csv` row writer: prints the figure and appends it.
struct HostRows {
    run: u64,
    csv: Csv,
}

impl HostRows {
    fn row(&self, metric: &str, value: f64, unit: &str, detail: &str) {
        println!("  {metric:<34} {value:>10.3} {unit:<6} {detail}");
        self.csv.row(&[
            self.run.to_string(),
            metric.into(),
            f(value),
            unit.into(),
            detail.into(),
            f(load1()),
        ]);
    }
}

/// Size of the buffers the host limits are measured with.
const N: usize = 256 << 20;

/// Measures memcpy, BLAKE3, zstd level 1 and write + fsync (to the bench directory and,
/// if it is tmpfs, /dev/shm); appends them to `host.csv`.
pub fn host_limits(run: u64, dir: &Path) -> Limits {
    let rows = HostRows {
        run,
        csv: Csv::new("host", "run,metric,value,unit,detail,load1"),
    };
    println!(
        "host limits (bench dir {} on {}):",
        dir.display(),
        fs_type(dir)
    );
    let mut src = vec![0u8; N];
    Rng::new(7).fill(&mut src);
    memcpy_limits(&rows, &src);
    blake3_limits(&rows, &src);
    zstd_limits(&rows, &src);
    fsync_limits(&rows, &src, dir)
}

/// The write + fsync bandwidth alone (a variant run: only what the target needs).
pub fn fsync_only(dir: &Path) -> Limits {
    let src = vec![0x5au8; N];
    let t = write_fsync_file(&dir.join("fsync-test.bin"), &src);
    let bw = src.len() as f64 / t.as_secs_f64();
    println!(
        "write + fsync to {} ({}): {:.3} GB/s",
        dir.display(),
        fs_type(dir),
        bw / 1e9
    );
    Limits { fsync_bw: bw }
}

fn memcpy_limits(rows: &HostRows, src: &[u8]) {
    let mut dst = vec![1u8; N];
    let d = best(5, || {
        let t = Instant::now();
        dst.copy_from_slice(src);
        std::hint::black_box(&dst);
        t.elapsed()
    });
    rows.row(
        "memcpy_warm",
        gbps(N, d),
        "GB/s",
        "256 MiB into touched memory, best of 5",
    );
    let d = best(3, || {
        let mut m = Mapping::new(N);
        let t = Instant::now();
        m.slice().copy_from_slice(src);
        std::hint::black_box(m.slice());
        t.elapsed()
    });
    rows.row(
        "memcpy_first_touch",
        gbps(N, d),
        "GB/s",
        "256 MiB into a fresh anonymous mapping (page faults included), best of 3",
    );
}

fn blake3_limits(rows: &HostRows, src: &[u8]) {
    let d = best(3, || {
        let t = Instant::now();
        for c in src.chunks(CHUNK) {
            std::hint::black_box(blake3::hash(c));
        }
        t.elapsed()
    });
    rows.row(
        "blake3_1thread",
        gbps(N, d),
        "GB/s",
        "64 KiB chunks, one thread",
    );
    let n = cores();
    let d = best(3, || {
        let per = N / n;
        let t = Instant::now();
        std::thread::scope(|s| {
            for part in src.chunks(per) {
                s.spawn(move || {
                    for c in part.chunks(CHUNK) {
                        std::hint::black_box(blake3::hash(c));
                    }
                });
            }
        });
        t.elapsed()
    });
    rows.row(
        "blake3_all_cores",
        gbps(N, d),
        "GB/s",
        &format!("64 KiB chunks, {n} threads"),
    );
}

/// zstd level 1 on the pattern's text pages and on random data.
fn zstd_limits(rows: &HostRows, src: &[u8]) {
    let mut text = vec![0u8; 64 << 20];
    let mut pat = Pattern::new(11);
    for (i, p) in text.chunks_mut(PAGE).enumerate() {
        pat.text_page(p, i as u64);
    }
    for (name, data) in [("text", &text[..]), ("random", &src[..64 << 20])] {
        let t = Instant::now();
        let comp: Vec<Vec<u8>> = data
            .chunks(CHUNK)
            .map(|c| zstd::bulk::compress(c, 1).unwrap())
            .collect();
        let dc = t.elapsed();
        let clen: usize = comp.iter().map(Vec::len).sum();
        let mut out = vec![0u8; CHUNK];
        let t = Instant::now();
        for c in &comp {
            let k = zstd::bulk::decompress_to_buffer(c, &mut out[..]).unwrap();
            std::hint::black_box(k);
        }
        let dd = t.elapsed();
        let ratio = data.len() as f64 / clen as f64;
        rows.row(
            &format!("zstd1_compress_{name}"),
            gbps(data.len(), dc),
            "GB/s",
            &format!("64 KiB chunks one thread; ratio {ratio:.2}"),
        );
        rows.row(
            &format!("zstd1_decompress_{name}"),
            gbps(data.len(), dd),
            "GB/s",
            "64 KiB chunks one thread",
        );
    }
}

/// write + fsync to the bench directory (and /dev/shm when it is tmpfs).
fn fsync_limits(rows: &HostRows, src: &[u8], dir: &Path) -> Limits {
    let mut fsync_bw = f64::NAN;
    let mut dirs = vec![(dir.to_path_buf(), "bench_dir")];
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && fs_type(shm) == "tmpfs" {
        let d = shm.join(format!("vmm-bench-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        dirs.push((d, "dev_shm"));
    }
    for (d, tag) in &dirs {
        let fst = fs_type(d);
        let file = d.join("fsync-test.bin");
        let t = write_fsync_file(&file, src);
        let bw = N as f64 / t.as_secs_f64();
        if *tag == "bench_dir" {
            fsync_bw = bw;
        }
        rows.row(
            &format!("write_fsync_seq_{tag}"),
            bw / 1e9,
            "GB/s",
            &format!("{fst}: one new 256 MiB file in 1 MiB writes then fsync"),
        );
        let t = chunk_files(&d.join("chunks-test"), &src[..128 << 20], 8);
        rows.row(
            &format!("write_fsync_chunks_{tag}"),
            gbps(128 << 20, t),
            "GB/s",
            &format!("{fst}: 2048 new 64 KiB files each fsynced+renamed by 8 threads"),
        );
        let (f_ms, d_ms) = fsync_latency(&d.join("latency-test"));
        rows.row(
            &format!("fsync_4k_file_{tag}"),
            f_ms,
            "ms",
            &format!("{fst}: create + write 4 KiB + fsync of a new file, median of 64"),
        );
        rows.row(
            &format!("fsync_dir_{tag}"),
            d_ms,
            "ms",
            &format!("{fst}: fsync of a directory with one new entry, median of 64"),
        );
        if *tag == "dev_shm" {
            let _ = fs::remove_dir_all(d);
        }
    }
    Limits { fsync_bw }
}
