//! Initial vCPU register state for the 64-bit boot protocol: long mode with flat segments from a
//! small GDT, an empty IDT, identity-mapped page tables, RIP at the kernel entry and RSI pointing
//! at the zero page.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use super::layout::{
    BOOT_PD_COUNT, BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START,
};

/// CR0: protected mode enable.
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0: extension type (always 1 on modern CPUs).
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0: native x87 error reporting.
pub const X86_CR0_NE: u64 = 1 << 5;
/// CR0: not write-through.
pub const X86_CR0_NW: u64 = 1 << 29;
/// CR0: cache disable.
pub const X86_CR0_CD: u64 = 1 << 30;
/// CR0: paging enable.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension.
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// GDT flags of the 64-bit code segment (G, L, present, DPL 0, execute/read, accessed).
pub const GDT_CODE64: u16 = 0xa09b;
/// GDT flags of the data segment (G, D/B, present, DPL 0, read/write, accessed).
pub const GDT_DATA: u16 = 0xc093;
/// GDT flags of the TSS (G, present, 64-bit busy TSS).
pub const GDT_TSS: u16 = 0x808b;

/// Page table entry bits: present | writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page directory entry bits for a 2 MiB page: present | writable | page size.
const PDE_2M_PAGE: u64 = 0x83;
/// Entries per page table.
const ENTRIES_PER_TABLE: u64 = 512;

/// Errors while setting up the boot vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// KVM_SET_REGS failed.
    #[error("KVM_SET_REGS failed")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// KVM_SET_FPU failed.
    #[error("KVM_SET_FPU failed")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// KVM_GET_SREGS failed.
    #[error("KVM_GET_SREGS failed")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("KVM_SET_SREGS failed")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// Writing the GDT or IDT to guest memory failed.
    #[error("failed to write the GDT/IDT to guest memory")]
    WriteDescriptorTables(#[source] GuestMemoryError),
    /// Writing the boot page tables to guest memory failed.
    #[error("failed to write the boot page tables to guest memory")]
    WritePageTables(#[source] GuestMemoryError),
}

type Result<T> = std::result::Result<T, RegsError>;

/// Encodes a GDT descriptor from `flags` (access byte in bits 7:0, G/DB/L/AVL in bits 15:12),
/// a 32-bit `base` and a 20-bit `limit`.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// Decodes GDT descriptor `entry` at index `table_index` into the `kvm_segment` that KVM loads
/// into a segment register's hidden part (selector = index * 8, RPL 0).
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let bit = |shift: u32| ((entry >> shift) & 1) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = bit(55);
    let present = bit(47);
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT: null, 64-bit code (selector 0x8), data (0x10), TSS (0x18).
pub fn boot_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(GDT_CODE64, 0, 0xfffff),
        gdt_entry(GDT_DATA, 0, 0xfffff),
        gdt_entry(GDT_TSS, 0, 0xfffff),
    ]
}

/// Sets the general-purpose registers: RIP = `entry`, RSI = `boot_params` (zero page address),
/// RSP = RBP = the boot stack, RFLAGS = 2 (reserved bit only, interrupts off).
pub fn setup_regs(vcpu: &VcpuFd, entry: u64, boot_params: u64) -> Result<()> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: boot_params,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

/// Sets the x87/SSE state to its reset defaults (FCW 0x37f, MXCSR 0x1f80).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

/// Writes the GDT, IDT and page tables to guest memory and puts the vCPU in 64-bit long mode
/// with flat segments (CR0 PE|PG|ET|NE, CR4 PAE, EFER LME|LMA, CR3 = PML4).
pub fn setup_sregs<M: GuestMemoryBackend>(mem: &M, vcpu: &VcpuFd) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    configure_segments_and_sregs(mem, &mut sregs)?;
    setup_page_tables(mem, &mut sregs)?;
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)
}

