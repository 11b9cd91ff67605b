//! The CPU features a guest is given, as the CPUID feature words that name them
//! ([`WORDS`]), with their names (those of Linux's `/proc/cpuinfo` and `clearcpuid=`).
//!
//! A [`CpuFeatures`] value holds the feature bits of every word; it is read from a CPUID
//! list (what a vCPU was set up with, or what KVM supports), from this host's own CPUID
//! instruction, or built from names (CPU templates). Snapshots record the features the
//! guest was given (`cpu_template::CpuRecord`) and restores compare them with what the
//! host can give (docs/KEEPING_SNAPSHOTS.md, "Hosts").

use std::collections::BTreeMap;
use std::fmt;

use kvm_bindings::{CpuId, kvm_cpuid_entry2};
use serde::{Deserialize, Serialize};

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// One CPUID register (leaf, subleaf, register) that holds feature bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FeatureWord {
    /// CPUID leaf (EAX input).
    pub leaf: u32,
    /// Subleaf (ECX input).
    pub subleaf: u32,
    /// Output register.
    pub reg: Reg,
}

impl FeatureWord {
    const fn new(leaf: u32, subleaf: u32, reg: Reg) -> Self {
        Self { leaf, subleaf, reg }
    }

    fn get(&self, e: &kvm_cpuid_entry2) -> u32 {
        match self.reg {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }

    fn set(&self, e: &mut kvm_cpuid_entry2, v: u32) {
        match self.reg {
            Reg::Eax => e.eax = v,
            Reg::Ebx => e.ebx = v,
            Reg::Ecx => e.ecx = v,
            Reg::Edx => e.edx = v,
        }
    }

    fn matches(&self, e: &kvm_cpuid_entry2) -> bool {
        e.function == self.leaf && e.index == self.subleaf
    }

    /// The Linux (6.1) capability word holding these bits (`clearcpuid=` numbers are
    /// `word * 32 + bit`), if Linux has one.
    pub fn linux_word(&self) -> Option<u32> {
        LINUX_WORDS.iter().find(|(w, _)| w == self).map(|&(_, n)| n)
    }
}

impl fmt::Display for FeatureWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reg = match self.reg {
            Reg::Eax => "eax",
            Reg::Ebx => "ebx",
            Reg::Ecx => "ecx",
            Reg::Edx => "edx",
        };
        write!(f, "cpuid.{:#x}.{}.{reg}", self.leaf, self.subleaf)
    }
}

/// Leaf 1 EDX: the original feature flags.
pub const L1_EDX: FeatureWord = FeatureWord::new(1, 0, Reg::Edx);
/// Leaf 1 ECX.
pub const L1_ECX: FeatureWord = FeatureWord::new(1, 0, Reg::Ecx);
/// Leaf 7 subleaf 0 EBX: structured extended features.
pub const L7_EBX: FeatureWord = FeatureWord::new(7, 0, Reg::Ebx);
/// Leaf 7 subleaf 0 ECX.
pub const L7_ECX: FeatureWord = FeatureWord::new(7, 0, Reg::Ecx);
/// Leaf 7 subleaf 0 EDX.
pub const L7_EDX: FeatureWord = FeatureWord::new(7, 0, Reg::Edx);
/// Leaf 7 subleaf 1 EAX.
pub const L7_1_EAX: FeatureWord = FeatureWord::new(7, 1, Reg::Eax);
/// Leaf 0xd subleaf 0 EAX: XSAVE state components (XCR0 bits 0–31) the guest may enable.
pub const XCR0_LO: FeatureWord = FeatureWord::new(0xd, 0, Reg::Eax);
/// Leaf 0xd subleaf 0 EDX: XCR0 bits 32–63.
pub const XCR0_HI: FeatureWord = FeatureWord::new(0xd, 0, Reg::Edx);
/// Leaf 0xd subleaf 1 EAX: XSAVE instruction extensions.
pub const XSAVE_EAX: FeatureWord = FeatureWord::new(0xd, 1, Reg::Eax);
/// Leaf 0x8000_0001 ECX: extended features.
pub const X1_ECX: FeatureWord = FeatureWord::new(0x8000_0001, 0, Reg::Ecx);
/// Leaf 0x8000_0001 EDX.
pub const X1_EDX: FeatureWord = FeatureWord::new(0x8000_0001, 0, Reg::Edx);
/// Leaf 0x8000_0008 EBX: AMD extended features (CLZERO, WBNOINVD, speculation controls).
pub const X8_EBX: FeatureWord = FeatureWord::new(0x8000_0008, 0, Reg::Ebx);

