//! virtio-blk request processing (virtio 1.x §5.2.6), as a pure function of a descriptor chain,
//! guest memory and a backend.
//!
//! Framing follows the spec: the device-readable part of a chain starts with the 16-byte
//! header (then, for OUT, the data); the device-writable part holds the data for IN/GET_ID
//! and ends with the status byte. Descriptor boundaries inside each part do not matter.
//! Every malformed request ends with IOERR or UNSUPP (or, when there is nowhere to put a
//! status byte, with nothing written at all); none can make the device fail.

use std::ops::Deref;

use log::debug;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::gate::{Ungated, WriteGate};
use crate::disk::{BlockBackend, DiskError, SECTOR_SIZE};

/// Length of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_LEN: u64 = 16;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of the device ID returned by GET_ID.
pub const DISK_ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Largest descriptor the device accepts (advertised as `size_max`).
pub const MAX_SEGMENT_BYTES: u32 = 1 << 20;
/// Most data segments in a request (advertised as `seg_max`).
pub const MAX_SEGMENTS: u32 = 128;
/// Most descriptors in a chain: the data segments plus header and status.
const MAX_DESCRIPTORS: usize = MAX_SEGMENTS as usize + 2;
/// Largest backend access issued at once (the bounce buffer's bound).
const CHUNK_BYTES: usize = 1 << 20;

/// Completion status of a request, as written to the status byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RequestStatus {
    /// Success.
    Ok = VIRTIO_BLK_S_OK as u8,
    /// Device or driver error.
    IoErr = VIRTIO_BLK_S_IOERR as u8,
    /// Request type not supported.
    Unsupported = VIRTIO_BLK_S_UNSUPP as u8,
}

/// Outcome of one request: what to put in the used ring, and the status reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Bytes written into the chain's device-writable buffers (status byte included).
    pub used_len: u32,
    /// Status reported (or that would have been, if the chain had no status byte).
    pub status: RequestStatus,
}

/// Why a request failed: for logs, and to pick the status.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain ended early (loop, bad index, bad indirect table) or is too long.
    #[error("malformed descriptor chain")]
    MalformedChain,
    /// No device-writable byte at the end of the chain for the status.
    #[error("no status descriptor")]
    NoStatus,
    /// A device-readable descriptor follows a device-writable one.
    #[error("readable descriptor after writable one")]
    Ordering,
    /// A descriptor exceeds the advertised size_max.
    #[error("descriptor of {0} bytes exceeds size_max")]
    SegmentTooLarge(u32),
    /// A descriptor lies (partly) outside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} outside guest memory")]
    OutsideMemory {
        /// Descriptor address.
        addr: u64,
        /// Descriptor length.
        len: u32,
    },
    /// Fewer than 16 readable bytes.
    #[error("short request header")]
    ShortHeader,
    /// Data in the wrong direction for the request type.
    #[error("data buffer has the wrong direction for request type {0}")]
    Direction(u32),
    /// Data length not a multiple of the sector size.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// Access beyond the end of the disk (or overflowing).
    #[error("sector {sector} + {len} bytes is beyond the disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Data length.
        len: u64,
    },
    /// Write to a read-only disk.
    #[error("write to read-only disk")]
    ReadOnly,
    /// Unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Guest memory access failed during the transfer.
    #[error("guest memory: {0}")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// The backend failed.
    #[error("backend: {0}")]
    Backend(#[source] DiskError),
    /// The device was reset or shut down while the request ran; nothing more is written.
    #[error("abandoned: the device was reset")]
    Abandoned,
}

/// Reusable buffers for request processing, so that steady-state requests do not allocate.
#[derive(Debug, Default)]
pub struct RequestScratch {
    descs: Vec<Descriptor>,
    buf: Vec<u8>,
}

/// A run of guest buffers viewed as one byte stream.
#[derive(Clone, Copy)]
struct Segments<'a>(&'a [Descriptor]);

impl Segments<'_> {
    fn len(&self) -> u64 {
        self.0.iter().map(|d| u64::from(d.len())).sum()
    }

    /// Applies `f(guest_addr, range_in_buf)` over the stream bytes `[offset, offset + len)`.
    fn for_each_piece(
        &self,
        mut offset: u64,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> vm_memory::GuestMemoryResult<()>,
    ) -> Result<(), RequestError> {
        let mut done = 0usize;
        for d in self.0 {
            if done == len {
                break;
            }
            let dlen = u64::from(d.len());
            if offset >= dlen {
                offset -= dlen;
                continue;
            }
            // dlen - offset <= u32::MAX, fits in usize.
            let n = ((dlen - offset) as usize).min(len - done);
            let addr = d
                .addr()
                .checked_add(offset)
                .ok_or(RequestError::OutsideMemory {
                    addr: d.addr().0,
                    len: d.len(),
                })?;
            f(addr, done..done + n).map_err(RequestError::Memory)?;
            done += n;
            offset = 0;
        }
        if done == len {
            Ok(())
        } else {
            Err(RequestError::MalformedChain)
        }
    }

    fn read_into<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), RequestError> {
        let len = buf.len();
        self.for_each_piece(offset, len, |addr, r| mem.read_slice(&mut buf[r], addr))
    }

    fn write_from<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), RequestError> {
        self.for_each_piece(offset, buf.len(), |addr, r| mem.write_slice(&buf[r], addr))
    }
}