/// Writes the GDT and IDT and fills the segment, descriptor-table and mode fields of `sregs`.
pub fn configure_segments_and_sregs<M: GuestMemoryBackend>(
    mem: &M,
    sregs: &mut kvm_sregs,
) -> Result<()> {
    let gdt = boot_gdt();
    let mut bytes = Vec::with_capacity(gdt.len() * 8);
    for entry in gdt {
        bytes.extend_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(GDT_START))
        .map_err(RegsError::WriteDescriptorTables)?;
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(RegsError::WriteDescriptorTables)?;

    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (bytes.len() - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;

    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment_from_gdt(gdt[3], 3);

    sregs.cr0 = (sregs.cr0 & !(X86_CR0_CD | X86_CR0_NW)) | X86_CR0_PE | X86_CR0_ET | X86_CR0_NE;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

/// Writes identity page tables mapping the first `BOOT_PD_COUNT` GiB with 2 MiB pages and
/// turns on paging in `sregs` (CR3, CR4.PAE, CR0.PG).
pub fn setup_page_tables<M: GuestMemoryBackend>(mem: &M, sregs: &mut kvm_sregs) -> Result<()> {
    mem.write_obj(PDPTE_START | PTE_PRESENT_RW, GuestAddress(PML4_START))
        .map_err(RegsError::WritePageTables)?;
    let mut pdpt = Vec::with_capacity(BOOT_PD_COUNT as usize * 8);
    for i in 0..BOOT_PD_COUNT {
        pdpt.extend_from_slice(&((PDE_START + i * 0x1000) | PTE_PRESENT_RW).to_le_bytes());
    }
    mem.write_slice(&pdpt, GuestAddress(PDPTE_START))
        .map_err(RegsError::WritePageTables)?;
    let mut pd = Vec::with_capacity((BOOT_PD_COUNT * ENTRIES_PER_TABLE * 8) as usize);
    for i in 0..BOOT_PD_COUNT * ENTRIES_PER_TABLE {
        pd.extend_from_slice(&((i << 21) | PDE_2M_PAGE).to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PDE_START))
        .map_err(RegsError::WritePageTables)?;

    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PG;
    Ok(())
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::VcpuExit;
    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn gdt_entries_encode() {
        assert_eq!(gdt_entry(0, 0, 0), 0);
        assert_eq!(gdt_entry(GDT_CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(GDT_DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(GDT_TSS, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        assert_eq!(
            gdt_entry(0x0093, 0x1234_5678, 0xabcde),
            0x120a_9334_5678_bcde
        );
    }

    #[test]
    fn segment_from_gdt_round_trips() {
        let code = kvm_segment_from_gdt(gdt_entry(GDT_CODE64, 0, 0xfffff), 1);
        assert_eq!(
            (code.selector, code.type_, code.present, code.dpl, code.s),
            (8, 0xb, 1, 0, 1)
        );
        assert_eq!((code.l, code.db, code.g, code.unusable), (1, 0, 1, 0));
        assert_eq!((code.base, code.limit), (0, 0xffff_ffff));

        let data = kvm_segment_from_gdt(gdt_entry(GDT_DATA, 0, 0xfffff), 2);
        assert_eq!(
            (data.selector, data.type_, data.l, data.db),
            (0x10, 3, 0, 1)
        );

        let tss = kvm_segment_from_gdt(gdt_entry(GDT_TSS, 0, 0xfffff), 3);
        assert_eq!(
            (tss.selector, tss.type_, tss.s, tss.present),
            (0x18, 0xb, 0, 1)
        );

        let odd = kvm_segment_from_gdt(gdt_entry(0x1093, 0x1234_5678, 0xabcde), 5);
        assert_eq!(
            (odd.base, odd.limit, odd.g, odd.avl),
            (0x1234_5678, 0xabcde, 0, 1)
        );

        let null = kvm_segment_from_gdt(0, 0);
        assert_eq!((null.present, null.unusable), (0, 1));
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let m = mem(1 << 20);
        let mut sregs = kvm_sregs::default();
        setup_page_tables(&m, &mut sregs).unwrap();
        let read = |a: u64| m.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(read(PML4_START), PDPTE_START | 3);
        assert_eq!(read(PDPTE_START + 3 * 8), (PDE_START + 0x3000) | 3);
        assert_eq!(read(PDE_START), 0x83);
        assert_eq!(read(PDE_START + 8), 0x20_0000 | 0x83);
        let last = PDE_START + (4 * 512 - 1) * 8;
        assert_eq!(read(last), 0xffe0_0000 | 0x83);
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
    }

    #[test]
    fn segments_and_gdt_in_memory() {
        let m = mem(1 << 20);
        let mut sregs = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        configure_segments_and_sregs(&m, &mut sregs).unwrap();
        for (i, e) in boot_gdt().iter().enumerate() {
            let got: u64 = m.read_obj(GuestAddress(GDT_START + 8 * i as u64)).unwrap();
            assert_eq!(got, *e);
        }
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (GDT_START, 31));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (IDT_START, 7));
        assert_eq!(
            (sregs.cs.selector, sregs.ss.selector, sregs.tr.selector),
            (8, 0x10, 0x18)
        );
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET | X86_CR0_NE);
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
    }

    /// Runs a few instructions of 64-bit code with this module's register setup: a store above
    /// 1 GiB (second page directory) and a port write that exits to us.
    #[test]
    fn kvm_runs_long_mode_code() {
        let Some(kvm) = crate::arch::x86_64::test_support::kvm_or_skip() else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let size = (1usize << 30) + (4 << 20);
        let m = mem(size);
        let host = m.get_host_address(GuestAddress(0)).unwrap();
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: size as u64,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: `host` is the start of `m`'s single mapping of `size` bytes, which outlives
        // the VM (both are dropped at the end of this test, the VM first).
        unsafe { vm.set_user_memory_region(region).unwrap() };

        let code: &[u8] = &[
            0xc7, 0x04, 0x25, 0x00, 0x10, 0x00, 0x40, 0xef, 0xbe, 0xad,
            0xde, // mov dword [0x40001000], 0xdeadbeef
            0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xb0, 0x41, // mov al, 'A'
            0xee, // out dx, al
            0xf4, // hlt
        ];
        m.write_slice(code, GuestAddress(0x10_0000)).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        setup_regs(&vcpu, 0x10_0000, 0x7000).unwrap();
        setup_fpu(&vcpu).unwrap();
        setup_sregs(&m, &vcpu).unwrap();

        let mut vcpu = vcpu;
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(port, data) => assert_eq!((port, data), (0x3f8, &b"A"[..])),
            other => panic!("unexpected exit {other:?}"),
        }
        let stored: u32 = m.read_obj(GuestAddress(0x4000_1000)).unwrap();
        assert_eq!(stored, 0xdead_beef);
        let regs = vcpu.get_regs().unwrap();
        assert_eq!((regs.rsi, regs.rsp), (0x7000, BOOT_STACK_POINTER));
        let sregs = vcpu.get_sregs().unwrap();
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_eq!(sregs.cs.l, 1);
    }
}
