//! virtio-blk: a block device over a [`BlockBackend`], one request queue.

pub mod gate;
mod persist;
pub mod request;
mod worker;

use std::sync::Arc;

use log::{debug, warn};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

pub use gate::IoGate;
pub use persist::{BlockDeviceState, BlockRestoreArgs};
pub use request::{
    Completion, DISK_ID_LEN, MAX_SEGMENT_BYTES, MAX_SEGMENTS, QUEUE_SIZE, RequestScratch,
    RequestStatus, process_request, process_request_gated,
};
pub use worker::{MAX_REQUESTS_PER_EVENT, WORKER_STOP_TIMEOUT};

use super::{
    GuestMem, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
    VirtioDevice, VirtioError, VirtioInterrupt, read_config_bytes,
};
use crate::disk::{BlockBackend, DiskError, SECTOR_SIZE};
use worker::{Engine, Worker};

/// Logical block size reported to the guest.
pub const BLOCK_SIZE: u32 = SECTOR_SIZE as u32;

/// Errors of the virtio-blk device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The queue eventfd could not be created.
    #[error("virtio-blk: creating queue eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// Saved state names a different disk than the one attached.
    #[error("virtio-blk: saved state is for another disk: {0}")]
    Identity(#[source] DiskError),
    /// Saved state differs from this device in a guest-visible way.
    #[error("virtio-blk: saved {0} differs from the device's")]
    StateMismatch(&'static str),
    /// The I/O worker thread could not be started.
    #[error("virtio-blk: starting the I/O worker")]
    Worker(#[source] std::io::Error),
}

/// Options of a block device, beyond its backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// Serial reported by GET_ID (at most 20 bytes are used); defaults to the image file name.
    pub id: Option<String>,
}

/// The virtio-blk configuration space fields this device provides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfigSpace {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment in bytes.
    pub size_max: u32,
    /// Most segments per request.
    pub seg_max: u32,
    /// Logical block size.
    pub blk_size: u32,
}

impl BlockConfigSpace {
    /// Layout of `struct virtio_blk_config` up to `blk_size`.
    fn to_bytes(self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // 16..20: geometry, not offered.
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b
    }
}

/// A virtio-blk device. Register its [`queue_events`](VirtioDevice::queue_events) as
/// ioeventfds on QueueNotify and call [`start_worker`](Self::start_worker): its I/O worker
/// thread then serves the queue (see the `worker` module). Without a worker, requests are
/// processed by whoever calls [`handle_queue_event`](Self::handle_queue_event).
pub struct BlockDevice {
    engine: Arc<Engine>,
    features: u64,
    config_space: BlockConfigSpace,
    config_bytes: [u8; 24],
    disk_id: [u8; DISK_ID_LEN],
    queue_evts: [EventFd; 1],
    worker: Option<Worker>,
}

impl BlockDevice {
    /// A block device serving `backend`.
    pub fn new(backend: Arc<dyn BlockBackend>, config: BlockConfig) -> Result<Self, BlockError> {
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if backend.read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        let config_space = BlockConfigSpace {
            capacity: backend.size() / SECTOR_SIZE,
            size_max: MAX_SEGMENT_BYTES,
            seg_max: MAX_SEGMENTS,
            blk_size: BLOCK_SIZE,
        };
        let id = config.id.unwrap_or_else(|| {
            let loc = backend.identity().location;
            loc.rsplit('/').next().unwrap_or_default().to_string()
        });
        let mut disk_id = [0u8; DISK_ID_LEN];
        let n = id.len().min(DISK_ID_LEN);
        disk_id[..n].copy_from_slice(&id.as_bytes()[..n]);
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?;
        let engine = Engine::new(backend, disk_id, &evt).map_err(BlockError::EventFd)?;
        Ok(Self {
            engine: Arc::new(engine),
            features,
            config_space,
            config_bytes: config_space.to_bytes(),
            disk_id,
            queue_evts: [evt],
            worker: None,
        })
    }

    /// Starts the device's I/O worker thread, named `name`: from now on it serves every
    /// notification of the queue. Starting it twice does nothing.
    pub fn start_worker(&mut self, name: &str) -> Result<(), BlockError> {
        if self.worker.is_none() {
            let w = Worker::spawn(name.to_string(), self.engine.clone(), &self.queue_evts[0])
                .map_err(BlockError::Worker)?;
            self.worker = Some(w);
        }
        Ok(())
    }

    /// The gate through which the device writes guest memory: the VMM holds it while the
    /// VM is paused (see [`IoGate`]).
    pub fn io_gate(&self) -> &Arc<IoGate> {
        &self.engine.gate
    }

    /// The backend served.
    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.engine.backend
    }

    /// Whether the driver activated the device.
    pub fn is_activated(&self) -> bool {
        self.engine.is_active()
    }

    /// Handles a notification of the request queue on the calling thread: consumes its
    /// eventfd and processes every available request (what the worker does on each event).
    pub fn handle_queue_event(&mut self) {
        if let Err(e) = self.queue_evts[0].read()
            && e.kind() != std::io::ErrorKind::WouldBlock
        {
            warn!("virtio-blk: reading queue eventfd: {e}");
        }
        self.process_queue();
    }

    /// Processes available requests, completes them and interrupts the guest if needed.
    pub fn process_queue(&mut self) {
        self.engine.process_queue();
    }
}

impl Drop for BlockDevice {
    fn drop(&mut self) {
        self.engine.deactivate();
        if let Some(mut w) = self.worker.take()
            && !w.stop()
        {
            // The worker keeps the backend alive; make what it completed durable now,
            // since its owner's drop may not run before the process ends.
            if let Err(e) = self.engine.backend.flush() {
                warn!("virtio-blk: flushing the disk of a detached worker: {e}");
            }
        }
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio-blk: {}-byte config write at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        mut queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), VirtioError> {
        if queues.len() != 1 {
            return Err(VirtioError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let queue = queues.remove(0);
        self.engine.activate(mem, queue, interrupt);
        Ok(())
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.engine.queue_state().into_iter().collect()
    }

    fn reset(&mut self) {
        self.engine.deactivate();
        // Drop a notification that raced with the reset.
        let _ = self.queue_evts[0].read();
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod worker_tests;