/// Processes one virtio-blk request: reads the header, does the I/O against `backend`,
/// writes the data (IN, GET_ID) and the status byte into the chain's buffers.
///
/// `disk_id` is the answer to GET_ID. `scratch` is reused across calls. The returned
/// [`Completion::used_len`] goes into the used ring with the chain's head index.
pub fn process_request<M, D>(
    mem: &M,
    chain: DescriptorChain<D>,
    backend: &dyn BlockBackend,
    disk_id: &[u8; DISK_ID_LEN],
    scratch: &mut RequestScratch,
) -> Completion
where
    M: GuestMemory + ?Sized,
    D: Deref,
    D::Target: GuestMemory,
{
    match process_request_gated(mem, chain, backend, disk_id, scratch, &Ungated) {
        Some(c) => c,
        // Ungated never refuses a write.
        None => Completion {
            used_len: 0,
            status: RequestStatus::IoErr,
        },
    }
}

/// [`process_request`], writing guest memory only inside busy sections of `gate`: each
/// write waits while the gate is held. `None` when the gate refused a write (the device
/// was reset or shut down): the request is abandoned, with nothing more written.
pub fn process_request_gated<M, D>(
    mem: &M,
    chain: DescriptorChain<D>,
    backend: &dyn BlockBackend,
    disk_id: &[u8; DISK_ID_LEN],
    scratch: &mut RequestScratch,
    gate: &dyn WriteGate,
) -> Option<Completion>
where
    M: GuestMemory + ?Sized,
    D: Deref,
    D::Target: GuestMemory,
{
    let RequestScratch { descs, buf } = scratch;
    descs.clear();
    let mut too_long = false;
    for d in chain {
        if descs.len() == MAX_DESCRIPTORS {
            too_long = true;
            break;
        }
        descs.push(d);
    }
    let status_addr = match locate_status(mem, descs, too_long) {
        Ok(a) => a,
        Err(e) => {
            debug!("virtio-blk: dropping request: {e}");
            return Some(Completion {
                used_len: 0,
                status: RequestStatus::IoErr,
            });
        }
    };
    let (status, data_written) = match execute(mem, descs, buf, backend, disk_id, gate) {
        Ok(n) => (RequestStatus::Ok, n),
        Err(RequestError::Abandoned) => return None,
        Err(e) => {
            debug!("virtio-blk: request failed: {e}");
            let status = match e {
                RequestError::Unsupported(_) => RequestStatus::Unsupported,
                _ => RequestStatus::IoErr,
            };
            (status, 0)
        }
    };
    let _busy = gate.enter()?;
    Some(match mem.write_obj(status as u8, status_addr) {
        // data_written <= writable bytes - 1 < u32::MAX (bounded by MAX_DESCRIPTORS * 1 MiB).
        Ok(()) => Completion {
            used_len: data_written as u32 + 1,
            status,
        },
        Err(e) => {
            debug!("virtio-blk: writing status: {e}");
            Completion {
                used_len: 0,
                status,
            }
        }
    })
}

/// Checks the chain's shape and returns where its status byte goes.
fn locate_status<M: GuestMemory + ?Sized>(
    mem: &M,
    descs: &[Descriptor],
    too_long: bool,
) -> Result<GuestAddress, RequestError> {
    let last = descs.last().ok_or(RequestError::MalformedChain)?;
    // A chain whose last descriptor still points onwards was cut short by the iterator
    // (a loop, an index past the table, a bad indirect table): never trust its tail.
    if too_long || last.has_next() {
        return Err(RequestError::MalformedChain);
    }
    if !last.is_write_only() || last.len() == 0 {
        return Err(RequestError::NoStatus);
    }
    let addr = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .ok_or(RequestError::NoStatus)?;
    if !mem.check_range(addr, 1, Permissions::Write) {
        return Err(RequestError::NoStatus);
    }
    Ok(addr)
}