/// Every feature word, in display order.
pub const WORDS: [FeatureWord; 12] = [
    L1_EDX, L1_ECX, L7_EBX, L7_ECX, L7_EDX, L7_1_EAX, XCR0_LO, XCR0_HI, XSAVE_EAX, X1_ECX, X1_EDX,
    X8_EBX,
];

/// Linux 6.1's capability word for each feature word it keeps (`arch/x86/include/asm/
/// cpufeatures.h`).
const LINUX_WORDS: [(FeatureWord, u32); 10] = [
    (L1_EDX, 0),
    (X1_EDX, 1),
    (L1_ECX, 4),
    (X1_ECX, 6),
    (L7_EBX, 9),
    (XSAVE_EAX, 10),
    (L7_1_EAX, 12),
    (X8_EBX, 13),
    (L7_ECX, 16),
    (L7_EDX, 18),
];

/// Bits of a feature word that the VMM or KVM manage themselves rather than pass from the
/// host: leaf 1 ECX OSXSAVE (mirrors CR4) and HYPERVISOR (set by the VMM), leaf 1 EDX HTT
/// (set from the vCPU count), leaf 7 ECX OSPKE (mirrors CR4). They are neither recorded
/// nor compared.
pub const MANAGED: [(FeatureWord, u32); 3] = [
    (L1_ECX, (1 << 27) | (1 << 31)),
    (L1_EDX, 1 << 28),
    (L7_ECX, 1 << 4),
];

/// A named feature bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    /// Its word.
    pub word: FeatureWord,
    /// Its bit.
    pub bit: u8,
    /// Its name: Linux's `/proc/cpuinfo` name where Linux shows it, else Linux's define in
    /// lower case, or `xstate_*` for XCR0 components.
    pub name: &'static str,
    /// Whether Linux shows it in `/proc/cpuinfo` and accepts the name in `clearcpuid=`.
    pub linux_named: bool,
}

impl Feature {
    /// Linux's feature number (`clearcpuid=` accepts it for unnamed bits too).
    pub fn linux_number(&self) -> Option<u32> {
        self.word.linux_word().map(|w| w * 32 + u32::from(self.bit))
    }
}

const fn f(word: FeatureWord, bit: u8, name: &'static str, linux_named: bool) -> Feature {
    Feature {
        word,
        bit,
        name,
        linux_named,
    }
}

