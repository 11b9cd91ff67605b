//! CPU templates and CPU portability with the tiny guest: a template is applied, recorded in
//! the snapshot (state format 3 and later) and kept across restores; a snapshot whose guest was given
//! a feature this host lacks (made by editing a real snapshot's state with the library's
//! own reader and writer) is refused with the missing features named and exit code 2, and
//! `--force` restores it with a warning. The Linux guest's view of a template is checked by
//! `tests/cpu_linux.rs`.

mod support;

use std::process::Command;
use std::time::Duration;

use support::env::temp_dir;
use support::tiny;
use support::tiny::harness::{check, check_ticks, deadline, ensure};
use support::tiny::{Capture, Scenario, Spec, TinyVm};
use vmm::arch::x86_64::cpu_features::{CpuFeatures, FEATURES, Feature};
use vmm::arch::x86_64::cpu_template::{CpuTemplate, HostCpu, plan};
use vmm::builder::Console;
use vmm::snapshot::microvm::MicrovmState;

fn host() -> Result<HostCpu, String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    HostCpu::probe(&kvm, vmm::config::pvm_host()).map_err(|e| e.to_string())
}

/// Restores `dir` with `force`, console captured.
fn restore(dir: &std::path::Path, force: bool) -> Result<TinyVm, String> {
    let console = Capture::default();
    let (state, memory) = vmm::builder::snapshot_files(dir);
    let mut opts = vmm::builder::RestoreOptions::stdio();
    opts.console = Console::Writer(Box::new(console.clone()));
    opts.force = force;
    let vmm = vmm::builder::build_from_snapshot(&state, &memory, opts)
        .map_err(|e| vmm::util::error_chain(&e))?;
    Ok(TinyVm { vmm, console })
}

/// Waits for three more ticks than `pre` ends with and checks the whole stream.
fn continues(vm: &TinyVm, pre: &str) -> Result<(), String> {
    let target = check_ticks(pre)? + 3;
    vm.wait_console(deadline(), &format!("tick {target}"), |c| {
        check_ticks(&format!("{pre}{c}")).map_or(true, |n| n >= target)
    })?;
    check_ticks(&format!("{pre}{}", vm.console.text())).map(drop)
}

/// Boots the tick guest with `template`, pauses it at tick 3 and snapshots it into `dir`.
fn snapshot_at_tick_3(template: CpuTemplate, dir: &std::path::Path) -> Result<TinyVm, String> {
    let mut spec = Spec::new(Scenario::SnapTicks);
    spec.cpu_template = template;
    let mut vm = tiny::boot(spec, Vec::new())?;
    vm.wait_for(deadline(), "tick 3\n")?;
    vm.pause()?;
    vm.snapshot(dir, None)?;
    Ok(vm)
}

/// `--cpu-template x86-64-v2`: the vCPUs get the template's features (on hardware KVM
/// exactly; PVM's KVM_GET_CPUID2 adds the host's own, docs/PVM_HOSTS.md), GET /vm and the
/// snapshot record it, and restores keep the record and the template.
#[test]
fn template_is_applied_recorded_and_kept() {
    check("template_is_applied_recorded_and_kept", || {
        let tmp = temp_dir("cpu-template");
        let h = host()?;
        let p = plan(CpuTemplate::X86_64V2, &h).map_err(|e| e.to_string())?;
        let keep = p.keep.clone().ok_or("a template keeps a set")?;
        let snap = tmp.join("snap");
        let mut vm = snapshot_at_tick_3(CpuTemplate::X86_64V2, &snap)?;
        let pre = vm.console.text();
        ensure(vm.vmm.machine.cpu == p.record, || {
            format!("record {:?}\nplan {:?}", vm.vmm.machine.cpu, p.record)
        })?;
        let names = p.record.features.names();
        for n in [
            "sse2", "cx16", "pni", "ssse3", "sse4_1", "sse4_2", "popcnt", "lahf_lm",
        ] {
            ensure(names.iter().any(|x| x == n), || {
                format!("{n} not given: {names:?}")
            })?;
        }
        let given = vm.vmm.machine.vcpus[0]
            .with(|fd| fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("KVM_GET_CPUID2: {e}"))?;
        let outside = CpuFeatures::from_cpuid(given.as_slice())
            .without_managed()
            .minus(&keep);
        if vmm::config::pvm_host() {
            eprintln!("  PVM: KVM_GET_CPUID2 adds {}", outside.names().join(" "));
        } else {
            ensure(outside.is_empty(), || {
                format!(
                    "the vCPU has features outside the template: {:?}",
                    outside.names()
                )
            })?;
        }
        let status = vm
            .vmm
            .handle_api_request(vmm::api::ApiRequest::GetVm)
            .map_err(|e| format!("GET /vm: {e:?}"))?;
        ensure(
            status["config"]["cpu_template"] == "x86-64-v2"
                && status["cpu"]["template"] == "x86-64-v2"
                && status["cpu"]["features"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|n| n == "sse4_2")),
            || format!("GET /vm: {status}"),
        )?;
        drop(vm);

        let state_file = snap.join("state");
        let bytes = std::fs::read(&state_file).map_err(|e| e.to_string())?;
        // The current state format (3 brought the CPU record; later versions keep it).
        let want = vmm::formats::FileKind::STATE.version;
        ensure(want >= 3 && bytes[8..12] == want.to_le_bytes(), || {
            format!("state format {:?}, expected {want}", &bytes[8..12])
        })?;
        let st = MicrovmState::read(&state_file).map_err(|e| vmm::util::error_chain(&e))?;
        ensure(
            st.config.cpu_template == CpuTemplate::X86_64V2 && st.cpu == p.record,
            || format!("state records {:?} / {:?}", st.config.cpu_template, st.cpu),
        )?;

        let mut back = restore(&snap, false)?;
        continues(&back, &pre)?;
        back.pause()?;
        ensure(
            back.vmm.machine.cpu == p.record
                && back.vmm.machine.config.cpu_template == CpuTemplate::X86_64V2,
            || "the restored VM lost its CPU record or template".into(),
        )?;
        let again = tmp.join("again");
        back.snapshot(&again, None)?;
        let st2 = MicrovmState::read(&again.join("state")).map_err(|e| e.to_string())?;
        ensure(
            st2.cpu == p.record && st2.config.cpu_template == CpuTemplate::X86_64V2,
            || "a snapshot of the restored VM changed the record".into(),
        )
    });
}

