//! An in-memory disk: for tests, benchmarks and scratch disks.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{BackendIdentity, BlockBackend, DiskError, Result, check_range};

/// A disk held in a `Vec<u8>`.
#[derive(Debug)]
pub struct MemBackend {
    data: RwLock<Vec<u8>>,
    read_only: bool,
    name: String,
}

impl MemBackend {
    /// A zero-filled, writable disk of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self::from_vec(vec![0; size])
    }

    /// A writable disk with the given content.
    pub fn from_vec(data: Vec<u8>) -> Self {
        Self {
            data: RwLock::new(data),
            read_only: false,
            name: "mem".into(),
        }
    }

    /// Makes the disk read-only (or writable again).
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Sets the name reported as the identity's location.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// A copy of the whole disk content.
    pub fn contents(&self) -> Vec<u8> {
        self.read().clone()
    }

    fn read(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.data.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        self.read().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = self.read();
        check_range(offset, buf.len(), data.len() as u64)?;
        // In range of a Vec's length, so both fit in usize.
        let start = offset as usize;
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        let mut data = self.write();
        check_range(offset, buf.len(), data.len() as u64)?;
        let start = offset as usize;
        data[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn identity(&self) -> BackendIdentity {
        BackendIdentity {
            kind: "mem".into(),
            location: self.name.clone(),
            size: self.size(),
            stamp: None,
            inner: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_bounds_and_ro() {
        let m = MemBackend::new(1024);
        m.write_at(&[1, 2, 3], 510).unwrap();
        let mut b = [0u8; 4];
        m.read_at(&mut b, 509).unwrap();
        assert_eq!(b, [0, 1, 2, 3]);
        assert!(matches!(
            m.read_at(&mut b, 1021),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(m.write_at(&b, u64::MAX).is_err());
        let ro = MemBackend::new(512).with_read_only(true).with_name("x");
        assert!(matches!(ro.write_at(&b, 0), Err(DiskError::ReadOnly)));
        assert!(ro.read_only());
        assert_eq!(ro.identity().location, "x");
        assert_eq!(ro.identity().size, 512);
    }
}
