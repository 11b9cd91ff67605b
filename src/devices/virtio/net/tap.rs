//! An existing tap device, opened non-blocking with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`
//! and a 12-byte vnet header (`struct virtio_net_hdr_v1`), so frames pass between the tap
//! and the virtqueues unchanged.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::queue::VNET_HDR_LEN;

/// Longest interface name Linux takes (IFNAMSIZ - 1).
pub const MAX_TAP_NAME: usize = 15;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// TUNSETOFFLOAD: the reader can take partial checksums.
pub const TUN_F_CSUM: u32 = 0x01;
/// TUNSETOFFLOAD: TCP segmentation offload, IPv4.
pub const TUN_F_TSO4: u32 = 0x02;
/// TUNSETOFFLOAD: TCP segmentation offload, IPv6.
pub const TUN_F_TSO6: u32 = 0x04;

/// Errors of opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("tap name {0:?}: must be 1 to {MAX_TAP_NAME} bytes, without '/' or whitespace")]
    BadName(String),
    /// No interface of that name exists (in this network namespace).
    #[error(
        "tap {0}: no such network interface (create it first, e.g. `ip tuntap add {0} mode tap`)"
    )]
    Missing(String),
    /// /dev/net/tun could not be opened.
    #[error("tap {name}: opening /dev/net/tun")]
    OpenTun {
        /// The tap.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An ioctl failed (the interface is not a tap, is busy, or not ours).
    #[error("tap {name}: {op}")]
    Ioctl {
        /// The tap.
        name: String,
        /// Which ioctl.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// An opened tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Checks a tap name (Linux interface name rules).
pub fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TAP_NAME
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if ok {
        Ok(())
    } else {
        Err(TapError::BadName(name.to_string()))
    }
}

impl Tap {
    /// Opens the existing tap `name`: refuses to create one (a missing tap is an error, as
    /// with Firecracker and Cloud Hypervisor given a tap name), sets the vnet header size
    /// and no offloads (they follow what the driver negotiates, [`Tap::set_offload`]).
    pub fn open(name: &str) -> Result<Self, TapError> {
        check_name(name)?;
        let cname = std::ffi::CString::new(name).map_err(|_| TapError::BadName(name.into()))?;
        // SAFETY: if_nametoindex reads the NUL-terminated string only.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::Missing(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` lays out in full.
        tap.ioctl(
            "TUNSETIFF",
            TUNSETIFF,
            &mut req as *mut IfReq as libc::c_ulong,
        )?;
        let mut hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        tap.ioctl(
            "TUNSETVNETHDRSZ",
            TUNSETVNETHDRSZ,
            &mut hdr as *mut libc::c_int as libc::c_ulong,
        )?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the offloads the reader (the guest) accepts: `TUN_F_*` bits.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        self.ioctl("TUNSETOFFLOAD", TUNSETOFFLOAD, libc::c_ulong::from(flags))
    }

    /// Runs one ioctl on the tap fd. Callers pass arguments valid for `req`.
    fn ioctl(
        &self,
        op: &'static str,
        req: libc::c_ulong,
        arg: libc::c_ulong,
    ) -> Result<(), TapError> {
        // SAFETY: the fd is open; every caller passes the argument the request expects
        // (a pointer to a live, correctly laid out value, or a plain integer).
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), req as _, arg) };
        if r < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                op,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame (vnet header first); `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (vnet header first).
    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("tap0").is_ok());
        assert!(check_name("a23456789012345").is_ok());
        assert!(check_name("a234567890123456").is_err());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("a b").is_err());
    }

    #[test]
    fn missing_tap_is_a_clear_error() {
        let e = Tap::open("vmmnosuchtap0").unwrap_err();
        assert!(matches!(e, TapError::Missing(_)), "{e}");
    }
}
