//! Port-I/O and MMIO buses: address ranges mapped to devices that vCPU threads dispatch exits to.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::util::lock;

/// A device that answers reads and writes at offsets within its bus range.
///
/// Implementations must never panic on any offset or data length: both are guest-controlled.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of the bus module.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// Zero-length or wrapping range.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    dev: SharedDevice,
}

/// A set of non-overlapping address ranges, each served by one device.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `dev` at `[base, base + len)`.
    pub fn insert(&mut self, dev: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        if let Some((&b, e)) = self.ranges.range(..end).next_back()
            && b + e.len > base
        {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Entry { len, dev });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, e) = self.ranges.range(..=addr).next_back()?;
        let off = addr - base;
        if off.checked_add(size as u64)? <= e.len {
            Some((off, &e.dev))
        } else {
            None
        }
    }

    /// Dispatches a read; returns false (and leaves `data` untouched) if no device covers it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                lock(dev).read(off, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if no device covers it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                lock(dev).write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<u8>);
    impl BusDevice for Mem {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn dispatch_and_bounds() {
        let mut bus = Bus::new();
        let dev: SharedDevice = Arc::new(Mutex::new(Mem(vec![0; 16])));
        bus.insert(dev.clone(), 0x100, 16).unwrap();
        assert!(bus.insert(dev.clone(), 0x10f, 1).is_err());
        assert!(bus.insert(dev.clone(), 0xf8, 9).is_err());
        assert!(bus.insert(dev.clone(), 0, 0).is_err());
        assert!(bus.insert(dev.clone(), u64::MAX, 2).is_err());
        bus.insert(dev, 0x110, 4).unwrap();
        assert!(bus.write(0x104, &[1, 2]));
        let mut b = [0u8; 2];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [1, 2]);
        assert!(!bus.read(0x10f, &mut [0u8; 2]), "straddles the end");
        assert!(!bus.read(0xff, &mut [0u8; 1]));
        assert!(!bus.read(0x114, &mut [0u8; 1]));
    }
}
