//! The snapshot repository (src/repo/, docs/REPOSITORY.md) with the tiny freestanding guest:
//! rm + gc free exactly the chunks no remaining snapshot uses; gc killed (SIGKILL) at random
//! points leaves every remaining snapshot verifiable and restorable; export → import into an
//! empty repository elsewhere restores the same guest state; verify finds a corrupt and a
//! missing chunk; restore from a repository then snapshot makes a branch (through `vmm`
//! processes and the API); `vmm` killed during the first snapshot into a new repository
//! leaves a path the next create and ls accept.
//!
//! Each test skips, printing `SKIP:`, when /dev/kvm cannot be opened.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm::repo::{Repo, SnapshotId};
use vmm::store::ChunkId;

use support::env::temp_dir;
use support::faults::vm::Expect;
use support::process::vmm_cli;
use support::rng::{Rng, random_bytes};
use support::tiny::TinyVm;
use support::tiny::harness::{check, deadline, ensure};
use support::{faults, tiny};

/// Guest memory the tests overwrite while the guest is paused (the tiny guest does not use
/// it): a "hot" MiB rewritten before every snapshot, and per-snapshot areas after it.
const HOT: u64 = 16 << 20;
const HOT_LEN: usize = 1 << 20;
const AREAS: u64 = 18 << 20;
/// Guest RAM of the tests' VMs.
const MEM_MIB: u64 = 64;

fn write_mem(vm: &TinyVm, addr: u64, data: &[u8]) -> Result<(), String> {
    vm.vmm
        .machine
        .mem
        .write_slice(data, GuestAddress(addr))
        .map_err(|e| format!("write guest memory at {addr:#x}: {e}"))
}

fn read_mem(vm: &TinyVm, addr: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut v = vec![0u8; len];
    vm.vmm
        .machine
        .mem
        .read_slice(&mut v, GuestAddress(addr))
        .map_err(|e| format!("read guest memory at {addr:#x}: {e}"))?;
    Ok(v)
}

/// A running tick guest whose memory the host changes before each repository snapshot.
struct Changing {
    vm: TinyVm,
    seq: u64,
    written: BTreeMap<u64, Vec<u8>>,
}

impl Changing {
    fn boot() -> Result<Self, String> {
        let vm = tiny::boot_ticking(MEM_MIB)?;
        Ok(Self {
            vm,
            seq: 0,
            written: BTreeMap::new(),
        })
    }

    /// Pauses, rewrites the hot MiB, fills `area_len` fresh bytes, snapshots into `repo`,
    /// resumes and lets a tick pass. Returns the snapshot id and what it must hold.
    fn snapshot(
        &mut self,
        repo: &Path,
        area_len: usize,
        name: Option<&str>,
    ) -> Result<(SnapshotId, Expect, vmm::vmm::RepoCreateReport), String> {
        self.seq += 1;
        self.vm.pause()?;
        let hot = random_bytes(self.seq * 1000, HOT_LEN);
        write_mem(&self.vm, HOT, &hot)?;
        self.written.insert(HOT, hot);
        let area = AREAS + self.seq * area_len as u64;
        let fresh = random_bytes(self.seq * 1000 + 1, area_len);
        write_mem(&self.vm, area, &fresh)?;
        self.written.insert(area, fresh);
        let rep = vmm::vmm::create_in_repo(&mut self.vm.vmm, repo, name)
            .map_err(|e| vmm::util::error_chain(&e))?;
        let expect = self.written.iter().map(|(a, b)| (*a, b.clone())).collect();
        self.vm.resume()?;
        let ticks = self.vm.console.text().matches("tick ").count();
        self.vm.wait_console(deadline(), "another tick", |c| {
            c.matches("tick ").count() > ticks
        })?;
        Ok((rep.id, expect, rep))
    }
}

