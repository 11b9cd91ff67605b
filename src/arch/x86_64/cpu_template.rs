//! CPU templates and CPU portability checks (docs/KEEPING_SNAPSHOTS.md, "Hosts").
//!
//! * [`HostCpu::probe`]: what this host can give a guest. On hardware KVM that is
//!   `KVM_GET_SUPPORTED_CPUID`; on PVM-style hosts the guest's own CPUID instruction is not
//!   intercepted, so the host's own CPUID features count too.
//! * [`plan`]: at boot, the features the guest is given for a [`CpuTemplate`] (`none` =
//!   everything the host can give; `x86-64-v2`/`x86-64-v3` = the psABI microarchitecture
//!   levels plus a fixed platform baseline, every other feature bit masked), the
//!   [`CpuRecord`] a snapshot keeps, and, for PVM hosts, the features the guest kernel must
//!   be told to ignore (`clearcpuid=`, [`pvm_clearcpuid`]).
//! * [`check_restore`]: on restore, the recorded features this host cannot give.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use serde::{Deserialize, Serialize};

use super::cpu_features::{CpuFeatures, FEATURES, X1_EDX, feature};

/// Errors of CPU templates and CPU compatibility checks.
#[derive(Debug, thiserror::Error)]
pub enum CpuTemplateError {
    /// No template has this name.
    #[error("unknown CPU template {0:?} (known: none, x86-64-v2, x86-64-v3)")]
    Unknown(String),
    /// The host lacks features the template requires.
    #[error("this host cannot give CPU template {template}: it lacks {} (host: {host})", missing.join(", "))]
    Unsatisfiable {
        /// The template.
        template: CpuTemplate,
        /// Names of the features missing.
        missing: Vec<String>,
        /// This host.
        host: String,
    },
    /// A snapshot's guest was given features this host cannot give.
    #[error(
        "this host cannot give the guest: {} (snapshot taken with template {template} on {taken_on}); --force restores anyway",
        missing.join(", ")
    )]
    MissingFeatures {
        /// Names of the features missing.
        missing: Vec<String>,
        /// The snapshot's template.
        template: CpuTemplate,
        /// The host the snapshot's guest was booted on.
        taken_on: String,
    },
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    Supported(#[source] kvm_ioctls::Error),
}

/// A CPU template: which CPU features the guest is given at boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CpuTemplate {
    /// Everything the host can give (host passthrough).
    #[default]
    #[serde(rename = "none")]
    None,
    /// x86-64-v2: baseline + CMPXCHG16B, LAHF/SAHF, POPCNT, SSE3, SSSE3, SSE4.1, SSE4.2.
    #[serde(rename = "x86-64-v2")]
    X86_64V2,
    /// x86-64-v3: v2 + AVX, AVX2, BMI1, BMI2, F16C, FMA, LZCNT, MOVBE, XSAVE.
    #[serde(rename = "x86-64-v3")]
    X86_64V3,
}

impl CpuTemplate {
    /// Every template.
    pub const ALL: [CpuTemplate; 3] = [Self::None, Self::X86_64V2, Self::X86_64V3];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::X86_64V2 => "x86-64-v2",
            Self::X86_64V3 => "x86-64-v3",
        }
    }

    /// The features the template requires the host to give, and those it passes on only
    /// where the host has them; `None` for no template. Every other feature bit of the
    /// feature words is masked.
    pub fn spec(self) -> Option<(CpuFeatures, CpuFeatures)> {
        let names: &[&[&str]] = match self {
            Self::None => return None,
            Self::X86_64V2 => &[BASELINE, V2],
            Self::X86_64V3 => &[BASELINE, V2, V3],
        };
        let names: Vec<&str> = names.iter().flat_map(|n| n.iter().copied()).collect();
        let required = CpuFeatures::from_names(&names).expect("template names are known");
        let mut optional =
            CpuFeatures::from_names(BASELINE_OPTIONAL).expect("template names are known");
        optional.set_word(X1_EDX, X1_EDX_MIRROR);
        Some((required, optional))
    }
}

