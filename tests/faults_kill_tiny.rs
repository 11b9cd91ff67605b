//! SIGKILL at random points (docs/FAULTS.md) of snapshot create — the `vmm` process that
//! runs the VM, and the `vmm snapshot create` client — `archive push`, `image import`, and
//! repository export and import, with the tiny guest. (gc: tests/repo_tiny.rs,
//! `gc_killed_at_random_points_leaves_every_snapshot_restorable`.) After every kill:
//! every snapshot, VM or image stored before verifies and restores; nothing half-written
//! is listed or complete; the next run of the same command succeeds.
//!
//! Kill points are uniform over the time an undisturbed run takes (measured first), with
//! a seed printed for replay (`FAULTS_SEED`). Skips, printing `SKIP:`, without /dev/kvm.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::env::{TempDir, temp_dir};
use support::faults;
use support::faults::vm::{Changing, Expect, check_archive, restore_and_check, verify_repo};
use support::faults::{Killed, run_and_kill, time_ok};
use support::process::vmm_cli_ok as vmm_ok;
use support::rng::Rng;
use support::tiny;
use support::tiny::harness::{check, ensure};

/// Rounds of kill-and-check per operation.
const ROUNDS: usize = 8;
/// Bytes of random guest memory in the big snapshot (768 incompressible chunks).
const BIG: usize = 48 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A snapshot directory and what it holds.
type Snap = (PathBuf, Expect);

/// A snapshot directory with [`BIG`] bytes of random memory, and a small one.
fn snapshots(tmp: &TempDir) -> Result<(Snap, Snap), String> {
    let mut small = Changing::boot(64 << 10)?;
    let sdir = tmp.join("small");
    let se = small.dir_snapshot(&sdir)??;
    drop(small);
    let mut big = Changing::boot(BIG)?;
    let bdir = tmp.join("big");
    let be = big.dir_snapshot(&bdir)??;
    Ok(((bdir, be), (sdir, se)))
}