/// Restores snapshot `id` of `repo` with all memory loaded, paused, checks `expect`, then
/// resumes it and waits for a tick.
fn restore_and_check(repo: &Path, id: &SnapshotId, expect: &Expect) -> Result<(), String> {
    faults::vm::restore_and_check(&repo.join("snapshots").join(id.to_string()), expect)
}

/// `vmm snapshot CMD --repo REPO --json ARGS`, which must succeed; its JSON.
fn repo_json(cmd: &str, repo: &Path, args: &[&str]) -> Result<serde_json::Value, String> {
    let r = repo.to_str().unwrap();
    let mut a = vec!["snapshot", cmd, "--repo", r, "--json"];
    a.extend_from_slice(args);
    let (code, out, err) = vmm_cli(&a);
    ensure(code == 0, || {
        format!("vmm {a:?} exited {code}\nstdout: {out}\nstderr: {err}")
    })?;
    serde_json::from_str(&out).map_err(|e| format!("vmm {a:?}: bad JSON ({e}): {out}"))
}

/// The complete packs of the repository's store (an index, and a pack at least as long as
/// it says): their indexes.
fn pack_indexes(repo: &Path) -> Vec<vmm::store::pack::PackIndex> {
    let dir = repo.join("packs");
    let mut out = Vec::new();
    for f in fs::read_dir(&dir).unwrap().flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        let Some(id) = name
            .strip_suffix(".idx")
            .and_then(vmm::store::pack::PackId::parse)
        else {
            continue;
        };
        if let Ok(Some((ix, _))) = vmm::store::pack::open_complete(&dir, id) {
            out.push(ix);
        }
    }
    out
}

/// The chunks in the repository's store: chunk files (older layout) and the chunks of
/// every complete pack.
fn chunk_files(repo: &Path) -> BTreeSet<ChunkId> {
    let mut out = BTreeSet::new();
    if let Ok(rd) = fs::read_dir(repo.join("chunks")) {
        for d in rd.flatten() {
            for f in fs::read_dir(d.path()).unwrap().flatten() {
                if let Ok(id) = f.file_name().to_string_lossy().parse() {
                    out.insert(id);
                }
            }
        }
    }
    for ix in pack_indexes(repo) {
        out.extend(ix.entries.iter().map(|e| e.id));
    }
    out
}

/// Packs that gc must repack to keep only `live`: some but less than half of their bytes
/// live.
fn packs_to_repack(repo: &Path, live: &BTreeSet<ChunkId>) -> usize {
    pack_indexes(repo)
        .iter()
        .filter(|ix| {
            let total: u64 = ix.entries.iter().map(|e| u64::from(e.len)).sum();
            let l: u64 = ix
                .entries
                .iter()
                .filter(|e| live.contains(&e.id))
                .map(|e| u64::from(e.len))
                .sum();
            l > 0 && (l as f64) < 0.5 * total as f64
        })
        .count()
}

fn refs_of(repo: &Path, ids: &[SnapshotId]) -> BTreeSet<ChunkId> {
    ids.iter()
        .flat_map(|id| {
            vmm::snapshot::refs::chunk_refs(&repo.join("snapshots").join(id.to_string())).unwrap()
        })
        .collect()
}

fn bytes_of(repo: &Path, chunks: &BTreeSet<ChunkId>) -> u64 {
    let store = vmm::store::LocalStore::open(repo, Default::default()).unwrap();
    chunks
        .iter()
        .map(|c| store.stored_len(c).unwrap().unwrap())
        .sum()
}

