//! The Linux guest's view of a CPU template: booted with `--cpu-template x86-64-v2`, the
//! guest kernel's feature flags (the test agent's `vmmtest.cpuflags`, the flags of
//! `/proc/cpuinfo`) hold the template's features and none of those it masks. On PVM hosts,
//! where the guest's CPUID instruction is not intercepted, this checks that the VMM told
//! the guest kernel (`clearcpuid=`); the features the host quirks hide there whatever the
//! template (e.g. `popcnt`) are the only kept ones allowed to be missing. One boot.

mod support;

use std::collections::BTreeSet;

use support::env::*;
use support::linux::*;
use support::process::*;
use vmm::arch::x86_64::cpu_features::{CpuFeatures, feature};
use vmm::arch::x86_64::cpu_template::{
    CpuTemplate, HostCpu, linux_feature_names, pvm_quirk_features,
};

/// The names of the `vmmtest: cpuflags: …` lines and the count of `cpuflags done n=N`.
fn cpuflags(console: &str) -> (BTreeSet<String>, Option<usize>) {
    let mut flags = BTreeSet::new();
    let mut done = None;
    for l in console.lines() {
        if let Some(i) = l.find("vmmtest: cpuflags: ") {
            flags.extend(l[i + 19..].split_whitespace().map(str::to_string));
        } else if let Some(i) = l.find("vmmtest: cpuflags done n=") {
            done = l[i + 25..].trim().parse().ok();
        }
    }
    (flags, done)
}

/// The names of the features this host can give a guest, as `vmm` probes them (the same
/// source its `clearcpuid=` list is computed from).
fn host_cpu_flags() -> BTreeSet<String> {
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    names(
        &HostCpu::probe(&kvm, pvm_host())
            .expect("probe the host CPU")
            .available,
    )
}

fn names(f: &CpuFeatures) -> BTreeSet<String> {
    f.names().into_iter().collect()
}

#[test]
fn template_decides_what_the_guest_kernel_sees() {
    let Some(a) = guest_env() else { return };
    let mut r = Running::spawn(&[
        "--kernel".into(),
        kernel_arg(&a, "rdinit=/idle vmmtest.cpuflags vmmtest.poweroff"),
        "--initrd".into(),
        a.file("idle.cpio.gz").display().to_string(),
        "--cpu-template".into(),
        "x86-64-v2".into(),
    ]);
    if r.wait_for("vmmtest: cpuflags done", BOOT_TIMEOUT).is_none() {
        fail(&r, "the agent printed no cpuflags");
    }
    let code = r.wait_exit(BOOT_TIMEOUT);
    let out = r.output();
    let (flags, done) = cpuflags(&r.console());
    assert_eq!(done, Some(flags.len()), "flag count\n{out}");
    assert_eq!(
        code,
        Some(0),
        "vmmtest.poweroff should end the VM cleanly\n{out}"
    );
    println!(
        "guest flags: {}",
        flags.iter().cloned().collect::<Vec<_>>().join(" ")
    );

    let (required, optional) = CpuTemplate::X86_64V2.spec().unwrap();
    let keep = names(&required.union(&optional));
    // Bits the VMM and KVM manage (hypervisor, ht) are not the template's business.
    let managed = ["hypervisor", "ht", "ospke"];
    let cpuid_names: BTreeSet<&str> = linux_feature_names().collect();
    let outside: Vec<&String> = flags
        .iter()
        .filter(|f| cpuid_names.contains(f.as_str()))
        .filter(|f| !keep.contains(*f) && !managed.contains(&f.as_str()))
        .collect();
    assert!(
        outside.is_empty(),
        "the guest kernel uses features x86-64-v2 masks: {outside:?}\n{out}"
    );

    let hidden_by_quirks = if pvm_host() {
        names(&pvm_quirk_features(vmm::config::PVM_CLEARCPUID))
    } else {
        BTreeSet::new()
    };
    let missing: Vec<String> = names(&required)
        .into_iter()
        .filter(|n| feature(n).is_some_and(|f| f.linux_named))
        .filter(|n| !flags.contains(n) && !hidden_by_quirks.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "the guest kernel lacks x86-64-v2 features: {missing:?}\n{out}"
    );
    for n in ["sse4_2", "ssse3", "cx16", "lahf_lm", "pni"] {
        assert!(flags.contains(n), "{n} missing\n{out}");
    }
    if pvm_host() {
        // The kernel took every clearcpuid= token (6.1 prints the ones it does not know as
        // "(unknown: …)"), all of it (patch 0004: the list is longer than 127 characters).
        let line = out
            .lines()
            .find(|l| l.contains("Clearing CPUID bits:"))
            .unwrap_or_else(|| panic!("no clearcpuid= on a PVM host\n{out}"));
        println!("{line}");
        assert!(!line.contains("unknown"), "{line}");
        // Only what this host's CPU has is cleared (sse4a and topoext are AMD's, for one).
        let host = host_cpu_flags();
        let expected: Vec<&str> = ["arch_capabilities", "sse4a", "topoext", "clflushopt"]
            .into_iter()
            .filter(|n| host.contains(*n))
            .collect();
        println!("host flags checked: {expected:?}");
        for n in expected {
            assert!(line.contains(&format!(" {n}")), "{n} not cleared: {line}");
        }
    }
}