fn argv(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Kill points: uniform in a window that starts as long as an undisturbed run and
/// shrinks by a third each time a run finished before its kill (the machine got faster),
/// until [`ROUNDS`] kills landed (at most `3 * ROUNDS` runs).
struct Window {
    full: Duration,
    outcomes: Vec<Killed>,
}

impl Window {
    fn new(full: Duration) -> Self {
        Self {
            full,
            outcomes: Vec::new(),
        }
    }

    fn kills(&self) -> usize {
        self.outcomes.iter().filter(|k| **k == Killed::Yes).count()
    }

    fn next(&mut self, rng: &mut Rng) -> Option<Duration> {
        (self.kills() < ROUNDS && self.outcomes.len() < 3 * ROUNDS)
            .then(|| rng.duration_below(self.full))
    }

    fn record(&mut self, k: Killed) {
        if k != Killed::Yes {
            self.full = self.full * 2 / 3;
        }
        self.outcomes.push(k);
    }

    fn report(&self, what: &str) -> Result<(), String> {
        let kills = self.kills();
        eprintln!("  {what}: {kills} of {} runs killed", self.outcomes.len());
        ensure(kills * 2 >= ROUNDS, || {
            format!("{what}: only {kills} kills landed: {:?}", self.outcomes)
        })
    }
}

/// `vmm archive push` killed: the archive's earlier VM stays whole, the pushed VM is
/// either complete or has no state file, and pushing again succeeds and resumes.
#[test]
fn archive_push_killed_at_random_points() {
    check("archive_push_killed", || {
        let tmp = temp_dir("kill-push");
        let ((big, big_e), (small, _)) = snapshots(&tmp)?;
        let archive = tmp.join("archive");
        let push = |snap: &Path, name: &str| {
            vec![
                "archive".to_string(),
                "push".into(),
                s(snap).into(),
                s(&archive).into(),
                "--name".into(),
                name.into(),
            ]
        };
        let args = push(&big, "new");
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let fresh = || -> Result<(), String> {
            let _ = std::fs::remove_dir_all(&archive);
            let a = push(&small, "old");
            vmm_ok(&a.iter().map(String::as_str).collect::<Vec<_>>())?;
            Ok(())
        };
        let full = time_ok(&argv, fresh)?;
        eprintln!("  an undisturbed push takes {full:?}");
        let mut rng = Rng::from_env_or_clock("FAULTS_SEED", "archive push");
        let mut w = Window::new(full);
        while let Some(at) = w.next(&mut rng) {
            fresh()?;
            w.record(run_and_kill(&argv, at));
            let (vms, _) = check_archive(&archive).map_err(|e| format!("kill at {at:?}: {e}"))?;
            ensure(vms.contains(&"old".to_string()), || {
                format!("kill at {at:?}: the earlier VM is gone: {vms:?}")
            })?;
            vmm_ok(&argv).map_err(|e| format!("push after a kill at {at:?}: {e}"))?;
            let (vms, _) = check_archive(&archive)?;
            ensure(vms.contains(&"new".to_string()), || format!("{vms:?}"))?;
        }
        w.report("archive push")?;
        restore_and_check(&archive.join("vms/new"), &big_e)
    });
}

/// `vmm image import` killed: the archive's earlier image stays whole, the new image's
/// index is absent or names only chunks that are there, and importing again succeeds and
/// reads back exactly.
#[test]
fn image_import_killed_at_random_points() {
    check("image_import_killed", || {
        let tmp = temp_dir("kill-import");
        let old_src = tmp.join("old.img");
        let new_src = tmp.join("new.img");
        std::fs::write(&old_src, support::rng::random_bytes(1, 1 << 20))
            .map_err(|e| e.to_string())?;
        let data = support::rng::random_bytes(2, 48 << 20);
        std::fs::write(&new_src, &data).map_err(|e| e.to_string())?;
        let archive = tmp.join("archive");
        let argv = ["image", "import", s(&new_src), s(&archive), "--name", "new"];
        let fresh = || -> Result<(), String> {
            let _ = std::fs::remove_dir_all(&archive);
            vmm_ok(&["image", "import", s(&old_src), s(&archive), "--name", "old"])?;
            Ok(())
        };
        let full = time_ok(&argv, fresh)?;
        eprintln!("  an undisturbed import takes {full:?}");
        let mut rng = Rng::from_env_or_clock("FAULTS_SEED", "image import");
        let mut w = Window::new(full);
        while let Some(at) = w.next(&mut rng) {
            fresh()?;
            w.record(run_and_kill(&argv, at));
            let (_, images) =
                check_archive(&archive).map_err(|e| format!("kill at {at:?}: {e}"))?;
            ensure(images.contains(&"old".to_string()), || {
                format!("kill at {at:?}: the earlier image is gone: {images:?}")
            })?;
            vmm_ok(&argv).map_err(|e| format!("import after a kill at {at:?}: {e}"))?;
        }
        w.report("image import")?;
        let (_, images) = check_archive(&archive)?;
        ensure(images.contains(&"new".to_string()), || {
            format!("{images:?}")
        })?;
        let url = format!("file://{}/images/new", archive.display());
        let opts = vmm::disk::http::LazyHttpOptions {
            cache_dir: Some(tmp.join("cache")),
            ..Default::default()
        };
        let (_, disk) = vmm::disk::http::open_remote_disk(&url, opts, None)
            .map_err(|e| vmm::util::error_chain(&e))?;
        let mut got = vec![0u8; data.len()];
        disk.read_at(&mut got, 0)
            .map_err(|e| vmm::util::error_chain(&e))?;
        ensure(got == data, || {
            "the imported image reads differently".into()
        })
    });
}

/// `vmm snapshot export` killed: no export file, or a complete one; `vmm snapshot import`
/// killed: the repository verifies, its earlier snapshot is listed, the imported one is
/// listed whole or not at all; both succeed when run again.
#[test]
fn export_and_import_killed_at_random_points() {
    check("export_import_killed", || {
        let tmp = temp_dir("kill-export");
        let ((big, big_e), (small, _)) = snapshots(&tmp)?;
        // Repositories from the two snapshot directories, through export files.
        let src = tmp.join("src-repo");
        let file = tmp.join("big.vmmsnap");
        let small_file = tmp.join("small.vmmsnap");
        let import_dir = |dir: &Path, repo: &Path| -> Result<String, String> {
            // A plain snapshot directory becomes a repository snapshot via a VM restore
            // and a repository snapshot; simpler: restore in-process and create_in_repo.
            let mut vm = tiny::restore_eager(dir, None, true)?;
            let rep = vmm::vmm::create_in_repo(&mut vm.vmm, repo, None)
                .map_err(|e| vmm::util::error_chain(&e))?;
            Ok(rep.id.to_string())
        };
        let big_id = import_dir(&big, &src)?;
        let small_id = import_dir(&small, &src)?;
        vmm_ok(&[
            "snapshot",
            "export",
            "--repo",
            s(&src),
            &small_id,
            s(&small_file),
        ])?;
        let export = ["snapshot", "export", "--repo", s(&src), &big_id, s(&file)];
        let full = time_ok(&export, || {
            let _ = std::fs::remove_file(&file);
            Ok(())
        })?;
        eprintln!("  an undisturbed export takes {full:?}");
        let mut rng = Rng::from_env_or_clock("FAULTS_SEED", "export");
        let mut w = Window::new(full);
        while let Some(at) = w.next(&mut rng) {
            let _ = std::fs::remove_file(&file);
            w.record(run_and_kill(&export, at));
            if file.exists() {
                // Complete, or it would not be there: it imports.
                let probe = tmp.join("probe");
                let _ = std::fs::remove_dir_all(&probe);
                vmm_ok(&["snapshot", "import", "--repo", s(&probe), s(&file)])
                    .map_err(|e| format!("export killed at {at:?} left a bad file: {e}"))?;
            }
            vmm_ok(&export).map_err(|e| format!("export after a kill at {at:?}: {e}"))?;
        }
        w.report("export")?;

        let repo = tmp.join("repo");
        let import = ["snapshot", "import", "--repo", s(&repo), s(&file)];
        let fresh = || -> Result<(), String> {
            let _ = std::fs::remove_dir_all(&repo);
            vmm_ok(&["snapshot", "import", "--repo", s(&repo), s(&small_file)])?;
            Ok(())
        };
        let full = time_ok(&import, fresh)?;
        eprintln!("  an undisturbed import takes {full:?}");
        let mut w = Window::new(full);
        while let Some(at) = w.next(&mut rng) {
            fresh()?;
            w.record(run_and_kill(&import, at));
            let listed = verify_repo(&repo).map_err(|e| format!("import killed at {at:?}: {e}"))?;
            ensure(listed.contains(&small_id), || {
                format!("import killed at {at:?}: the earlier snapshot is gone: {listed:?}")
            })?;
            vmm_ok(&import).map_err(|e| format!("import after a kill at {at:?}: {e}"))?;
            let listed = verify_repo(&repo)?;
            ensure(listed.contains(&big_id), || format!("{listed:?}"))?;
            // Leftovers of the killed run go with the next gc.
            vmm_ok(&["snapshot", "gc", "--repo", s(&repo)])?;
            ensure(faults::temp_files(&repo).is_empty(), || {
                format!("gc left temp files: {:?}", faults::temp_files(&repo))
            })?;
        }
        w.report("import")?;
        restore_and_check(&repo.join("snapshots").join(&big_id), &big_e)
    });
}

/// A `vmm restore` process of the big snapshot with an API socket, ticking.
fn vm_process(snap: &Path, sock: &Path) -> Result<support::process::Running, String> {
    let _ = std::fs::remove_file(sock);
    let mut r = support::process::Running::spawn(&[
        "restore".into(),
        s(snap).into(),
        "--api-sock".into(),
        s(sock).into(),
    ]);
    if r.wait_for("tick ", Duration::from_secs(60)).is_none() {
        return Err(format!("the restored VM does not tick:\n{}", r.output()));
    }
    // The guest may tick before the API socket is bound.
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        ensure(std::time::Instant::now() < end, || {
            format!("no API socket:\n{}", r.output())
        })?;
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(r)
}

fn api(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String), String> {
    vmm::api::request(
        &vmm::api::ApiTarget::Unix(sock.to_path_buf()),
        method,
        path,
        body,
    )
    .map_err(|e| format!("{method} {path}: {e}"))
}

/// Snapshot create killed both ways: the `vmm` process running the VM (SIGKILL while it
/// writes the repository snapshot), and the `vmm snapshot create` client. After a VM kill
/// the repository verifies with only complete snapshots listed and a new VM process
/// snapshots into it fine; after a client kill the VM process keeps running (resumed if
/// the client left it paused) and its next snapshot succeeds.
#[test]
fn snapshot_create_killed_at_random_points() {
    check("snapshot_create_killed", || {
        let tmp = temp_dir("kill-create");
        let ((big, big_e), (small, _)) = snapshots(&tmp)?;
        // Each round snapshots the big VM into its own repository holding only a small
        // snapshot, so that every snapshot writes all of the big VM's memory.
        let seed = tmp.join("seed");
        let mut vm = tiny::restore_eager(&small, None, true)?;
        let small_id = vmm::vmm::create_in_repo(&mut vm.vmm, &seed, None)
            .map_err(|e| vmm::util::error_chain(&e))?
            .id
            .to_string();
        drop(vm);
        let seed_file = tmp.join("seed.vmmsnap");
        vmm_ok(&[
            "snapshot",
            "export",
            "--repo",
            s(&seed),
            &small_id,
            s(&seed_file),
        ])?;
        let sock = tmp.join("api.sock");
        let round = std::cell::Cell::new(0);
        let repo = || tmp.join(format!("repo{}", round.get()));
        let fresh = || -> Result<PathBuf, String> {
            round.set(round.get() + 1);
            let r = repo();
            vmm_ok(&["snapshot", "import", "--repo", s(&r), s(&seed_file)])?;
            Ok(r)
        };
        let create = |r: &Path| -> Vec<String> {
            ["snapshot", "create", "--repo", s(r), "--api-sock", s(&sock)]
                .map(String::from)
                .to_vec()
        };
        let mut vm = vm_process(&big, &sock)?;
        let mut best = Duration::MAX;
        for _ in 0..2 {
            let r = fresh()?;
            let t = std::time::Instant::now();
            vmm_ok(&argv(&create(&r)))?;
            best = best.min(t.elapsed());
        }
        drop(vm);
        let full = best * 9 / 10;
        eprintln!("  an undisturbed snapshot takes {best:?}");
        let mut rng = Rng::from_env_or_clock("FAULTS_SEED", "snapshot create");

        // Kill the VM process while it writes.
        let mut w = Window::new(full);
        while let Some(at) = w.next(&mut rng) {
            let r = fresh()?;
            vm = vm_process(&big, &sock)?;
            let mut client = std::process::Command::new(support::env::vmm_bin())
                .args(create(&r))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| e.to_string())?;
            std::thread::sleep(at);
            let done = client.try_wait().map_err(|e| e.to_string())?.is_some();
            let _ = vm.child.kill();
            let _ = vm.child.wait();
            let _ = client.wait();
            w.record(if done {
                Killed::Finished(0)
            } else {
                Killed::Yes
            });
            let now = verify_repo(&r).map_err(|e| format!("VM killed at {at:?}: {e}"))?;
            ensure(now.contains(&small_id) && now.len() <= 2, || {
                format!("VM killed at {at:?}: listed {now:?}")
            })?;
            // The next run of the same command succeeds.
            vm = vm_process(&big, &sock)?;
            vmm_ok(&argv(&create(&r))).map_err(|e| {
                format!(
                    "snapshot after a kill at {at:?}: {e}\nVM process: {}",
                    vm.output()
                )
            })?;
            drop(vm);
            let now = verify_repo(&r)?;
            // The killed run's snapshot is listed (complete) or not; the retry's is.
            ensure((2..=3).contains(&now.len()), || {
                format!("after the retry: {now:?}")
            })?;
        }
        w.report("VM process")?;

        // Kill the client.
        let mut w = Window::new(full);
        vm = vm_process(&big, &sock)?;
        while let Some(at) = w.next(&mut rng) {
            let r = fresh()?;
            w.record(run_and_kill(&argv(&create(&r)), at));
            // The VM process is alive and answers (once a snapshot in progress is done).
            let (code, body) = api(&sock, "GET", "/vm", None)?;
            ensure(code == 200, || format!("GET /vm: {code} {body}"))?;
            if body.contains("\"Paused\"") {
                let (code, body) = api(&sock, "PATCH", "/vm", Some(r#"{"state":"Resumed"}"#))?;
                ensure(code == 204, || format!("resume: {code} {body}"))?;
            }
            let ticks = vm.console().matches("tick ").count();
            let end = std::time::Instant::now() + Duration::from_secs(30);
            while vm.console().matches("tick ").count() <= ticks {
                ensure(std::time::Instant::now() < end, || {
                    format!(
                        "client killed at {at:?}: the VM stopped ticking\n{}",
                        vm.output()
                    )
                })?;
                std::thread::sleep(Duration::from_millis(20));
            }
            verify_repo(&r).map_err(|e| format!("client killed at {at:?}: {e}"))?;
            vmm_ok(&argv(&create(&r))).map_err(|e| format!("snapshot after a client kill: {e}"))?;
        }
        w.report("client")?;
        ensure(
            vm.child.try_wait().map_err(|e| e.to_string())?.is_none(),
            || format!("the VM process died:\n{}", vm.output()),
        )?;
        drop(vm);
        // The last repository's snapshots of the big VM hold its memory and carry on.
        let r = repo();
        for id in verify_repo(&r)? {
            if id != small_id {
                restore_and_check(&r.join("snapshots").join(&id), &big_e)?;
            }
        }
        Ok(())
    });
}
