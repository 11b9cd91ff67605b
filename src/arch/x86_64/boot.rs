//! Loading a Linux kernel (ELF `vmlinux` or `bzImage`) and an initrd into guest memory, and
//! writing the zero page (`boot_params`) and command line for the 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol").

use std::io::{self, Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryRegion, ReadVolatile,
};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, DEFAULT_INITRD_ADDR_MAX, EBDA_START, HIMEM_START, LOW_MEM_END,
    MMIO_GAP_START, ZERO_PAGE_START,
};

/// `boot_params.hdr.boot_flag` magic.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `boot_params.hdr.header` magic ("HdrS").
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a boot loader without an assigned id.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Alignment reported when the kernel gives none (an ELF vmlinux has no setup header).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// Offset of the setup header in a bzImage (and in `boot_params`).
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has the 64-bit entry point at offset 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// `loadflags` bit: the protected-mode code is loaded at 0x100000.
const LOADED_HIGH: u8 = 1 << 0;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// Guest pages are 4 KiB.
const PAGE_SIZE: u64 = 0x1000;

/// Errors while loading the kernel, the initrd, or writing the boot parameters.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Reading or seeking the kernel image failed.
    #[error("cannot read the kernel image")]
    ReadKernel(#[source] io::Error),
    /// The file is neither an ELF image nor a bzImage.
    #[error("kernel image is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat,
    /// The ELF image is not a little-endian 64-bit x86_64 executable.
    #[error("ELF kernel is not a little-endian 64-bit x86_64 image")]
    ElfNotX86_64,
    /// The ELF file ends inside its headers.
    #[error("ELF kernel image is truncated")]
    ElfTruncated,
    /// An ELF segment would overwrite the boot structures in low memory.
    #[error("ELF kernel segment at {addr:#x} lies below high memory ({HIMEM_START:#x})")]
    ElfSegmentInLowMemory {
        /// Physical address of the segment.
        addr: u64,
    },
    /// The ELF entry point is not inside a loaded segment.
    #[error("ELF entry point {0:#x} is not inside a loaded segment")]
    ElfBadEntry(u64),
    /// The bzImage boot protocol predates the 64-bit entry point.
    #[error("bzImage boot protocol {0:#x} is too old (2.12 or later is needed for 64-bit boot)")]
    BzImageTooOld(u16),
    /// The bzImage does not advertise a 64-bit entry point.
    #[error("bzImage has no 64-bit entry point (XLF_KERNEL_64 is not set)")]
    BzImageNot64Bit,
    /// The image does not fit in guest RAM below the MMIO gap.
    #[error(
        "kernel needs guest memory [{start:#x}, {end:#x}) but RAM below the MMIO gap ends at \
         {ram_end:#x}: give the VM more memory"
    )]
    KernelDoesNotFit {
        /// First address the kernel needs.
        start: u64,
        /// First address past what the kernel needs.
        end: u64,
        /// First address past the contiguous low RAM.
        ram_end: u64,
    },
    /// linux-loader failed to load the image.
    #[error("failed to load the kernel image")]
    Load(#[source] linux_loader::loader::Error),
    /// Reading or seeking the initrd failed.
    #[error("cannot read the initrd")]
    ReadInitrd(#[source] io::Error),
    /// The initrd file is empty.
    #[error("the initrd is empty")]
    EmptyInitrd,
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error(
        "initrd of {size} bytes does not fit between the kernel end {kernel_end:#x} and {limit:#x}"
    )]
    InitrdDoesNotFit {
        /// Initrd size in bytes.
        size: u64,
        /// End of the kernel (and its decompression area).
        kernel_end: u64,
        /// Highest end address allowed for the initrd.
        limit: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("failed to copy the initrd into guest memory")]
    WriteInitrd(#[source] GuestMemoryError),
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// The command line is longer than the kernel accepts.
    #[error("kernel command line is {len} bytes, at most {max} are allowed")]
    CmdlineTooLong {
        /// Length including the terminating NUL.
        len: usize,
        /// Limit including the terminating NUL.
        max: usize,
    },
    /// Writing the command line into guest memory failed.
    #[error("failed to write the kernel command line")]
    WriteCmdline(#[source] GuestMemoryError),
    /// Guest memory has more discontiguous regions than the zero page's e820 table holds.
    #[error("guest memory map needs more than {0} e820 entries")]
    TooManyE820Entries(usize),
    /// Guest memory has no RAM from address 0 up past high memory.
    #[error("guest memory must start at 0 and extend past {HIMEM_START:#x}")]
    NoLowMemory,
    /// Writing the zero page failed.
    #[error("failed to write boot_params to guest memory")]
    WriteBootParams(#[source] GuestMemoryError),
}

type Result<T> = std::result::Result<T, BootError>;

/// Kind of kernel image that was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// Uncompressed ELF `vmlinux`.
    Elf,
    /// Compressed `bzImage`.
    BzImage,
}

/// Where the kernel was loaded and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct KernelLoad {
    /// Image format.
    pub format: KernelFormat,
    /// 64-bit entry point: put it in RIP (see `setup_regs`).
    pub entry: GuestAddress,
    /// First guest address of the loaded image.
    pub kernel_start: GuestAddress,
    /// First guest address past the image and, for a bzImage, past the area it decompresses
    /// into; the initrd is placed above it.
    pub kernel_end: u64,
    /// The bzImage setup header to copy into `boot_params` (`None` for ELF).
    pub setup_header: Option<setup_header>,
}

/// First address past the contiguous guest RAM that starts at 0, capped at the MMIO gap.
fn low_ram_end<M: GuestMemoryBackend>(mem: &M) -> u64 {
    let mut end = 0u64;
    while let Some(region) = mem.find_region(GuestAddress(end)) {
        let next = region.start_addr().raw_value() + region.len();
        if next <= end {
            break;
        }
        end = next;
    }
    end.min(MMIO_GAP_START)
}

/// Checks that `[start, end)` is RAM in the low region, above the boot structures.
fn check_fits(start: u64, end: u64, ram_end: u64) -> Result<()> {
    if start < HIMEM_START || end > ram_end || end < start {
        return Err(BootError::KernelDoesNotFit {
            start,
            end,
            ram_end,
        });
    }
    Ok(())
}

fn le_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Reads `buf.len()` bytes at `offset`, returning `false` if the file is shorter.
fn read_at<F: Read + Seek>(f: &mut F, offset: u64, buf: &mut [u8]) -> Result<bool> {
    f.seek(SeekFrom::Start(offset))
        .map_err(BootError::ReadKernel)?;
    match f.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(BootError::ReadKernel(e)),
    }
}

