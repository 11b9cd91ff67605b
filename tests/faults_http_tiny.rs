//! HTTP faults between `vmm` and a real nginx (docs/FAULTS.md), injected by a proxy the
//! tests run on loopback (tests/support/faults/proxy.rs): connection reset mid-body, truncated
//! body, wrong Content-Length (too long, too short), 500 and 503, a 10 s stall, and the
//! bytes of a different chunk. Driven through a lazy remote disk read by the tiny guest's
//! virtio-blk request and through an archived VM resumed over HTTP with lazy memory.
//! Transient faults are retried and succeed; a lying server's bytes are rejected by hash
//! and never reach the guest (the guest's read fails; lazy memory that cannot be read
//! stops the VM with exit code 6).
//!
//! Each test skips, printing `SKIP:`, without /dev/kvm or nginx.

mod support;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::env::{TempDir, temp_dir};
use support::faults::proxy::{Fault, Proxy};
use support::nginx::{Nginx, nginx_available};
use support::tiny;
use support::tiny::archive::{PagePattern, snapshot_with_pattern};
use support::tiny::harness::{deadline, ensure};
use support::tiny::{Scenario, Spec, TinyVm, guest};
use vmm::archive::workingset::FillRate;
use vmm::config::BlockConfig;
use vmm::snapshot::{ChunkEntry, MemoryManifest};
use vmm::util::error_chain;
use vmm::vstate::exit::ExitReason;

fn check(name: &str, body: impl FnOnce() -> Result<(), String>) {
    if !nginx_available() {
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    tiny::harness::check(name, body);
}

/// The transient faults: each hits the first request for every path once.
fn transient() -> Vec<Fault> {
    vec![
        Fault::ResetMidBody,
        Fault::TruncatedBody,
        Fault::LongContentLength,
        Fault::ShortContentLength,
        Fault::Status(500),
        Fault::Status(503),
    ]
}

/// A 10 s stall: long enough that a request must be given up on and sent again.
const STALL: Duration = Duration::from_secs(10);

fn is_chunk(path: &str) -> bool {
    path.contains("/chunks/")
}

/// `fault` on the first request for every path; a stall only on the first two chunk
/// requests (each costs 10 s).
fn first_request_policy(fault: Fault) -> impl Fn(&str, u64) -> Fault + Send + Sync + 'static {
    let stalls = std::sync::atomic::AtomicUsize::new(0);
    move |path, n| {
        if n != 1 {
            return Fault::Pass;
        }
        if matches!(fault, Fault::Stall(_)) {
            let k = stalls.fetch_add(usize::from(is_chunk(path)), Ordering::Relaxed);
            return if is_chunk(path) && k < 2 {
                fault.clone()
            } else {
                Fault::Pass
            };
        }
        fault.clone()
    }
}

// ---------------------------------------------------------------------------------------
// Lazy remote disk.

const DISK_LEN: u64 = 1 << 20;

fn disk_pattern(xor: u64, range: std::ops::Range<u64>) -> Vec<u8> {
    range
        .step_by(8)
        .flat_map(|o| (o ^ xor).to_le_bytes())
        .collect()
}

/// Imports the virtio guest's disk pattern as image `disk`; returns the chunk paths (as
/// served) in disk order.
fn disk_archive(tmp: &TempDir) -> Result<(std::path::PathBuf, Vec<String>), String> {
    let src = tmp.join("disk.raw");
    std::fs::write(&src, disk_pattern(guest::DISK_XOR, 0..DISK_LEN)).map_err(|e| e.to_string())?;
    let archive = tmp.join("archive");
    vmm::image::import_image(&src, &archive, "disk", vmm::image::DEFAULT_IMAGE_CHUNK_SIZE)
        .map_err(|e| error_chain(&e))?;
    let index = vmm::image::read_index(&archive.join("images/disk")).map_err(|e| e.to_string())?;
    let chunks = index
        .entries
        .iter()
        .filter_map(|e| match e {
            vmm::image::ImageEntry::Chunk(id) => Some(format!("/{}", id.relative_path())),
            vmm::image::ImageEntry::Zero => None,
        })
        .collect();
    Ok((archive, chunks))
}

