//! Minimal userfaultfd bindings: the `linux/userfaultfd.h` structs and ioctls used by
//! [`LazyMemory`](super::LazyMemory), as thin safe wrappers over `libc`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// `UFFD_API`: the only API version.
/// Page size the ranges and chunks are aligned to.
pub(super) const PAGE_SIZE: usize = 4096;

const UFFD_API: u64 = 0xAA;
/// The ioctl type of userfaultfd ioctls (`UFFDIO`, also `USERFAULTFD_IOC`).
const UFFDIO: u64 = 0xAA;

const _UFFDIO_REGISTER: u64 = 0x00;
const _UFFDIO_WAKE: u64 = 0x02;
const _UFFDIO_COPY: u64 = 0x03;
const _UFFDIO_ZEROPAGE: u64 = 0x04;
const _UFFDIO_API: u64 = 0x3F;

/// `UFFDIO_REGISTER_MODE_MISSING`.
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;

/// `UFFD_EVENT_PAGEFAULT`.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// Bits of `uffdio_register.ioctls` that lazy restore needs on a registered range.
pub const NEEDED_RANGE_IOCTLS: u64 =
    (1 << _UFFDIO_WAKE) | (1 << _UFFDIO_COPY) | (1 << _UFFDIO_ZEROPAGE);

const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// The kernel's `_IOC(dir, type, nr, size)` encoding (x86, arm64, riscv layout).
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

/// `USERFAULTFD_IOC_NEW`: `_IO(USERFAULTFD_IOC, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = ioc(0, 0x00, 0);
const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, _UFFDIO_API, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    _UFFDIO_REGISTER,
    size_of::<UffdioRegister>(),
);
const UFFDIO_WAKE: u64 = ioc(IOC_READ, _UFFDIO_WAKE, size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, _UFFDIO_COPY, size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    _UFFDIO_ZEROPAGE,
    size_of::<UffdioZeropage>(),
);

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (packed in C, but every field is naturally aligned, so
/// `repr(C)` gives the same 32-byte layout). Only the page-fault view of the
/// union is spelled out: `arg0` = `pagefault.flags`, `arg1` = `pagefault.address`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// For page faults: `UFFD_PAGEFAULT_FLAG_*`.
    pub arg0: u64,
    /// For page faults: the faulting address.
    pub arg1: u64,
    arg2: u64,
}

const _: () = assert!(size_of::<UffdMsg>() == 32);
const _: () = assert!(size_of::<UffdioApi>() == 24);
const _: () = assert!(size_of::<UffdioRegister>() == 32);
const _: () = assert!(size_of::<UffdioCopy>() == 40);
const _: () = assert!(size_of::<UffdioZeropage>() == 32);
const _: () = assert!(UFFDIO_API == 0xC018_AA3F);
const _: () = assert!(UFFDIO_COPY == 0xC028_AA03);

/// How a copy or zero-page ioctl ended.
enum Fill {
    /// The whole range was filled.
    Done,
    /// Only this many bytes from the start were filled (the kernel stopped, e.g. at a
    /// page that already exists).
    Partial(usize),
    /// Nothing was filled: the kernel's error.
    Failed(io::Error),
}

/// An open, API-negotiated userfaultfd (non-blocking, close-on-exec).
pub struct Uffd {
    fd: OwnedFd,
}

