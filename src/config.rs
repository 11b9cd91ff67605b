//! VM configuration and the parsing of the original tool's `key=value,…` flag syntax.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::arch::x86_64::cpu_template::CpuTemplate;

/// Errors of configuration parsing and validation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A `key=value` list could not be parsed.
    #[error("--{flag}: {message}")]
    Syntax {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range.
    #[error("--{flag}: {message}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Default guest memory in MiB.
pub const DEFAULT_MEM_MIB: u64 = 256;
/// Default command line when the user gives none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule";

/// The guest kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelConfig {
    /// vmlinux (ELF) or bzImage.
    pub path: PathBuf,
    /// The user's command line (the VMM appends device and host-quirk parameters).
    pub cmdline: String,
}

/// One virtio-block disk: a local image file, or a lazy remote image (docs/REMOTE_IMAGES.md).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// Local image file (empty for a remote image).
    pub path: PathBuf,
    /// Refuse guest writes.
    pub read_only: bool,
    /// Drive name (GET_ID); defaults to the image's file name.
    pub id: Option<String>,
    /// Add `root=/dev/vdX` for this disk.
    pub root: bool,
    /// Open the local image with O_DIRECT (bypass the host page cache).
    #[serde(default)]
    pub direct: bool,
    /// Remote image: `http://HOST/ARCHIVE/images/NAME` or `s3://BUCKET/PREFIX/images/NAME`.
    #[serde(default)]
    pub url: Option<String>,
    /// Root of the local chunk cache (shared by remote images and archive memory).
    #[serde(default)]
    pub cache: Option<PathBuf>,
    /// Size limit of the whole shared chunk cache, in MiB (oldest chunks evicted).
    #[serde(default)]
    pub cache_max_mib: Option<u64>,
    /// Persistent copy-on-write overlay file that receives the guest's writes.
    #[serde(default)]
    pub overlay: Option<PathBuf>,
    /// Mirror archive base URLs tried when the main one fails.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// Record the chunks the guest reads into this file (a prefetch list).
    #[serde(default)]
    pub record_prefetch: Option<PathBuf>,
    /// Fetch the chunks listed in this file in the background at start.
    #[serde(default)]
    pub prefetch: Option<PathBuf>,
}

impl BlockConfig {
    /// What the disk is, for messages: its path or URL.
    pub fn location(&self) -> String {
        match &self.url {
            Some(u) => u.clone(),
            None => self.path.display().to_string(),
        }
    }
}

/// One virtio-net interface on an existing tap device (docs/NETWORK.md).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Interface id (`net0`, `net1`, … by default): names it on a restore's `--net id=…`.
    pub id: String,
    /// Host tap device name (at most 15 bytes).
    pub tap: String,
    /// Guest MAC address; a locally administered random one when not given.
    pub mac: Option<[u8; 6]>,
}

/// The whole VM configuration, recorded in snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Kernel and command line.
    pub kernel: KernelConfig,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Disks in attach order (vda, vdb, …).
    pub blocks: Vec<BlockConfig>,
    /// Append the PVM-host command-line workarounds when such a host is detected.
    pub host_quirks: bool,
    /// The CPU features the guest is given (docs/KEEPING_SNAPSHOTS.md, "Hosts").
    pub cpu_template: CpuTemplate,
    /// virtio-net interfaces, in attach order (after the disks on the MMIO window).
    #[serde(default)]
    pub nets: Vec<NetConfig>,
}