/// Boots the virtio guest on the remote image through `proxy` (fresh cache and overlay
/// under `dir`), lets it read sector 8, check it, write, and reset. Returns how the VM
/// ended and its console.
fn virtio_run(proxy: &Proxy, dir: &Path) -> Result<(ExitReason, String), String> {
    let disk = BlockConfig {
        url: Some(format!("{}/images/disk", proxy.url())),
        cache: Some(dir.join("cache")),
        overlay: Some(dir.join("overlay")),
        id: Some("tiny0".into()),
        ..Default::default()
    };
    let mut vm = tiny::boot(Spec::new(Scenario::SnapVirtio), vec![disk])?;
    vm.wait_for(deadline(), "virtio: read posted\n")?;
    vm.write(guest::MB_HOST_GO, guest::HOST_GO)?;
    let exit = tiny::run_for(&mut vm, Duration::from_secs(90))?;
    Ok((exit, vm.console.text()))
}

const VIRTIO_OK: &str = "virtio: read posted\nvirtio: go\nvirtio: read ok\nvirtio: write ok\n";

/// Every transient fault on the first request of every path (index and chunks), then a
/// 10 s stall on the chunk the guest reads: the guest's virtio read is retried until it
/// succeeds, returns the image's bytes, and the guest carries on (write, reset).
#[test]
fn remote_disk_rides_out_transient_http_faults() {
    check("remote_disk_transient_faults", || {
        let tmp = temp_dir("faults-http-disk");
        let (archive, _) = disk_archive(&tmp)?;
        let nginx = Nginx::start(&archive);
        let proxy = Proxy::start(&nginx.url());
        let mut faults = transient();
        faults.push(Fault::Stall(STALL));
        for (k, fault) in faults.into_iter().enumerate() {
            proxy.set_policy(first_request_policy(fault.clone()));
            proxy.clear_log();
            let (exit, console) = virtio_run(&proxy, &tmp.join(format!("run{k}")))?;
            let injected = proxy.injected();
            eprintln!("  {fault:?}: {exit:?}, {} injected", injected.len());
            ensure(exit == ExitReason::Reset && console == VIRTIO_OK, || {
                format!(
                    "{fault:?}: the guest ended {exit:?} with\n{console}\nproxy log {:?}",
                    proxy.log()
                )
            })?;
            ensure(injected.iter().any(|(p, _)| is_chunk(p)), || {
                format!("{fault:?}: no chunk request was faulted: {:?}", proxy.log())
            })?;
        }
        Ok(())
    });
}

/// A server answering the chunk the guest reads with another chunk's bytes: the bytes
/// fail their hash, the guest's read completes with an I/O error (the guest reports the
/// failed request and panics: it never sees wrong data), nothing wrong is cached; with an
/// honest server again the same disk and cache read correctly.
#[test]
fn remote_disk_rejects_a_lying_servers_bytes() {
    check("remote_disk_lying_server", || {
        let tmp = temp_dir("faults-http-disk-lie");
        let (archive, chunks) = disk_archive(&tmp)?;
        ensure(chunks.len() >= 2, || format!("chunks {chunks:?}"))?;
        let nginx = Nginx::start(&archive);
        let proxy = Proxy::start(&nginx.url());
        let (victim, other) = (chunks[0].clone(), chunks[1].clone());
        let v = victim.clone();
        proxy.set_policy(move |path, _| {
            if path == v {
                Fault::Substitute(other.clone())
            } else {
                Fault::Pass
            }
        });
        let dir = tmp.join("run");
        let (exit, console) = virtio_run(&proxy, &dir)?;
        eprintln!("  lying server: {exit:?}, console {console:?}");
        ensure(!console.contains("read ok"), || {
            format!("the guest accepted the read: {console}")
        })?;
        ensure(
            exit == ExitReason::GuestPanic && console.contains("virtio: FAIL"),
            || format!("expected the guest to see a failed read, got {exit:?}:\n{console}"),
        )?;
        ensure(proxy.injected().iter().any(|(p, _)| *p == victim), || {
            "the lie was never told".into()
        })?;
        // Honest again: same cache and overlay, the read succeeds.
        proxy.set_policy(|_, _| Fault::Pass);
        let _ = std::fs::remove_file(dir.join("overlay"));
        let _ = std::fs::remove_file(dir.join("overlay.map"));
        let (exit, console) = virtio_run(&proxy, &dir)?;
        ensure(exit == ExitReason::Reset && console == VIRTIO_OK, || {
            format!("after the lie: {exit:?}\n{console}")
        })
    });
}