/// Every named feature bit (from Linux 6.1's cpufeatures.h, plus the XCR0 components).
pub const FEATURES: &[Feature] = &[
    f(L1_EDX, 0, "fpu", true),
    f(L1_EDX, 1, "vme", true),
    f(L1_EDX, 2, "de", true),
    f(L1_EDX, 3, "pse", true),
    f(L1_EDX, 4, "tsc", true),
    f(L1_EDX, 5, "msr", true),
    f(L1_EDX, 6, "pae", true),
    f(L1_EDX, 7, "mce", true),
    f(L1_EDX, 8, "cx8", true),
    f(L1_EDX, 9, "apic", true),
    f(L1_EDX, 11, "sep", true),
    f(L1_EDX, 12, "mtrr", true),
    f(L1_EDX, 13, "pge", true),
    f(L1_EDX, 14, "mca", true),
    f(L1_EDX, 15, "cmov", true),
    f(L1_EDX, 16, "pat", true),
    f(L1_EDX, 17, "pse36", true),
    f(L1_EDX, 18, "pn", true),
    f(L1_EDX, 19, "clflush", true),
    f(L1_EDX, 21, "dts", true),
    f(L1_EDX, 22, "acpi", true),
    f(L1_EDX, 23, "mmx", true),
    f(L1_EDX, 24, "fxsr", true),
    f(L1_EDX, 25, "sse", true),
    f(L1_EDX, 26, "sse2", true),
    f(L1_EDX, 27, "ss", true),
    f(L1_EDX, 28, "ht", true),
    f(L1_EDX, 29, "tm", true),
    f(L1_EDX, 30, "ia64", true),
    f(L1_EDX, 31, "pbe", true),
    f(L1_ECX, 0, "pni", true),
    f(L1_ECX, 1, "pclmulqdq", true),
    f(L1_ECX, 2, "dtes64", true),
    f(L1_ECX, 3, "monitor", true),
    f(L1_ECX, 4, "ds_cpl", true),
    f(L1_ECX, 5, "vmx", true),
    f(L1_ECX, 6, "smx", true),
    f(L1_ECX, 7, "est", true),
    f(L1_ECX, 8, "tm2", true),
    f(L1_ECX, 9, "ssse3", true),
    f(L1_ECX, 10, "cid", true),
    f(L1_ECX, 11, "sdbg", true),
    f(L1_ECX, 12, "fma", true),
    f(L1_ECX, 13, "cx16", true),
    f(L1_ECX, 14, "xtpr", true),
    f(L1_ECX, 15, "pdcm", true),
    f(L1_ECX, 17, "pcid", true),
    f(L1_ECX, 18, "dca", true),
    f(L1_ECX, 19, "sse4_1", true),
    f(L1_ECX, 20, "sse4_2", true),
    f(L1_ECX, 21, "x2apic", true),
    f(L1_ECX, 22, "movbe", true),
    f(L1_ECX, 23, "popcnt", true),
    f(L1_ECX, 24, "tsc_deadline_timer", true),
    f(L1_ECX, 25, "aes", true),
    f(L1_ECX, 26, "xsave", true),
    f(L1_ECX, 27, "osxsave", false),
    f(L1_ECX, 28, "avx", true),
    f(L1_ECX, 29, "f16c", true),
    f(L1_ECX, 30, "rdrand", true),
    f(L1_ECX, 31, "hypervisor", true),
    f(L7_EBX, 0, "fsgsbase", true),
    f(L7_EBX, 1, "tsc_adjust", true),
    f(L7_EBX, 2, "sgx", true),
    f(L7_EBX, 3, "bmi1", true),
    f(L7_EBX, 4, "hle", true),
    f(L7_EBX, 5, "avx2", true),
    f(L7_EBX, 6, "fdp_excptn_only", false),
    f(L7_EBX, 7, "smep", true),
    f(L7_EBX, 8, "bmi2", true),
    f(L7_EBX, 9, "erms", true),
    f(L7_EBX, 10, "invpcid", true),
    f(L7_EBX, 11, "rtm", true),
    f(L7_EBX, 12, "cqm", true),
    f(L7_EBX, 13, "zero_fcs_fds", false),
    f(L7_EBX, 14, "mpx", true),
    f(L7_EBX, 15, "rdt_a", true),
    f(L7_EBX, 16, "avx512f", true),
    f(L7_EBX, 17, "avx512dq", true),
    f(L7_EBX, 18, "rdseed", true),
    f(L7_EBX, 19, "adx", true),
    f(L7_EBX, 20, "smap", true),
    f(L7_EBX, 21, "avx512ifma", true),
    f(L7_EBX, 23, "clflushopt", true),
    f(L7_EBX, 24, "clwb", true),
    f(L7_EBX, 25, "intel_pt", true),
    f(L7_EBX, 26, "avx512pf", true),
    f(L7_EBX, 27, "avx512er", true),
    f(L7_EBX, 28, "avx512cd", true),
    f(L7_EBX, 29, "sha_ni", true),
    f(L7_EBX, 30, "avx512bw", true),
    f(L7_EBX, 31, "avx512vl", true),
    f(L7_ECX, 1, "avx512vbmi", true),
    f(L7_ECX, 2, "umip", true),
    f(L7_ECX, 3, "pku", true),
    f(L7_ECX, 4, "ospke", true),
    f(L7_ECX, 5, "waitpkg", true),
    f(L7_ECX, 6, "avx512_vbmi2", true),
    f(L7_ECX, 8, "gfni", true),
    f(L7_ECX, 9, "vaes", true),
    f(L7_ECX, 10, "vpclmulqdq", true),
    f(L7_ECX, 11, "avx512_vnni", true),
    f(L7_ECX, 12, "avx512_bitalg", true),
    f(L7_ECX, 13, "tme", true),
    f(L7_ECX, 14, "avx512_vpopcntdq", true),
    f(L7_ECX, 16, "la57", true),
    f(L7_ECX, 22, "rdpid", true),
    f(L7_ECX, 24, "bus_lock_detect", true),
    f(L7_ECX, 25, "cldemote", true),
    f(L7_ECX, 27, "movdiri", true),
    f(L7_ECX, 28, "movdir64b", true),
    f(L7_ECX, 29, "enqcmd", true),
    f(L7_ECX, 30, "sgx_lc", true),
    f(L7_EDX, 2, "avx512_4vnniw", true),
    f(L7_EDX, 3, "avx512_4fmaps", true),
    f(L7_EDX, 4, "fsrm", true),
    f(L7_EDX, 8, "avx512_vp2intersect", true),
    f(L7_EDX, 9, "srbds_ctrl", false),
    f(L7_EDX, 10, "md_clear", true),
    f(L7_EDX, 11, "rtm_always_abort", false),
    f(L7_EDX, 13, "tsx_force_abort", false),
    f(L7_EDX, 14, "serialize", true),
    f(L7_EDX, 15, "hybrid_cpu", false),
    f(L7_EDX, 16, "tsxldtrk", true),
    f(L7_EDX, 18, "pconfig", true),
    f(L7_EDX, 19, "arch_lbr", true),
    f(L7_EDX, 20, "ibt", true),
    f(L7_EDX, 22, "amx_bf16", true),
    f(L7_EDX, 23, "avx512_fp16", true),
    f(L7_EDX, 24, "amx_tile", true),
    f(L7_EDX, 25, "amx_int8", true),
    f(L7_EDX, 26, "spec_ctrl", false),
    f(L7_EDX, 27, "intel_stibp", false),
    f(L7_EDX, 28, "flush_l1d", true),
    f(L7_EDX, 29, "arch_capabilities", true),
    f(L7_EDX, 30, "core_capabilities", false),
    f(L7_EDX, 31, "spec_ctrl_ssbd", false),
    f(L7_1_EAX, 4, "avx_vnni", true),
    f(L7_1_EAX, 5, "avx512_bf16", true),
    f(XSAVE_EAX, 0, "xsaveopt", true),
    f(XSAVE_EAX, 1, "xsavec", true),
    f(XSAVE_EAX, 2, "xgetbv1", true),
    f(XSAVE_EAX, 3, "xsaves", true),
    f(XSAVE_EAX, 4, "xfd", false),
    f(X1_ECX, 0, "lahf_lm", true),
    f(X1_ECX, 1, "cmp_legacy", true),
    f(X1_ECX, 2, "svm", true),
    f(X1_ECX, 3, "extapic", true),
    f(X1_ECX, 4, "cr8_legacy", true),
    f(X1_ECX, 5, "abm", true),
    f(X1_ECX, 6, "sse4a", true),
    f(X1_ECX, 7, "misalignsse", true),
    f(X1_ECX, 8, "3dnowprefetch", true),
    f(X1_ECX, 9, "osvw", true),
    f(X1_ECX, 10, "ibs", true),
    f(X1_ECX, 11, "xop", true),
    f(X1_ECX, 12, "skinit", true),
    f(X1_ECX, 13, "wdt", true),
    f(X1_ECX, 15, "lwp", true),
    f(X1_ECX, 16, "fma4", true),
    f(X1_ECX, 17, "tce", true),
    f(X1_ECX, 19, "nodeid_msr", true),
    f(X1_ECX, 21, "tbm", true),
    f(X1_ECX, 22, "topoext", true),
    f(X1_ECX, 23, "perfctr_core", true),
    f(X1_ECX, 24, "perfctr_nb", true),
    f(X1_ECX, 26, "bpext", true),
    f(X1_ECX, 27, "ptsc", true),
    f(X1_ECX, 28, "perfctr_llc", true),
    f(X1_ECX, 29, "mwaitx", true),
    f(X1_EDX, 11, "syscall", true),
    f(X1_EDX, 19, "mp", true),
    f(X1_EDX, 20, "nx", true),
    f(X1_EDX, 22, "mmxext", true),
    f(X1_EDX, 25, "fxsr_opt", true),
    f(X1_EDX, 26, "pdpe1gb", true),
    f(X1_EDX, 27, "rdtscp", true),
    f(X1_EDX, 29, "lm", true),
    f(X1_EDX, 30, "3dnowext", true),
    f(X1_EDX, 31, "3dnow", true),
    f(X8_EBX, 0, "clzero", true),
    f(X8_EBX, 1, "irperf", true),
    f(X8_EBX, 2, "xsaveerptr", true),
    f(X8_EBX, 4, "rdpru", true),
    f(X8_EBX, 9, "wbnoinvd", true),
    f(X8_EBX, 12, "amd_ibpb", false),
    f(X8_EBX, 14, "amd_ibrs", false),
    f(X8_EBX, 15, "amd_stibp", false),
    f(X8_EBX, 17, "amd_stibp_always_on", false),
    f(X8_EBX, 23, "amd_ppin", true),
    f(X8_EBX, 24, "amd_ssbd", false),
    f(X8_EBX, 25, "virt_ssbd", true),
    f(X8_EBX, 26, "amd_ssb_no", false),
    f(X8_EBX, 27, "cppc", true),
    f(X8_EBX, 29, "btc_no", false),
    f(X8_EBX, 30, "amd_ibpb_ret", false),
    f(X8_EBX, 31, "brs", true),
    f(XCR0_LO, 0, "xstate_x87", false),
    f(XCR0_LO, 1, "xstate_sse", false),
    f(XCR0_LO, 2, "xstate_avx", false),
    f(XCR0_LO, 3, "xstate_bndregs", false),
    f(XCR0_LO, 4, "xstate_bndcsr", false),
    f(XCR0_LO, 5, "xstate_opmask", false),
    f(XCR0_LO, 6, "xstate_zmm_hi256", false),
    f(XCR0_LO, 7, "xstate_hi16_zmm", false),
    f(XCR0_LO, 8, "xstate_pt", false),
    f(XCR0_LO, 9, "xstate_pkru", false),
    f(XCR0_LO, 10, "xstate_pasid", false),
    f(XCR0_LO, 11, "xstate_cet_u", false),
    f(XCR0_LO, 12, "xstate_cet_s", false),
    f(XCR0_LO, 13, "xstate_hdc", false),
    f(XCR0_LO, 14, "xstate_uintr", false),
    f(XCR0_LO, 15, "xstate_lbr", false),
    f(XCR0_LO, 16, "xstate_hwp", false),
    f(XCR0_LO, 17, "xstate_xtilecfg", false),
    f(XCR0_LO, 18, "xstate_xtiledata", false),
];