#[test]
fn rm_and_gc_free_exactly_the_chunks_no_remaining_snapshot_uses() {
    check("rm_and_gc_free_exactly", || {
        let tmp = temp_dir("repo-gc");
        let repo = tmp.join("repo");
        let mut g = Changing::boot()?;
        let mut snaps = Vec::new();
        for i in 0..5 {
            let (id, expect, rep) = g.snapshot(&repo, 256 << 10, None)?;
            eprintln!(
                "  snapshot {i}: {} ({} bytes written, {} new chunks)",
                id.short(),
                rep.report.memory.bytes_written,
                rep.report.memory.chunks_new
            );
            ensure(rep.parent == snaps.last().map(|(p, _)| *p), || {
                format!("snapshot {i}: parent {:?}", rep.parent)
            })?;
            snaps.push((id, expect));
        }
        drop(g);
        let ids: Vec<SnapshotId> = snaps.iter().map(|(i, _)| *i).collect();
        let ls = repo_json("ls", &repo, &[])?;
        ensure(ls["snapshots"].as_array().unwrap().len() == 5, || {
            format!("ls: {ls}")
        })?;
        ensure(ls["roots"].as_array().unwrap().len() == 1, || {
            format!("ls roots: {ls}")
        })?;

        let before = chunk_files(&repo);
        let gone = [ids[1], ids[3]];
        let kept = [ids[0], ids[2], ids[4]];
        let keep_refs = refs_of(&repo, &kept);
        let freed: BTreeSet<ChunkId> = before.difference(&keep_refs).copied().collect();
        ensure(!freed.is_empty(), || "nothing to free".into())?;
        let expected_bytes = bytes_of(&repo, &freed);
        let rm = repo_json("rm", &repo, &[&gone[0].short(), &gone[1].to_string()[..20]])?;
        ensure(
            rm["chunks_freed"] == freed.len() as u64 && rm["bytes_freed"] == expected_bytes,
            || {
                format!(
                    "rm says {rm}, expected {} chunks / {expected_bytes} bytes",
                    freed.len()
                )
            },
        )?;
        // rm deletes no chunk by itself.
        ensure(chunk_files(&repo) == before, || "rm deleted chunks".into())?;
        let gc = repo_json("gc", &repo, &[])?;
        ensure(gc["chunks_deleted"] == freed.len() as u64, || {
            format!("gc: {gc}")
        })?;
        ensure(chunk_files(&repo) == keep_refs, || {
            "after gc the store is not exactly the remaining snapshots' chunks".into()
        })?;
        let v = repo_json("verify", &repo, &[])?;
        ensure(v["ok"] == true, || format!("verify: {v}"))?;
        // Snapshot 2's parent was removed: it is a root now.
        let ls = repo_json("ls", &repo, &[])?;
        let roots: Vec<&str> = ls["roots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        ensure(roots.len() == 3, || format!("ls after rm: {ls}"))?;
        for (id, expect) in &snaps {
            if kept.contains(id) {
                restore_and_check(&repo, id, expect)?;
            }
        }
        // A second gc has nothing left to do.
        let gc = repo_json("gc", &repo, &[])?;
        ensure(gc["chunks_deleted"] == 0, || format!("second gc: {gc}"))
    });
}

#[test]
fn gc_killed_at_random_points_leaves_every_snapshot_restorable() {
    check("gc_killed_at_random_points", || {
        let tmp = temp_dir("repo-gc-kill");
        let repo = tmp.join("repo");
        let mut g = Changing::boot()?;
        let mut snaps = Vec::new();
        for _ in 0..10 {
            let (id, expect, _) = g.snapshot(&repo, 2 << 20, None)?;
            snaps.push((id, expect));
        }
        drop(g);
        let kept: Vec<(SnapshotId, Expect)> = [1, 5, 9].iter().map(|&i| snaps[i].clone()).collect();
        let kept_ids: Vec<SnapshotId> = kept.iter().map(|(i, _)| *i).collect();
        let gone: Vec<String> = snaps
            .iter()
            .filter(|(i, _)| !kept_ids.contains(i))
            .map(|(i, _)| i.to_string())
            .collect();
        let gone_refs: Vec<&str> = gone.iter().map(String::as_str).collect();
        repo_json("rm", &repo, &gone_refs)?;
        let keep_refs = refs_of(&repo, &kept_ids);
        let to_delete = chunk_files(&repo).difference(&keep_refs).count();
        let to_repack = packs_to_repack(&repo, &keep_refs);
        eprintln!("  {to_delete} chunks to sweep, {to_repack} packs to repack");
        // gc runs with every pack holding a dead chunk repacked (`GC_REPACK_BELOW_ENV`),
        // so that it frees every dead chunk and the kills land in repacks too.

        let mut rng = Rng::from_env_or_clock("FAULTS_SEED", "gc kill points");
        let (mut kills, mut finished) = (0, false);
        for round in 0..40 {
            let mut child = Command::new(support::env::vmm_bin())
                .args(["snapshot", "gc", "--repo", repo.to_str().unwrap()])
                .env(vmm::repo::gc::GC_DELAY_ENV, "10000")
                .env(vmm::repo::gc::GC_REPACK_BELOW_ENV, "1")
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("spawn gc: {e}"))?;
            // Early rounds kill in the first milliseconds (mark phase, tmp cleanup).
            let wait_ms = if round < 4 {
                rng.next() % 15
            } else {
                rng.next() % 200
            };
            std::thread::sleep(Duration::from_millis(wait_ms));
            if child.try_wait().map_err(|e| e.to_string())?.is_some() {
                finished = true;
            } else {
                child.kill().map_err(|e| format!("SIGKILL gc: {e}"))?;
                kills += 1;
            }
            let _ = child.wait();
            let left = chunk_files(&repo).difference(&keep_refs).count();
            // Every remaining snapshot is intact after every kill.
            let v = repo_json("verify", &repo, &[])?;
            ensure(v["ok"] == true, || {
                format!("verify after kill {kills} (round {round}): {v}")
            })?;
            if round % 5 == 0 {
                let (id, expect) = &kept[round / 5 % kept.len()];
                restore_and_check(&repo, id, expect)?;
            }
            if finished || left == 0 {
                eprintln!("  gc done after {kills} kills (round {round}), {left} dead chunks left");
                break;
            }
        }
        ensure(kills >= 5, || format!("only {kills} kills landed"))?;
        let full = Command::new(support::env::vmm_bin())
            .args(["snapshot", "gc", "--repo", repo.to_str().unwrap()])
            .env(vmm::repo::gc::GC_REPACK_BELOW_ENV, "1")
            .status()
            .map_err(|e| format!("gc: {e}"))?;
        ensure(full.success(), || format!("the last gc failed: {full}"))?;
        ensure(chunk_files(&repo) == keep_refs, || {
            "after a full gc the store is not exactly the remaining chunks".into()
        })?;
        ensure(packs_to_repack(&repo, &keep_refs) == 0, || {
            "a sparse pack is left after a full gc".into()
        })?;
        let names: Vec<String> = fs::read_dir(repo.join("packs"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ensure(
            names.iter().all(|n| {
                let stem = n.trim_end_matches(".pack").trim_end_matches(".idx");
                names.contains(&format!("{stem}.pack")) && names.contains(&format!("{stem}.idx"))
            }),
            || format!("packs without index or index without pack after gc: {names:?}"),
        )?;
        ensure(
            fs::read_dir(repo.join("tmp")).unwrap().next().is_none(),
            || "tmp/ not empty after gc".into(),
        )?;
        for (id, expect) in &kept {
            restore_and_check(&repo, id, expect)?;
        }
        Ok(())
    });
}

/// Guest RAM and vCPU registers of a paused VM.
fn whole_state(vm: &TinyVm) -> Result<(Vec<u8>, kvm_bindings::kvm_regs), String> {
    Ok((read_mem(vm, 0, (MEM_MIB << 20) as usize)?, vm.regs()?))
}

#[test]
fn export_import_into_an_empty_repo_restores_the_same_state() {
    check("export_import", || {
        let tmp = temp_dir("repo-export");
        let repo = tmp.join("repo");
        let mut g = Changing::boot()?;
        g.snapshot(&repo, 1 << 20, None)?;
        let (id, expect, _) = g.snapshot(&repo, 1 << 20, Some("second"))?;
        drop(g);
        let file = tmp.join("second.vmmsnap");
        let e = repo_json("export", &repo, &["second", file.to_str().unwrap()])?;
        let needed = refs_of(&repo, &[id]);
        ensure(e["chunks"] == needed.len() as u64, || {
            format!("export: {e}")
        })?;

        let other = tmp.join("elsewhere").join("imported");
        let i = repo_json("import", &other, &[file.to_str().unwrap(), "--name", "x"])?;
        ensure(i["id"] == id.to_string() && i["new"] == true, || {
            format!("import: {i}")
        })?;
        ensure(chunk_files(&other) == needed, || {
            "the imported repository holds other chunks than the snapshot needs".into()
        })?;
        let v = repo_json("verify", &other, &["x"])?;
        ensure(v["ok"] == true, || format!("verify: {v}"))?;

        let a = tiny::restore_eager(&repo.join("snapshots").join(id.to_string()), None, true)?;
        let b = tiny::restore_eager(&other.join("snapshots").join(id.to_string()), None, true)?;
        let (sa, sb) = (whole_state(&a)?, whole_state(&b)?);
        ensure(sa.1 == sb.1, || "registers differ".into())?;
        ensure(sa.0 == sb.0, || "guest memory differs".into())?;
        drop((a, b));
        restore_and_check(&other, &id, &expect)?;

        // A truncated or damaged file is refused and changes nothing.
        let bytes = fs::read(&file).unwrap();
        let bad = tmp.join("bad.vmmsnap");
        let third = tmp.join("third");
        for (what, data) in [
            ("truncated", bytes[..bytes.len() * 2 / 3].to_vec()),
            ("checksum", {
                let mut d = bytes.clone();
                let n = d.len() - 3;
                d[n] ^= 1;
                d
            }),
        ] {
            fs::write(&bad, &data).unwrap();
            let (code, _, err) = vmm_cli(&[
                "snapshot",
                "import",
                "--repo",
                third.to_str().unwrap(),
                bad.to_str().unwrap(),
            ]);
            ensure(code != 0 && err.contains(what), || {
                format!("import of a {what} file: exit {code}, {err}")
            })?;
            ensure(
                Repo::open(&third).unwrap().list().unwrap().is_empty(),
                || "a failed import listed a snapshot".into(),
            )?;
        }
        Ok(())
    });
}

#[test]
fn verify_detects_a_corrupt_and_a_missing_chunk() {
    check("verify_detects", || {
        let tmp = temp_dir("repo-verify");
        let repo = tmp.join("repo");
        let mut g = Changing::boot()?;
        let (a, _, _) = g.snapshot(&repo, 1 << 20, Some("first"))?;
        let (b, _, _) = g.snapshot(&repo, 1 << 20, None)?;
        drop(g);
        ensure(repo_json("verify", &repo, &[])?["ok"] == true, || {
            "fresh repository does not verify".into()
        })?;
        let only_b: Vec<ChunkId> = refs_of(&repo, &[b])
            .difference(&refs_of(&repo, &[a]))
            .copied()
            .collect();
        ensure(only_b.len() >= 2, || {
            "snapshot b has no chunks of its own".into()
        })?;
        // Damage the middle of one chunk's record; take another out of its pack's index.
        let store = vmm::store::LocalStore::open_read(&repo).unwrap();
        let loc = store.location(&only_b[0]).unwrap().unwrap();
        let mut data = fs::read(&loc.path).unwrap();
        let n = (loc.offset + loc.len / 2) as usize;
        data[n] ^= 0x40;
        fs::write(&loc.path, data).unwrap();
        for ix_path in fs::read_dir(repo.join("packs"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
        {
            if ix_path.extension().is_some_and(|e| e == "idx") {
                let mut ix = vmm::store::pack::read_index(&ix_path).unwrap();
                ix.entries.retain(|e| e.id != only_b[1]);
                vmm::formats::file::write_file(&ix_path, &vmm::formats::PACK_INDEX_KIND, &ix)
                    .unwrap();
            }
        }

        let r = repo.to_str().unwrap();
        let (code, out, _) = vmm_cli(&["snapshot", "verify", "--repo", r, "--json"]);
        ensure(code != 0, || format!("verify exited 0: {out}"))?;
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        let sb = v["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == b.to_string())
            .unwrap();
        ensure(
            sb["missing"] == serde_json::json!([only_b[1].to_string()])
                && sb["corrupt"][0][0] == only_b[0].to_string(),
            || format!("verify report: {v}"),
        )?;
        let (code, out, _) = vmm_cli(&["snapshot", "verify", "--repo", r]);
        ensure(
            code != 0 && out.contains("missing chunk") && out.contains("corrupt chunk"),
            || format!("human verify: exit {code}\n{out}"),
        )?;
        // The untouched snapshot still verifies on its own.
        ensure(
            repo_json("verify", &repo, &["first"])?["ok"] == true,
            || "snapshot a does not verify".into(),
        )?;
        // Bad input: clear errors, exit 2, nothing changed.
        for (args, want) in [
            (vec!["show", "nope"], "no snapshot"),
            (vec!["rm", "0000"], "no snapshot"),
            (vec!["tag", "first", "../evil"], "invalid snapshot name"),
        ] {
            let mut a = vec!["snapshot", args[0], "--repo", r];
            a.extend_from_slice(&args[1..]);
            let (code, _, err) = vmm_cli(&a);
            ensure(code == 2 && err.contains(want), || {
                format!("{a:?}: exit {code}, {err}")
            })?;
        }
        // A damaged catalogue entry: still listed, with the error.
        fs::write(
            repo.join("snapshots").join(a.to_string()).join("meta.json"),
            "{",
        )
        .unwrap();
        let ls = repo_json("ls", &repo, &[])?;
        ensure(ls["snapshots"].as_array().unwrap().len() == 2, || {
            format!("ls: {ls}")
        })?;
        let (code, out, _) = vmm_cli(&["snapshot", "ls", "--repo", r]);
        ensure(code == 0 && out.contains("ERROR"), || format!("ls: {out}"))?;
        Ok(())
    });
}

/// Starts `vmm restore --repo REPO WHAT --api-sock SOCK` and waits for a tick.
fn restore_process(
    repo: &Path,
    what: &str,
    sock: &Path,
) -> Result<support::process::Running, String> {
    let mut r = support::process::Running::spawn(&[
        "restore".into(),
        "--repo".into(),
        repo.display().to_string(),
        what.into(),
        "--api-sock".into(),
        sock.display().to_string(),
    ]);
    if r.wait_for("tick ", Duration::from_secs(120)).is_none() {
        return Err(format!("restored {what} does not tick:\n{}", r.output()));
    }
    Ok(r)
}

#[test]
fn restore_from_a_repo_then_snapshot_creates_a_branch() {
    check("restore_then_snapshot_branches", || {
        let tmp = temp_dir("repo-branch");
        let repo = tmp.join("repo");
        let mut g = Changing::boot()?;
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(g.snapshot(&repo, 64 << 10, None)?.0);
        }
        drop(g);
        let sock = tmp.join("api.sock");
        let mut vm = restore_process(&repo, &ids[1].short(), &sock)?;
        let sock_s = sock.to_str().unwrap();
        let (code, out, err) = vmm_cli(&[
            "snapshot",
            "create",
            "--repo",
            repo.to_str().unwrap(),
            "--name",
            "branch",
            "--api-sock",
            sock_s,
            "--json",
        ]);
        ensure(code == 0, || format!("create: {code} {out} {err}"))?;
        let rep: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        ensure(rep["parent"] == ids[1].to_string(), || {
            format!("branch snapshot's parent: {rep}")
        })?;
        let branch: SnapshotId = rep["id"].as_str().unwrap().parse().unwrap();
        // A second snapshot of the same VM hangs under the branch.
        let (code, out, _) = vmm_cli(&[
            "snapshot",
            "create",
            "--repo",
            repo.to_str().unwrap(),
            "--api-sock",
            sock_s,
        ]);
        ensure(code == 0 && out.contains("parent"), || {
            format!("create: {out}")
        })?;
        let _ = vm.child.kill();
        let _ = vm.child.wait();

        let ls = repo_json("ls", &repo, &[])?;
        let entry = |id: &SnapshotId| {
            ls["snapshots"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["id"] == id.to_string())
                .cloned()
                .unwrap_or_default()
        };
        let kids: BTreeSet<String> = entry(&ids[1])["children"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        ensure(
            kids == [ids[2].to_string(), branch.to_string()]
                .into_iter()
                .collect(),
            || format!("children of snapshot 1: {kids:?}\n{ls}"),
        )?;
        ensure(
            entry(&branch)["names"] == serde_json::json!(["branch"]),
            || format!("{ls}"),
        )?;
        ensure(
            entry(&branch)["children"].as_array().unwrap().len() == 1,
            || format!("{ls}"),
        )?;
        let (_, tree, _) = vmm_cli(&["snapshot", "ls", "--repo", repo.to_str().unwrap()]);
        eprintln!("{tree}");
        ensure(
            tree.contains("├──") && tree.contains("[branch]"),
            || tree.clone(),
        )?;
        let shown = repo_json("show", &repo, &["branch"])?;
        ensure(shown["parent"] == ids[1].to_string(), || format!("{shown}"))?;
        // The branch restores by name; the plain directory path works too.
        let sock2 = tmp.join("api2.sock");
        drop(restore_process(&repo, "branch", &sock2)?);
        let mut r = support::process::Running::spawn(&[
            "restore".into(),
            repo.join("snapshots")
                .join(branch.to_string())
                .display()
                .to_string(),
        ]);
        ensure(
            r.wait_for("tick ", Duration::from_secs(120)).is_some(),
            || r.output(),
        )?;
        Ok(())
    });
}

#[test]
fn snapshot_after_its_parent_was_removed_and_collected() {
    check("parent_removed_and_collected", || {
        let tmp = temp_dir("repo-parent-gone");
        let repo = tmp.join("repo");
        let mut g = Changing::boot()?;
        let (a, _, _) = g.snapshot(&repo, 1 << 20, None)?;
        // Remove the VM's parent and collect its chunks: the next snapshot cannot reuse them.
        repo_json("rm", &repo, &[&a.to_string()])?;
        repo_json("gc", &repo, &[])?;
        ensure(chunk_files(&repo).is_empty(), || "gc left chunks".into())?;
        let (b, expect, rep) = g.snapshot(&repo, 1 << 20, None)?;
        ensure(rep.parent == Some(a), || format!("parent {:?}", rep.parent))?;
        drop(g);
        let v = repo_json("verify", &repo, &[])?;
        ensure(v["ok"] == true, || format!("verify: {v}"))?;
        let ls = repo_json("ls", &repo, &[])?;
        ensure(ls["snapshots"][0]["parent_listed"] == false, || {
            format!("{ls}")
        })?;
        restore_and_check(&repo, &b, &expect)?;
        Ok(())
    });
}

/// What a killed first snapshot left at the new repository's path.
#[derive(Debug, Default)]
struct KillOutcomes {
    nothing: usize,
    temp_left: usize,
    empty_repo: usize,
    with_snapshot: usize,
}

/// Temporary repositories being built beside `repo` (see src/repo/init.rs).
fn temp_repos(repo: &Path) -> Vec<String> {
    let prefix = format!(
        ".{}.vmm-repo-new-",
        repo.file_name().unwrap().to_str().unwrap()
    );
    fs::read_dir(repo.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// `vmm snapshot create --repo NEW` against a running VM, the VM's `vmm` SIGKILLed at a
/// random moment: whatever is left at NEW, a later create into it succeeds, `ls` lists what
/// was committed and `verify` passes. Before repositories were created atomically, a kill
/// between the layout and the marker left a directory every command refused.
#[test]
fn vmm_killed_during_the_first_snapshot_into_a_new_repo() {
    check("killed_during_first_repo_snapshot", || {
        let tmp = temp_dir("repo-first-kill");
        let src = tmp.join("src");
        let mut g = Changing::boot()?;
        let (id, _, _) = g.snapshot(&src, 1 << 20, None)?;
        drop(g);
        let id = id.short();
        let create = |repo: &Path, sock: &Path| {
            Command::new(support::env::vmm_bin())
                .args(["snapshot", "create", "--json", "--repo"])
                .arg(repo)
                .arg("--api-sock")
                .arg(sock)
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("spawn snapshot create: {e}"))
        };
        // How long one first snapshot into a new repository takes here, end to end.
        let sock = tmp.join("calib.sock");
        let vm = restore_process(&src, &id, &sock)?;
        let t = std::time::Instant::now();
        let st = create(&tmp.join("calib"), &sock)?
            .wait()
            .map_err(|e| e.to_string())?;
        let full = t.elapsed();
        ensure(st.success(), || format!("calibration create: {st}"))?;
        drop(vm);
        eprintln!("  a first snapshot into a new repository takes {full:?}");

        let mut rng = Rng::from_env_or_clock("FAULTS_SEED", "create kill points");
        let span = full.as_micros().max(20_000) as u64;
        let mut seen = KillOutcomes::default();
        for round in 0..12 {
            let repo = tmp.join(format!("new{round}"));
            if round % 3 == 0 {
                // Users often make the directory first.
                fs::create_dir(&repo).unwrap();
            }
            let sock = tmp.join(format!("api{round}.sock"));
            let mut vm = restore_process(&src, &id, &sock)?;
            let mut client = create(&repo, &sock)?;
            // Half of the kills in the first quarter, where the repository is made.
            let range = if round % 2 == 0 { span / 4 } else { span };
            std::thread::sleep(Duration::from_micros(rng.next() % range.max(1)));
            vm.kill_and_drain();
            let _ = client.wait();
            let listed = fs::read_dir(repo.join("snapshots"))
                .map(|rd| rd.count())
                .unwrap_or(0);
            if !temp_repos(&repo).is_empty() {
                seen.temp_left += 1;
            } else if repo.join(vmm::repo::MARKER_FILE).exists() {
                if listed > 0 {
                    seen.with_snapshot += 1;
                } else {
                    seen.empty_repo += 1;
                }
            } else {
                ensure(
                    fs::read_dir(&repo).map_or(true, |mut rd| rd.next().is_none()),
                    || format!("round {round}: a repository without its marker was left"),
                )?;
                seen.nothing += 1;
            }
            // A later create into the same path works, and so do ls and verify.
            let sock2 = tmp.join(format!("api{round}b.sock"));
            let vm2 = restore_process(&src, &id, &sock2)?;
            let st = create(&repo, &sock2)?.wait().map_err(|e| e.to_string())?;
            ensure(st.success(), || {
                format!(
                    "round {round}: create after the kill: {st}\n{}",
                    vm2.output()
                )
            })?;
            drop(vm2);
            let ls = repo_json("ls", &repo, &[])?;
            let n = ls["snapshots"].as_array().map_or(0, Vec::len);
            ensure(n == listed + 1, || {
                format!("round {round}: {listed} listed after the kill, then {n}: {ls}")
            })?;
            let v = repo_json("verify", &repo, &[])?;
            ensure(v["ok"] == true, || format!("round {round}: verify: {v}"))?;
            ensure(temp_repos(&repo).is_empty(), || {
                format!(
                    "round {round}: temporary repositories left: {:?}",
                    temp_repos(&repo)
                )
            })?;
        }
        eprintln!("  after the kills: {seen:?}");
        ensure(seen.with_snapshot < 12, || {
            "every kill came after the snapshot was committed".into()
        })?;
        Ok(())
    });
}
