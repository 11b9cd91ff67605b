//! Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI finds its CPUs, the
//! IOAPIC and the routing of ISA interrupts.
//!
//! Written at [`MPTABLE_START`] (the last KiB of base memory, where Linux looks for the floating
//! pointer): the MP floating pointer structure, then the configuration table with one processor
//! entry per vCPU, an ISA bus, the IOAPIC, identity-mapped interrupt entries for IRQ
//! `0..=max_irq`, and the local interrupts (ExtINT on LINT0, NMI on LINT1 of every LAPIC).

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use super::layout::{APIC_START, HIMEM_START, IOAPIC_START, MPTABLE_START};

/// Largest vCPU count: APIC ids are 8 bits, 0xff is the broadcast id and the IOAPIC takes the id
/// after the last CPU.
pub const MAX_SUPPORTED_CPUS: u8 = 254;
/// Number of KVM IOAPIC input pins.
pub const IOAPIC_NUM_PINS: u32 = 24;
/// Highest IRQ routed by default: every IOAPIC pin (virtio-mmio devices use GSIs 5 and up).
pub const MAX_LEGACY_IRQ: u32 = IOAPIC_NUM_PINS - 1;

const MPF_INTEL_SIZE: usize = 16;
const MPC_TABLE_SIZE: usize = 44;
const MPC_CPU_SIZE: usize = 20;
const MPC_SMALL_ENTRY_SIZE: usize = 8;

const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MPC_APIC_USABLE: u8 = 1;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_FPU: u32 = 1 << 0;
const CPU_FEATURE_APIC: u32 = 1 << 9;
const MPC_SPEC: u8 = 4;
/// Destination APIC id meaning "all local APICs".
const ALL_LOCAL_APICS: u8 = 0xff;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Zero vCPUs.
    #[error("the MP table needs at least one CPU")]
    NoCpus,
    /// More vCPUs than APIC ids allow.
    #[error("{0} CPUs do not fit in an MP table (at most {MAX_SUPPORTED_CPUS})")]
    TooManyCpus(u8),
    /// More IRQs than IOAPIC pins.
    #[error("IRQ {0} has no IOAPIC pin (the IOAPIC has {IOAPIC_NUM_PINS})")]
    TooManyIrqs(u32),
    /// The table would not fit in guest memory below high memory.
    #[error("the MP table ({size} bytes at {MPTABLE_START:#x}) does not fit in guest memory")]
    NotEnoughMemory {
        /// Size of the table in bytes.
        size: usize,
    },
    /// Writing the table failed.
    #[error("failed to write the MP table to guest memory")]
    Write(#[source] GuestMemoryError),
}

type Result<T> = std::result::Result<T, MptableError>;

/// Two's-complement checksum byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Size in bytes of the MP floating pointer plus configuration table.
pub fn mptable_size(num_cpus: u8, max_irq: u32) -> usize {
    MPF_INTEL_SIZE
        + MPC_TABLE_SIZE
        + MPC_CPU_SIZE * usize::from(num_cpus)
        + MPC_SMALL_ENTRY_SIZE * (2 + max_irq as usize + 1 + 2)
}