/// Loads a kernel image into guest memory: an ELF `vmlinux` at its physical addresses, or a
/// bzImage's protected-mode kernel at [`HIMEM_START`]. Returns the 64-bit entry point and the
/// setup header to pass to [`configure_system`].
pub fn load_kernel<M, F>(mem: &M, kernel: &mut F) -> Result<KernelLoad>
where
    M: GuestMemoryBackend,
    F: Read + Seek + ReadVolatile,
{
    let mut magic = [0u8; 4];
    if read_at(kernel, 0, &mut magic)? && magic == *b"\x7fELF" {
        return load_elf(mem, kernel);
    }
    let mut hdr = setup_header::default();
    if read_at(kernel, SETUP_HEADER_OFFSET, hdr.as_mut_slice())? && hdr.header == KERNEL_HDR_MAGIC {
        return load_bzimage(mem, kernel, hdr);
    }
    Err(BootError::UnknownKernelFormat)
}

fn load_elf<M, F>(mem: &M, kernel: &mut F) -> Result<KernelLoad>
where
    M: GuestMemoryBackend,
    F: Read + Seek + ReadVolatile,
{
    const EHDR_SIZE: usize = 64;
    const PHDR_SIZE: usize = 56;
    const PT_LOAD: u32 = 1;
    const EM_X86_64: u16 = 62;

    let mut ehdr = [0u8; EHDR_SIZE];
    if !read_at(kernel, 0, &mut ehdr)? {
        return Err(BootError::ElfTruncated);
    }
    // EI_CLASS = ELFCLASS64, EI_DATA = little endian, e_machine = x86_64.
    if ehdr[4] != 2 || ehdr[5] != 1 || le_u16(&ehdr, 0x12) != EM_X86_64 {
        return Err(BootError::ElfNotX86_64);
    }
    let entry = le_u64(&ehdr, 0x18);
    let phoff = le_u64(&ehdr, 0x20);
    let phentsize = usize::from(le_u16(&ehdr, 0x36));
    let phnum = u64::from(le_u16(&ehdr, 0x38));
    if phentsize != PHDR_SIZE {
        return Err(BootError::ElfNotX86_64);
    }

    let ram_end = low_ram_end(mem);
    let (mut start, mut end) = (u64::MAX, 0u64);
    let mut entry_ok = false;
    for i in 0..phnum {
        let mut ph = [0u8; PHDR_SIZE];
        let off = phoff
            .checked_add(i * PHDR_SIZE as u64)
            .ok_or(BootError::ElfTruncated)?;
        if !read_at(kernel, off, &mut ph)? {
            return Err(BootError::ElfTruncated);
        }
        let (p_type, paddr, filesz, memsz) = (
            le_u32(&ph, 0),
            le_u64(&ph, 24),
            le_u64(&ph, 32),
            le_u64(&ph, 40),
        );
        if p_type != PT_LOAD || memsz.max(filesz) == 0 {
            continue;
        }
        if paddr < HIMEM_START {
            return Err(BootError::ElfSegmentInLowMemory { addr: paddr });
        }
        let seg_end = paddr
            .checked_add(memsz.max(filesz))
            .ok_or(BootError::KernelDoesNotFit {
                start: paddr,
                end: u64::MAX,
                ram_end,
            })?;
        check_fits(paddr, seg_end, ram_end)?;
        entry_ok |= (paddr..seg_end).contains(&entry);
        start = start.min(paddr);
        end = end.max(seg_end);
    }
    if !entry_ok {
        return Err(BootError::ElfBadEntry(entry));
    }

    let res =
        Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))).map_err(BootError::Load)?;
    Ok(KernelLoad {
        format: KernelFormat::Elf,
        entry: GuestAddress(entry),
        kernel_start: GuestAddress(start),
        kernel_end: end.max(res.kernel_end),
        setup_header: res.setup_header,
    })
}

