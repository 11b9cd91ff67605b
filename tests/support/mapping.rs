//! An anonymous private memory mapping, untouched until used: memory whose first touch
//! costs a page fault (the snapshot bench's first-touch copy).

/// `len` bytes of anonymous private memory (`MAP_NORESERVE`), unmapped when dropped.
pub struct Mapping(*mut u8, usize);

impl Mapping {
    /// Maps `len` bytes; panics if mmap fails.
    pub fn new(len: usize) -> Self {
        // SAFETY: a fresh anonymous mapping; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap {len} bytes");
        Mapping(p as *mut u8, len)
    }

    /// The whole mapping.
    pub fn slice(&mut self) -> &mut [u8] {
        // SAFETY: we own the mapping of that length.
        unsafe { std::slice::from_raw_parts_mut(self.0, self.1) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, self.1) };
    }
}
