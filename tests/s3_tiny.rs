//! Archived VMs in S3-compatible object storage, on a real SeaweedFS cluster (master,
//! three volume servers with replication `001`, filer + S3 gateway requiring signed
//! requests; `support::seaweed`), with the tiny guest: push + resume (memory exact, little
//! fetched before the first instruction, concurrent pushes), wrong credentials and a
//! missing bucket, an altered object, the whole cluster stopped, a volume server killed
//! while resuming, and a cache bound smaller than the working set.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::env::TempDir;
use support::seaweed::{PUBLIC_BUCKET, Seaweed};
use support::tiny;
use support::tiny::archive::{PagePattern, snapshot_with_pattern};
use support::tiny::harness::{check_ticks, deadline, ensure};
use support::tiny::{Scenario, TinyVm, guest};
use vmm::archive::restore::ArchiveSession;
use vmm::archive::s3push::push_s3;
use vmm::archive::workingset::FillRate;
use vmm::snapshot::{ChunkEntry, MemoryManifest};
use vmm::store::http::HttpStoreOptions;
use vmm::store::{ChunkId, ChunkRead, ChunkWrite, PutOutcome};
use vmm::util::error_chain;
use vmm::vstate::exit::ExitReason;

/// Guest memory of the archived VMs.
const MEM_MIB: u64 = 256;
const PATTERN: PagePattern = PagePattern {
    base: 16 << 20,
    len: 16 << 20,
    xor: 0x5eed_f00d_0bad_cafe,
};

