use super::*;
use crate::arch::x86_64::cpu_features::{
    L1_ECX, L1_EDX, L7_EBX, Reg, WORDS, X1_ECX, XCR0_LO, bit_name, feature,
};
use kvm_bindings::kvm_cpuid_entry2;

fn names(f: &CpuFeatures) -> BTreeSet<String> {
    f.names().into_iter().collect()
}

fn set(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A host whose supported CPUID has exactly `features` (and nothing native).
fn host(features: &[&str]) -> HostCpu {
    let f = CpuFeatures::from_names(features).unwrap();
    let entries: Vec<kvm_cpuid_entry2> = [(1, 0), (7, 0), (7, 1), (0xd, 0), (0xd, 1)]
        .into_iter()
        .chain([(0x8000_0001, 0), (0x8000_0008, 0)])
        .map(|(function, index)| {
            let mut e = kvm_cpuid_entry2 {
                function,
                index,
                ..Default::default()
            };
            for w in WORDS
                .iter()
                .filter(|w| w.leaf == function && w.subleaf == index)
            {
                let v = f.word(*w);
                match w.reg {
                    Reg::Eax => e.eax = v,
                    Reg::Ebx => e.ebx = v,
                    Reg::Ecx => e.ecx = v,
                    Reg::Edx => e.edx = v,
                }
            }
            e
        })
        .collect();
    HostCpu::from_parts(
        CpuId::from_entries(&entries).unwrap(),
        CpuFeatures::default(),
        false,
    )
}

const V3_HOST: &[&str] = &[
    "fpu",
    "vme",
    "de",
    "pse",
    "tsc",
    "msr",
    "pae",
    "mce",
    "cx8",
    "apic",
    "sep",
    "mtrr",
    "pge",
    "mca",
    "cmov",
    "pat",
    "pse36",
    "clflush",
    "mmx",
    "fxsr",
    "sse",
    "sse2",
    "syscall",
    "nx",
    "lm",
    "x2apic",
    "cx16",
    "lahf_lm",
    "popcnt",
    "pni",
    "sse4_1",
    "sse4_2",
    "ssse3",
    "avx",
    "avx2",
    "bmi1",
    "bmi2",
    "f16c",
    "fma",
    "abm",
    "movbe",
    "xsave",
    "xstate_x87",
    "xstate_sse",
    "xstate_avx",
    "aes",
    "avx512f",
    "sha_ni",
    "rdtscp",
    "hypervisor",
    "xstate_opmask",
];

#[test]
fn names_and_parsing() {
    for t in CpuTemplate::ALL {
        assert_eq!(t.name().parse::<CpuTemplate>().unwrap(), t);
        assert_eq!(t.to_string(), t.name());
    }
    let e = "x86-64-v9".parse::<CpuTemplate>().unwrap_err().to_string();
    assert_eq!(
        e,
        "unknown CPU template \"x86-64-v9\" (known: none, x86-64-v2, x86-64-v3)"
    );
    assert_eq!(CpuTemplate::default(), CpuTemplate::None);
}

#[test]
fn feature_table() {
    let mut seen = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for f in FEATURES {
        assert!(seen.insert(f.name), "duplicate name {}", f.name);
        if let Some(n) = f.linux_number() {
            assert!(numbers.insert(n), "duplicate number {n}");
        }
    }
    // Spot checks against Linux 6.1's cpufeatures.h.
    for (name, number) in [
        ("fpu", 0),
        ("syscall", 32 + 11),
        ("pni", 128),
        ("popcnt", 4 * 32 + 23),
        ("lahf_lm", 6 * 32),
        ("avx512f", 9 * 32 + 16),
        ("sha_ni", 9 * 32 + 29),
        ("xsaveopt", 10 * 32),
        ("avx512_bf16", 12 * 32 + 5),
        ("clzero", 13 * 32),
        ("umip", 16 * 32 + 2),
        ("fsrm", 18 * 32 + 4),
    ] {
        assert_eq!(
            feature(name).unwrap().linux_number(),
            Some(number),
            "{name}"
        );
    }
    assert_eq!(bit_name(L1_EDX, 20), "cpuid.0x1.0.edx[20]");
    assert_eq!(bit_name(XCR0_LO, 2), "xstate_avx");
}

#[test]
fn templates_keep_the_psabi_levels() {
    let (v2, opt) = CpuTemplate::X86_64V2.spec().unwrap();
    let (v3, _) = CpuTemplate::X86_64V3.spec().unwrap();
    assert!(CpuTemplate::None.spec().is_none());
    let v2n = names(&v2);
    for n in [
        "cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3", "sse2", "lm",
    ] {
        assert!(v2n.contains(n), "v2 lacks {n}");
    }
    for n in [
        "avx",
        "avx2",
        "bmi1",
        "movbe",
        "xsave",
        "abm",
        "aes",
        "pclmulqdq",
    ] {
        assert!(!v2n.contains(n), "v2 has {n}");
    }
    assert!(v3.minus(&v2).names().contains(&"avx2".to_string()));
    assert!(v2.minus(&v3).is_empty(), "v3 contains v2");
    assert_eq!(
        names(&v3.minus(&v2)),
        set(&[
            "fma",
            "movbe",
            "xsave",
            "avx",
            "f16c",
            "bmi1",
            "avx2",
            "bmi2",
            "xstate_x87",
            "xstate_sse",
            "xstate_avx",
            "abm"
        ])
    );
    assert!(names(&opt).contains("tsc_deadline_timer"));
}

#[test]
fn plan_masks_and_records() {
    let h = host(V3_HOST);
    let none = plan(CpuTemplate::None, &h).unwrap();
    assert!(none.keep.is_none() && none.hidden.is_empty());
    assert!(
        !names(&none.record.features).contains("hypervisor"),
        "managed"
    );
    assert!(names(&none.record.features).contains("avx512f"));

    let p = plan(CpuTemplate::X86_64V2, &h).unwrap();
    let rec = names(&p.record.features);
    assert!(rec.contains("sse4_2") && rec.contains("x2apic"));
    assert!(!rec.contains("avx") && !rec.contains("aes") && !rec.contains("rdtscp"));
    assert!(
        !rec.contains("tsc_deadline_timer"),
        "optional, the host lacks it"
    );
    let hidden = names(&p.hidden);
    for n in [
        "avx",
        "avx2",
        "aes",
        "avx512f",
        "sha_ni",
        "rdtscp",
        "xstate_avx",
    ] {
        assert!(hidden.contains(n), "{n} not hidden");
    }
    assert!(p.record.features.intersect(&p.hidden).is_empty());

    let p3 = plan(CpuTemplate::X86_64V3, &h).unwrap();
    assert!(names(&p3.record.features).contains("avx2"));
    assert!(names(&p3.hidden).contains("xstate_opmask"));
}

#[test]
fn unsatisfiable_template_is_refused_with_the_missing_features() {
    let lacking: Vec<&str> = V3_HOST
        .iter()
        .copied()
        .filter(|n| !["avx2", "bmi2"].contains(n))
        .collect();
    let h = host(&lacking);
    assert!(plan(CpuTemplate::X86_64V2, &h).is_ok());
    let e = plan(CpuTemplate::X86_64V3, &h).unwrap_err();
    match &e {
        CpuTemplateError::Unsatisfiable { missing, .. } => {
            assert_eq!(missing, &["avx2".to_string(), "bmi2".to_string()])
        }
        other => panic!("{other:?}"),
    }
    assert!(
        e.to_string().starts_with(
            "this host cannot give CPU template x86-64-v3: it lacks avx2, bmi2 (host: "
        ),
        "{e}"
    );
}

#[test]
fn restore_check_lists_missing_features() {
    let h = host(V3_HOST);
    let rec = plan(CpuTemplate::None, &h).unwrap().record;
    assert!(check_restore(&rec, CpuTemplate::None, &h).is_ok());

    let mut more = rec.clone();
    more.features.set_bit(L7_EBX, 30); // avx512bw
    more.features.set_bit(X1_ECX, 6); // sse4a
    more.host = "Elsewhere CPU (KVM)".into();
    let e = check_restore(&more, CpuTemplate::X86_64V3, &h).unwrap_err();
    assert_eq!(
        e.to_string(),
        "this host cannot give the guest: avx512bw, sse4a (snapshot taken with template \
         x86-64-v3 on Elsewhere CPU (KVM)); --force restores anyway"
    );
    assert!(e.forced().starts_with(
        "restoring a guest that was given CPU features this host cannot give: avx512bw, sse4a"
    ));

    // Managed bits never count.
    let mut managed = rec.clone();
    managed.features.set_bit(L1_ECX, 31); // hypervisor
    managed.features.set_bit(L1_ECX, 27); // osxsave
    assert!(check_restore(&managed, CpuTemplate::None, &h).is_ok());
}

#[test]
fn mask_cpuid_clears_feature_bits_and_xstate_leaves() {
    let h = host(V3_HOST);
    let mut c = h.supported.clone();
    c.push(kvm_cpuid_entry2 {
        function: 0xd,
        index: 5,
        eax: 0x40,
        ebx: 0x340,
        ..Default::default()
    })
    .unwrap();
    c.push(kvm_cpuid_entry2 {
        function: 0xd,
        index: 2,
        eax: 0x100,
        ebx: 0x240,
        ..Default::default()
    })
    .unwrap();
    let p = plan(CpuTemplate::X86_64V3, &h).unwrap();
    CpuFeatures::mask_cpuid(p.keep.as_ref().unwrap(), &mut c);
    let got = CpuFeatures::from_cpuid(c.as_slice());
    assert_eq!(got, p.record.features);
    let leaf = |i| {
        *c.as_slice()
            .iter()
            .find(|e| e.function == 0xd && e.index == i)
            .unwrap()
    };
    assert_eq!(leaf(5).eax, 0, "opmask state masked");
    assert_eq!(leaf(2).eax, 0x100, "AVX state kept");
    assert!(got.has(L1_ECX, 28) && !got.has(L7_EBX, 16));
}

#[test]
fn pvm_clearcpuid_fits_and_leaves_out_what_linux_clears_anyway() {
    let quirks = pvm_quirk_features(crate::config::PVM_CLEARCPUID);
    let today = pvm_clearcpuid(&quirks, &CpuFeatures::default());
    eprintln!(
        "host quirks: clearcpuid={today} ({} characters)",
        today.len()
    );
    let tokens: BTreeSet<&str> = today.split(',').collect();
    assert!(
        today.len() <= LINUX_CLEARCPUID_MAX,
        "{} chars: {today}",
        today.len()
    );
    for n in [
        "smap",
        "smep",
        "popcnt",
        "sha_ni",
        "clflushopt",
        "clwb",
        "rdrand",
    ] {
        assert!(tokens.contains(n), "{n} missing from {today}");
    }
    for n in [
        "avx", "avx2", "avx512f", "xsaveopt", "xsavec", "xsaves", "pku",
    ] {
        assert!(!tokens.contains(n), "{n} is cleared by noxsave: {today}");
    }

    // A host with every feature Linux names, under x86-64-v2: the quirks come first, then
    // what the template hides, as numbers once names no longer fit.
    let all: Vec<&str> = linux_feature_names().collect();
    let p = plan(CpuTemplate::X86_64V2, &host(&all)).unwrap();
    let long = pvm_clearcpuid(&quirks, &p.hidden);
    let tokens: Vec<&str> = long.split(',').collect();
    assert_eq!(
        tokens[..3],
        ["150", "151", "158"],
        "movbe, popcnt, rdrand: {long}"
    );
    assert!(
        tokens.contains(&"198") && tokens.contains(&"vmx"),
        "sse4a, vmx: {long}"
    );
    for t in ["xsave", "avx", "avx512f", "304", "pni", "128", "cx16"] {
        assert!(!tokens.contains(&t), "{t} in {long}");
    }
}

#[test]
fn kvm_accepts_a_masked_cpuid() {
    let Some(kvm) = crate::arch::x86_64::test_support::kvm_or_skip() else {
        return;
    };
    let h = HostCpu::probe(&kvm, crate::config::pvm_host()).unwrap();
    eprintln!("host: {}: {}", h.description, h.available.names().join(" "));
    let vm = kvm.create_vm().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let p = plan(CpuTemplate::X86_64V2, &h).unwrap();
    let mut c = h.supported.clone();
    CpuFeatures::mask_cpuid(p.keep.as_ref().unwrap(), &mut c);
    crate::arch::x86_64::normalize_cpuid(&mut c, 0, 1).unwrap();
    vcpu.set_cpuid2(&c).unwrap();
    let back = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
    let got = CpuFeatures::from_cpuid(back.as_slice()).without_managed();
    let outside = got.minus(p.keep.as_ref().unwrap()).names();
    if crate::config::pvm_host() {
        // PVM reports the host's own features here whatever was set (docs/PVM_HOSTS.md).
        eprintln!("PVM host: KVM_GET_CPUID2 adds {}", outside.join(" "));
        let quirks = pvm_quirk_features(crate::config::PVM_CLEARCPUID);
        let clear = pvm_clearcpuid(&quirks, &p.hidden);
        eprintln!("x86-64-v2 clearcpuid={clear} ({} characters)", clear.len());
    } else {
        assert!(
            outside.is_empty(),
            "KVM shows features outside the template: {outside:?}"
        );
    }
    assert!(check_restore(&p.record, CpuTemplate::X86_64V2, &h).is_ok());
}