/// The feature named `name`.
pub fn feature(name: &str) -> Option<&'static Feature> {
    FEATURES.iter().find(|f| f.name == name)
}

/// The named feature at (`word`, `bit`), if it has a name.
pub fn feature_at(word: FeatureWord, bit: u8) -> Option<&'static Feature> {
    FEATURES.iter().find(|f| f.word == word && f.bit == bit)
}

/// The name of (`word`, `bit`): its feature name, else e.g. `cpuid.0x80000001.0.edx[3]`.
pub fn bit_name(word: FeatureWord, bit: u8) -> String {
    match feature_at(word, bit) {
        Some(f) => f.name.to_string(),
        None => format!("{word}[{bit}]"),
    }
}

/// Feature bits, per feature word (words not present are all zero).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    words: BTreeMap<FeatureWord, u32>,
}

impl CpuFeatures {
    /// The feature words of a CPUID list (e.g. what a vCPU was set up with).
    pub fn from_cpuid(entries: &[kvm_cpuid_entry2]) -> Self {
        let mut out = Self::default();
        for w in WORDS {
            if let Some(e) = entries.iter().find(|e| w.matches(e)) {
                out.set_word(w, w.get(e));
            }
        }
        out
    }

    /// What this host's own CPUID instruction reports (on PVM hosts, what a guest's CPUID
    /// instruction sees, since it is not intercepted there).
    pub fn native() -> Self {
        use std::arch::x86_64::__cpuid_count;
        let max_basic = __cpuid_count(0, 0).eax;
        let max_ext = __cpuid_count(0x8000_0000, 0).eax;
        let mut out = Self::default();
        for w in WORDS {
            let max = if w.leaf >= 0x8000_0000 {
                max_ext
            } else {
                max_basic
            };
            if w.leaf > max {
                continue;
            }
            let r = __cpuid_count(w.leaf, w.subleaf);
            let e = kvm_cpuid_entry2 {
                eax: r.eax,
                ebx: r.ebx,
                ecx: r.ecx,
                edx: r.edx,
                ..Default::default()
            };
            out.set_word(w, w.get(&e));
        }
        out
    }