/// Starts the cluster, or None when `weed` is missing (SKIP; CI fails).
fn cluster() -> Option<Seaweed> {
    if !support::env::kvm_or_skip() {
        return None;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    Seaweed::start()
}

/// Options for resumes that must succeed: patient retries.
fn patient(sw: &Seaweed) -> HttpStoreOptions {
    HttpStoreOptions {
        s3: Some(sw.config()),
        budget: Duration::from_secs(60),
        attempts: 10,
        ..HttpStoreOptions::default()
    }
}

/// Options for resumes whose cluster is taken away: give up quickly.
fn quick(sw: &Seaweed) -> HttpStoreOptions {
    HttpStoreOptions {
        s3: Some(sw.config()),
        attempts: 2,
        first_backoff: Duration::from_millis(50),
        budget: Duration::from_millis(400),
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        ..HttpStoreOptions::default()
    }
}

/// A snapshot of `scenario` with the pattern, in `tmp/snap`; returns (dir, console).
fn snapshot(tmp: &TempDir, scenario: Scenario, ready: &str) -> Result<(PathBuf, String), String> {
    let snap = tmp.join("snap");
    let pre = snapshot_with_pattern(scenario, MEM_MIB, ready, &PATTERN, &snap)?;
    Ok((snap, pre))
}

fn resume(
    url: &str,
    cache: &Path,
    http: HttpStoreOptions,
    tune: impl FnOnce(&mut vmm::archive::restore::ArchiveRestoreOptions),
) -> Result<(TinyVm, ArchiveSession), String> {
    tiny::archive::resume(url, cache, FillRate::Off, |o| {
        o.http = http;
        tune(o);
    })
}

/// Reads every `step`-th page of the pattern from the paused VM and checks it.
fn check_pattern(vm: &TinyVm, step: usize) -> Result<(), String> {
    for addr in PATTERN.pages(step) {
        let v = vm.read_u64(addr)?;
        ensure(v == PATTERN.value(addr), || {
            format!("guest memory at {addr:#x} is {v:#x}")
        })?;
    }
    Ok(())
}

/// The manifest's chunk id for guest address `gpa` (region 0) of the snapshot.
fn chunk_of(snap: &Path, gpa: u64) -> Result<String, String> {
    let m = MemoryManifest::read_from(snap.join("memory")).map_err(|e| error_chain(&e))?;
    match &m.regions[0].chunks[(gpa / m.chunk_size) as usize] {
        ChunkEntry::Chunk(id) => Ok(id.to_string()),
        ChunkEntry::Zero => Err(format!("{gpa:#x} is a zero chunk")),
    }
}

/// Has the (dirty-scenario) guest write to `addr`: a fault on a chunk not fetched yet.
fn guest_touch(vm: &TinyVm, addr: u64) -> Result<(), String> {
    vm.write(guest::MB_CMD_LIST, addr)?;
    vm.write(guest::MB_CMD_COUNT, 1u32)?;
    vm.write(guest::MB_CMD_SEQ, 1u32)
}

/// `vmm …` with the cluster's environment (plus `extra_env`); returns (exit code, stdout,
/// stderr).
fn vmm_with_env(sw: &Seaweed, args: &[&str], extra_env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(support::env::vmm_bin());
    sw.apply_env(&mut cmd);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd.args(args).output().expect("run vmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Push (library, then twice at once through the CLI with `--s3-endpoint`), resume with
/// signed requests: the ticks continue, guest memory is exact, less than 1 % of memory is
/// fetched before the first instruction; the same bucket also resumes over plain HTTP,
/// read anonymously.
#[test]
fn push_and_resume_from_seaweedfs() {
    let Some(sw) = cluster() else { return };
    tiny::harness::check("push_and_resume_from_seaweedfs", || {
        let tmp = TempDir::new("s3-push");
        let (snap, pre) = snapshot(&tmp, Scenario::SnapTicks, "tick 3\n")?;
        sw.create_bucket(PUBLIC_BUCKET);
        let r = push_s3(&snap, "s3://public/arch", "ticks", patient(&sw))
            .map_err(|e| error_chain(&e))?;
        eprintln!("  {r}");
        ensure(
            r.chunks_uploaded == r.chunks_total && r.chunks_total >= PATTERN.len / (64 << 10),
            || format!("unexpected first push: {r:?}"),
        )?;
        // Two pushes of the same VM at once, through the CLI: both succeed, neither
        // uploads a chunk again.
        let snap_s = snap.display().to_string();
        let ep = sw.endpoint();
        let args = [
            "archive",
            "push",
            snap_s.as_str(),
            "s3://public/arch",
            "--name",
            "ticks",
            "--s3-endpoint",
            ep.as_str(),
        ];
        let no_env = [("AWS_ENDPOINT_URL", "")];
        let outs: Vec<(i32, String, String)> = std::thread::scope(|s| {
            let a = s.spawn(|| vmm_with_env(&sw, &args, &no_env));
            let b = s.spawn(|| vmm_with_env(&sw, &args, &no_env));
            vec![a.join().unwrap(), b.join().unwrap()]
        });
        for (code, out, err) in &outs {
            ensure(
                *code == 0 && out.contains(" 0 chunk files uploaded"),
                || format!("concurrent push: exit {code}\n{out}\n{err}"),
            )?;
            eprintln!("  {}", out.trim());
        }

        let url = "s3://public/arch/vms/ticks";
        let (mut vm, s) = resume(url, &tmp.join("cache"), patient(&sw), |_| {})?;
        let b = s.before_first_instruction;
        eprintln!("  before the first instruction: {b:?}");
        ensure(b.total_bytes < (MEM_MIB << 20) / 100, || {
            format!("fetched {b:?} before the first instruction")
        })?;
        let pre_last = check_ticks(&pre)?;
        let target = pre_last + 3;
        vm.wait_console(deadline(), &format!("tick {target}"), |c| {
            check_ticks(&format!("{pre}{c}")).map_or(true, |n| n >= target)
        })?;
        check_ticks(&format!("{pre}{}", vm.console.text()))?;
        vm.pause()?;
        check_pattern(&vm, 1)?;
        let now = s.now();
        eprintln!("  after reading the pattern: {now:?}");
        ensure(now.memory_requests > 0, || "no S3 request".into())?;
        drop(vm);
        drop(s);

        // The same bucket read anonymously over plain HTTP (path-style object URLs).
        let http_url = format!("{}/{PUBLIC_BUCKET}/arch/vms/ticks", sw.endpoint());
        let (mut vm, _s) = resume(
            &http_url,
            &tmp.join("cache-http"),
            HttpStoreOptions::default(),
            |_| {},
        )?;
        vm.pause()?;
        check_pattern(&vm, 7)?;
        Ok(())
    });
}

/// A failing restore: URL, environment changes, what stderr must name.
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a [&'a str]);

/// Wrong credentials, no credentials for a private bucket, a missing bucket, a missing VM
/// and no endpoint: a one-line error
/// naming the cause, exit code 1, no panic.
#[test]
fn wrong_credentials_and_missing_bucket_fail_clearly() {
    let Some(sw) = cluster() else { return };
    tiny::harness::check("wrong_credentials_and_missing_bucket_fail_clearly", || {
        sw.create_bucket("present");
        let cases: [Case; 5] = [
            (
                "s3://present/a/vms/x",
                vec![("AWS_SECRET_ACCESS_KEY", "wrong-secret")],
                &["SignatureDoesNotMatch", "403"],
            ),
            (
                "s3://present/a/vms/x",
                vec![("AWS_ACCESS_KEY_ID", "nobody")],
                &["InvalidAccessKeyId", "403"],
            ),
            ("s3://no-such-bucket/a/vms/x", vec![], &["NoSuchBucket"]),
            (
                "s3://present/a/vms/x",
                vec![],
                &["no archived VM at s3://present/a/vms/x"],
            ),
            (
                "s3://present/a/vms/x",
                vec![("AWS_ACCESS_KEY_ID", ""), ("AWS_SECRET_ACCESS_KEY", "")],
                &["AccessDenied", "403"],
            ),
        ];
        for (url, env, want) in &cases {
            let (code, _, err) = vmm_with_env(&sw, &["restore", url], env);
            eprintln!("  {url} {env:?}: exit {code}: {}", err.trim());
            ensure(code == 1, || format!("exit code {code} for {url}: {err}"))?;
            ensure(!err.contains("panicked"), || format!("panic: {err}"))?;
            for w in *want {
                ensure(err.contains(w), || format!("no {w:?} in: {err}"))?;
            }
        }
        let (code, _, err) = vmm_with_env(
            &sw,
            &["restore", "s3://present/a/vms/x"],
            &[("AWS_ENDPOINT_URL", "")],
        );
        ensure(code == 1 && err.contains("--s3-endpoint"), || {
            format!("without an endpoint: exit {code}: {err}")
        })?;
        Ok(())
    });
}

/// An object altered in the bucket is rejected naming the chunk (never a wrong guest);
/// then the whole cluster is stopped during a resume: the next fault is retried, then the
/// VM stops with exit code 6.
#[test]
fn altered_object_and_stopped_cluster_stop_the_vm_cleanly() {
    let Some(mut sw) = cluster() else { return };
    tiny::harness::check(
        "altered_object_and_stopped_cluster_stop_the_vm_cleanly",
        || {
            let tmp = TempDir::new("s3-faults");
            let (snap, _) = snapshot(&tmp, Scenario::SnapDirty, "dirty: ready\n")?;
            sw.create_bucket("faults");
            push_s3(&snap, "s3://faults/a", "dirty", patient(&sw)).map_err(|e| error_chain(&e))?;
            let url = "s3://faults/a/vms/dirty";

            // 1. Altered object: a well-formed chunk file with other content.
            let addr = PATTERN.base + 40 * 4096;
            let id = chunk_of(&snap, addr)?;
            let len = 64u32 << 10;
            let mut bytes = vec![b'V', b'C', 1, 0];
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.resize(8 + len as usize, 0xab);
            sw.store("s3://faults/a")
                .put_object(&format!("chunks/{}/{id}", &id[..2]), &bytes)
                .map_err(|e| error_chain(&e))?;
            let (mut vm, s) = resume(url, &tmp.join("cache-a"), quick(&sw), |_| {})?;
            guest_touch(&vm, addr)?;
            let reason = tiny::run_for(&mut vm, Duration::from_secs(120))?;
            eprintln!("  altered object: {reason:?}");
            match &reason {
                ExitReason::MemoryUnavailable { message }
                    if message.contains(&id) && message.contains("corrupt") => {}
                other => {
                    return Err(format!(
                        "expected MemoryUnavailable naming {id}, got {other:?}"
                    ));
                }
            }
            ensure(reason.exit_code() == 6, || "exit code".into())?;
            drop(vm);
            drop(s);

            // 2. The whole cluster stopped after the resume.
            let (mut vm, s) = resume(url, &tmp.join("cache-b"), quick(&sw), |_| {})?;
            // Fetch the guest's code, stack and mailbox (its low 4 MiB) while the cluster
            // is up: the host's own mailbox write below must not fault on a chunk that
            // cannot be fetched any more.
            for addr in (0..4u64 << 20).step_by(64 << 10) {
                vm.read_u64(addr)?;
            }
            sw.stop();
            guest_touch(&vm, PATTERN.base + 5 * 4096)?;
            let reason = tiny::run_for(&mut vm, Duration::from_secs(120))?;
            eprintln!("  cluster stopped: {reason:?}");
            match &reason {
                ExitReason::MemoryUnavailable { message }
                    if message.contains("gave up") || message.contains("refused") => {}
                other => {
                    return Err(format!(
                        "expected MemoryUnavailable after retries, got {other:?}"
                    ));
                }
            }
            ensure(reason.exit_code() == 6, || "exit code".into())?;
            drop(vm);
            drop(s);
            Ok(())
        },
    );
}

/// One volume server killed (SIGKILL) while a resume fetches: every object has a replica
/// on another server (replication 001), and the resume completes with exact memory.
#[test]
fn a_killed_volume_server_is_replaced_by_its_replica() {
    let Some(mut sw) = cluster() else { return };
    tiny::harness::check("a_killed_volume_server_is_replaced_by_its_replica", || {
        let tmp = TempDir::new("s3-replica");
        let (snap, _) = snapshot(&tmp, Scenario::SnapTicks, "tick 3\n")?;
        sw.create_bucket("repl");
        push_s3(&snap, "s3://repl/a", "ticks", patient(&sw)).map_err(|e| error_chain(&e))?;
        let (mut vm, s) = resume(
            "s3://repl/a/vms/ticks",
            &tmp.join("cache"),
            patient(&sw),
            |_| {},
        )?;
        vm.pause()?;
        // A first part of the pattern before, the rest after the kill.
        for addr in PATTERN.pages(1).take(32) {
            ensure(vm.read_u64(addr)? == PATTERN.value(addr), || {
                format!("{addr:#x}")
            })?;
        }
        let before = s.now();
        sw.kill_volume(0);
        check_pattern(&vm, 1)?;
        let after = s.now();
        eprintln!("  before the kill: {before:?}\n  after: {after:?}");
        ensure(after.memory_requests > before.memory_requests, || {
            "nothing was fetched after the kill".into()
        })?;
        Ok(())
    });
}

/// A cache bound (1 MiB = 16 chunks) far smaller than what the guest reads (16 MiB):
/// memory is exact, the cache stays within its bound, chunks are evicted, and a second
/// instance on the same cache fetches evicted chunks again.
#[test]
fn a_cache_smaller_than_the_working_set_stays_within_its_bound() {
    let Some(sw) = cluster() else { return };
    tiny::harness::check(
        "a_cache_smaller_than_the_working_set_stays_within_its_bound",
        || {
            let tmp = TempDir::new("s3-bound");
            let (snap, _) = snapshot(&tmp, Scenario::SnapTicks, "tick 3\n")?;
            sw.create_bucket("bound");
            push_s3(&snap, "s3://bound/a", "ticks", patient(&sw)).map_err(|e| error_chain(&e))?;
            let cache = tmp.join("cache");
            let limit_mib = 1u64;
            let tune = |o: &mut vmm::archive::restore::ArchiveRestoreOptions| {
                o.cache_max_mib = Some(limit_mib)
            };
            let url = "s3://bound/a/vms/ticks";
            let mut fetched = Vec::new();
            for round in 0..2 {
                let (mut vm, s) = resume(url, &cache, patient(&sw), tune)?;
                vm.pause()?;
                check_pattern(&vm, 1)?;
                let st = s.store().stats();
                let u =
                    vmm::store::evict::usage(&cache.join("chunks")).map_err(|e| error_chain(&e))?;
                eprintln!("  round {round}: cache {st:?}, directory {u:?}");
                ensure(u.bytes <= limit_mib << 20, || {
                    format!("cache directory {u:?} over {limit_mib} MiB")
                })?;
                ensure(st.evicted > 0, || format!("nothing evicted: {st:?}"))?;
                fetched.push(s.now().memory_requests);
            }
            ensure(fetched[1] >= PATTERN.len / (64 << 10) - 16, || {
                format!("the second instance did not fetch evicted chunks again: {fetched:?}")
            })?;
            Ok(())
        },
    );
}

/// The chunk store itself: a put asks with HEAD first and skips a chunk that is there, a
/// read is verified, a ranged read returns exactly the bytes asked for, a missing chunk is
/// "missing", and a missing bucket is named as such (not as a missing chunk).
#[test]
fn the_s3_store_puts_once_reads_verified_and_reads_ranges() {
    let Some(sw) = cluster() else { return };
    tiny::harness::check(
        "the_s3_store_puts_once_reads_verified_and_reads_ranges",
        || {
            sw.create_bucket("store");
            let s = sw.store("s3://store/p");
            let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
            let id = ChunkId::of(&data);
            let first = s.put_hashed(&id, &data).map_err(|e| error_chain(&e))?;
            let again = s.put_hashed(&id, &data).map_err(|e| error_chain(&e))?;
            ensure(
                matches!(first, PutOutcome::Written { .. }) && again == PutOutcome::Present,
                || format!("put outcomes {first:?}, {again:?}"),
            )?;
            let w = s.write_stats();
            ensure(w.puts == 1 && w.skipped == 1, || format!("{w:?}"))?;
            ensure(s.get(&id).map_err(|e| error_chain(&e))? == data, || {
                "read back differs".into()
            })?;
            s.put_object("packs/one", &data)
                .map_err(|e| error_chain(&e))?;
            let r = s
                .get_range("packs/one", 1000, 5000)
                .map_err(|e| error_chain(&e))?;
            ensure(r == data[1000..6000], || "range read differs".into())?;
            let missing = ChunkId::of(b"not stored");
            ensure(!s.contains(&missing).map_err(|e| error_chain(&e))?, || {
                "a missing chunk is present".into()
            })?;
            let e = error_chain(&s.get(&missing).unwrap_err());
            ensure(e.contains("missing"), || e.clone())?;
            let nb = sw.store("s3://no-such-bucket-x/p");
            let e = error_chain(&nb.get(&id).unwrap_err());
            ensure(e.contains("NoSuchBucket"), || e.clone())?;
            Ok(())
        },
    );
}

/// `vmm image import SRC s3://…` writes a remote image into the bucket, and a lazy disk
/// (`url=s3://…/images/NAME`) reads it back exactly, through signed requests and the
/// chunk cache.
#[test]
fn an_image_imported_to_a_bucket_reads_back_as_a_lazy_disk() {
    use vmm::disk::BlockBackend;
    use vmm::disk::http::{LazyHttpDisk, LazyHttpOptions};
    let Some(sw) = cluster() else { return };
    tiny::harness::check(
        "an_image_imported_to_a_bucket_reads_back_as_a_lazy_disk",
        || {
            let tmp = TempDir::new("s3-image");
            sw.create_bucket("images");
            let img = tmp.join("disk.raw");
            let data = support::files::test_image(&img);
            let img_s = img.display().to_string();
            let (code, out, err) = vmm_with_env(
                &sw,
                &["image", "import", &img_s, "s3://images/a", "--name", "disk"],
                &[],
            );
            ensure(
                code == 0 && out.contains("uploaded to s3://images/a/images/disk"),
                || format!("image import: exit {code}\n{out}\n{err}"),
            )?;
            eprintln!("  {}", out.trim());
            let opts = LazyHttpOptions {
                cache_dir: Some(tmp.join("cache")),
                http: patient(&sw),
                ..LazyHttpOptions::default()
            };
            let disk = LazyHttpDisk::open("s3://images/a/images/disk", opts)
                .map_err(|e| error_chain(&e))?;
            let mut all = vec![0u8; data.len()];
            disk.read_at(&mut all, 0).map_err(|e| format!("{e:?}"))?;
            ensure(all == data, || "the disk reads differently".into())?;
            Ok(())
        },
    );
}