// ---------------------------------------------------------------------------------------
// Archived VM, lazy memory over HTTP.

const MEM_MIB: u64 = 64;
const PAT_BASE: u64 = 16 << 20;
const PAT_LEN: u64 = 4 << 20;
const PAT_XOR: u64 = 0x5eed_f00d_0bad_cafe;
const PATTERN: PagePattern = PagePattern {
    base: PAT_BASE,
    len: PAT_LEN,
    xor: PAT_XOR,
};

/// Boots the command guest, writes a distinct qword per page of the pattern area,
/// snapshots and pushes it as `vms/dirty`; returns the archive directory. The archive keeps
/// one file per chunk (the layout older archives and object-store pushes have, which every
/// reader still serves): the fault proxy picks its victims by chunk path and does not pass
/// `Range` headers on, so it cannot fault single chunks inside a pack. Altered pack records
/// are covered by `archive_tiny`.
fn archive_vm(tmp: &TempDir) -> Result<std::path::PathBuf, String> {
    let snap = tmp.join("snap");
    snapshot_with_pattern(
        Scenario::SnapDirty,
        MEM_MIB,
        "dirty: ready\n",
        &PATTERN,
        &snap,
    )?;
    let archive = tmp.join("archive");
    vmm::archive::push::push_in_layout(&snap, &archive, "dirty", vmm::store::Layout::Files)
        .map_err(|e| error_chain(&e))?;
    Ok(archive)
}

fn resume(url: &str, cache: &Path, fill: FillRate) -> Result<TinyVm, String> {
    let (vm, s) = tiny::archive::resume(url, cache, fill, |o| o.prefetch = false)?;
    // The session owns the prefetcher and reports; the VM works without it.
    std::mem::forget(s);
    Ok(vm)
}

/// Has the running guest write `seq << 32 | addr` at `addr` and waits until it did: the
/// guest runs, and its fault on `addr`'s chunk was served.
fn guest_touch(vm: &TinyVm, seq: u32, addr: u64) -> Result<(), String> {
    vm.write(guest::MB_CMD_LIST, addr)?;
    vm.write(guest::MB_CMD_COUNT, 1u32)?;
    vm.write(guest::MB_CMD_SEQ, seq)?;
    vm.wait_console(deadline(), "the guest's write", |_| {
        vm.read_u32(guest::MB_CMD_ACK).is_ok_and(|a| a == seq)
    })
}

fn chunk_path(archive: &Path, gpa: u64) -> Result<String, String> {
    let m =
        MemoryManifest::read_from(archive.join("vms/dirty/memory")).map_err(|e| e.to_string())?;
    match &m.regions[0].chunks[(gpa / m.chunk_size) as usize] {
        ChunkEntry::Chunk(id) => Ok(format!("/{}", id.relative_path())),
        ChunkEntry::Zero => Err(format!("{gpa:#x} is a zero chunk")),
    }
}

