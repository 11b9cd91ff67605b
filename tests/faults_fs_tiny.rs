//! File-system faults where they happen (docs/FAULTS.md): `ENOSPC` from a small tmpfs the
//! test mounts, `EIO` from a fault-injecting FUSE file system, during snapshot create
//! (repository and plain directory), `archive push`, `image import`, repository
//! export/import and gc, with the tiny guest. Each fault must end in a clear error (or a
//! success with everything intact), the VM keeps running, nothing stored before is lost
//! or damaged, `vmm snapshot verify` passes, and the same operation succeeds once the
//! fault is gone.
//!
//! The tests mount file systems, so they need root: without it they print `SKIP:`; without
//! /dev/kvm too.

mod support;

use std::path::{Path, PathBuf};

use support::env::{TempDir, temp_dir};
use support::faults::fusefs::{Mounted, Op, Plan};
use support::faults::vm::{Changing, Expect, check_archive, restore_and_check, verify_repo};
use support::faults::{Tmpfs, root_or_skip, temp_files};
use support::tiny::harness::{check, ensure};
use vmm::repo::Repo;
use vmm::util::error_chain;

/// Bytes of fresh guest memory per snapshot (32 incompressible chunks).
const AREA: usize = 2 << 20;
const ENOSPC_TEXT: &str = "No space left on device";
const EIO_TEXT: &str = "Input/output error";

fn fs_check(name: &str, body: impl FnOnce() -> Result<(), String>) {
    if !root_or_skip(name) {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        println!("SKIP: {name}: /dev/fuse is missing (the EIO half needs FUSE)");
        return;
    }
    check(name, body);
}

/// The `leave` values (free bytes) an ENOSPC sweep tries for an operation that needs about
/// `need` bytes: nothing free, a little, half, and every page around the end (where the
/// last small files — manifest, state, index — are written).
fn leaves(need: u64) -> Vec<u64> {
    let mut v = vec![0, 4096, 64 << 10, need / 2];
    let mut l = need.saturating_sub(64 << 10);
    while l < need + (8 << 10) {
        v.push(l);
        l += 4096;
    }
    v.extend([need + (256 << 10), need * 2]);
    v
}

/// A failure must name the cause.
fn clear_error(err: &str, want: &str) -> Result<(), String> {
    ensure(err.contains(want), || {
        format!("the error does not say {want:?}: {err}")
    })
}

/// Mounts a FUSE view of `tmp/backing` at `tmp/mnt`.
fn fuse(tmp: &TempDir) -> Result<Mounted, String> {
    let backing = tmp.join("backing");
    let mnt = tmp.join("mnt");
    std::fs::create_dir_all(&backing).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
    Mounted::mount(&backing, &mnt)
}

