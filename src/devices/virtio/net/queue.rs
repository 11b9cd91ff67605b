//! The pure queue work of virtio-net: gathering a transmitted frame out of a TX chain and
//! scattering a received frame into RX chains. No tap, no threads, no locks: the worker
//! calls these inside its busy sections, and the unit tests drive them with virtio-queue's
//! mock rings, hostile chains included.
//!
//! A chain the driver got wrong (a descriptor outside guest memory, a device-writable
//! descriptor in a TX chain or a read-only one in an RX chain, a frame longer than
//! [`MAX_FRAME`], nothing but a header) never panics and never writes outside the chain's
//! writable buffers: the packet is dropped and the chain returned to the driver with a used
//! length of 0. Loops end where virtio-queue's chain iterator ends them (after as many
//! descriptors as the queue has entries), and then fail the length or header checks.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::GuestMem;

/// Size of `struct virtio_net_hdr_v1` (virtio 1.x always includes `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Largest frame (header included) either way: a 64 KiB TSO/GSO packet, its Ethernet and
/// VLAN header, and the vnet header.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65_550;

/// Why a chain was dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor lies (partly) outside guest memory.
    #[error("descriptor at {addr:#x} (+{len}) is outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A TX chain has a device-writable descriptor, or an RX chain a read-only one.
    #[error("{0} chain has a descriptor of the wrong direction")]
    WrongDirection(&'static str),
    /// The frame is longer than [`MAX_FRAME`].
    #[error("frame of more than {MAX_FRAME} bytes")]
    TooLong,
    /// The chain is shorter than the vnet header.
    #[error("chain of {0} bytes, shorter than the vnet header")]
    TooShort(usize),
    /// The available ring names a descriptor that does not exist, or rings lie outside
    /// guest memory: the device needs a reset.
    #[error("broken ring: {0}")]
    Ring(String),
}

impl From<virtio_queue::Error> for ChainError {
    fn from(e: virtio_queue::Error) -> Self {
        ChainError::Ring(e.to_string())
    }
}

/// One TX chain taken from the queue.
#[derive(Debug, PartialEq, Eq)]
pub struct TxFrame {
    /// The chain's head, to return in the used ring.
    pub head: u16,
    /// The frame (vnet header first) in `buf[..len]`, or why the chain is dropped.
    pub result: Result<usize, ChainError>,
}

/// Pops the next TX chain and gathers it into `buf` (resized to [`MAX_FRAME`] if smaller).
/// `Ok(None)` when the ring is empty. The caller writes the frame to the tap (when
/// `result` is `Ok`) and returns the chain with [`complete`] either way.
pub fn pop_tx(
    mem: &GuestMem,
    queue: &mut Queue,
    buf: &mut Vec<u8>,
) -> Result<Option<TxFrame>, ChainError> {
    if buf.len() < MAX_FRAME {
        buf.resize(MAX_FRAME, 0);
    }
    let Some(chain) = queue.iter(mem)?.next() else {
        return Ok(None);
    };
    let head = chain.head_index();
    Ok(Some(TxFrame {
        head,
        result: gather(mem, chain, buf),
    }))
}

fn gather(
    mem: &GuestMem,
    chain: DescriptorChain<&GuestMem>,
    buf: &mut [u8],
) -> Result<usize, ChainError> {
    let mut len = 0usize;
    for d in chain {
        if d.is_write_only() {
            return Err(ChainError::WrongDirection("TX"));
        }
        let n = d.len() as usize;
        let end = len.checked_add(n).filter(|&e| e <= buf.len());
        let Some(end) = end else {
            return Err(ChainError::TooLong);
        };
        mem.read_slice(&mut buf[len..end], d.addr())
            .map_err(|_| ChainError::OutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            })?;
        len = end;
    }
    if len < VNET_HDR_LEN {
        return Err(ChainError::TooShort(len));
    }
    Ok(len)
}

