//! Local APIC setup: LINT0 delivers the legacy PIC's interrupts (ExtINT) and LINT1 delivers NMIs,
//! the virtual-wire configuration that the MP table describes and Linux expects on every CPU.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

/// Offset of the LVT LINT0 register in the LAPIC register page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register in the LAPIC register page.
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery mode NMI.
pub const APIC_MODE_NMI: u32 = 0x4;
/// LVT delivery mode ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors while programming the local APIC.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// KVM_GET_LAPIC failed.
    #[error("KVM_GET_LAPIC failed")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// KVM_SET_LAPIC failed.
    #[error("KVM_SET_LAPIC failed")]
    SetLapic(#[source] kvm_ioctls::Error),
    /// A register offset outside the LAPIC page or not 4-byte aligned.
    #[error("invalid LAPIC register offset {0:#x}")]
    BadOffset(usize),
}

type Result<T> = std::result::Result<T, InterruptError>;

fn reg_range(klapic: &kvm_lapic_state, offset: usize) -> Result<std::ops::Range<usize>> {
    let end = offset
        .checked_add(4)
        .filter(|&end| end <= klapic.regs.len() && offset.is_multiple_of(4))
        .ok_or(InterruptError::BadOffset(offset))?;
    Ok(offset..end)
}

/// Reads the 32-bit LAPIC register at `offset` from a KVM_GET_LAPIC image.
pub fn get_klapic_reg(klapic: &kvm_lapic_state, offset: usize) -> Result<u32> {
    let range = reg_range(klapic, offset)?;
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&klapic.regs[range]) {
        *b = *r as u8;
    }
    Ok(u32::from_le_bytes(bytes))
}

/// Writes the 32-bit LAPIC register at `offset` in a KVM_SET_LAPIC image.
pub fn set_klapic_reg(klapic: &mut kvm_lapic_state, offset: usize, value: u32) -> Result<()> {
    let range = reg_range(klapic, offset)?;
    for (r, b) in klapic.regs[range].iter_mut().zip(value.to_le_bytes()) {
        *r = b as _;
    }
    Ok(())
}

/// Replaces the delivery mode (bits 10:8) of an LVT register value.
pub fn set_apic_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | ((mode & 0x7) << 8)
}

/// Configures LINT0 as ExtINT and LINT1 as NMI on `vcpu`'s in-kernel LAPIC (the irqchip must
/// exist). Call once per vCPU before it first runs.
pub fn set_lint(vcpu: &VcpuFd) -> Result<()> {
    let mut klapic = vcpu.get_lapic().map_err(InterruptError::GetLapic)?;
    let lvt0 = get_klapic_reg(&klapic, APIC_LVT0)?;
    set_klapic_reg(
        &mut klapic,
        APIC_LVT0,
        set_apic_delivery_mode(lvt0, APIC_MODE_EXTINT),
    )?;
    let lvt1 = get_klapic_reg(&klapic, APIC_LVT1)?;
    set_klapic_reg(
        &mut klapic,
        APIC_LVT1,
        set_apic_delivery_mode(lvt1, APIC_MODE_NMI),
    )?;
    vcpu.set_lapic(&klapic).map_err(InterruptError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reg_round_trip() {
        let mut k = kvm_lapic_state::default();
        set_klapic_reg(&mut k, APIC_LVT0, 0xdead_beef).unwrap();
        assert_eq!(get_klapic_reg(&k, APIC_LVT0).unwrap(), 0xdead_beef);
        assert_eq!(k.regs[APIC_LVT0] as u8, 0xef);
        assert_eq!(k.regs[APIC_LVT0 + 3] as u8, 0xde);
        assert_eq!(get_klapic_reg(&k, APIC_LVT1).unwrap(), 0);
        set_klapic_reg(&mut k, 0x3fc, 7).unwrap();
        assert_eq!(get_klapic_reg(&k, 0x3fc).unwrap(), 7);
    }

    #[test]
    fn bad_offsets() {
        let mut k = kvm_lapic_state::default();
        for off in [0x400, 0x3fe, 0x351, usize::MAX] {
            assert!(matches!(
                get_klapic_reg(&k, off),
                Err(InterruptError::BadOffset(_))
            ));
            assert!(set_klapic_reg(&mut k, off, 1).is_err());
        }
    }

    #[test]
    fn delivery_mode() {
        assert_eq!(
            set_apic_delivery_mode(0x0001_0000, APIC_MODE_EXTINT),
            0x0001_0700
        );
        assert_eq!(
            set_apic_delivery_mode(0x0001_07ff, APIC_MODE_NMI),
            0x0001_04ff
        );
    }

    #[test]
    fn kvm_set_lint() {
        let Some(kvm) = crate::arch::x86_64::test_support::kvm_or_skip() else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        set_lint(&vcpu).unwrap();
        let k = vcpu.get_lapic().unwrap();
        assert_eq!(
            (get_klapic_reg(&k, APIC_LVT0).unwrap() >> 8) & 7,
            APIC_MODE_EXTINT
        );
        assert_eq!(
            (get_klapic_reg(&k, APIC_LVT1).unwrap() >> 8) & 7,
            APIC_MODE_NMI
        );
    }
}
