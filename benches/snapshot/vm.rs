//! The VMs the synthetic snapshots are taken of: a 3-instruction ELF kernel that halts,
//! built with `build_for_boot` at any memory size.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::builder::{BootOptions, Console, build_for_boot};
use vmm::config::{KernelConfig, VmConfig};
use vmm::vmm::Vmm;

/// A 3-instruction ELF kernel at 1 MiB: `hlt; jmp .-3`.
pub fn tiny_kernel(dir: &Path) -> PathBuf {
    let mut e = vec![0u8; 0x1000];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little endian
    e[6] = 1; // version
    let put16 = |e: &mut Vec<u8>, o: usize, v: u16| e[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |e: &mut Vec<u8>, o: usize, v: u32| e[o..o + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |e: &mut Vec<u8>, o: usize, v: u64| e[o..o + 8].copy_from_slice(&v.to_le_bytes());
    put16(&mut e, 0x10, 2); // ET_EXEC
    put16(&mut e, 0x12, 62); // x86_64
    put32(&mut e, 0x14, 1);
    put64(&mut e, 0x18, 0x10_0000); // entry
    put64(&mut e, 0x20, 64); // phoff
    put16(&mut e, 0x34, 64); // ehsize
    put16(&mut e, 0x36, 56); // phentsize
    put16(&mut e, 0x38, 1); // phnum
    put16(&mut e, 0x3a, 64); // shentsize
    put32(&mut e, 64, 1); // PT_LOAD
    put32(&mut e, 68, 5); // R+X
    put64(&mut e, 72, 0x1000); // offset
    put64(&mut e, 80, 0x10_0000); // vaddr
    put64(&mut e, 88, 0x10_0000); // paddr
    put64(&mut e, 96, 3); // filesz
    put64(&mut e, 104, 3); // memsz
    put64(&mut e, 112, 0x1000); // align
    e.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp .-3
    let p = dir.join("hlt-kernel.elf");
    fs::write(&p, e).unwrap();
    p
}

/// Boots the tiny kernel with `mem_mib`, lets it run (it halts), pauses it.
pub fn boot_tiny(kernel: &Path, mem_mib: u64) -> Vmm {
    let cfg = VmConfig {
        kernel: KernelConfig {
            path: kernel.to_path_buf(),
            cmdline: String::new(),
        },
        initrd: None,
        mem_mib,
        vcpus: 1,
        blocks: Vec::new(),
        host_quirks: false,
        cpu_template: Default::default(),
        nets: Vec::new(),
    };
    let opts = BootOptions {
        console: Console::Writer(Box::new(std::io::sink())),
        extra_pio: Vec::new(),
        extra_mmio: Vec::new(),
        start_paused: false,
    };
    let mut vmm = build_for_boot(&cfg, opts).expect("build_for_boot (tiny kernel)");
    std::thread::sleep(Duration::from_millis(20));
    vmm.pause().expect("pause");
    vmm
}