/// Result of an ioctl: its return value, or `errno`.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Uffd {
    /// Opens a userfaultfd handling faults from kernel-mode accesses too (KVM's
    /// accesses on behalf of the guest are kernel-mode, so `UFFD_USER_MODE_ONLY` is
    /// not set): the `userfaultfd` system call, or `/dev/userfaultfd` if the system
    /// call is refused (`vm.unprivileged_userfaultfd = 0` without
    /// `CAP_SYS_PTRACE`).
    pub fn open() -> io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd system call takes one integer argument and only
        // returns a new file descriptor or an error.
        let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if ret >= 0 {
            ret as libc::c_int
        } else {
            let syscall_err = io::Error::last_os_error();
            let dev = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open("/dev/userfaultfd")
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("userfaultfd(2): {syscall_err}; /dev/userfaultfd: {e}"),
                    )
                })?;
            // SAFETY: USERFAULTFD_IOC_NEW on a /dev/userfaultfd descriptor takes the
            // open flags by value and returns a new file descriptor or an error.
            check(unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) })
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("userfaultfd(2): {syscall_err}; USERFAULTFD_IOC_NEW: {e}"),
                    )
                })?
        };
        // SAFETY: `fd` is a new descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Uffd { fd })
    }

    /// The `UFFDIO_API` handshake, asking for no optional features. Returns the
    /// kernel's supported feature bits.
    pub fn api(&self) -> io::Result<u64> {
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api`
        // is (repr(C), same layout), and which lives across the call.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_API as _, &mut api) })?;
        Ok(api.features)
    }

    /// Registers `[start, start + len)` in missing mode; returns the ioctls the
    /// kernel allows on the range (bit `n` = `_UFFDIO_*` number `n`).
    pub fn register_missing(&self, start: usize, len: usize) -> io::Result<u64> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`, which
        // `reg` is; it changes no memory of this process.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) })?;
        Ok(reg.ioctls)
    }

    /// `UFFDIO_COPY`: atomically maps new pages at `[dst, dst + src.len())` holding
    /// a copy of `src`, and wakes the threads waiting on them. Pages that already
    /// exist are never overwritten (the copy stops there).
    fn copy(&self, dst: usize, src: &[u8]) -> Fill {
        let mut copy = UffdioCopy {
            dst: dst as u64,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            ..Default::default()
        };
        // SAFETY: `copy` is a `struct uffdio_copy`; the kernel reads `src.len()`
        // bytes from `src`, which is a live buffer, and writes only pages that are
        // missing in a range registered with this userfaultfd (never memory Rust
        // code holds a reference to in this thread).
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut copy) };
        Self::fill_result(ret, copy.copy, src.len())
    }

    /// `UFFDIO_ZEROPAGE`: maps the zero page over the missing pages at the start of
    /// `[dst, dst + len)`, and wakes the threads waiting on them.
    fn zeropage(&self, dst: usize, len: usize) -> Fill {
        let mut zp = UffdioZeropage {
            range: UffdioRange {
                start: dst as u64,
                len: len as u64,
            },
            ..Default::default()
        };
        // SAFETY: `zp` is a `struct uffdio_zeropage`; the kernel only maps zero
        // pages where pages are missing in a registered range.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut zp) };
        Self::fill_result(ret, zp.zeropage, len)
    }

    fn fill_result(ret: libc::c_int, done: i64, len: usize) -> Fill {
        if ret == 0 {
            return Fill::Done;
        }
        let err = io::Error::last_os_error();
        match usize::try_from(done) {
            Ok(n) if n >= len => Fill::Done,
            Ok(n) if n > 0 => Fill::Partial(n),
            _ => Fill::Failed(err),
        }
    }

    /// `UFFDIO_WAKE`: wakes the threads waiting on faults in `[start, start + len)`.
    fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let mut range = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range`, which `range` is.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut range) })?;
        Ok(())
    }

    /// Reads the pending events into `msgs` without blocking; returns how many were
    /// read (0 if none is pending).
    pub fn read_events(&self, msgs: &mut [UffdMsg]) -> io::Result<usize> {
        // SAFETY: `msgs` is a live, writable buffer of `size_of_val(msgs)` bytes and
        // `UffdMsg` is plain data valid for any bytes.
        let ret = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                size_of_val(msgs),
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) => Ok(0),
                _ => Err(err),
            };
        }
        Ok(ret as usize / size_of::<UffdMsg>())
    }

    /// Fills `[dst, dst + len)` from `src` (or with the zero page), skipping pages that
    /// already exist, and makes sure every thread waiting on the range is woken.
    /// Returns the bytes placed.
    pub fn place(&self, dst: usize, len: usize, src: Option<&[u8]>) -> io::Result<usize> {
        let mut off = 0;
        let mut placed = 0;
        let mut skipped = false;
        let mut retries = 0;
        while off < len {
            let fill = match src {
                Some(src) => self.copy(dst + off, &src[off..len]),
                None => self.zeropage(dst + off, len - off),
            };
            match fill {
                Fill::Done => {
                    placed += len - off;
                    off = len;
                }
                Fill::Partial(n) => {
                    placed += n;
                    off += n;
                }
                Fill::Failed(e) => match e.raw_os_error() {
                    // The page exists (placed before, or discarded and refaulted):
                    // never overwrite it; wake its waiters below.
                    Some(libc::EEXIST) => {
                        off += PAGE_SIZE;
                        skipped = true;
                    }
                    // The address space is changing under us: try again.
                    Some(libc::EAGAIN) if retries < 1000 => {
                        retries += 1;
                        std::thread::yield_now();
                    }
                    _ => return Err(e),
                },
            }
        }
        if skipped {
            self.wake(dst, len)?;
        }
        Ok(placed)
    }

    /// The raw descriptor, for `poll`.
    pub fn raw_fd(&self) -> libc::c_int {
        self.fd.as_raw_fd()
    }

    /// Leaks the descriptor: the registrations stay, so threads blocked on
    /// unresolved faults stay blocked until the process exits.
    pub fn leak(self) {
        std::mem::forget(File::from(self.fd));
    }
}

/// Discards the pages of `[addr, addr + len)` (private anonymous memory reads as
/// zeros afterwards and its pages are missing again).
///
/// # Safety
///
/// The range must be memory the caller owns and whose contents it means to drop,
/// with no Rust reference into it.
pub unsafe fn discard(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: per this function's contract, dropping the range's contents breaks
    // no reference; madvise touches nothing outside the range.
    check(unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) })?;
    Ok(())
}

/// Waits up to `timeout_ms` (-1: forever) for `fds` to become readable; returns
/// which of them are.
pub fn poll_readable<const N: usize>(
    fds: [libc::c_int; N],
    timeout_ms: libc::c_int,
) -> io::Result<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `pfds` is a live array of `N` pollfd structs.
        let ret = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
        if ret >= 0 {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(pfds.map(|p| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0))
}