    /// The features named (see [`FEATURES`]); an unknown name is an error naming it.
    pub fn from_names(names: &[&str]) -> Result<Self, String> {
        let mut out = Self::default();
        for n in names {
            let f = feature(n).ok_or_else(|| format!("unknown CPU feature {n:?}"))?;
            out.set_bit(f.word, f.bit);
        }
        Ok(out)
    }

    /// The bits of `word`.
    pub fn word(&self, word: FeatureWord) -> u32 {
        self.words.get(&word).copied().unwrap_or(0)
    }

    /// Sets the bits of `word`.
    pub fn set_word(&mut self, word: FeatureWord, bits: u32) {
        if bits == 0 {
            self.words.remove(&word);
        } else {
            self.words.insert(word, bits);
        }
    }

    /// Sets one bit.
    pub fn set_bit(&mut self, word: FeatureWord, bit: u8) {
        let v = self.word(word) | (1 << bit);
        self.set_word(word, v);
    }

    /// Whether (`word`, `bit`) is set.
    pub fn has(&self, word: FeatureWord, bit: u8) -> bool {
        self.word(word) & (1 << bit) != 0
    }

    fn combine(&self, other: &Self, op: impl Fn(u32, u32) -> u32) -> Self {
        let mut out = Self::default();
        for w in self.words.keys().chain(other.words.keys()) {
            out.set_word(*w, op(self.word(*w), other.word(*w)));
        }
        out
    }

