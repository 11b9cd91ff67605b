//! Guest physical memory layout of an x86_64 VM booted with the Linux 64-bit boot protocol.
//!
//! ```text
//! 0x0000_0000 ┬ real-mode IVT / BDA (unused)
//! 0x0000_0500 │ GDT (4 entries), IDT (empty) at 0x520
//! 0x0000_7000 │ zero page (`boot_params`)
//! 0x0000_8ff0 │ boot stack (grows down)
//! 0x0000_9000 │ identity page tables: PML4, PDPT, 4 × PD (2 MiB pages, first 4 GiB)
//! 0x0002_0000 │ kernel command line (CMDLINE_MAX_SIZE bytes)
//! 0x0009_fc00 │ MP floating pointer + MP configuration table (e820 reserved)
//! 0x000a_0000 │ legacy VGA / BIOS hole (not RAM in the e820 map)
//! 0x0010_0000 ┼ HIMEM_START: kernel (bzImage here; a vmlinux at its own p_paddr, usually 16 MiB),
//!             │ initrd at the top of low RAM
//! 0xc000_0000 ┼ 32-bit MMIO gap: virtio-mmio windows from 0xd000_0000, IOAPIC, LAPIC
//! 0x1_0000_0000 ┴ RAM above 3 GiB continues here
//! ```

use vm_memory::GuestAddress;

/// Start of the GDT written by `setup_sregs` (4 entries of 8 bytes).
pub const GDT_START: u64 = 0x500;
/// Start of the (empty, one null entry) IDT written by `setup_sregs`.
pub const IDT_START: u64 = 0x520;
/// The zero page: Linux `struct boot_params`, handed to the kernel in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (RSP and RBP) of the boot vCPU; the stack grows down into
/// `0x8000..0x8ff0`, above the zero page.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table of the boot identity mapping (CR3).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity mapping.
pub const PDPTE_START: u64 = 0xa000;
/// First of [`BOOT_PD_COUNT`] consecutive page directories (2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Number of page directories: each maps 1 GiB, so the boot page tables identity-map the
/// first 4 GiB, which holds everything the kernel touches before it builds its own tables.
pub const BOOT_PD_COUNT: u64 = 4;
/// Guest address of the kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted, including its terminating NUL. This is x86 Linux's
/// `COMMAND_LINE_SIZE`: the kernel would truncate anything longer.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; conventional RAM in the e820 map ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// Location of the MP floating pointer structure, followed by the MP configuration table.
/// Linux scans the last KiB of base memory (639 KiB..640 KiB) for it.
pub const MPTABLE_START: u64 = EBDA_START;
/// End of conventional memory (start of the legacy VGA/BIOS hole).
pub const LOW_MEM_END: u64 = 0xa0000;
/// Start of high memory, where a bzImage's protected-mode kernel is loaded.
pub const HIMEM_START: u64 = 0x0010_0000;
/// Start of the 32-bit MMIO gap; RAM that would overlap it is placed from 4 GiB up.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO gap; also the first address past 32 bits.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Size of the 32-bit MMIO gap.
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;
/// First virtio-mmio device window; device `n` lives at `VIRTIO_MMIO_START + n * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Base of the IOAPIC's MMIO registers (KVM's in-kernel IOAPIC lives here).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Base of the local APIC's MMIO registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// Highest address an initrd may end at when the kernel gives no `initrd_addr_max`
/// (the value every x86_64 kernel advertises is `0x7fff_ffff`).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

// The fixed boot structures must not overlap (checked at compile time).
const _: () = {
    assert!(GDT_START + 32 <= IDT_START && IDT_START + 8 <= ZERO_PAGE_START);
    assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER && BOOT_STACK_POINTER < PML4_START);
    assert!(PML4_START < PDPTE_START && PDPTE_START < PDE_START);
    assert!(PDE_START + BOOT_PD_COUNT * 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= MPTABLE_START);
    assert!(MPTABLE_START < LOW_MEM_END && LOW_MEM_END <= HIMEM_START);
    assert!(MMIO_GAP_START <= VIRTIO_MMIO_START && VIRTIO_MMIO_START < IOAPIC_START);
    assert!(IOAPIC_START < APIC_START && APIC_START < MMIO_GAP_END);
};

/// Guest address of virtio-mmio window `index`, or `None` if it would leave the window area
/// below the IOAPIC.
pub fn virtio_mmio_addr(index: u32) -> Option<GuestAddress> {
    let addr = VIRTIO_MMIO_START.checked_add(u64::from(index).checked_mul(VIRTIO_MMIO_SIZE)?)?;
    (addr + VIRTIO_MMIO_SIZE <= IOAPIC_START).then_some(GuestAddress(addr))
}

/// The guest RAM regions for a VM of `size_bytes` bytes: one region from 0 up to the MMIO gap,
/// and whatever does not fit below the gap from 4 GiB up.
pub fn arch_memory_regions(size_bytes: u64) -> Vec<(GuestAddress, usize)> {
    if size_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), size_bytes as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (
                GuestAddress(MMIO_GAP_END),
                (size_bytes - MMIO_GAP_START) as usize,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_small_guest() {
        let r = arch_memory_regions(256 << 20);
        assert_eq!(r, vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn regions_exactly_gap() {
        let r = arch_memory_regions(MMIO_GAP_START);
        assert_eq!(r, vec![(GuestAddress(0), MMIO_GAP_START as usize)]);
    }

    #[test]
    fn regions_big_guest() {
        let r = arch_memory_regions(6 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        let total: usize = r.iter().map(|(_, s)| s).sum();
        assert_eq!(total as u64, 6 << 30);
    }

    #[test]
    fn virtio_windows() {
        assert_eq!(virtio_mmio_addr(0), Some(GuestAddress(0xd000_0000)));
        assert_eq!(virtio_mmio_addr(2), Some(GuestAddress(0xd000_2000)));
        assert!(virtio_mmio_addr(u32::MAX).is_none());
    }
}
