//! Tiny-guest VMs in archives: a page pattern the host writes before the snapshot, and a
//! resume through `vmm::archive::restore` with the console captured.

use std::path::Path;

use vmm::archive::Source;
use vmm::archive::restore::{ArchiveRestoreOptions, ArchiveSession, restore};
use vmm::archive::workingset::FillRate;
use vmm::builder::Console;
use vmm::util::error_chain;

use super::harness::deadline;
use super::{Capture, Scenario, Spec, TinyVm};

/// One distinct qword per 4 KiB page of `[base, base + len)`: the page at `a` holds
/// `a ^ xor`, so every page's content is known and differs.
#[derive(Clone, Copy, Debug)]
pub struct PagePattern {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the address is XORed with.
    pub xor: u64,
}

impl PagePattern {
    /// The qword the pattern puts at the page address `a`.
    pub fn value(&self, a: u64) -> u64 {
        a ^ self.xor
    }

    /// The page addresses, every `step`-th page.
    pub fn pages(&self, step: usize) -> impl Iterator<Item = u64> + '_ {
        (0..self.len / 4096)
            .step_by(step)
            .map(|p| self.base + p * 4096)
    }

    /// Writes the pattern into the (paused) VM's memory.
    pub fn write(&self, vm: &TinyVm) -> Result<(), String> {
        for a in self.pages(1) {
            vm.write(a, self.value(a))?;
        }
        Ok(())
    }
}

/// Boots `scenario` with `mem_mib` of RAM, waits for `ready` on the console, pauses,
/// writes `pattern` and snapshots into `snap`. Returns the console up to the snapshot.
pub fn snapshot_with_pattern(
    scenario: Scenario,
    mem_mib: u64,
    ready: &str,
    pattern: &PagePattern,
    snap: &Path,
) -> Result<String, String> {
    let mut spec = Spec::new(scenario);
    spec.mem_mib = mem_mib;
    let mut vm = super::boot(spec, Vec::new())?;
    vm.wait_for(deadline(), ready)?;
    vm.pause()?;
    pattern.write(&vm)?;
    vm.snapshot(snap, None)?;
    Ok(vm.console.text())
}

/// Resumes the archived VM at `url` (`vmm restore URL`, in-process) with its cache under
/// `cache` and the background fill at `fill`; `tune` adjusts the other options.
pub fn resume(
    url: &str,
    cache: &Path,
    fill: FillRate,
    tune: impl FnOnce(&mut ArchiveRestoreOptions),
) -> Result<(TinyVm, ArchiveSession), String> {
    let console = Capture::default();
    let mut o = ArchiveRestoreOptions::new(Console::Writer(Box::new(console.clone())));
    o.cache_root = Some(cache.to_path_buf());
    o.fill = fill;
    tune(&mut o);
    let (vmm, s) = restore(&Source::parse(url), o).map_err(|e| error_chain(&e))?;
    Ok((TinyVm { vmm, console }, s))
}