fn load_bzimage<M, F>(mem: &M, kernel: &mut F, hdr: setup_header) -> Result<KernelLoad>
where
    M: GuestMemoryBackend,
    F: Read + Seek + ReadVolatile,
{
    let version = hdr.version;
    if version < 0x020c {
        return Err(BootError::BzImageTooOld(version));
    }
    if hdr.xloadflags & XLF_KERNEL_64 == 0 || hdr.loadflags & LOADED_HIGH == 0 {
        return Err(BootError::BzImageNot64Bit);
    }
    let file_len = kernel
        .seek(SeekFrom::End(0))
        .map_err(BootError::ReadKernel)?;
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    let payload = file_len
        .checked_sub(setup_size)
        .ok_or(BootError::UnknownKernelFormat)?;

    // The protected-mode kernel goes at HIMEM_START; it decompresses itself into
    // [pref_address, pref_address + init_size) (at least that much memory must be RAM).
    let ram_end = low_ram_end(mem);
    let load_end = HIMEM_START + payload;
    check_fits(HIMEM_START, load_end, ram_end)?;
    let pref = hdr.pref_address.max(HIMEM_START);
    let decompress_end = pref.saturating_add(u64::from(hdr.init_size));
    check_fits(pref, decompress_end, ram_end)?;

    let res = BzImage::load(
        mem,
        Some(GuestAddress(HIMEM_START)),
        kernel,
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(BootError::Load)?;
    Ok(KernelLoad {
        format: KernelFormat::BzImage,
        entry: GuestAddress(HIMEM_START + BZIMAGE_64BIT_ENTRY_OFFSET),
        kernel_start: GuestAddress(HIMEM_START),
        kernel_end: res.kernel_end.max(decompress_end),
        setup_header: res.setup_header,
    })
}

/// Loads an initrd page-aligned at the top of low RAM (below the MMIO gap and the kernel's
/// `initrd_addr_max`) and above the kernel. Returns its address and size.
pub fn load_initrd<M, F>(
    mem: &M,
    initrd: &mut F,
    kernel: &KernelLoad,
) -> Result<(GuestAddress, usize)>
where
    M: GuestMemoryBackend,
    F: Read + Seek + ReadVolatile,
{
    let size = initrd
        .seek(SeekFrom::End(0))
        .map_err(BootError::ReadInitrd)?;
    initrd.rewind().map_err(BootError::ReadInitrd)?;
    if size == 0 {
        return Err(BootError::EmptyInitrd);
    }
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let limit = low_ram_end(mem).min(addr_max.saturating_add(1));
    let kernel_end = kernel.kernel_end.next_multiple_of(PAGE_SIZE);
    let too_big = BootError::InitrdDoesNotFit {
        size,
        kernel_end,
        limit,
    };
    let addr = match limit.checked_sub(size) {
        Some(a) => a & !(PAGE_SIZE - 1),
        None => return Err(too_big),
    };
    if addr < kernel_end {
        return Err(too_big);
    }
    let len = usize::try_from(size).map_err(|_| BootError::EmptyInitrd)?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, len)
        .map_err(BootError::WriteInitrd)?;
    Ok((GuestAddress(addr), len))
}