/// Returns chain `head` to the driver with `len` bytes written.
pub fn complete(mem: &GuestMem, queue: &mut Queue, head: u16, len: u32) -> Result<(), ChainError> {
    match queue.add_used(mem, head, len) {
        Ok(()) => Ok(()),
        Err(virtio_queue::Error::InvalidDescriptorIndex) => {
            log::debug!("virtio-net: available ring names descriptor {head}; skipped");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// What [`deliver_rx`] did with a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivered {
    /// In the used ring, in this many chains.
    Chains(u16),
    /// Not enough RX buffers: nothing was taken from the ring; try again after the driver
    /// adds buffers.
    NoBuffers,
    /// Dropped (a hostile chain, or a frame no buffer can take); the chains involved were
    /// returned with a used length of 0.
    Dropped(ChainError),
}

/// The writable buffers of one RX chain.
struct RxChain {
    head: u16,
    bufs: Vec<(GuestAddress, u32)>,
    capacity: usize,
}

fn rx_buffers(chain: DescriptorChain<&GuestMem>) -> Result<RxChain, (u16, ChainError)> {
    let head = chain.head_index();
    let mut bufs = Vec::new();
    let mut capacity = 0usize;
    for d in chain {
        if !d.is_write_only() {
            return Err((head, ChainError::WrongDirection("RX")));
        }
        capacity = capacity.saturating_add(d.len() as usize);
        bufs.push((d.addr(), d.len()));
    }
    if capacity < VNET_HDR_LEN {
        return Err((head, ChainError::TooShort(capacity)));
    }
    Ok(RxChain {
        head,
        bufs,
        capacity,
    })
}

/// Puts `frame` (vnet header first, as read from the tap) into the RX queue: into one chain,
/// or with `mergeable` (VIRTIO_NET_F_MRG_RXBUF) over as many as it needs, `num_buffers`
/// set in the header. Chains are only taken when the whole frame fits.
pub fn deliver_rx(
    mem: &GuestMem,
    queue: &mut Queue,
    frame: &mut [u8],
    mergeable: bool,
) -> Result<Delivered, ChainError> {
    if frame.len() < VNET_HDR_LEN || frame.len() > MAX_FRAME {
        return Ok(Delivered::Dropped(if frame.len() > MAX_FRAME {
            ChainError::TooLong
        } else {
            ChainError::TooShort(frame.len())
        }));
    }
    let start = queue.next_avail();
    let mut chains = Vec::new();
    let mut capacity = 0usize;
    while capacity < frame.len() {
        let Some(chain) = queue.iter(mem)?.next() else {
            // Not enough buffers: give back what was taken, untouched.
            queue.set_next_avail(start);
            return Ok(Delivered::NoBuffers);
        };
        match rx_buffers(chain) {
            Ok(c) => {
                capacity += c.capacity;
                chains.push(c);
            }
            Err((head, e)) => return drop_chains(mem, queue, &chains, Some(head), e),
        }
        if !mergeable {
            break;
        }
    }
    if capacity < frame.len() {
        return drop_chains(mem, queue, &chains, None, ChainError::TooLong);
    }
    let n = chains.len() as u16;
    frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&n.to_le_bytes());
    let mut written = 0usize;
    let mut used = Vec::with_capacity(chains.len());
    for c in &chains {
        let mut in_chain = 0u32;
        for &(addr, len) in &c.bufs {
            if written == frame.len() {
                break;
            }
            let take = (len as usize).min(frame.len() - written);
            if mem
                .write_slice(&frame[written..written + take], addr)
                .is_err()
            {
                return drop_chains(
                    mem,
                    queue,
                    &chains,
                    None,
                    ChainError::OutsideMemory { addr: addr.0, len },
                );
            }
            written += take;
            in_chain += take as u32;
        }
        used.push((c.head, in_chain));
    }
    for (head, len) in used {
        complete(mem, queue, head, len)?;
    }
    Ok(Delivered::Chains(n))
}

/// Returns every chain taken (and `extra`) with a used length of 0.
fn drop_chains(
    mem: &GuestMem,
    queue: &mut Queue,
    chains: &[RxChain],
    extra: Option<u16>,
    e: ChainError,
) -> Result<Delivered, ChainError> {
    for head in chains.iter().map(|c| c.head).chain(extra) {
        complete(mem, queue, head, 0)?;
    }
    Ok(Delivered::Dropped(e))
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