/// Validates and runs the request; returns the data bytes written into the chain.
fn execute<M: GuestMemory + ?Sized>(
    mem: &M,
    descs: &[Descriptor],
    buf: &mut Vec<u8>,
    backend: &dyn BlockBackend,
    disk_id: &[u8; DISK_ID_LEN],
    gate: &dyn WriteGate,
) -> Result<usize, RequestError> {
    let (readable, writable) = check_descriptors(mem, descs)?;
    let (req_type, sector) = read_header(mem, &readable)?;
    // Data bytes in each direction: after the header, before the status byte.
    let in_data = readable.len() - HEADER_LEN;
    let out_data = writable.len() - 1;
    let io = Transfer {
        mem,
        buf,
        backend,
        gate,
    };

    match req_type {
        VIRTIO_BLK_T_IN => {
            if in_data != 0 {
                return Err(RequestError::Direction(req_type));
            }
            io.read(&writable, sector, out_data)
        }
        VIRTIO_BLK_T_OUT => {
            if out_data != 0 {
                return Err(RequestError::Direction(req_type));
            }
            io.write(&readable, sector, in_data)
        }
        VIRTIO_BLK_T_FLUSH => {
            if in_data != 0 || out_data != 0 {
                return Err(RequestError::Direction(req_type));
            }
            backend.flush().map_err(RequestError::Backend)?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            if in_data != 0 {
                return Err(RequestError::Direction(req_type));
            }
            let n = (out_data as usize).min(DISK_ID_LEN);
            let _busy = gate.enter().ok_or(RequestError::Abandoned)?;
            writable.write_from(mem, 0, &disk_id[..n])?;
            Ok(n)
        }
        t => Err(RequestError::Unsupported(t)),
    }
}

/// Splits the chain into its device-readable and device-writable parts, checking that
/// no readable descriptor follows a writable one and that each is of a sane size inside
/// guest memory with the right permission.
fn check_descriptors<'a, M: GuestMemory + ?Sized>(
    mem: &M,
    descs: &'a [Descriptor],
) -> Result<(Segments<'a>, Segments<'a>), RequestError> {
    let split = descs
        .iter()
        .position(|d| d.is_write_only())
        .unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(split);
    if writable.iter().any(|d| !d.is_write_only()) {
        return Err(RequestError::Ordering);
    }
    for d in descs {
        if d.len() > MAX_SEGMENT_BYTES {
            return Err(RequestError::SegmentTooLarge(d.len()));
        }
        let perm = if d.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(d.addr(), d.len() as usize, perm) {
            return Err(RequestError::OutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            });
        }
    }
    Ok((Segments(readable), Segments(writable)))
}

/// Reads the request header: its type and first sector.
fn read_header<M: GuestMemory + ?Sized>(
    mem: &M,
    readable: &Segments<'_>,
) -> Result<(u32, u64), RequestError> {
    let mut header = [0u8; HEADER_LEN as usize];
    if readable.len() < HEADER_LEN {
        return Err(RequestError::ShortHeader);
    }
    readable.read_into(mem, 0, &mut header)?;
    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    Ok((req_type, sector))
}

/// What a data transfer between guest memory and the disk uses.
struct Transfer<'a, M: ?Sized> {
    mem: &'a M,
    buf: &'a mut Vec<u8>,
    backend: &'a dyn BlockBackend,
    gate: &'a dyn WriteGate,
}

impl<M: GuestMemory + ?Sized> Transfer<'_, M> {
    /// `VIRTIO_BLK_T_IN`: reads `len` bytes at `sector` into `writable`, through the
    /// bounce buffer; returns the bytes written into the chain.
    fn read(self, writable: &Segments<'_>, sector: u64, len: u64) -> Result<usize, RequestError> {
        let start = check_io(self.backend, sector, len)?;
        let mut done = 0u64;
        while done < len {
            let n = chunk(len - done);
            let b = bounce(self.buf, n);
            self.backend
                .read_at(b, start + done)
                .map_err(RequestError::Backend)?;
            let _busy = self.gate.enter().ok_or(RequestError::Abandoned)?;
            writable.write_from(self.mem, done, b)?;
            done += n as u64;
        }
        Ok(len as usize)
    }

    /// `VIRTIO_BLK_T_OUT`: writes the `len` data bytes of `readable` (after the header)
    /// at `sector`, through the bounce buffer.
    fn write(self, readable: &Segments<'_>, sector: u64, len: u64) -> Result<usize, RequestError> {
        if self.backend.read_only() {
            return Err(RequestError::ReadOnly);
        }
        let start = check_io(self.backend, sector, len)?;
        let mut done = 0u64;
        while done < len {
            let n = chunk(len - done);
            let b = bounce(self.buf, n);
            readable.read_into(self.mem, HEADER_LEN + done, b)?;
            self.backend
                .write_at(b, start + done)
                .map_err(RequestError::Backend)?;
            done += n as u64;
        }
        Ok(0)
    }
}

/// Checks a data transfer of `len` bytes at `sector`; returns its byte offset on the disk.
fn check_io(backend: &dyn BlockBackend, sector: u64, len: u64) -> Result<u64, RequestError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::UnalignedLength(len));
    }
    let capacity = backend.size() / SECTOR_SIZE * SECTOR_SIZE;
    sector
        .checked_mul(SECTOR_SIZE)
        .filter(|start| start.checked_add(len).is_some_and(|end| end <= capacity))
        .ok_or(RequestError::OutOfRange { sector, len })
}

fn chunk(remaining: u64) -> usize {
    remaining.min(CHUNK_BYTES as u64) as usize
}

/// The first `n` (<= CHUNK_BYTES) bytes of the bounce buffer, growing it if needed.
fn bounce(buf: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if buf.len() < n {
        buf.resize(n, 0);
    }
    &mut buf[..n]
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
