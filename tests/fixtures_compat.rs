//! Golden fixtures: snapshots, a repository, an export file, an archive with an image and
//! a working set, written by earlier builds and committed under `tests/fixtures/vN/`. Every
//! later build must read them all: the tiny guest of each snapshot continues its tick stream
//! exactly where the fixture's console left off, the repository lists and verifies, the
//! export imports, the archived VM resumes, the image reads back byte for byte.
//!
//! A format change adds a new fixture set (`scripts/make-fixtures.sh`, which runs the
//! ignored test [`make_fixtures`] with `VMM_FIXTURES_OUT`) and keeps reading the old ones.
//! `tests/fixtures/README.md` and docs/KEEPING_SNAPSHOTS.md ("Versions") state the rule.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use support::env::{TempDir, temp_dir};
use support::files::copy_dir;
use support::rng::Rng;
use support::tiny;
use support::tiny::harness::{check, check_ticks, deadline, ensure};
use support::tiny::{Capture, Scenario, Spec, TinyVm};
use vmm::archive::Source;
use vmm::archive::restore::{ArchiveRestoreOptions, RestoreError, restore as archive_restore};
use vmm::archive::workingset::{FillRate, WorkingSet, manifest_hash};
use vmm::builder::{BuildError, Console};
use vmm::image::ImageEntry;
use vmm::repo::Repo;
use vmm::store::ChunkRead;
use vmm::store::local::{LocalStore, LocalStoreOptions};
use vmm::util::error_chain;

/// Guest memory of the fixture VMs: small, the fixtures are committed.
const MEM_MIB: u64 = 16;
/// Name of the archived VM and of the archived image.
const ARCHIVE_VM: &str = "ticks";
const ARCHIVE_IMAGE: &str = "data";
/// The image: `IMAGE_BYTES` of xorshift64* output from `IMAGE_SEED`, with a zero run in the
/// middle (so the index has both kinds of entry), cut into `IMAGE_CHUNK` chunks.
const IMAGE_BYTES: usize = 64 << 10;
const IMAGE_SEED: u64 = 0x6669_7874_7572_6573;
const IMAGE_CHUNK: u32 = 16 << 10;
/// Ticks a restored guest must add to the fixture's console.
const MORE_TICKS: u32 = 3;

/// Errors as strings, like the tiny-guest harness.
fn s<E: std::error::Error>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {}", error_chain(&e))
}

fn io<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

/// The fixture sets, `tests/fixtures/v1`, `v2`, … in order.
fn fixture_sets() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut sets: Vec<(u32, PathBuf)> = fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .filter_map(|e| {
            let e = e.ok()?;
            let n: u32 = e.file_name().to_str()?.strip_prefix('v')?.parse().ok()?;
            e.file_type().ok()?.is_dir().then(|| (n, e.path()))
        })
        .collect();
    sets.sort();
    assert!(!sets.is_empty(), "no fixture sets in {}", root.display());
    sets.into_iter().map(|(_, p)| p).collect()
}