    /// Bits in either.
    pub fn union(&self, other: &Self) -> Self {
        self.combine(other, |a, b| a | b)
    }

    /// Bits in both.
    pub fn intersect(&self, other: &Self) -> Self {
        self.combine(other, |a, b| a & b)
    }

    /// Bits in `self` but not in `other`.
    pub fn minus(&self, other: &Self) -> Self {
        self.combine(other, |a, b| a & !b)
    }

    /// Whether no bit is set.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Without the [`MANAGED`] bits.
    pub fn without_managed(&self) -> Self {
        let mut out = self.clone();
        for (w, m) in MANAGED {
            out.set_word(w, out.word(w) & !m);
        }
        out
    }

    /// Every set bit, in [`WORDS`] order.
    pub fn bits(&self) -> Vec<(FeatureWord, u8)> {
        WORDS
            .iter()
            .flat_map(|&w| {
                let v = self.word(w);
                (0..32u8)
                    .filter(move |b| v & (1 << b) != 0)
                    .map(move |b| (w, b))
            })
            .collect()
    }

    /// The names of every set bit, in [`WORDS`] order.
    pub fn names(&self) -> Vec<String> {
        self.bits()
            .into_iter()
            .map(|(w, b)| bit_name(w, b))
            .collect()
    }

    /// Clears, in every entry of `cpuid`, the feature bits not in `keep`, and empties the
    /// XSAVE subleaves (0xd.2 and up) of state components `keep` does not allow.
    pub fn mask_cpuid(keep: &Self, cpuid: &mut CpuId) {
        let xcr0 = u64::from(keep.word(XCR0_LO)) | (u64::from(keep.word(XCR0_HI)) << 32);
        for e in cpuid.as_mut_slice() {
            for w in WORDS {
                if w.matches(e) {
                    w.set(e, w.get(e) & keep.word(w));
                }
            }
            if e.function == 0xd && (2..64).contains(&e.index) && xcr0 & (1 << e.index) == 0 {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
        }
    }
}
