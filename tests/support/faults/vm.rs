//! The tiny tick guest whose memory the host changes before each snapshot, and the checks
//! every fault test ends with: stored snapshots verify and restore with the right memory,
//! archives hold every chunk their VMs and images name.

use std::path::Path;

use vm_memory::{Bytes, GuestAddress};
use vmm::repo::SnapshotId;
use vmm::store::{ChunkRead, LocalStore, LocalStoreOptions};

use crate::support::process::vmm_cli_ok;
use crate::support::rng::random_bytes;
use crate::support::tiny::harness::{deadline, ensure};
use crate::support::tiny::{self, TinyVm};

/// Guest RAM of the tests' VMs.
pub const MEM_MIB: u64 = 64;
/// Where the host writes fresh random bytes before each snapshot (unused by the guest).
const AREAS: u64 = 16 << 20;

/// What a snapshot must hold: (guest address, bytes).
pub type Expect = Vec<(u64, Vec<u8>)>;

/// A running tick guest whose memory the host changes before each snapshot: the same
/// area gets fresh random bytes each time, so every snapshot stores about the same amount
/// whether the one before failed or not.
pub struct Changing {
    /// The VM.
    pub vm: TinyVm,
    seq: u64,
    /// What guest memory holds now at the area.
    current: Vec<u8>,
    /// What the last successful snapshot holds there.
    stored: Vec<u8>,
    area_len: usize,
}

impl Changing {
    /// Boots the tick guest; each snapshot rewrites `area_len` bytes.
    pub fn boot(area_len: usize) -> Result<Self, String> {
        let vm = tiny::boot_ticking(MEM_MIB)?;
        Ok(Self {
            vm,
            seq: 0,
            current: vec![0; area_len],
            stored: vec![0; area_len],
            area_len,
        })
    }

    /// Pauses the VM and rewrites the area; returns what a snapshot taken now must hold.
    pub fn pause_and_change(&mut self) -> Result<Expect, String> {
        self.seq += 1;
        self.vm.pause()?;
        self.current = random_bytes(self.seq, self.area_len);
        self.vm
            .vmm
            .machine
            .mem
            .write_slice(&self.current, GuestAddress(AREAS))
            .map_err(|e| format!("write guest memory: {e}"))?;
        Ok(vec![(AREAS, self.current.clone())])
    }

    /// What the last successful snapshot holds: after a failed one, the snapshot before it
    /// must still read exactly so (never the failed attempt's memory).
    pub fn stored(&self) -> Expect {
        vec![(AREAS, self.stored.clone())]
    }

    fn outcome<T>(&mut self, r: &Result<T, String>) {
        if r.is_ok() {
            self.stored = self.current.clone();
        }
    }

    /// Resumes the VM and waits for a new tick: it keeps running.
    pub fn resume_and_tick(&mut self) -> Result<(), String> {
        self.vm.resume()?;
        let ticks = self.vm.console.text().matches("tick ").count();
        self.vm
            .wait_console(deadline(), "a tick after the fault", |c| {
                c.matches("tick ").count() > ticks
            })
    }

    /// Pauses, changes memory, snapshots into `repo`, resumes. The outer error is a test
    /// failure, the inner one the snapshot's error (the VM is running again either way).
    pub fn repo_snapshot(
        &mut self,
        repo: &Path,
    ) -> Result<Result<(SnapshotId, Expect), String>, String> {
        let expect = self.pause_and_change()?;
        let r = vmm::vmm::create_in_repo(&mut self.vm.vmm, repo, None)
            .map(|rep| (rep.id, expect))
            .map_err(|e| vmm::util::error_chain(&e));
        self.outcome(&r);
        self.resume_and_tick()?;
        Ok(r)
    }

    /// Like [`Changing::repo_snapshot`], into the snapshot directory `dir`.
    pub fn dir_snapshot(&mut self, dir: &Path) -> Result<Result<Expect, String>, String> {
        let expect = self.pause_and_change()?;
        let r = vmm::vmm::create_snapshot(&mut self.vm.vmm, dir, None)
            .map(|_| expect)
            .map_err(|e| vmm::util::error_chain(&e));
        self.outcome(&r);
        self.resume_and_tick()?;
        Ok(r)
    }
}

/// Restores the snapshot in `dir` with all memory loaded, checks `expect`, resumes it and
/// waits for a tick (it carries on, it did not reboot).
pub fn restore_and_check(dir: &Path, expect: &Expect) -> Result<(), String> {
    let mut vm = tiny::restore_eager(dir, None, true)?;
    for (addr, bytes) in expect {
        let mut got = vec![0u8; bytes.len()];
        vm.vmm
            .machine
            .mem
            .read_slice(&mut got, GuestAddress(*addr))
            .map_err(|e| format!("read guest memory: {e}"))?;
        ensure(got == *bytes, || {
            format!("{}: memory at {addr:#x} differs", dir.display())
        })?;
    }
    vm.resume()?;
    vm.wait_for(deadline(), "tick ")?;
    ensure(!vm.console.text().contains("serial set"), || {
        format!("{} rebooted after restore", dir.display())
    })
}

/// `vmm snapshot verify --repo REPO --json` must pass; returns the listed snapshot ids.
pub fn verify_repo(repo: &Path) -> Result<Vec<String>, String> {
    let r = repo.to_str().unwrap();
    let out = vmm_cli_ok(&["snapshot", "verify", "--repo", r, "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    ensure(v["ok"] == true, || format!("verify: {v}"))?;
    let ls = vmm_cli_ok(&["snapshot", "ls", "--repo", r, "--json"])?;
    let ls: serde_json::Value = serde_json::from_str(&ls).map_err(|e| format!("{e}: {ls}"))?;
    Ok(ls["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default())
}

/// Checks an archive directory: every VM with a `state` file has its state, manifest and
/// every chunk they name, each chunk decoding to its id; every image index names only
/// chunks that are there and intact. Returns the complete VMs' and images' names.
pub fn check_archive(archive: &Path) -> Result<(Vec<String>, Vec<String>), String> {
    let store = LocalStore::open(archive, LocalStoreOptions::default())
        .map_err(|e| format!("open {}: {e}", archive.display()))?;
    let mut vms = Vec::new();
    if let Ok(rd) = std::fs::read_dir(archive.join("vms")) {
        for e in rd.flatten() {
            let dir = e.path();
            if !dir.join("state").exists() {
                continue;
            }
            let refs = vmm::snapshot::refs::chunk_refs(&dir)
                .map_err(|e| format!("{}: {}", dir.display(), vmm::util::error_chain(&e)))?;
            for id in refs {
                store
                    .get(&id)
                    .map_err(|e| format!("archived VM {}: chunk {id}: {e}", dir.display()))?;
            }
            vms.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    let mut images = Vec::new();
    if let Ok(rd) = std::fs::read_dir(archive.join("images")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let index = vmm::image::read_index(&e.path())
                .map_err(|err| format!("image index {name}: {err}"))?;
            for entry in &index.entries {
                if let vmm::image::ImageEntry::Chunk(id) = entry {
                    store
                        .get(id)
                        .map_err(|err| format!("image {name}: chunk {id}: {err}"))?;
                }
            }
            images.push(name);
        }
    }
    vms.sort();
    images.sort();
    Ok((vms, images))
}