impl CpuTemplateError {
    /// What `--force` logs when it restores despite this error.
    pub fn forced(&self) -> String {
        match self {
            Self::MissingFeatures {
                missing,
                template,
                taken_on,
            } => format!(
                "restoring a guest that was given CPU features this host cannot give: {}                  (snapshot taken with template {template} on {taken_on}); the guest fails if                  it uses them",
                missing.join(", ")
            ),
            other => other.to_string(),
        }
    }
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CpuTemplate {
    type Err = CpuTemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| CpuTemplateError::Unknown(s.into()))
    }
}

/// Every template's platform baseline and the x86-64 psABI baseline: the architectural
/// features every x86-64 KVM host gives.
const BASELINE: &[&str] = &[
    "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge",
    "mca", "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "syscall", "nx", "lm",
];
/// Kept where the host has them: KVM emulates both timers' and the x2APIC's registers,
/// and the legacy FPU/SSE XSAVE components.
const BASELINE_OPTIONAL: &[&str] = &["x2apic", "tsc_deadline_timer", "xstate_x87", "xstate_sse"];
/// Leaf 0x8000_0001 EDX bits 0–9, 12–17, 23, 24: AMD repeats leaf 1 EDX's baseline bits
/// there (Intel leaves them 0); kept where the host has them.
const X1_EDX_MIRROR: u32 = 0x0183_f3ff;
/// x86-64-v2 (psABI): CMPXCHG16B, LAHF-SAHF, POPCNT, SSE3, SSE4_1, SSE4_2, SSSE3.
const V2: &[&str] = &[
    "cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3",
];
/// x86-64-v3 (psABI): AVX, AVX2, BMI1, BMI2, F16C, FMA, LZCNT (abm), MOVBE, OSXSAVE (the
/// XSAVE feature, with the x87/SSE/AVX state components).
const V3: &[&str] = &[
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
];

/// What this host can give a guest.
#[derive(Clone, Debug)]
pub struct HostCpu {
    /// `KVM_GET_SUPPORTED_CPUID`: the base of every vCPU's CPUID.
    pub supported: CpuId,
    /// The feature bits a guest can be given (managed bits excluded).
    pub available: CpuFeatures,
    /// The host, for messages: its CPU model and the kind of KVM.
    pub description: String,
}

impl HostCpu {
    /// Probes this host (`pvm`: `/dev/kvm` is PVM-style, see docs/PVM_HOSTS.md).
    pub fn probe(kvm: &kvm_ioctls::Kvm, pvm: bool) -> Result<Self, CpuTemplateError> {
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(CpuTemplateError::Supported)?;
        Ok(Self::from_parts(supported, CpuFeatures::native(), pvm))
    }

    /// A host with this supported CPUID and native CPUID features.
    pub fn from_parts(supported: CpuId, native: CpuFeatures, pvm: bool) -> Self {
        let from_kvm = CpuFeatures::from_cpuid(supported.as_slice());
        // On PVM hosts the guest's CPUID instruction reaches the host's, so everything
        // the host's CPU has is the guest's too (plus what KVM emulates).
        let available = if pvm {
            from_kvm.union(&native)
        } else {
            from_kvm
        };
        let kind = if pvm { "PVM-style nested KVM" } else { "KVM" };
        Self {
            supported,
            available: available.without_managed(),
            description: format!("{} ({kind})", brand_string()),
        }
    }
}