/// Splits `a=1,b="x,y",c=z` on commas outside double quotes into (key, value) pairs,
/// removing the quotes.
pub fn parse_kv(flag: &'static str, s: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut items = Vec::new();
    for c in s.chars() {
        match c {
            '"' => in_quotes = !in_quotes,
            ',' if !in_quotes => items.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    if in_quotes {
        return Err(ConfigError::Syntax {
            flag,
            message: "unterminated quote".into(),
        });
    }
    items.push(cur);
    for item in items {
        if item.is_empty() {
            continue;
        }
        let (k, v) = item.split_once('=').ok_or_else(|| ConfigError::Syntax {
            flag,
            message: format!("expected key=value, got {item:?}"),
        })?;
        if k.is_empty() {
            return Err(ConfigError::Syntax {
                flag,
                message: format!("empty key in {item:?}"),
            });
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

fn unknown(flag: &'static str, k: &str, known: &[&str]) -> ConfigError {
    ConfigError::Syntax {
        flag,
        message: format!("unknown key {k:?} (known: {})", known.join(", ")),
    }
}

fn parse_bool(flag: &'static str, k: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "true" | "on" | "1" | "yes" => Ok(true),
        "false" | "off" | "0" | "no" => Ok(false),
        _ => Err(ConfigError::Syntax {
            flag,
            message: format!("{k}: expected true or false, got {v:?}"),
        }),
    }
}

fn parse_num<T: std::str::FromStr>(flag: &'static str, k: &str, v: &str) -> Result<T, ConfigError> {
    v.parse().map_err(|_| ConfigError::Syntax {
        flag,
        message: format!("{k}: not a number: {v:?}"),
    })
}

/// `--kernel path=FILE[,cmdline="…"]` (a bare path is accepted too).
pub fn parse_kernel(s: &str) -> Result<KernelConfig, ConfigError> {
    const F: &str = "kernel";
    if !s.contains('=') {
        return Ok(KernelConfig {
            path: s.into(),
            cmdline: DEFAULT_CMDLINE.into(),
        });
    }
    let mut path = None;
    let mut cmdline = None;
    for (k, v) in parse_kv(F, s)? {
        match k.as_str() {
            "path" => path = Some(PathBuf::from(v)),
            "cmdline" => cmdline = Some(v),
            _ => return Err(unknown(F, &k, &["path", "cmdline"])),
        }
    }
    Ok(KernelConfig {
        path: path.ok_or_else(|| ConfigError::Syntax {
            flag: F,
            message: "path= is required".into(),
        })?,
        cmdline: cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.into()),
    })
}

/// `--memory size_mib=N` (a bare number is accepted too).
pub fn parse_memory(s: &str) -> Result<u64, ConfigError> {
    const F: &str = "memory";
    let mib: u64 = if s.contains('=') {
        let mut size = None;
        for (k, v) in parse_kv(F, s)? {
            match k.as_str() {
                "size_mib" => size = Some(parse_num(F, &k, &v)?),
                _ => return Err(unknown(F, &k, &["size_mib"])),
            }
        }
        size.ok_or_else(|| ConfigError::Syntax {
            flag: F,
            message: "size_mib= is required".into(),
        })?
    } else {
        parse_num(F, "size_mib", s)?
    };
    if !(1..=(1 << 20)).contains(&mib) {
        return Err(ConfigError::Invalid {
            flag: F,
            message: format!("size_mib must be 1..=1048576, got {mib}"),
        });
    }
    Ok(mib)
}

/// `--vcpu num=N` (a bare number is accepted too). Checked against KVM's limit later.
pub fn parse_vcpu(s: &str) -> Result<u8, ConfigError> {
    const F: &str = "vcpu";
    let n: u32 = if s.contains('=') {
        let mut num = None;
        for (k, v) in parse_kv(F, s)? {
            match k.as_str() {
                "num" => num = Some(parse_num(F, &k, &v)?),
                _ => return Err(unknown(F, &k, &["num"])),
            }
        }
        num.ok_or_else(|| ConfigError::Syntax {
            flag: F,
            message: "num= is required".into(),
        })?
    } else {
        parse_num(F, "num", s)?
    };
    if n == 0 || n > 254 {
        return Err(ConfigError::Invalid {
            flag: F,
            message: format!("num must be 1..=254 (APIC ids in the MP table), got {n}"),
        });
    }
    Ok(n as u8)
}

/// `--block path=FILE[,read_only=true][,id=NAME][,root=true][,direct=true]` or
/// `--block url=http://…/images/NAME[,cache=DIR][,cache_max_mib=N][,overlay=FILE][,mirror=URL]…
/// [,record_prefetch=FILE][,prefetch=FILE][,id=NAME][,root=true]`.
pub fn parse_block(s: &str) -> Result<BlockConfig, ConfigError> {
    const F: &str = "block";
    const KNOWN: &[&str] = &[
        "path",
        "read_only",
        "id",
        "root",
        "direct",
        "url",
        "cache",
        "cache_max_mib",
        "overlay",
        "mirror",
        "record_prefetch",
        "prefetch",
    ];
    let mut b = BlockConfig::default();
    let mut have_path = false;
    for (k, v) in parse_kv(F, s)? {
        match k.as_str() {
            "path" => {
                b.path = v.into();
                have_path = true;
            }
            "read_only" | "readonly" | "ro" => b.read_only = parse_bool(F, &k, &v)?,
            "id" => {
                if v.len() > 20 {
                    return Err(ConfigError::Invalid {
                        flag: F,
                        message: "id= is at most 20 bytes (virtio-blk GET_ID)".into(),
                    });
                }
                b.id = Some(v)
            }
            "root" => b.root = parse_bool(F, &k, &v)?,
            "direct" => b.direct = parse_bool(F, &k, &v)?,
            "url" => {
                if !v.starts_with("http://") && !v.starts_with("s3://") {
                    return Err(ConfigError::Invalid {
                        flag: F,
                        message: format!("url= must be an http:// or s3:// URL, got {v:?}"),
                    });
                }
                b.url = Some(v)
            }
            "cache" => b.cache = Some(v.into()),
            "cache_max_mib" => b.cache_max_mib = Some(parse_num(F, &k, &v)?),
            "overlay" => b.overlay = Some(v.into()),
            "mirror" => b.mirrors.push(v),
            "record_prefetch" => b.record_prefetch = Some(v.into()),
            "prefetch" => b.prefetch = Some(v.into()),
            _ => return Err(unknown(F, &k, KNOWN)),
        }
    }
    match (have_path, b.url.is_some()) {
        (false, false) => Err(ConfigError::Syntax {
            flag: F,
            message: "path= (a local image) or url= (a remote image) is required".into(),
        }),
        (true, true) => Err(ConfigError::Syntax {
            flag: F,
            message: "give either path= or url=, not both".into(),
        }),
        (true, false)
            if b.cache.is_some()
                || b.overlay.is_some()
                || !b.mirrors.is_empty()
                || b.record_prefetch.is_some()
                || b.prefetch.is_some() =>
        {
            Err(ConfigError::Syntax {
                flag: F,
                message: "cache=, overlay=, mirror= and prefetch options need url=".into(),
            })
        }
        _ => Ok(b),
    }
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`; refuses multicast addresses.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    (mac[0] & 1 == 0).then_some(mac)
}

/// `--net tap=NAME[,mac=MAC][,id=ID]`; `index` gives the default id `net<index>`. With
/// `restore`, `id=` is required and `mac=` refused (a restored guest keeps its MAC).
pub fn parse_net(s: &str, index: usize, restore: bool) -> Result<NetConfig, ConfigError> {
    const F: &str = "net";
    let mut n = NetConfig {
        id: format!("net{index}"),
        ..Default::default()
    };
    let mut have_id = false;
    for (k, v) in parse_kv(F, s)? {
        match k.as_str() {
            "tap" => {
                let ok = !v.is_empty()
                    && v.len() <= 15
                    && !v
                        .bytes()
                        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace());
                if !ok {
                    return Err(ConfigError::Invalid {
                        flag: F,
                        message: format!(
                            "tap={v:?}: a tap name is 1 to 15 bytes, without '/', ':' or spaces"
                        ),
                    });
                }
                n.tap = v;
            }
            "mac" if !restore => {
                n.mac = Some(parse_mac(&v).ok_or_else(|| ConfigError::Invalid {
                    flag: F,
                    message: format!("mac={v:?}: expected a unicast aa:bb:cc:dd:ee:ff"),
                })?)
            }
            "id" => {
                if v.is_empty() || v.len() > 32 {
                    return Err(ConfigError::Invalid {
                        flag: F,
                        message: "id= is 1 to 32 bytes".into(),
                    });
                }
                n.id = v;
                have_id = true;
            }
            _ if restore => return Err(unknown(F, &k, &["id", "tap"])),
            _ => return Err(unknown(F, &k, &["tap", "mac", "id"])),
        }
    }
    if n.tap.is_empty() {
        return Err(ConfigError::Syntax {
            flag: F,
            message: "tap= is required".into(),
        });
    }
    if restore && !have_id {
        return Err(ConfigError::Syntax {
            flag: F,
            message: "id= is required on a restore (which interface gets this tap)".into(),
        });
    }
    Ok(n)
}

/// Parses every `--net` (ids must be unique).
pub fn parse_nets(flags: &[String], restore: bool) -> Result<Vec<NetConfig>, ConfigError> {
    let nets = flags
        .iter()
        .enumerate()
        .map(|(i, s)| parse_net(s, i, restore))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, n) in nets.iter().enumerate() {
        if nets[..i].iter().any(|o| o.id == n.id) {
            return Err(ConfigError::Invalid {
                flag: "net",
                message: format!("id {:?} given twice", n.id),
            });
        }
    }
    Ok(nets)
}

/// True when `/dev/kvm` is provided by the PVM module (nested, PVM-style KVM).
pub fn pvm_host() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// The clearcpuid list for PVM hosts: features the guest sees in CPUID but whose
/// instructions KVM's emulator cannot run (see docs/PVM_HOSTS.md). The value passed is
/// this list with a CPU template's masked features added, and the features Linux clears
/// anyway because of `noxsave` left out (`cpu_template::pvm_clearcpuid`): the whole list
/// would exceed the 127 characters Linux 6.1 reads.
pub const PVM_CLEARCPUID: &str = "smap,smep,umip,pku,popcnt,bmi1,bmi2,movbe,avx,avx2,fsgsbase,rdpid,erms,fsrm,xsaveopt,xsavec,xsaves,rdrand,rdseed,adx,sha_ni,avx512f,clflushopt,clwb";

/// Command-line workarounds for PVM hosts, for a guest with `vcpus` vCPUs, with `clearcpuid`
/// the features the guest kernel must ignore (see [`PVM_CLEARCPUID`]).
///
/// `tsc_khz` (KVM_GET_TSC_KHZ) is passed as `tsc_early_khz` because the guest's PIT
/// calibration runs emulated and fails (the TSC would be marked unstable and every `udelay`
/// would become an emulated busy loop), and as a loops-per-jiffy value so delay-loop
/// calibration is skipped; lpj assumes HZ=100, which makes delays on a higher-HZ kernel
/// longer, never shorter.
///
/// The guest's clock: these hosts ignore the TSC a VMM gives a vCPU (the guest reads the
/// host's TSC), so a guest clocked by the TSC sees the time a snapshot was kept as a jump and,
/// with a periodic tick, replays every tick it missed with interrupts off (emulated here):
/// minutes for a snapshot kept for minutes. kvmclock, which KVM_SET_CLOCK restores, does not
/// jump. A single-vCPU guest therefore keeps KVM paravirt (no `nopv`) with
/// `clocksource=kvm-clock` (the guest prefers an invariant TSC otherwise) and `no-kvmapf`:
/// with one vCPU Linux enables none of the PV features that make hypercalls (PV IPIs, PV
/// spinlocks, PV sched yield, PV TLB flush), and the KVM PTP clock is not built into the
/// project's kernel. With several vCPUs those PV features would hang (their hypercalls never
/// complete here), so the guest gets `nopv`, which also turns kvmclock off: such guests still
/// stall after a restore in proportion to the snapshot's age (docs/PVM_HOSTS.md).
pub fn pvm_quirks(tsc_khz: Option<u32>, clearcpuid: &str, vcpus: u8) -> String {
    let pv = if vcpus <= 1 {
        "clocksource=kvm-clock no-kvmapf"
    } else {
        "nopv"
    };
    let mut s = format!("{pv} noxsave clearcpuid={clearcpuid} tsc=reliable");
    if let Some(khz) = tsc_khz.filter(|k| *k > 0) {
        s.push_str(&format!(" tsc_early_khz={khz} lpj={}", u64::from(khz) * 10));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_with_quotes() {
        let k = parse_kernel(r#"path=/k,cmdline="console=ttyS0 clearcpuid=a,b""#).unwrap();
        assert_eq!(k.path, PathBuf::from("/k"));
        assert_eq!(k.cmdline, "console=ttyS0 clearcpuid=a,b");
        assert!(parse_kernel(r#"path=/k,cmdline="x"#).is_err());
        assert!(parse_kernel("cmdline=x").is_err());
        assert!(parse_kernel("path=/k,foo=1").is_err());
        assert_eq!(parse_kernel("/k").unwrap().cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_memory("size_mib=512").unwrap(), 512);
        assert_eq!(parse_memory("64").unwrap(), 64);
        assert!(parse_memory("size_mib=0").is_err());
        assert!(parse_memory("size_mib=lots").is_err());
        assert_eq!(parse_vcpu("num=2").unwrap(), 2);
        assert!(parse_vcpu("num=0").is_err());
        assert!(parse_vcpu("num=999").is_err());
        assert!(parse_vcpu("n=1").is_err());
    }

    #[test]
    fn block() {
        let b = parse_block("path=/d,read_only=true,id=data,root=true").unwrap();
        assert!(b.read_only && b.root);
        assert_eq!(b.id.as_deref(), Some("data"));
        assert!(parse_block("read_only=true").is_err());
        assert!(parse_block("path=/d,read_only=maybe").is_err());
        assert!(parse_block("path=/d,id=123456789012345678901").is_err());
        let r =
            parse_block("url=http://h/a/images/x,cache=/c,overlay=/o,mirror=http://m/a,root=true")
                .unwrap();
        assert_eq!(r.url.as_deref(), Some("http://h/a/images/x"));
        assert_eq!(r.mirrors, vec!["http://m/a".to_string()]);
        assert!(parse_block("url=ftp://h/x").is_err());
        let r = parse_block("url=s3://bkt/a/images/x").unwrap();
        assert_eq!(r.url.as_deref(), Some("s3://bkt/a/images/x"));
        assert!(parse_block("path=/d,url=http://h/x").is_err());
        assert!(parse_block("path=/d,overlay=/o").is_err());
    }

    #[test]
    fn net() {
        let n = parse_net("tap=tap0,mac=02:00:00:00:00:01", 0, false).unwrap();
        assert_eq!((n.id.as_str(), n.tap.as_str()), ("net0", "tap0"));
        assert_eq!(n.mac, Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(parse_net("tap=t,id=x", 3, false).unwrap().id, "x");
        assert_eq!(parse_net("tap=t", 3, false).unwrap().id, "net3");
        assert!(parse_net("tap=a234567890123456", 0, false).is_err());
        assert!(
            parse_net("tap=a234567890123456", 0, false)
                .unwrap_err()
                .to_string()
                .contains("15")
        );
        assert!(parse_net("mac=02:00:00:00:00:01", 0, false).is_err());
        assert!(parse_net("tap=t,mac=01:00:00:00:00:01", 0, false).is_err());
        assert!(parse_net("tap=t,mac=02:00:00:00:00", 0, false).is_err());
        assert!(parse_net("tap=t,mac=zz:00:00:00:00:00", 0, false).is_err());
        assert!(parse_net("tap=t,foo=1", 0, false).is_err());
        assert!(parse_net("tap=t", 0, true).is_err(), "restore needs id=");
        assert!(parse_net("id=net0,tap=t,mac=02:00:00:00:00:01", 0, true).is_err());
        assert!(parse_nets(&["tap=a,id=x".into(), "tap=b,id=x".into()], false).is_err());
    }

    #[test]
    fn quirks() {
        let q = pvm_quirks(Some(2_596_128), "smap,smep", 1);
        assert!(q.starts_with(
            "clocksource=kvm-clock no-kvmapf noxsave clearcpuid=smap,smep tsc=reliable"
        ));
        assert!(!q.contains("nopv"));
        assert!(q.ends_with("tsc_early_khz=2596128 lpj=25961280"));
        assert!(!pvm_quirks(None, "smap", 1).contains("lpj"));
        let smp = pvm_quirks(Some(2_596_128), "smap", 2);
        assert!(smp.starts_with("nopv noxsave clearcpuid=smap tsc=reliable"));
        assert!(!smp.contains("kvm-clock"));
    }
}