/// An archived VM resumed through the proxy while every transient fault hits the first
/// request of every path (state, manifest, chunks), then with a 10 s stall on the chunk
/// the guest touches: it resumes, the guest's faults on unfetched memory are served, it
/// keeps running, and the pattern reads back exactly.
#[test]
fn lazy_memory_rides_out_transient_http_faults() {
    check("lazy_memory_transient_faults", || {
        let tmp = temp_dir("faults-http-mem");
        let archive = archive_vm(&tmp)?;
        let nginx = Nginx::start(&archive);
        let proxy = Proxy::start(&nginx.url());
        let url = format!("{}/vms/dirty", proxy.url());
        let mut faults = transient();
        faults.push(Fault::Stall(STALL));
        for (k, fault) in faults.into_iter().enumerate() {
            proxy.set_policy(first_request_policy(fault.clone()));
            proxy.clear_log();
            let vm = resume(&url, &tmp.join(format!("cache{k}")), FillRate::Off)?;
            let addr = PAT_BASE + (k as u64 * 3 + 1) * (64 << 10) + 8 * 4096;
            guest_touch(&vm, 1, addr).map_err(|e| format!("{fault:?}: {e}"))?;
            for a in PATTERN.pages(61) {
                let v = vm.read_u64(a)?;
                let want = if a == addr {
                    1u64 << 32 | a
                } else {
                    PATTERN.value(a)
                };
                ensure(v == want, || {
                    format!("{fault:?}: memory at {a:#x} is {v:#x}")
                })?;
            }
            guest_touch(&vm, 2, PAT_BASE + 40 * 4096)?;
            ensure(vm.vmm.machine.exit.reason().is_none(), || {
                format!(
                    "{fault:?}: the VM exited: {:?}",
                    vm.vmm.machine.exit.reason()
                )
            })?;
            let injected = proxy.injected();
            eprintln!("  {fault:?}: {} requests faulted", injected.len());
            ensure(injected.iter().any(|(p, _)| is_chunk(p)), || {
                format!("{fault:?}: no chunk request was faulted: {:?}", proxy.log())
            })?;
            if !matches!(fault, Fault::Stall(_)) {
                ensure(injected.iter().any(|(p, _)| p.ends_with("/state")), || {
                    format!(
                        "{fault:?}: the state file was not faulted: {:?}",
                        proxy.log()
                    )
                })?;
            }
        }
        Ok(())
    });
}

/// A server answering the chunk the guest touches with another chunk's bytes: the VM
/// stops with exit code 6 naming the chunk as corrupt (it never runs on wrong memory), the
/// wrong bytes are not cached; an honest server later serves a new instance fine.
#[test]
fn lazy_memory_stops_the_vm_on_a_lying_server() {
    check("lazy_memory_lying_server", || {
        let tmp = temp_dir("faults-http-mem-lie");
        let archive = archive_vm(&tmp)?;
        let nginx = Nginx::start(&archive);
        let proxy = Proxy::start(&nginx.url());
        let url = format!("{}/vms/dirty", proxy.url());
        let addr = PAT_BASE + 20 * 4096;
        let victim = chunk_path(&archive, addr)?;
        let other = chunk_path(&archive, PAT_BASE + (1 << 20))?;
        let v = victim.clone();
        proxy.set_policy(move |path, _| {
            if path == v {
                Fault::Substitute(other.clone())
            } else {
                Fault::Pass
            }
        });
        let cache = tmp.join("cache");
        let mut vm = resume(&url, &cache, FillRate::Off)?;
        vm.write(guest::MB_CMD_LIST, addr)?;
        vm.write(guest::MB_CMD_COUNT, 1u32)?;
        vm.write(guest::MB_CMD_SEQ, 1u32)?;
        let reason = tiny::run_for(&mut vm, Duration::from_secs(60))?;
        eprintln!("  lying server: {reason:?}");
        let id = victim.rsplit('/').next().unwrap_or_default().to_string();
        match &reason {
            ExitReason::MemoryUnavailable { message }
                if message.contains(&id) && message.contains("corrupt") => {}
            other => {
                return Err(format!(
                    "expected exit 6 naming {id} as corrupt, got {other:?}"
                ));
            }
        }
        ensure(reason.exit_code() == 6, || "exit code".into())?;
        ensure(vm.read_u32(guest::MB_CMD_ACK).unwrap_or(0) != 1, || {
            "the guest completed its write on wrong memory".into()
        })?;
        drop(vm);
        ensure(
            !cache.join("chunks").join(&id[..2]).join(&id).exists(),
            || "the wrong bytes were cached".into(),
        )?;
        proxy.set_policy(|_, _| Fault::Pass);
        let vm = resume(&url, &cache, FillRate::Off)?;
        guest_touch(&vm, 1, addr)?;
        ensure(vm.read_u64(addr + 8)? == 0, || "pattern".into())?;
        ensure(vm.read_u64(addr + 4096)? == (addr + 4096) ^ PAT_XOR, || {
            "memory after the lie".into()
        })
    });
}