/// This CPU's brand string (CPUID 0x8000_0002–4), or its vendor.
fn brand_string() -> String {
    use std::arch::x86_64::__cpuid_count;
    let mut bytes = Vec::new();
    if __cpuid_count(0x8000_0000, 0).eax >= 0x8000_0004 {
        for leaf in 0x8000_0002..=0x8000_0004u32 {
            let r = __cpuid_count(leaf, 0);
            for v in [r.eax, r.ebx, r.ecx, r.edx] {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    let brand = String::from_utf8_lossy(&bytes)
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string();
    if !brand.is_empty() {
        return brand;
    }
    let r = __cpuid_count(0, 0);
    let mut v = Vec::new();
    for x in [r.ebx, r.edx, r.ecx] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    String::from_utf8_lossy(&v).into_owned()
}

/// What a snapshot records about the CPU features its guest was given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuRecord {
    /// The feature bits given (managed bits excluded).
    pub features: CpuFeatures,
    /// The host the guest was booted on (CPU model, kind of KVM), for messages.
    pub host: String,
}

/// How a VM's vCPUs are set up for a template on this host.
#[derive(Clone, Debug)]
pub struct CpuPlan {
    /// The feature bits every vCPU's CPUID keeps (`None`: the host's, unmasked).
    pub keep: Option<CpuFeatures>,
    /// What the guest is given, as a snapshot records it.
    pub record: CpuRecord,
    /// Features the host has that the template masks: on PVM hosts the guest kernel must
    /// be told to ignore them ([`pvm_clearcpuid`]), as its CPUID instruction sees them.
    pub hidden: CpuFeatures,
}

/// Plans `template` on `host`; refuses a template whose required features the host lacks.
pub fn plan(template: CpuTemplate, host: &HostCpu) -> Result<CpuPlan, CpuTemplateError> {
    let Some((required, optional)) = template.spec() else {
        return Ok(CpuPlan {
            keep: None,
            record: CpuRecord {
                features: host.available.clone(),
                host: host.description.clone(),
            },
            hidden: CpuFeatures::default(),
        });
    };
    let missing = required.minus(&host.available);
    if !missing.is_empty() {
        return Err(CpuTemplateError::Unsatisfiable {
            template,
            missing: missing.names(),
            host: host.description.clone(),
        });
    }
    let keep = required.union(&optional);
    Ok(CpuPlan {
        record: CpuRecord {
            features: host.available.intersect(&keep),
            host: host.description.clone(),
        },
        hidden: host.available.minus(&keep),
        keep: Some(keep),
    })
}

/// Checks, before restoring, that this host can give the guest every feature it was given
/// (the record; the vCPUs' saved CPUID is not used: on PVM hosts `KVM_GET_CPUID2` reports
/// the host's own features whatever was set).
pub fn check_restore(
    record: &CpuRecord,
    template: CpuTemplate,
    host: &HostCpu,
) -> Result<(), CpuTemplateError> {
    let missing = record.features.without_managed().minus(&host.available);
    if missing.is_empty() {
        return Ok(());
    }
    Err(CpuTemplateError::MissingFeatures {
        missing: missing.names(),
        template,
        taken_on: record.host.clone(),
    })
}

/// Linux 6.1's feature dependencies among the named features (`arch/x86/kernel/cpu/
/// cpuid-deps.c`): clearing the second clears the first.
const LINUX_DEPS: &[(&str, &str)] = &[
    ("xsaveopt", "xsave"),
    ("xsavec", "xsave"),
    ("xsaves", "xsave"),
    ("avx", "xsave"),
    ("pku", "xsave"),
    ("mpx", "xsave"),
    ("xgetbv1", "xsave"),
    ("cmov", "fxsr"),
    ("mmx", "fxsr"),
    ("mmxext", "mmx"),
    ("fxsr_opt", "fxsr"),
    ("xsave", "fxsr"),
    ("sse", "fxsr"),
    ("sse2", "sse"),
    ("pni", "sse2"),
    ("sse4_1", "sse2"),
    ("sse4_2", "sse2"),
    ("pclmulqdq", "sse2"),
    ("ssse3", "sse2"),
    ("f16c", "sse2"),
    ("aes", "sse2"),
    ("sha_ni", "sse2"),
    ("gfni", "sse2"),
    ("fma", "avx"),
    ("vaes", "avx"),
    ("vpclmulqdq", "avx"),
    ("avx2", "avx"),
    ("avx512f", "avx"),
    ("avx512ifma", "avx512f"),
    ("avx512pf", "avx512f"),
    ("avx512er", "avx512f"),
    ("avx512cd", "avx512f"),
    ("avx512dq", "avx512f"),
    ("avx512bw", "avx512f"),
    ("avx512vl", "avx512f"),
    ("avx512vbmi", "avx512f"),
    ("avx512_vbmi2", "avx512vl"),
    ("avx512_vnni", "avx512vl"),
    ("avx512_bitalg", "avx512vl"),
    ("avx512_4vnniw", "avx512f"),
    ("avx512_4fmaps", "avx512f"),
    ("avx512_vpopcntdq", "avx512f"),
    ("avx512_vp2intersect", "avx512vl"),
    ("avx512_bf16", "avx512vl"),
    ("avx512_fp16", "avx512bw"),
    ("enqcmd", "xsaves"),
    ("xfd", "xsaves"),
    ("xfd", "xgetbv1"),
    ("amx_tile", "xfd"),
    ("sgx_lc", "sgx"),
];

/// Linux 6.1 copies at most this many characters of the `clearcpuid=` value
/// (`cpu_parse_early_param`'s 128-byte buffer); the project's guest kernel reads more.
pub const LINUX_CLEARCPUID_MAX: usize = 127;

/// Features the PVM host quirks hide from the guest kernel besides `clearcpuid=`:
/// `noxsave` clears XSAVE (and, in Linux, everything that depends on it).
pub const PVM_NOXSAVE: &str = "xsave";

/// The `clearcpuid=` value for a guest on a PVM host: the host quirks' features
/// (`quirks`, first, as the boot needs them), then `hidden`; features Linux clears anyway
/// because one they depend on is cleared (or is `noxsave`'s XSAVE) are left out. Names are
/// used where Linux has them, feature numbers otherwise, and numbers for long names too
/// when the list would exceed [`LINUX_CLEARCPUID_MAX`] (a warning names what a stock
/// Linux 6.1 would then miss).
pub fn pvm_clearcpuid(quirks: &CpuFeatures, hidden: &CpuFeatures) -> String {
    let explicit: Vec<_> = quirks
        .bits()
        .into_iter()
        .chain(hidden.minus(quirks).bits())
        .filter_map(|(w, b)| super::cpu_features::feature_at(w, b).copied())
        .filter(|f| f.linux_number().is_some())
        .collect();
    let mut cleared: BTreeSet<&str> = explicit.iter().map(|f| f.name).collect();
    cleared.insert(PVM_NOXSAVE);
    loop {
        let before = cleared.len();
        for (feat, dep) in LINUX_DEPS {
            if cleared.contains(dep) {
                cleared.insert(feat);
            }
        }
        if cleared.len() == before {
            break;
        }
    }
    let implied = |name: &str| {
        LINUX_DEPS
            .iter()
            .any(|(feat, dep)| *feat == name && cleared.contains(dep))
    };
    let mut tokens: Vec<(String, String)> = explicit
        .iter()
        .filter(|f| f.name != PVM_NOXSAVE && !implied(f.name))
        .map(|f| {
            let num = f.linux_number().expect("filtered").to_string();
            let name = if f.linux_named {
                f.name.to_string()
            } else {
                num.clone()
            };
            (name, num)
        })
        .collect();
    let len = |t: &[(String, String)]| {
        t.iter().map(|(s, _)| s.len()).sum::<usize>() + t.len().saturating_sub(1)
    };
    while len(&tokens) > LINUX_CLEARCPUID_MAX {
        let best = tokens
            .iter_mut()
            .filter(|(s, n)| s.len() > n.len())
            .max_by_key(|(s, n)| s.len() - n.len());
        match best {
            Some((s, n)) => *s = n.clone(),
            None => break,
        }
    }
    let value: Vec<&str> = tokens.iter().map(|(s, _)| s.as_str()).collect();
    let value = value.join(",");
    if value.len() > LINUX_CLEARCPUID_MAX {
        log::warn!(
            "clearcpuid= needs {} characters; a stock Linux 6.1 guest reads {LINUX_CLEARCPUID_MAX} \
             and ignores the rest ({}) — the project's guest kernel reads them all",
            value.len(),
            &value[LINUX_CLEARCPUID_MAX..]
        );
    }
    value
}

/// The features named by the PVM host quirks' `clearcpuid=` list.
pub fn pvm_quirk_features(names: &str) -> CpuFeatures {
    let names: Vec<&str> = names.split(',').filter(|n| feature(n).is_some()).collect();
    CpuFeatures::from_names(&names).expect("filtered to known names")
}

/// Names of every feature Linux shows in `/proc/cpuinfo` among the feature words.
pub fn linux_feature_names() -> impl Iterator<Item = &'static str> {
    FEATURES.iter().filter(|f| f.linux_named).map(|f| f.name)
}

#[cfg(test)]
#[path = "cpu_template_tests.rs"]
mod tests;
