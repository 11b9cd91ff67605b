//! Tests of the virtio-blk device model (queue handling, features, state).

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::IrqLine;
use crate::devices::virtio::test_utils::*;
use crate::disk::MemBackend;
use crate::formats::Persist;
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;

fn device(backend: MemBackend, id: Option<&str>) -> BlockDevice {
    let config = BlockConfig {
        id: id.map(str::to_string),
    };
    BlockDevice::new(Arc::new(backend), config).unwrap()
}

fn interrupt() -> (Arc<VirtioInterrupt>, EventFd) {
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = IrqLine::new(evt.try_clone().unwrap(), 7);
    (Arc::new(VirtioInterrupt::new(irq)), evt)
}

#[test]
fn features_and_config() {
    let dev = device(MemBackend::new(1 << 20), None);
    let f = dev.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        1 << VIRTIO_BLK_F_FLUSH,
        1 << VIRTIO_BLK_F_SEG_MAX,
        1 << VIRTIO_BLK_F_BLK_SIZE,
        1 << VIRTIO_BLK_F_SIZE_MAX,
    ] {
        assert_ne!(f & bit, 0, "{bit:#x}");
    }
    assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(dev.device_type(), 2);
    assert_eq!(dev.queue_max_sizes(), &[256]);
    assert_eq!(dev.queue_events().len(), 1);
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);

    let ro = device(MemBackend::new(1000).with_read_only(true), Some("x"));
    assert_ne!(ro.features() & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(
        ro.save().unwrap().config_space.capacity,
        1,
        "partial sector not exposed"
    );
}

#[test]
fn disk_id_from_config_or_location() {
    let named = device(MemBackend::new(512), Some("a-very-long-serial-number-here"));
    assert_eq!(&named.disk_id, b"a-very-long-serial-n");
    let anon = device(MemBackend::new(512).with_name("/images/root.img"), None);
    assert_eq!(&anon.disk_id[..9], b"root.img\0");
}

#[test]
fn activation_checks_queue_count() {
    let mem = guest_mem();
    let mut dev = device(MemBackend::new(4096), None);
    let (irq, _) = interrupt();
    let err = dev.activate(mem.clone(), vec![], irq.clone()).unwrap_err();
    assert!(matches!(
        err,
        VirtioError::QueueCount {
            expected: 1,
            got: 0
        }
    ));
    assert!(!dev.is_activated());
    let q = Driver::new(&mem, 0, 16).create_queue();
    dev.activate(mem.clone(), vec![q], irq).unwrap();
    assert!(dev.is_activated());
    assert_eq!(dev.queue_states().len(), 1);
    dev.reset();
    assert!(!dev.is_activated() && dev.queue_states().is_empty());
}

/// A backend that, like a guest on another vCPU, queues a new request whenever one is read.
struct Refilling {
    mem: GuestMem,
    avail: u64,
}

impl BlockBackend for Refilling {
    fn size(&self) -> u64 {
        4096
    }
    fn read_at(&self, buf: &mut [u8], _: u64) -> crate::disk::Result<()> {
        buf.fill(0);
        let idx: u16 = self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap();
        let slot = self.avail + 4 + 2 * u64::from(idx % 256);
        self.mem.write_obj(0u16, GuestAddress(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> crate::disk::Result<()> {
        Ok(())
    }
    fn flush(&self) -> crate::disk::Result<()> {
        Ok(())
    }
    fn read_only(&self) -> bool {
        false
    }
    fn identity(&self) -> crate::disk::BackendIdentity {
        MemBackend::new(0).identity()
    }
}

#[test]
fn endless_requests_yield_to_the_event_loop() {
    let mem = guest_mem();
    let mut d = Driver::new(&mem, 0, 256);
    let backend = Refilling {
        mem: mem.clone(),
        avail: d.avail_addr(),
    };
    let mut dev = BlockDevice::new(Arc::new(backend), BlockConfig::default()).unwrap();
    let (irq, irq_evt) = interrupt();
    dev.activate(mem.clone(), vec![d.create_queue()], irq)
        .unwrap();
    write_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    d.write_chain(0, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    d.publish(0);
    dev.handle_queue_event();
    assert_eq!(usize::from(d.used_idx()), MAX_REQUESTS_PER_EVENT);
    assert_eq!(dev.queue_events()[0].read().unwrap(), 1, "re-kicked itself");
    assert_eq!(irq_evt.read().unwrap(), 1);
    dev.handle_queue_event();
    assert_eq!(usize::from(d.used_idx()), 2 * MAX_REQUESTS_PER_EVENT);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
}

#[test]
fn restore_refuses_guest_visible_changes() {
    let dev = device(MemBackend::new(4096).with_name("d"), Some("id"));
    let state = dev.save().unwrap();
    let restore = |backend: MemBackend, id: &str, force: bool| {
        let args = BlockRestoreArgs {
            backend: Arc::new(backend),
            config: BlockConfig {
                id: Some(id.to_string()),
            },
            force,
        };
        BlockDevice::restore(args, &state).map(|_| ())
    };
    restore(MemBackend::new(4096).with_name("d"), "id", false).unwrap();
    let err = restore(MemBackend::new(8192).with_name("d"), "id", false).unwrap_err();
    assert!(matches!(err, BlockError::Identity(_)), "{err}");
    restore(MemBackend::new(8192).with_name("d"), "id", true)
        .expect("--force accepts another disk");
    let err = restore(MemBackend::new(4096).with_name("d"), "other", false).unwrap_err();
    assert!(matches!(err, BlockError::StateMismatch("disk id")), "{err}");
    let err = restore(
        MemBackend::new(4096).with_name("d").with_read_only(true),
        "id",
        false,
    )
    .unwrap_err();
    assert!(
        matches!(err, BlockError::StateMismatch("feature set")),
        "{err}"
    );
}