/// The EIO plans tried for an operation that made `counts[op]` operations of each kind:
/// the first, a middle and the last of each kind; the first write, fsync and rename of
/// each file named in `files` (the small files written last: manifest, state, index…);
/// and a disk that dies from the third change on.
fn eio_plans(counts: &[(Op, u64)], files: &[&'static str]) -> Vec<Plan> {
    let mut v = Vec::new();
    for &(op, n) in counts {
        let mut picks = vec![1, n.div_ceil(2), n];
        picks.dedup();
        for nth in picks.into_iter().filter(|&k| k >= 1) {
            v.push(Plan::eio(op, nth));
        }
    }
    for &f in files {
        for op in [Op::Create, Op::Write, Op::Fsync, Op::Rename] {
            v.push(Plan::eio_on(op, f));
        }
    }
    v.push(Plan {
        sticky: true,
        ..Plan::eio(Op::AnyChange, 3)
    });
    v
}

/// Counts the operations of each kind `run` makes on `m`.
fn count_ops(
    m: &Mounted,
    mut run: impl FnMut() -> Result<(), String>,
) -> Result<Vec<(Op, u64)>, String> {
    let mut counts = Vec::new();
    for op in [Op::Write, Op::Fsync, Op::Rename, Op::Create] {
        m.control.set(Plan::eio(op, u64::MAX));
        run()?;
        counts.push((op, m.control.seen()));
        m.control.clear();
    }
    eprintln!("  operations: {counts:?}");
    Ok(counts)
}

/// Snapshots into a repository on a full tmpfs: every failure says "No space left on
/// device", lists nothing, leaves no work directory; earlier snapshots verify and
/// restore; the VM keeps running; with space again the next snapshot succeeds.
#[test]
fn snapshot_create_into_a_repository_on_a_full_disk() {
    fs_check("snapshot_create_repo_enospc", || {
        let tmp = temp_dir("faults-snap-enospc");
        let fs = Tmpfs::mount(&tmp.join("fs"), 128 << 20)?;
        let repo = fs.path().join("repo");
        let mut g = Changing::boot(AREA)?;
        let mut good: Vec<(String, Expect)> = Vec::new();
        let before = fs.free();
        let (id, expect) = g.repo_snapshot(&repo)??;
        good.push((id.to_string(), expect));
        let need = before - fs.free();
        eprintln!("  one snapshot needs {need} bytes");
        let (mut failed, mut ok) = (0, 0);
        for leave in leaves(need) {
            let ballast = fs.fill_to(leave);
            let r = g.repo_snapshot(&repo)?;
            std::fs::remove_file(&ballast).map_err(|e| e.to_string())?;
            match r {
                Err(e) => {
                    failed += 1;
                    eprintln!("  leave {leave}: {e}");
                    clear_error(&e, ENOSPC_TEXT)?;
                }
                Ok((id, expect)) => {
                    ok += 1;
                    good.push((id.to_string(), expect));
                }
            }
            let listed = verify_repo(&repo)?;
            let mut want: Vec<String> = good.iter().map(|(i, _)| i.clone()).collect();
            want.sort();
            let mut got = listed.clone();
            got.sort();
            ensure(got == want, || {
                format!("listed {got:?}, expected {want:?} (leave {leave})")
            })?;
            let work = std::fs::read_dir(repo.join("tmp")).map_err(|e| e.to_string())?;
            ensure(work.count() == 0, || {
                format!("a failed create left a work directory (leave {leave})")
            })?;
        }
        eprintln!("  {failed} failed with ENOSPC, {ok} fitted");
        ensure(failed >= 4, || format!("only {failed} snapshots failed"))?;
        // Space again: the same VM snapshots fine, and every stored snapshot restores.
        let (id, expect) = g.repo_snapshot(&repo)??;
        good.push((id.to_string(), expect));
        verify_repo(&repo)?;
        drop(g);
        for (id, expect) in [&good[0], good.last().unwrap()] {
            restore_and_check(&repo.join("snapshots").join(id), expect)?;
        }
        Ok(())
    });
}

/// Overwriting a snapshot directory on a full disk: the old snapshot stays whole (never
/// the new memory with the old state), and a later snapshot into it succeeds.
#[test]
fn snapshot_create_over_a_snapshot_directory_on_a_full_disk() {
    fs_check("snapshot_create_dir_enospc", || {
        let tmp = temp_dir("faults-snapdir-enospc");
        let fs = Tmpfs::mount(&tmp.join("fs"), 128 << 20)?;
        let dir = fs.path().join("snap");
        let mut g = Changing::boot(AREA)?;
        let before = fs.free();
        g.dir_snapshot(&dir)??;
        let need = before - fs.free();
        let mut failed = 0;
        for leave in leaves(need) {
            let ballast = fs.fill_to(leave);
            let r = g.dir_snapshot(&dir)?;
            std::fs::remove_file(&ballast).map_err(|e| e.to_string())?;
            let current = match r {
                Err(e) => {
                    failed += 1;
                    clear_error(&e, ENOSPC_TEXT)?;
                    ensure(temp_files(&dir).is_empty(), || {
                        format!("temp files left: {:?}", temp_files(&dir))
                    })?;
                    g.stored()
                }
                Ok(expect) => expect,
            };
            if dir.join("state").exists() {
                restore_and_check(&dir, &current)
                    .map_err(|e| format!("after leave {leave}: {e}"))?;
            } else {
                return Err(format!(
                    "the snapshot directory lost its state file (leave {leave})"
                ));
            }
        }
        ensure(failed >= 4, || format!("only {failed} snapshots failed"))?;
        let expect = g.dir_snapshot(&dir)??;
        restore_and_check(&dir, &expect)?;
        drop(fs);

        // EIO at every kind of step, the state file's write included.
        let m = fuse(&tmp)?;
        let dir = m.path().join("snap");
        g.dir_snapshot(&dir)??;
        let mut current = Expect::new();
        let counts = count_ops(&m, || {
            current = g.dir_snapshot(&dir)??;
            Ok(())
        })?;
        let mut failed = 0;
        for plan in eio_plans(&counts, &["memory", "state"]) {
            m.control.set(plan);
            let r = g.dir_snapshot(&dir)?;
            m.control.clear();
            match r {
                Err(e) => {
                    failed += 1;
                    eprintln!("  {plan:?}: {e}");
                    clear_error(&e, EIO_TEXT).map_err(|e| format!("{plan:?}: {e}"))?;
                    current = g.stored();
                }
                Ok(expect) => current = expect,
            }
            // The directory holds the old snapshot or the new one, whole.
            restore_and_check(&dir, &current).map_err(|e| format!("after {plan:?}: {e}"))?;
        }
        ensure(failed >= 8, || format!("only {failed} snapshots failed"))?;
        let expect = g.dir_snapshot(&dir)??;
        drop(g);
        restore_and_check(&dir, &expect)
    });
}

/// EIO at the first, middle and last write, fsync, rename and create of a repository
/// snapshot, and a disk that dies: a clear error, nothing listed, verify passes, the VM
/// keeps running; without the fault the next snapshot succeeds.
#[test]
fn snapshot_create_with_io_errors() {
    fs_check("snapshot_create_eio", || {
        let tmp = temp_dir("faults-snap-eio");
        let m = fuse(&tmp)?;
        let repo = m.path().join("repo");
        let mut g = Changing::boot(AREA)?;
        let mut good: Vec<(String, Expect)> = Vec::new();
        let mut counts_run = || -> Result<(), String> {
            let (id, e) = g.repo_snapshot(&repo)??;
            good.push((id.to_string(), e));
            Ok(())
        };
        let counts = count_ops(&m, &mut counts_run)?;
        let (mut failed, mut survived) = (0, 0);
        for plan in eio_plans(&counts, &["memory", "state", "meta", "snapshots"]) {
            m.control.set(plan);
            let r = g.repo_snapshot(&repo)?;
            let injected = m.control.clear();
            match r {
                Err(e) => {
                    failed += 1;
                    clear_error(&e, EIO_TEXT).map_err(|e| format!("{plan:?}: {e}"))?;
                }
                Ok((id, e)) => {
                    survived += usize::from(injected > 0);
                    good.push((id.to_string(), e));
                }
            }
            let mut got = verify_repo(&repo).map_err(|e| format!("{plan:?}: {e}"))?;
            got.sort();
            let mut want: Vec<String> = good.iter().map(|(i, _)| i.clone()).collect();
            want.sort();
            ensure(got == want, || {
                format!("{plan:?}: listed {got:?}, expected {want:?}")
            })?;
        }
        eprintln!("  {failed} failed with EIO, {survived} succeeded despite an injected error");
        ensure(failed >= 8, || format!("only {failed} snapshots failed"))?;
        let (id, e) = g.repo_snapshot(&repo)??;
        good.push((id.to_string(), e));
        verify_repo(&repo)?;
        drop(g);
        for (id, expect) in [&good[0], good.last().unwrap()] {
            restore_and_check(&repo.join("snapshots").join(id), expect)?;
        }
        Ok(())
    });
}

/// A snapshot on the local disk with `n` fresh areas, for the archive and repository
/// tests. Returns its directory and what it holds.
fn local_snapshot(
    tmp: &TempDir,
    name: &str,
    g: &mut Changing,
) -> Result<(PathBuf, Expect), String> {
    let dir = tmp.join(name);
    let e = g.dir_snapshot(&dir)??;
    Ok((dir, e))
}

/// Checks an archive after a failed or successful push: complete VMs verify, `old` is
/// among them; a failed push's VM has no state file.
fn archive_after(archive: &Path, old: &str, new: &str, pushed: bool) -> Result<(), String> {
    let (vms, _) = check_archive(archive)?;
    ensure(vms.iter().any(|v| v == old), || {
        format!("the earlier archived VM {old} is gone: {vms:?}")
    })?;
    ensure(pushed == vms.iter().any(|v| v == new), || {
        format!("push result {pushed} but archive VMs {vms:?}")
    })?;
    let packs_dir = archive.join("packs");
    ensure(temp_files(&packs_dir).is_empty(), || {
        format!("temp files left: {:?}", temp_files(&packs_dir))
    })?;
    // A failed push removes its pack: no pack is left without its index.
    let packs: Vec<String> = std::fs::read_dir(archive.join("packs"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let orphans: Vec<&String> = packs
        .iter()
        .filter(|n| {
            n.strip_suffix(".pack")
                .is_some_and(|stem| !packs.contains(&format!("{stem}.idx")))
        })
        .collect();
    ensure(orphans.is_empty(), || {
        format!("packs without an index left: {orphans:?}")
    })
}

/// `archive push` onto a full disk and with EIO: a clear error, the archive's earlier VM
/// intact, the half-pushed VM not complete (no state file), no temp file or pack without index left; the push
/// succeeds once the fault is gone and the VM resumes from the archive directory.
#[test]
fn archive_push_on_a_full_disk_and_with_io_errors() {
    fs_check("archive_push_faults", || {
        let tmp = temp_dir("faults-push");
        let mut g = Changing::boot(AREA)?;
        let (old_snap, _) = local_snapshot(&tmp, "old", &mut g)?;
        let (new_snap, new_expect) = local_snapshot(&tmp, "new", &mut g)?;
        drop(g);

        // ENOSPC.
        let fs = Tmpfs::mount(&tmp.join("fs"), 128 << 20)?;
        let archive = fs.path().join("archive");
        vmm::archive::push::push(&old_snap, &archive, "old").map_err(|e| error_chain(&e))?;
        // What pushing "new" over "old" needs: measured on a probe archive holding "old"
        // (a pack holds only the chunks the archive lacks).
        let probe = fs.path().join("probe");
        vmm::archive::push::push(&old_snap, &probe, "old").map_err(|e| error_chain(&e))?;
        let before = fs.free();
        vmm::archive::push::push(&new_snap, &probe, "new").map_err(|e| error_chain(&e))?;
        let need = before - fs.free();
        std::fs::remove_dir_all(&probe).map_err(|e| e.to_string())?;
        let mut failed = 0;
        for leave in leaves(need) {
            let ballast = fs.fill_to(leave);
            let r = vmm::archive::push::push(&new_snap, &archive, "new");
            std::fs::remove_file(&ballast).map_err(|e| e.to_string())?;
            if let Err(e) = &r {
                failed += 1;
                clear_error(&error_chain(e), ENOSPC_TEXT)?;
            }
            archive_after(&archive, "old", "new", r.is_ok())
                .map_err(|e| format!("leave {leave}: {e}"))?;
            if r.is_ok() {
                // Start over for the next point.
                std::fs::remove_dir_all(archive.join("vms/new")).map_err(|e| e.to_string())?;
            }
        }
        ensure(failed >= 4, || format!("only {failed} pushes failed"))?;
        drop(fs);

        // EIO.
        let m = fuse(&tmp)?;
        let archive = m.path().join("archive");
        vmm::archive::push::push(&old_snap, &archive, "old").map_err(|e| error_chain(&e))?;
        let counts = count_ops(&m, || {
            let a = m.path().join("probe");
            vmm::archive::push::push(&new_snap, &a, "new").map_err(|e| error_chain(&e))?;
            std::fs::remove_dir_all(&a).map_err(|e| e.to_string())
        })?;
        let mut failed = 0;
        for plan in eio_plans(&counts, &["memory", "state"]) {
            m.control.set(plan);
            let r = vmm::archive::push::push(&new_snap, &archive, "new");
            m.control.clear();
            if let Err(e) = &r {
                failed += 1;
                clear_error(&error_chain(e), EIO_TEXT).map_err(|e| format!("{plan:?}: {e}"))?;
            }
            archive_after(&archive, "old", "new", r.is_ok())
                .map_err(|e| format!("{plan:?}: {e}"))?;
            if r.is_ok() {
                std::fs::remove_dir_all(archive.join("vms/new")).map_err(|e| e.to_string())?;
            }
        }
        ensure(failed >= 8, || format!("only {failed} pushes failed"))?;
        vmm::archive::push::push(&new_snap, &archive, "new").map_err(|e| error_chain(&e))?;
        archive_after(&archive, "old", "new", true)?;
        restore_and_check(&archive.join("vms/new"), &new_expect)
    });
}

/// `image import` onto a full disk and with EIO: a clear error, the archive's earlier
/// image intact, no index naming a missing chunk; the import succeeds afterwards and
/// reads back exactly.
#[test]
fn image_import_on_a_full_disk_and_with_io_errors() {
    fs_check("image_import_faults", || {
        let tmp = temp_dir("faults-import");
        let old_src = tmp.join("old.img");
        let new_src = tmp.join("new.img");
        std::fs::write(&old_src, support::rng::random_bytes(1, 3 << 20))
            .map_err(|e| e.to_string())?;
        let data = support::rng::random_bytes(2, 6 << 20);
        std::fs::write(&new_src, &data).map_err(|e| e.to_string())?;
        let import = |src: &Path, archive: &Path, name: &str| {
            vmm::image::import_image(src, archive, name, vmm::image::DEFAULT_IMAGE_CHUNK_SIZE)
                .map_err(|e| error_chain(&e))
        };
        let after = |archive: &Path, imported: bool| -> Result<(), String> {
            let (_, images) = check_archive(archive)?;
            ensure(images.contains(&"old".to_string()), || {
                format!("old image gone: {images:?}")
            })?;
            ensure(imported == images.contains(&"new".to_string()), || {
                format!("import result {imported}, images {images:?}")
            })?;
            ensure(temp_files(archive).is_empty(), || {
                format!("temp files left: {:?}", temp_files(archive))
            })
        };

        let fs = Tmpfs::mount(&tmp.join("fs"), 128 << 20)?;
        let archive = fs.path().join("archive");
        import(&old_src, &archive, "old")?;
        let before = fs.free();
        import(&new_src, &fs.path().join("probe"), "new")?;
        let need = before - fs.free();
        std::fs::remove_dir_all(fs.path().join("probe")).map_err(|e| e.to_string())?;
        let mut failed = 0;
        for leave in leaves(need) {
            let ballast = fs.fill_to(leave);
            let r = import(&new_src, &archive, "new");
            std::fs::remove_file(&ballast).map_err(|e| e.to_string())?;
            if let Err(e) = &r {
                failed += 1;
                clear_error(e, ENOSPC_TEXT)?;
            }
            after(&archive, r.is_ok()).map_err(|e| format!("leave {leave}: {e}"))?;
            if r.is_ok() {
                std::fs::remove_file(archive.join("images/new")).map_err(|e| e.to_string())?;
            }
        }
        ensure(failed >= 4, || format!("only {failed} imports failed"))?;
        drop(fs);

        let m = fuse(&tmp)?;
        let archive = m.path().join("archive");
        import(&old_src, &archive, "old")?;
        let counts = count_ops(&m, || {
            let a = m.path().join("probe");
            import(&new_src, &a, "new")?;
            std::fs::remove_dir_all(&a).map_err(|e| e.to_string())
        })?;
        let mut failed = 0;
        for plan in eio_plans(&counts, &["new"]) {
            m.control.set(plan);
            let r = import(&new_src, &archive, "new");
            m.control.clear();
            if let Err(e) = &r {
                failed += 1;
                clear_error(e, EIO_TEXT).map_err(|e| format!("{plan:?}: {e}"))?;
            }
            // A dead disk cannot even delete temp files: they stay (under a temp name,
            // never a real one) until the disk works again.
            if plan.sticky {
                check_archive(&archive).map_err(|e| format!("{plan:?}: {e}"))?;
                for t in temp_files(&archive) {
                    std::fs::remove_file(&t).map_err(|e| e.to_string())?;
                }
            }
            after(&archive, r.is_ok()).map_err(|e| format!("{plan:?}: {e}"))?;
            if r.is_ok() {
                std::fs::remove_file(archive.join("images/new")).map_err(|e| e.to_string())?;
            }
        }
        ensure(failed >= 8, || format!("only {failed} imports failed"))?;
        import(&new_src, &archive, "new")?;
        after(&archive, true)?;
        let url = format!("file://{}/images/new", archive.display());
        let (_, disk) = vmm::disk::http::open_remote_disk(
            &url,
            vmm::disk::http::LazyHttpOptions {
                cache_dir: Some(tmp.join("cache")),
                ..Default::default()
            },
            None,
        )
        .map_err(|e| error_chain(&e))?;
        let mut got = vec![0u8; data.len()];
        disk.read_at(&mut got, 0).map_err(|e| error_chain(&e))?;
        ensure(got == data, || {
            "the imported image reads differently".into()
        })
    });
}

/// Export to a full disk / with EIO: a clear error, no export file (or temp) left; import
/// from a good file into a repository on a full disk / with EIO: a clear error, nothing
/// listed, verify passes; gc with EIO: a clear error, every snapshot still verifies. All
/// succeed once the fault is gone.
#[test]
fn export_import_and_gc_on_a_full_disk_and_with_io_errors() {
    fs_check("export_import_gc_faults", || {
        let tmp = temp_dir("faults-export");
        let src_repo = tmp.join("src-repo");
        let mut g = Changing::boot(AREA)?;
        let (a, _) = g.repo_snapshot(&src_repo)??;
        let (b, b_expect) = g.repo_snapshot(&src_repo)??;
        drop(g);
        let src = Repo::open(&src_repo).map_err(|e| error_chain(&e))?;
        let good_file = tmp.join("b.vmmsnap");
        vmm::repo::export::export(&src, &b, &good_file, Some(false))
            .map_err(|e| error_chain(&e))?;
        let export_to = |dest: &Path| {
            vmm::repo::export::export(&src, &b, dest, Some(false))
                .map(|_| ())
                .map_err(|e| error_chain(&e))
        };
        let import_into = |repo: &Path| {
            let r = Repo::open_or_init(repo).map_err(|e| error_chain(&e))?;
            vmm::repo::export::import(&r, &good_file, None, Some(false))
                .map(|_| ())
                .map_err(|e| error_chain(&e))
        };
        let size = std::fs::metadata(&good_file)
            .map_err(|e| e.to_string())?
            .len();

        // ENOSPC.
        let fs = Tmpfs::mount(&tmp.join("fs"), 128 << 20)?;
        let file = fs.path().join("b.vmmsnap");
        let repo = fs.path().join("repo");
        let first = Repo::open_or_init(&repo).map_err(|e| error_chain(&e))?;
        let a_file = tmp.join("a.vmmsnap");
        vmm::repo::export::export(&src, &a, &a_file, Some(false)).map_err(|e| error_chain(&e))?;
        vmm::repo::export::import(&first, &a_file, None, Some(false))
            .map_err(|e| error_chain(&e))?;
        let mut failed = 0;
        for leave in leaves(size) {
            let ballast = fs.fill_to(leave);
            let r = export_to(&file);
            let ri = import_into(&repo);
            std::fs::remove_file(&ballast).map_err(|e| e.to_string())?;
            match &r {
                Err(e) => {
                    failed += 1;
                    clear_error(e, ENOSPC_TEXT)?;
                    ensure(!file.exists(), || "a failed export left the file".into())?;
                }
                Ok(()) => std::fs::remove_file(&file).map_err(|e| e.to_string())?,
            }
            ensure(temp_files(fs.path()).is_empty(), || {
                format!("temp files left: {:?}", temp_files(fs.path()))
            })?;
            let listed = verify_repo(&repo)?;
            match &ri {
                Err(e) => {
                    failed += 1;
                    clear_error(e, ENOSPC_TEXT)?;
                    ensure(listed == vec![a.to_string()], || {
                        format!("listed {listed:?}")
                    })?;
                }
                Ok(()) => {
                    vmm::repo::gc::rm(&first, &[b]).map_err(|e| error_chain(&e))?;
                }
            }
        }
        ensure(failed >= 8, || {
            format!("only {failed} exports/imports failed")
        })?;
        // gc on a full disk needs no space and frees it.
        import_into(&repo)?;
        vmm::repo::gc::rm(&first, &[b]).map_err(|e| error_chain(&e))?;
        let ballast = fs.fill_to(0);
        let free = fs.free();
        vmm::repo::gc::gc(&first, Some(false)).map_err(|e| error_chain(&e))?;
        ensure(fs.free() > free, || {
            "gc on a full disk freed nothing".into()
        })?;
        std::fs::remove_file(&ballast).map_err(|e| e.to_string())?;
        ensure(verify_repo(&repo)? == vec![a.to_string()], || {
            "after gc".into()
        })?;
        drop(first);
        drop(fs);

        // EIO.
        let m = fuse(&tmp)?;
        let repo = m.path().join("repo");
        let file = m.path().join("b.vmmsnap");
        let mrepo = Repo::open_or_init(&repo).map_err(|e| error_chain(&e))?;
        vmm::repo::export::import(&mrepo, &a_file, None, Some(false))
            .map_err(|e| error_chain(&e))?;
        let counts = count_ops(&m, || {
            export_to(&file)?;
            std::fs::remove_file(&file).map_err(|e| e.to_string())?;
            import_into(&repo)?;
            vmm::repo::gc::rm(&mrepo, &[b]).map_err(|e| error_chain(&e))?;
            vmm::repo::gc::gc(&mrepo, Some(false))
                .map(|_| ())
                .map_err(|e| error_chain(&e))
        })?;
        let mut failed = 0;
        for plan in eio_plans(&counts, &["vmmsnap", "meta", "state", "memory"]) {
            m.control.set(plan);
            let r = export_to(&file).and_then(|()| import_into(&repo));
            m.control.clear();
            if let Err(e) = &r {
                failed += 1;
                clear_error(e, EIO_TEXT).map_err(|e| format!("{plan:?}: {e}"))?;
            }
            let listed = verify_repo(&repo).map_err(|e| format!("{plan:?}: {e}"))?;
            ensure(listed.contains(&a.to_string()), || {
                format!("{plan:?}: a lost")
            })?;
            // Collect with the same fault: the listed snapshots survive it.
            let _ = std::fs::remove_file(&file);
            if listed.contains(&b.to_string()) {
                vmm::repo::gc::rm(&mrepo, &[b]).map_err(|e| error_chain(&e))?;
            }
            m.control.set(plan);
            let gc = vmm::repo::gc::gc(&mrepo, Some(false));
            m.control.clear();
            if let Err(e) = &gc {
                failed += 1;
                clear_error(&error_chain(e), EIO_TEXT).map_err(|e| format!("gc {plan:?}: {e}"))?;
            }
            let listed = verify_repo(&repo).map_err(|e| format!("after gc {plan:?}: {e}"))?;
            ensure(listed == vec![a.to_string()], || {
                format!("{plan:?}: listed {listed:?}")
            })?;
        }
        ensure(failed >= 8, || format!("only {failed} operations failed"))?;
        import_into(&repo)?;
        verify_repo(&repo)?;
        restore_and_check(&repo.join("snapshots").join(b.to_string()), &b_expect)
    });
}