/// Builds the configuration table entries (without header) and returns them with their count.
fn entries(num_cpus: u8, max_irq: u32) -> (Vec<u8>, u16) {
    let ioapic_id = num_cpus;
    let mut t = Vec::new();
    let mut count = 0u16;
    for cpu in 0..num_cpus {
        t.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION]);
        let bsp = if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        t.push(CPU_ENABLED | bsp);
        t.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        t.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        t.extend_from_slice(&[0; 8]);
        count += 1;
    }
    t.extend_from_slice(&[MP_BUS, 0]);
    t.extend_from_slice(b"ISA   ");
    t.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE]);
    t.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 2;
    for irq in 0..=max_irq as u8 {
        // Conforming polarity and trigger (ISA: edge, active high), bus 0 IRQ -> same pin.
        t.extend_from_slice(&[MP_INTSRC, MP_IRQ_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    for (kind, lint) in [(MP_IRQ_EXTINT, 0), (MP_IRQ_NMI, 1)] {
        t.extend_from_slice(&[MP_LINTSRC, kind, 0, 0, 0, 0, ALL_LOCAL_APICS, lint]);
        count += 1;
    }
    (t, count)
}

/// Writes the MP floating pointer and configuration table for `num_cpus` vCPUs (APIC ids
/// `0..num_cpus`, the IOAPIC gets id `num_cpus`) with IRQs `0..=max_irq` routed to the same
/// IOAPIC pins.
pub fn setup_mptable<M: GuestMemoryBackend>(mem: &M, num_cpus: u8, max_irq: u32) -> Result<()> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_SUPPORTED_CPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    if max_irq >= IOAPIC_NUM_PINS {
        return Err(MptableError::TooManyIrqs(max_irq));
    }
    let size = mptable_size(num_cpus, max_irq);
    if MPTABLE_START + size as u64 > HIMEM_START
        || !mem.check_range(GuestAddress(MPTABLE_START), size)
    {
        return Err(MptableError::NotEnoughMemory { size });
    }

    let table_addr = MPTABLE_START + MPF_INTEL_SIZE as u64;
    let mut mpf = Vec::with_capacity(MPF_INTEL_SIZE);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    // Length in 16-byte units, spec revision, checksum, feature bytes (0: table present).
    mpf.extend_from_slice(&[1, MPC_SPEC, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);

    let (body, count) = entries(num_cpus, max_irq);
    let length = (MPC_TABLE_SIZE + body.len()) as u16;
    let mut table = Vec::with_capacity(usize::from(length));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.extend_from_slice(&[MPC_SPEC, 0]);
    table.extend_from_slice(b"RUSTVMM ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum, reserved
    debug_assert_eq!(table.len(), MPC_TABLE_SIZE);
    table.extend_from_slice(&body);
    table[7] = checksum(&table);

    mpf.extend_from_slice(&table);
    debug_assert_eq!(mpf.len(), size);
    mem.write_slice(&mpf, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Parsed view of a written table: (cpu entries, ioapic ids, intsrc (busirq, pin), lints).
    #[allow(clippy::type_complexity)]
    fn parse(m: &GuestMemoryMmap) -> (Vec<(u8, u8)>, Vec<u8>, Vec<(u8, u8)>, Vec<(u8, u8)>) {
        let mut mpf = [0u8; 16];
        m.read_slice(&mut mpf, GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(&mpf[0..4], b"_MP_");
        assert_eq!(sum(&mpf), 0);
        let addr = u32::from_le_bytes(mpf[4..8].try_into().unwrap());
        let mut hdr = [0u8; 44];
        m.read_slice(&mut hdr, GuestAddress(u64::from(addr)))
            .unwrap();
        assert_eq!(&hdr[0..4], b"PCMP");
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        let count = u16::from_le_bytes([hdr[34], hdr[35]]);
        assert_eq!(
            u32::from_le_bytes(hdr[36..40].try_into().unwrap()),
            0xfee0_0000
        );
        let mut table = vec![0u8; len];
        m.read_slice(&mut table, GuestAddress(u64::from(addr)))
            .unwrap();
        assert_eq!(sum(&table), 0, "table checksum");

        let (mut cpus, mut ioapics, mut ints, mut lints) = (vec![], vec![], vec![], vec![]);
        let (mut off, mut seen) = (44, 0);
        while off < len {
            let e = &table[off..];
            off += match e[0] {
                MP_PROCESSOR => {
                    cpus.push((e[1], e[3]));
                    20
                }
                MP_BUS => {
                    assert_eq!(&e[2..8], b"ISA   ");
                    8
                }
                MP_IOAPIC => {
                    assert_eq!(u32::from_le_bytes(e[4..8].try_into().unwrap()), 0xfec0_0000);
                    ioapics.push(e[1]);
                    8
                }
                MP_INTSRC => {
                    assert_eq!(e[6], *ioapics.last().unwrap());
                    ints.push((e[5], e[7]));
                    8
                }
                MP_LINTSRC => {
                    lints.push((e[1], e[7]));
                    8
                }
                t => panic!("unknown entry type {t}"),
            };
            seen += 1;
        }
        assert_eq!(off, len);
        assert_eq!(seen, count);
        (cpus, ioapics, ints, lints)
    }

    #[test]
    fn two_cpus_parse_back() {
        let m = mem();
        setup_mptable(&m, 2, MAX_LEGACY_IRQ).unwrap();
        let (cpus, ioapics, ints, lints) = parse(&m);
        assert_eq!(
            cpus,
            vec![(0, CPU_ENABLED | CPU_BOOTPROCESSOR), (1, CPU_ENABLED)]
        );
        assert_eq!(ioapics, vec![2]);
        assert_eq!(ints.len(), 24);
        assert!(
            ints.iter()
                .enumerate()
                .all(|(i, &(s, d))| s == i as u8 && d == i as u8)
        );
        assert_eq!(lints, vec![(MP_IRQ_EXTINT, 0), (MP_IRQ_NMI, 1)]);
    }

    #[test]
    fn cpu_counts() {
        let m = mem();
        for n in [1u8, 3, 64, MAX_SUPPORTED_CPUS] {
            setup_mptable(&m, n, 15).unwrap();
            let (cpus, ioapics, ints, _) = parse(&m);
            assert_eq!(cpus.len(), usize::from(n));
            assert_eq!(ioapics, vec![n]);
            assert_eq!(ints.len(), 16);
        }
    }

    #[test]
    fn rejects_bad_input() {
        let m = mem();
        assert!(matches!(
            setup_mptable(&m, 0, 23),
            Err(MptableError::NoCpus)
        ));
        assert!(matches!(
            setup_mptable(&m, 255, 23),
            Err(MptableError::TooManyCpus(255))
        ));
        assert!(matches!(
            setup_mptable(&m, 1, 24),
            Err(MptableError::TooManyIrqs(24))
        ));
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9fc10)]).unwrap();
        assert!(matches!(
            setup_mptable(&small, 1, 23),
            Err(MptableError::NotEnoughMemory { .. })
        ));
    }
}