/// The set's `FORMATS.json`.
fn formats(set: &Path) -> serde_json::Value {
    let p = set.join("FORMATS.json");
    let bytes = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A private copy of `set/part` (tests never touch the committed files).
fn copy_part(set: &Path, part: &str, tmp: &TempDir) -> Result<PathBuf, String> {
    let to = tmp.join(part);
    copy_dir(&set.join(part), &to).map_err(io(format!("copy {part}")))?;
    Ok(to)
}

fn console_of(set: &Path, name: &str) -> Result<String, String> {
    let p = set.join("consoles").join(name);
    fs::read_to_string(&p).map_err(io(p.display()))
}

/// Waits until the restored guest has printed [`MORE_TICKS`] more ticks than `pre` ends
/// with, then checks that `pre` + its console is one unbroken tick stream.
fn continues(vm: &TinyVm, pre: &str, what: &str) -> Result<(), String> {
    let pre_last = check_ticks(pre).map_err(|e| format!("{what}: fixture console: {e}"))?;
    let target = pre_last + MORE_TICKS;
    vm.wait_console(deadline(), &format!("{what}: tick {target}"), |c| {
        check_ticks(&format!("{pre}{c}")).map_or(true, |n| n >= target)
    })?;
    let post = vm.console.text();
    let last = check_ticks(&format!("{pre}{post}")).map_err(|e| {
        format!(
            "{what}: the ticks do not continue the fixture's: {e}\n--- after restore ---\n{post}"
        )
    })?;
    ensure(last >= target, || format!("{what}: stopped at tick {last}"))
}

/// Restores the snapshot in `dir`. A fixture's guest may have been given CPU features this
/// host lacks (fixtures are written on the development hosts): that refusal is shown and
/// the snapshot restored with `force`, as the tiny guest uses none of them.
fn restore_fixture(dir: &Path, what: &str) -> Result<TinyVm, String> {
    let attempt = |force: bool| {
        let console = Capture::default();
        let (state, memory) = vmm::builder::snapshot_files(dir);
        let mut opts = vmm::builder::RestoreOptions::stdio();
        opts.console = Console::Writer(Box::new(console.clone()));
        opts.force = force;
        vmm::builder::build_from_snapshot(&state, &memory, opts).map(|vmm| TinyVm { vmm, console })
    };
    match attempt(false) {
        Err(BuildError::Cpu(e)) => {
            eprintln!("  {what}: {e}: restoring with force");
            attempt(true).map_err(s(what))
        }
        r => r.map_err(s(what)),
    }
}

/// The deterministic image content.
fn image_bytes() -> Vec<u8> {
    let mut out = Rng::new(IMAGE_SEED).bytes(IMAGE_BYTES);
    out[IMAGE_BYTES / 2..IMAGE_BYTES / 2 + IMAGE_CHUNK as usize].fill(0);
    out
}

// ---------------------------------------------------------------------------------------
// Reading every fixture set.

/// Every set was written with versions this build reads, of formats it knows (the state
/// format moved from 2 to 3 between v1 and v2, so v1 exercises the version 2 reader).
#[test]
fn fixture_sets_use_readable_versions() {
    let all = vmm::formats::all();
    for set in fixture_sets() {
        let f = formats(&set);
        let map = f["formats"].as_object().expect("formats");
        for (name, v) in map {
            let fmt = all.iter().find(|x| x.name == name);
            let fmt = fmt.unwrap_or_else(|| panic!("{}: unknown format {name}", set.display()));
            let v = v.as_u64().expect("a version") as u32;
            assert!(
                (fmt.oldest..=fmt.version).contains(&v),
                "{}: {name} version {v} is not read by this build ({}..={})",
                set.display(),
                fmt.oldest,
                fmt.version
            );
        }
    }
}

/// The plain snapshot directory restores and its guest continues.
#[test]
fn snapshot_fixtures_restore() {
    check("snapshot_fixtures_restore", || {
        for set in fixture_sets() {
            let tmp = temp_dir("fixture-snapshot");
            let dir = copy_part(&set, "snapshot", &tmp)?;
            let what = format!("{}/snapshot", set.display());
            let vm = restore_fixture(&dir, &what)?;
            continues(&vm, &console_of(&set, "snapshot.txt")?, &what)?;
            eprintln!("  {what}: restored, ticks continue");
        }
        Ok(())
    });
}

/// The repository opens, lists both snapshots and their names, verifies, and its second
/// snapshot restores; the export file imports into a fresh repository with the same id.
#[test]
fn repository_fixtures_read() {
    check("repository_fixtures_read", || {
        for set in fixture_sets() {
            let f = formats(&set);
            let tmp = temp_dir("fixture-repo");
            let what = format!("{}/repo", set.display());
            let root = copy_part(&set, "repo", &tmp)?;
            let repo = Repo::open(&root).map_err(s(&what))?;
            let ids = repo.list().map_err(s(&what))?;
            let first = repo.resolve("first").map_err(s(&what))?;
            let second = repo.resolve("second").map_err(s(&what))?;
            ensure(
                ids.len() == 2 && ids.contains(&first) && ids.contains(&second),
                || format!("{what}: lists {ids:?}"),
            )?;
            ensure(
                f["repo"]["first"] == json!(first.to_string())
                    && f["repo"]["second"] == json!(second.to_string()),
                || format!("{what}: ids differ from FORMATS.json: {first} {second}"),
            )?;
            let meta = repo.read_meta(&second).map_err(s(&what))?;
            ensure(meta.parent == Some(first), || {
                format!("{what}: parent of second is {:?}", meta.parent)
            })?;
            let report = vmm::repo::verify::verify(&repo, None, Some(false)).map_err(s(&what))?;
            ensure(report.ok && report.chunks_checked > 0, || {
                format!("{what}: verify: {report:?}")
            })?;
            let vm = restore_fixture(&repo.snapshot_dir(&second), &what)?;
            continues(&vm, &console_of(&set, "second.txt")?, &what)?;
            drop(vm);

            let fresh = Repo::open_or_init(&tmp.join("imported")).map_err(s(&what))?;
            let export = set.join("second.export");
            let r = vmm::repo::export::import(&fresh, &export, Some("again"), Some(false))
                .map_err(s("import"))?;
            ensure(r.id == second && r.new, || {
                format!("{}: imported {r:?}", export.display())
            })?;
            let check = vmm::repo::verify::verify(&fresh, None, Some(false)).map_err(s(&what))?;
            ensure(check.ok, || {
                format!("{what}: verify after import: {check:?}")
            })?;
            eprintln!("  {what}: 2 snapshots verified, second restored, export imported");
        }
        Ok(())
    });
}

/// The archived VM resumes from the local archive (its working set decodes and belongs to
/// its manifest); the image index reads and the image's chunks give back its content.
#[test]
fn archive_fixtures_read() {
    check("archive_fixtures_read", || {
        for set in fixture_sets() {
            let tmp = temp_dir("fixture-archive");
            let what = format!("{}/archive", set.display());
            let archive = copy_part(&set, "archive", &tmp)?;
            let vm_dir = archive.join("vms").join(ARCHIVE_VM);

            let manifest = fs::read(vm_dir.join("memory")).map_err(io(&what))?;
            let ws = WorkingSet::read_from(&vm_dir.join("workingset")).map_err(s(&what))?;
            ensure(
                ws.manifest_hash == manifest_hash(&manifest) && !ws.chunks.is_empty(),
                || format!("{what}: the working set does not belong to the manifest"),
            )?;

            let console = Capture::default();
            let resume = |force: bool| {
                let mut o = ArchiveRestoreOptions::new(Console::Writer(Box::new(console.clone())));
                o.cache_root = Some(tmp.join("cache"));
                o.fill = FillRate::Unlimited;
                o.force = force;
                archive_restore(&Source::parse(&vm_dir.to_string_lossy()), o)
            };
            let (vmm, session) = match resume(false) {
                Err(RestoreError::Build(BuildError::Cpu(e))) => {
                    eprintln!("  {what}: {e}: restoring with force");
                    resume(true)
                }
                r => r,
            }
            .map_err(s(&what))?;
            let vm = TinyVm { vmm, console };
            continues(&vm, &console_of(&set, "snapshot.txt")?, &what)?;
            drop(vm);
            drop(session);

            let index = vmm::image::read_index(&vmm::image::index_path(&archive, ARCHIVE_IMAGE))
                .map_err(s(&what))?;
            let store =
                LocalStore::open(&archive, LocalStoreOptions::default()).map_err(s(&what))?;
            let mut content = Vec::with_capacity(index.size as usize);
            for (i, e) in index.entries.iter().enumerate() {
                match e {
                    ImageEntry::Zero => content.resize(content.len() + index.chunk_len(i), 0),
                    ImageEntry::Chunk(id) => content.extend(store.get(id).map_err(s(&what))?),
                }
            }
            ensure(content == image_bytes(), || {
                format!("{what}: image {ARCHIVE_IMAGE} does not read back")
            })?;
            eprintln!("  {what}: VM resumed, working set and image read");
        }
        Ok(())
    });
}

/// What a file written by a future build looks like to this one: each format's version
/// field in a copy of the newest fixture set is set one above what this build reads, and
/// every reader must refuse it saying that a newer vmm is needed.
#[test]
fn newer_versions_are_refused_clearly() {
    check("newer_versions_are_refused_clearly", || {
        let set = fixture_sets().pop().expect("a fixture set");
        let tmp = temp_dir("fixture-future");
        let v = vmm::formats::current();
        let needs = |what: &str, name: &str, err: String| {
            let want = format!("{name} has format version {}", v[what] + 1);
            ensure(
                err.contains(&want) && err.contains("needs a newer vmm"),
                || format!("{what}: expected {want:?} … needs a newer vmm, got: {err}"),
            )?;
            eprintln!("  {what}: {err}");
            Ok::<(), String>(())
        };
        // The checksummed containers: u32 version at offset 8.
        let bump_u32 = |p: &Path, what: &str| -> Result<(), String> {
            let mut b = fs::read(p).map_err(io(p.display()))?;
            b[8..12].copy_from_slice(&(v[what] + 1).to_le_bytes());
            fs::write(p, b).map_err(io(p.display()))
        };
        let bump_json = |p: &Path, what: &str| -> Result<(), String> {
            let mut m: serde_json::Value =
                serde_json::from_slice(&fs::read(p).map_err(io(p.display()))?)
                    .map_err(io(p.display()))?;
            m["version"] = json!(v[what] + 1);
            fs::write(p, m.to_string()).map_err(io(p.display()))
        };
        // Eager, so that the chunks are read (and their version checked) before the VM runs;
        // forced past a CPU-feature refusal as in `restore_fixture` (fixtures are written on
        // the development hosts, which may be of another CPU vendor than this one).
        let restore_err = |dir: &Path| {
            let attempt = |force: bool| {
                let (state, memory) = vmm::builder::snapshot_files(dir);
                let mut opts = vmm::builder::RestoreOptions::stdio();
                opts.console = Console::Writer(Box::new(Capture::default()));
                opts.force = force;
                opts.eager_memory = true;
                opts.start_paused = true;
                vmm::builder::build_from_snapshot(&state, &memory, opts).map(drop)
            };
            let r = match attempt(false) {
                Err(BuildError::Cpu(_)) => attempt(true),
                r => r,
            };
            match r {
                Ok(()) => Err(format!("{} restored", dir.display())),
                Err(e) => Ok(format!("restoring {}: {e}", dir.display())),
            }
        };

        for (what, name, file) in [
            ("state", "vmm snapshot file", "state"),
            ("memory_manifest", "vmm memory manifest", "memory"),
        ] {
            let dir = copy_part(&set, "snapshot", &tmp)?;
            bump_u32(&dir.join(file), what)?;
            needs(what, name, restore_err(&dir)?)?;
            fs::remove_dir_all(&dir).map_err(io("rm"))?;
        }

        let dir = copy_part(&set, "snapshot", &tmp)?;
        let manifest =
            vmm::snapshot::MemoryManifest::read_from(dir.join("memory")).map_err(s("manifest"))?;
        let id = manifest
            .regions
            .iter()
            .flat_map(|r| &r.chunks)
            .find_map(|c| match c {
                vmm::snapshot::ChunkEntry::Chunk(id) => Some(*id),
                vmm::snapshot::ChunkEntry::Zero => None,
            })
            .ok_or("the snapshot has no stored chunk")?;
        let chunk = dir.join(id.relative_path());
        let mut b = fs::read(&chunk).map_err(io(chunk.display()))?;
        b[2] = (v["chunk"] + 1) as u8;
        fs::write(&chunk, b).map_err(io(chunk.display()))?;
        needs("chunk", "chunk file", restore_err(&dir)?)?;

        let repo = copy_part(&set, "repo", &tmp)?;
        bump_json(&repo.join("vmm-repo.json"), "repository")?;
        let e = Repo::open(&repo).map(drop).map_err(|e| error_chain(&e));
        needs(
            "repository",
            "vmm snapshot repository",
            e.err().ok_or("repo opened")?,
        )?;

        let export = tmp.join("future.export");
        fs::copy(set.join("second.export"), &export).map_err(io("copy"))?;
        bump_u32(&export, "export")?;
        let fresh = Repo::open_or_init(&tmp.join("fresh")).map_err(s("repo"))?;
        let e = vmm::repo::export::import(&fresh, &export, None, Some(false));
        let e = e.map(drop).map_err(|e| error_chain(&e)).err();
        needs("export", "vmm snapshot export", e.ok_or("imported")?)?;

        let archive = copy_part(&set, "archive", &tmp)?;
        let vm_dir = archive.join("vms").join(ARCHIVE_VM);
        let ws = vm_dir.join("workingset");
        bump_u32(&ws, "working_set")?;
        let e = WorkingSet::read_from(&ws)
            .map(drop)
            .map_err(|e| error_chain(&e));
        needs(
            "working_set",
            "vmm working-set file",
            e.err().ok_or("read")?,
        )?;
        let index = vmm::image::index_path(&archive, ARCHIVE_IMAGE);
        bump_u32(&index, "image_index")?;
        let e = vmm::image::read_index(&index)
            .map(drop)
            .map_err(|e| error_chain(&e));
        needs("image_index", "vmm image index", e.err().ok_or("read")?)?;
        bump_json(&archive.join("vmm-archive.json"), "archive")?;
        let mut o = ArchiveRestoreOptions::new(Console::Writer(Box::new(Capture::default())));
        o.cache_root = Some(tmp.join("cache"));
        let e = archive_restore(&Source::parse(&vm_dir.to_string_lossy()), o)
            .map(drop)
            .map_err(|e| error_chain(&e));
        needs("archive", "vmm archive", e.err().ok_or("archive restored")?)
    });
}

// ---------------------------------------------------------------------------------------
// Writing a new fixture set.

fn vmm_cmd(args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .output()
        .map_err(io("run vmm"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure(out.status.success(), || {
        format!(
            "vmm {args:?}: {}\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok(text)
}

/// Waits for `tick n` and pauses.
fn pause_at(vm: &mut TinyVm, n: u32) -> Result<String, String> {
    vm.wait_for(deadline(), &format!("tick {n}\n"))?;
    vm.pause()?;
    Ok(vm.console.text())
}

/// Writes a fixture set into `$VMM_FIXTURES_OUT` (which must not exist) with this build:
/// run through `scripts/make-fixtures.sh`, never by hand over an existing set.
#[test]
#[ignore = "writes a new fixture set: scripts/make-fixtures.sh"]
fn make_fixtures() {
    let out = PathBuf::from(std::env::var_os("VMM_FIXTURES_OUT").expect("set VMM_FIXTURES_OUT"));
    assert!(
        !out.exists(),
        "{} exists: fixture sets are never rewritten",
        out.display()
    );
    assert!(
        support::env::kvm_or_skip(),
        "making fixtures needs /dev/kvm"
    );
    let work = temp_dir("make-fixtures");
    let set = work.join("set");
    write_set(&set, &work).unwrap_or_else(|e| panic!("{e}"));
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    // Same file system in the usual case; otherwise copy.
    if fs::rename(&set, &out).is_err() {
        copy_dir(&set, &out).unwrap();
    }
    eprintln!("fixture set written to {}", out.display());
}

fn write_set(set: &Path, work: &TempDir) -> Result<(), String> {
    let consoles = set.join("consoles");
    fs::create_dir_all(&consoles).map_err(io("mkdir"))?;
    let mut spec = Spec::new(Scenario::SnapTicks);
    spec.mem_mib = MEM_MIB;
    // A baseline every x86-64-v2 host can give, so the fixtures restore on other hosts.
    spec.cpu_template = vmm::config::CpuTemplate::X86_64V2;
    let mut vm = tiny::boot(spec, Vec::new())?;

    // 1. A plain snapshot directory.
    let pre = pause_at(&mut vm, 3)?;
    vm.snapshot(&set.join("snapshot"), None)?;
    fs::write(consoles.join("snapshot.txt"), &pre).map_err(io("console"))?;

    // 2. A repository with two snapshots of the same VM (the second one's parent is the
    //    first), and an export of the second.
    let repo_dir = set.join("repo");
    let first =
        vmm::vmm::create_in_repo(&mut vm.vmm, &repo_dir, Some("first")).map_err(s("repo first"))?;
    fs::write(consoles.join("first.txt"), &pre).map_err(io("console"))?;
    vm.resume()?;
    let pre2 = pause_at(&mut vm, 6)?;
    let second = vmm::vmm::create_in_repo(&mut vm.vmm, &repo_dir, Some("second"))
        .map_err(s("repo second"))?;
    fs::write(consoles.join("second.txt"), &pre2).map_err(io("console"))?;
    drop(vm);
    let repo = Repo::open(&repo_dir).map_err(s("repo"))?;
    vmm::repo::export::export(&repo, &second.id, &set.join("second.export"), Some(false))
        .map_err(s("export"))?;

    // 3. An archive: the snapshot as VM `ticks` with a recorded working set, and an image.
    let archive = set.join("archive");
    vmm::archive::push::push(&set.join("snapshot"), &archive, ARCHIVE_VM).map_err(s("push"))?;
    let vm_dir = archive.join("vms").join(ARCHIVE_VM);
    let cache = work.join("cache");
    vmm_cmd(&[
        "archive",
        "record-workingset",
        &vm_dir.to_string_lossy(),
        "--seconds",
        "0.5",
        "--cache",
        &cache.to_string_lossy(),
    ])?;
    let raw = work.join("image.raw");
    fs::write(&raw, image_bytes()).map_err(io("image"))?;
    vmm::image::import_image(&raw, &archive, ARCHIVE_IMAGE, IMAGE_CHUNK).map_err(s("import"))?;

    // Repositories keep work in tmp/, which git would drop when empty: it is created again
    // on demand, and the fixture tests read the repository without it.
    let _ = fs::remove_dir(repo_dir.join("tmp"));
    let f = json!({
        "written_by": format!("vmm {}", env!("CARGO_PKG_VERSION")),
        "commit": std::env::var("VMM_FIXTURES_COMMIT").unwrap_or_default(),
        "formats": vmm::formats::current(),
        "repo": { "first": first.id.to_string(), "second": second.id.to_string() },
        "image": { "name": ARCHIVE_IMAGE, "bytes": IMAGE_BYTES, "chunk": IMAGE_CHUNK },
    });
    let text = serde_json::to_string_pretty(&f).map_err(io("json"))?;
    fs::write(set.join("FORMATS.json"), text + "\n").map_err(io("FORMATS.json"))
}
