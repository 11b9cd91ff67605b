//! Unit tests of `boot.rs` on synthetic ELF and bzImage files in plain guest memory.

use std::io::Cursor;

use vm_memory::GuestMemoryMmap;

use super::*;
use crate::arch::x86_64::layout::arch_memory_regions;

const MIB: u64 = 1 << 20;

fn mem(size: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&arch_memory_regions(size)).unwrap()
}

/// A minimal ELF64 x86_64 executable with one PT_LOAD segment of `payload` at `paddr`,
/// `memsz` bytes long in memory.
fn elf(class: u8, paddr: u64, entry: u64, payload: &[u8], memsz: u64) -> Vec<u8> {
    let mut f = vec![0u8; 64 + 56];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = class;
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f[0x18..0x20].copy_from_slice(&entry.to_le_bytes());
    f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = 64;
    let offset = f.len() as u64;
    f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
    f[ph + 16..ph + 24].copy_from_slice(&(paddr | 0xffff_ffff_8000_0000).to_le_bytes());
    f[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
    f[ph + 32..ph + 40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    f[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn bz_header() -> setup_header {
    setup_header {
        setup_sects: 1,
        header: KERNEL_HDR_MAGIC,
        version: 0x020f,
        loadflags: LOADED_HIGH,
        xloadflags: XLF_KERNEL_64,
        code32_start: HIMEM_START as u32,
        pref_address: 16 * MIB,
        init_size: 8 * MIB as u32,
        kernel_alignment: 0x20_0000,
        cmdline_size: 2047,
        initrd_addr_max: 0x7fff_ffff,
        ..Default::default()
    }
}

/// A bzImage with one setup sector after the boot sector and `payload` as protected-mode code.
fn bzimage(hdr: setup_header, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 1024];
    let off = SETUP_HEADER_OFFSET as usize;
    let bytes = hdr.as_slice();
    f[off..off + bytes.len()].copy_from_slice(bytes);
    f.extend_from_slice(payload);
    f
}

fn read_bytes(m: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    m.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

#[test]
fn loads_elf_at_paddr() {
    let m = mem(64 * MIB);
    let payload: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    let image = elf(2, 16 * MIB, 16 * MIB + 0x10, &payload, 0x2000);
    let k = load_kernel(&m, &mut Cursor::new(image)).unwrap();
    assert_eq!(k.format, KernelFormat::Elf);
    assert_eq!(k.entry, GuestAddress(16 * MIB + 0x10));
    assert_eq!(k.kernel_start, GuestAddress(16 * MIB));
    assert_eq!(k.kernel_end, 16 * MIB + 0x2000);
    assert!(k.setup_header.is_none());
    assert_eq!(read_bytes(&m, 16 * MIB, payload.len()), payload);
}

#[test]
fn rejects_unknown_and_short_files() {
    let m = mem(64 * MIB);
    for image in [vec![], vec![1, 2, 3], vec![0x55; 4096]] {
        let err = load_kernel(&m, &mut Cursor::new(image)).unwrap_err();
        assert!(matches!(err, BootError::UnknownKernelFormat), "{err}");
    }
}

#[test]
fn rejects_bad_elves() {
    let m = mem(64 * MIB);
    let e32 = elf(1, 16 * MIB, 16 * MIB, &[0x90; 16], 16);
    assert!(matches!(
        load_kernel(&m, &mut Cursor::new(e32)),
        Err(BootError::ElfNotX86_64)
    ));
    let low = elf(2, 0x8000, 0x8000, &[0x90; 16], 16);
    assert!(matches!(
        load_kernel(&m, &mut Cursor::new(low)),
        Err(BootError::ElfSegmentInLowMemory { addr: 0x8000 })
    ));
    let big = elf(2, 16 * MIB, 16 * MIB, &[0x90; 16], 64 * MIB);
    assert!(matches!(
        load_kernel(&m, &mut Cursor::new(big)),
        Err(BootError::KernelDoesNotFit { .. })
    ));
    let bad_entry = elf(2, 16 * MIB, 0x10_0000, &[0x90; 16], 16);
    assert!(matches!(
        load_kernel(&m, &mut Cursor::new(bad_entry)),
        Err(BootError::ElfBadEntry(0x10_0000))
    ));
    let mut truncated = elf(2, 16 * MIB, 16 * MIB, &[0x90; 16], 16);
    truncated.truncate(100);
    assert!(matches!(
        load_kernel(&m, &mut Cursor::new(truncated)),
        Err(BootError::ElfTruncated)
    ));
    let mut short_image = elf(2, 16 * MIB, 16 * MIB, &[0x90; 4096], 4096);
    short_image.truncate(200);
    assert!(matches!(
        load_kernel(&m, &mut Cursor::new(short_image)),
        Err(BootError::Load(_))
    ));
}

#[test]
fn loads_bzimage_at_himem() {
    let m = mem(64 * MIB);
    let payload: Vec<u8> = (0..=255u8).rev().cycle().take(3000).collect();
    let k = load_kernel(&m, &mut Cursor::new(bzimage(bz_header(), &payload))).unwrap();
    assert_eq!(k.format, KernelFormat::BzImage);
    assert_eq!(k.entry, GuestAddress(HIMEM_START + 0x200));
    assert_eq!(k.kernel_start, GuestAddress(HIMEM_START));
    assert_eq!(k.kernel_end, 24 * MIB);
    let hdr = k.setup_header.unwrap();
    assert_eq!({ hdr.code32_start }, HIMEM_START as u32);
    assert_eq!(read_bytes(&m, HIMEM_START, payload.len()), payload);
}

#[test]
fn rejects_bad_bzimages() {
    let m = mem(64 * MIB);
    let old = setup_header {
        version: 0x0206,
        ..bz_header()
    };
    assert!(matches!(
        load_kernel(&m, &mut Cursor::new(bzimage(old, &[0; 16]))),
        Err(BootError::BzImageTooOld(0x0206))
    ));
    let no64 = setup_header {
        xloadflags: 0,
        ..bz_header()
    };
    assert!(matches!(
        load_kernel(&m, &mut Cursor::new(bzimage(no64, &[0; 16]))),
        Err(BootError::BzImageNot64Bit)
    ));
    let huge = setup_header {
        init_size: 0x1000_0000,
        ..bz_header()
    };
    assert!(matches!(
        load_kernel(&m, &mut Cursor::new(bzimage(huge, &[0; 16]))),
        Err(BootError::KernelDoesNotFit { .. })
    ));
}

fn elf_kernel(m: &GuestMemoryMmap) -> KernelLoad {
    let image = elf(2, 16 * MIB, 16 * MIB, &[0x90; 64], 4 * MIB);
    load_kernel(m, &mut Cursor::new(image)).unwrap()
}

#[test]
fn initrd_at_top_of_low_ram() {
    let m = mem(128 * MIB);
    let k = elf_kernel(&m);
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let (addr, size) = load_initrd(&m, &mut Cursor::new(data.clone()), &k).unwrap();
    assert_eq!(size, data.len());
    assert_eq!(addr.raw_value() % 4096, 0);
    assert!(addr.raw_value() + size as u64 <= 128 * MIB);
    assert!(addr.raw_value() + size as u64 > 128 * MIB - 4096);
    assert_eq!(read_bytes(&m, addr.raw_value(), size), data);
}

#[test]
fn initrd_respects_addr_max_and_kernel() {
    let m = mem(128 * MIB);
    let mut k = elf_kernel(&m);
    k.setup_header = Some(setup_header {
        initrd_addr_max: (64 * MIB - 1) as u32,
        ..Default::default()
    });
    let (addr, size) = load_initrd(&m, &mut Cursor::new(vec![1u8; 4096]), &k).unwrap();
    assert_eq!(addr.raw_value() + size as u64, 64 * MIB);

    let k = elf_kernel(&m);
    let err = load_initrd(&m, &mut Cursor::new(vec![1u8; 110 * MIB as usize]), &k);
    assert!(matches!(err, Err(BootError::InitrdDoesNotFit { .. })));
    let err = load_initrd(&m, &mut Cursor::new(Vec::new()), &k);
    assert!(matches!(err, Err(BootError::EmptyInitrd)));
}

#[test]
fn initrd_below_gap_for_big_guest() {
    let m = mem(4 << 30);
    let k = elf_kernel(&m);
    let (addr, _) = load_initrd(&m, &mut Cursor::new(vec![7u8; 8192]), &k).unwrap();
    assert_eq!(addr.raw_value() + 8192, DEFAULT_INITRD_ADDR_MAX + 1);
}

#[test]
fn cmdline_written_and_limited() {
    let m = mem(64 * MIB);
    let cl = "console=ttyS0 nopv";
    let len = write_cmdline(&m, cl, None).unwrap();
    assert_eq!(len, 19);
    assert_eq!(read_bytes(&m, CMDLINE_START, len), b"console=ttyS0 nopv\0");

    let hdr = setup_header {
        cmdline_size: 10,
        ..Default::default()
    };
    let err = write_cmdline(&m, cl, Some(&hdr)).unwrap_err();
    assert!(matches!(
        err,
        BootError::CmdlineTooLong { len: 19, max: 11 }
    ));

    let long = "x".repeat(CMDLINE_MAX_SIZE);
    assert!(matches!(
        write_cmdline(&m, &long, None),
        Err(BootError::CmdlineTooLong { .. })
    ));
    assert!(write_cmdline(&m, &long[1..], None).is_ok());
    assert!(matches!(
        write_cmdline(&m, "a\0b", None),
        Err(BootError::CmdlineNul)
    ));
}

#[test]
fn boot_params_small_guest() {
    let m = mem(256 * MIB);
    let cl = "console=ttyS0 abcde";
    let zp = configure_system(&m, cl, Some((GuestAddress(0x0f00_0000), 0x1234)), None).unwrap();
    assert_eq!(read_bytes(&m, CMDLINE_START, 20), b"console=ttyS0 abcde\0");
    assert_eq!(zp, GuestAddress(ZERO_PAGE_START));
    let p: boot_params = m.read_obj(zp).unwrap();
    assert_eq!({ p.hdr.type_of_loader }, 0xff);
    assert_eq!({ p.hdr.boot_flag }, 0xaa55);
    assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
    assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
    assert_eq!({ p.hdr.cmdline_size }, 19);
    assert_eq!({ p.hdr.kernel_alignment }, KERNEL_MIN_ALIGNMENT_BYTES);
    assert_eq!({ p.hdr.ramdisk_image }, 0x0f00_0000);
    assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
    assert_eq!(p.e820_entries, 3);
    let e: Vec<(u64, u64, u32)> = p.e820_table[..3]
        .iter()
        .map(|e| (e.addr, e.size, e.r#type))
        .collect();
    assert_eq!(
        e,
        vec![
            (0, EBDA_START, E820_RAM),
            (EBDA_START, LOW_MEM_END - EBDA_START, E820_RESERVED),
            (HIMEM_START, 256 * MIB - HIMEM_START, E820_RAM),
        ]
    );
}

#[test]
fn boot_params_big_guest_and_header() {
    let m = mem(5 << 30);
    let hdr = setup_header {
        kernel_alignment: 0x20_0000,
        ..bz_header()
    };
    let zp = configure_system(&m, "", None, Some(hdr)).unwrap();
    let p: boot_params = m.read_obj(zp).unwrap();
    assert_eq!({ p.hdr.version }, 0x020f);
    assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
    assert_eq!({ p.hdr.type_of_loader }, 0xff);
    assert_eq!({ p.hdr.ramdisk_image }, 0);
    assert_eq!(p.e820_entries, 4);
    let last = p.e820_table[3];
    assert_eq!(
        (last.addr, last.size, last.r#type),
        (1 << 32, 2 << 30, E820_RAM)
    );
    let below_gap = p.e820_table[2];
    assert_eq!(
        { below_gap.size },
        crate::arch::x86_64::layout::MMIO_GAP_START - HIMEM_START
    );
}

#[test]
fn boot_params_needs_ram_above_himem() {
    let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
    assert!(matches!(
        write_boot_params(&m, GuestAddress(CMDLINE_START), 1, None, None),
        Err(BootError::NoLowMemory)
    ));
}