/// Writes `cmdline` NUL-terminated at [`CMDLINE_START`] and returns its length including the
/// NUL. The limit is [`CMDLINE_MAX_SIZE`], or less if the bzImage header says so.
pub fn write_cmdline<M: GuestMemoryBackend>(
    mem: &M,
    cmdline: &str,
    setup_header: Option<&setup_header>,
) -> Result<usize> {
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    let max = setup_header
        .map(|h| h.cmdline_size)
        .filter(|&m| m != 0)
        .map_or(CMDLINE_MAX_SIZE, |m| {
            (m as usize).saturating_add(1).min(CMDLINE_MAX_SIZE)
        });
    if bytes.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: bytes.len(),
            max,
        });
    }
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(BootError::WriteCmdline)?;
    Ok(bytes.len())
}

/// Writes the command line ([`write_cmdline`]) and the zero page ([`write_boot_params`]);
/// returns the zero page address, to be passed in RSI (see `setup_regs`).
pub fn configure_system<M: GuestMemoryBackend>(
    mem: &M,
    cmdline: &str,
    initrd: Option<(GuestAddress, usize)>,
    setup_header: Option<setup_header>,
) -> Result<GuestAddress> {
    let len = write_cmdline(mem, cmdline, setup_header.as_ref())?;
    write_boot_params(mem, GuestAddress(CMDLINE_START), len, initrd, setup_header)
}

/// The e820 map for `mem`: conventional RAM below [`EBDA_START`], the MP table area reserved,
/// and every RAM byte from [`HIMEM_START`] up (below the gap and from 4 GiB).
pub fn e820_map<M: GuestMemoryBackend>(mem: &M) -> Vec<(u64, u64, u32)> {
    let mut map = Vec::new();
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start + region.len();
        if start < EBDA_START {
            map.push((start, end.min(EBDA_START) - start, E820_RAM));
        }
        let high = start.max(HIMEM_START);
        if end > high {
            map.push((high, end - high, E820_RAM));
        }
    }
    map.push((EBDA_START, LOW_MEM_END - EBDA_START, E820_RESERVED));
    map.sort_unstable();
    map
}

/// Writes the zero page (`boot_params`) at [`ZERO_PAGE_START`] and returns its address.
/// `cmdline_size` is the length written by [`write_cmdline`] (with NUL); `setup_header` is the
/// bzImage header from [`KernelLoad`], if any. The e820 map comes from [`e820_map`].
pub fn write_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    cmdline_addr: GuestAddress,
    cmdline_size: usize,
    initrd: Option<(GuestAddress, usize)>,
    setup_header: Option<setup_header>,
) -> Result<GuestAddress> {
    if low_ram_end(mem) <= HIMEM_START {
        return Err(BootError::NoLowMemory);
    }
    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    let cmd = cmdline_addr.raw_value();
    params.hdr.cmd_line_ptr = cmd as u32;
    params.ext_cmd_line_ptr = (cmd >> 32) as u32;
    params.hdr.cmdline_size = cmdline_size.saturating_sub(1) as u32;
    if let Some((addr, size)) = initrd {
        let (addr, size) = (addr.raw_value(), size as u64);
        params.hdr.ramdisk_image = addr as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }

    let map = e820_map(mem);
    if map.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820Entries(params.e820_table.len()));
    }
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = map.len() as u8;

    let zero_page = GuestAddress(ZERO_PAGE_START);
    mem.write_obj(params, zero_page)
        .map_err(BootError::WriteBootParams)?;
    Ok(zero_page)
}

#[cfg(test)]
#[path = "boot_tests.rs"]
mod tests;