/// A feature this host cannot give: preferably a real ISA extension, else any named one.
fn lacking(h: &HostCpu) -> Option<&'static Feature> {
    let preferred = [
        "amx_tile",
        "avx512_fp16",
        "avx512_vp2intersect",
        "avx512er",
        "avx512f",
    ];
    let absent = |f: &&Feature| !h.available.has(f.word, f.bit);
    preferred
        .iter()
        .filter_map(|n| vmm::arch::x86_64::cpu_features::feature(n))
        .find(absent)
        .or_else(|| FEATURES.iter().filter(|f| f.linux_named).find(absent))
}

/// A snapshot whose record names a feature this host lacks is refused (library error,
/// `vmm restore` exit code 2 with one clear line), and `--force` restores it with a
/// warning; the guest continues, and the forced VM keeps the record it was given.
#[test]
fn restore_refuses_features_this_host_lacks() {
    check("restore_refuses_features_this_host_lacks", || {
        let tmp = temp_dir("cpu-refuse");
        let h = host()?;
        let f = lacking(&h).ok_or("this host has every feature: nothing to test")?;
        let snap = tmp.join("snap");
        let vm = snapshot_at_tick_3(CpuTemplate::None, &snap)?;
        let pre = vm.console.text();
        drop(vm);
        let state_file = snap.join("state");
        let mut st = MicrovmState::read(&state_file).map_err(|e| e.to_string())?;
        st.cpu.features.set_bit(f.word, f.bit);
        st.write(&state_file).map_err(|e| e.to_string())?;
        let want = format!(
            "this host cannot give the guest: {} (snapshot taken with template none on {}); \
             --force restores anyway",
            f.name, h.description
        );

        let err = match restore(&snap, false) {
            Ok(_) => return Err("restored a guest given a feature this host lacks".into()),
            Err(e) => e,
        };
        ensure(err == want, || format!("error {err:?}, expected {want:?}"))?;

        let out = Command::new(support::env::vmm_bin())
            .arg("restore")
            .arg(&snap)
            .env("RUST_LOG", "error")
            .output()
            .map_err(|e| e.to_string())?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure(
            out.status.code() == Some(2) && stderr.trim() == format!("vmm: error: {want}"),
            || format!("vmm restore: {:?}, stderr:\n{stderr}", out.status),
        )?;

        let mut r = support::process::Running::spawn(&[
            "restore".into(),
            "--force".into(),
            snap.display().to_string(),
        ]);
        let target = check_ticks(&pre)? + 2;
        let seen = r.wait_for(&format!("tick {target}"), Duration::from_secs(30));
        let _ = r.child.kill();
        let _ = r.wait_exit(Duration::from_secs(10));
        let warning = format!(
            "--force: restoring a guest that was given CPU features this host cannot give: {}",
            f.name
        );
        ensure(seen.is_some() && r.output().contains(&warning), || {
            format!("vmm restore --force:\n{}", r.output())
        })?;

        let mut forced = restore(&snap, true)?;
        continues(&forced, &pre)?;
        forced.pause()?;
        ensure(forced.vmm.machine.cpu.features.has(f.word, f.bit), || {
            "the forced VM forgot what its guest was given".into()
        })?;
        eprintln!("  refused and forced: {}", f.name);
        Ok(())
    });
}

/// A template name the VMM does not know is a clear usage error.
#[test]
fn unknown_template_is_a_clear_error() {
    let out = Command::new(support::env::vmm_bin())
        .args([
            "--kernel",
            "path=/nonexistent",
            "--cpu-template",
            "x86-64-v9",
        ])
        .output()
        .expect("run vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("unknown CPU template \"x86-64-v9\" (known: none, x86-64-v2, x86-64-v3)"),
        "{stderr}"
    );
}
