//! Tests of the virtio-mmio register protocol, driving a block device like a guest driver.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_RO, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_FAILED};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{BlockConfig, BlockDevice, BlockRestoreArgs, VIRTIO_RING_F_EVENT_IDX};
use crate::disk::MemBackend;
use crate::formats::Persist;

const QBASE: u64 = 0x1000;
const QSIZE: u16 = 256;
const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const RUNNING: u32 = ACK | DRIVER | FEATURES_OK | DRIVER_OK;

struct Vm<'a> {
    mem: &'a GuestMem,
    t: MmioTransport,
    block: Arc<Mutex<BlockDevice>>,
    irq: EventFd,
    disk: Arc<MemBackend>,
    d: Driver<'a>,
}

impl<'a> Vm<'a> {
    fn new(mem: &'a GuestMem, disk: Arc<MemBackend>) -> Self {
        let config = BlockConfig {
            id: Some("serial-1".into()),
        };
        let block = Arc::new(Mutex::new(BlockDevice::new(disk.clone(), config).unwrap()));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let line = IrqLine::new(irq.try_clone().unwrap(), 5);
        let t = MmioTransport::new(mem.clone(), block.clone(), line).unwrap();
        Self {
            mem,
            t,
            block,
            irq,
            disk,
            d: Driver::new(mem, QBASE, QSIZE),
        }
    }

    fn rd(&mut self, reg: u32) -> u32 {
        let mut b = [0xffu8; 4];
        self.t.read(reg.into(), &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(&mut self, reg: u32, v: u32) {
        self.t.write(reg.into(), &v.to_le_bytes());
    }

    fn device_features(&mut self) -> u64 {
        self.wr(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let lo = self.rd(VIRTIO_MMIO_DEVICE_FEATURES);
        self.wr(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = self.rd(VIRTIO_MMIO_DEVICE_FEATURES);
        u64::from(hi) << 32 | u64::from(lo)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns whether FEATURES_OK stuck.
    fn negotiate(&mut self, features: u64) -> bool {
        assert_eq!(self.rd(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.rd(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(self.rd(VIRTIO_MMIO_DEVICE_ID), 2);
        self.wr(VIRTIO_MMIO_STATUS, 0);
        assert_eq!(self.rd(VIRTIO_MMIO_STATUS), 0);
        self.wr(VIRTIO_MMIO_STATUS, ACK);
        self.wr(VIRTIO_MMIO_STATUS, ACK | DRIVER);
        self.wr(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.wr(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.wr(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.wr(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        self.wr(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
        self.rd(VIRTIO_MMIO_STATUS) & FEATURES_OK != 0
    }

    fn setup_queue(&mut self) {
        self.wr(VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(self.rd(VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(self.rd(VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(QSIZE));
        self.wr(VIRTIO_MMIO_QUEUE_NUM, QSIZE.into());
        let (desc, avail, used) = (self.d.desc_addr(), self.d.avail_addr(), self.d.used_addr());
        self.wr(VIRTIO_MMIO_QUEUE_DESC_LOW, desc as u32);
        self.wr(VIRTIO_MMIO_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.wr(VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail as u32);
        self.wr(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
        self.wr(VIRTIO_MMIO_QUEUE_USED_LOW, used as u32);
        self.wr(VIRTIO_MMIO_QUEUE_USED_HIGH, (used >> 32) as u32);
        self.wr(VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(self.rd(VIRTIO_MMIO_QUEUE_READY), 1);
    }

    /// The whole driver initialization, accepting `features`.
    fn init(&mut self, features: u64) {
        assert!(self.negotiate(features));
        self.setup_queue();
        self.wr(VIRTIO_MMIO_STATUS, RUNNING);
        assert_eq!(self.rd(VIRTIO_MMIO_STATUS), RUNNING);
        assert!(self.t.is_activated());
    }

    /// Queues a 512-byte read of `sector` into DATA, using descriptors at `at..at+3`.
    fn queue_read(&mut self, sector: u64, at: u16) {
        write_header(self.mem, HDR, VIRTIO_BLK_T_IN, sector);
        let head = self
            .d
            .write_chain(at, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        self.d.publish(head);
    }

    /// QueueNotify through the bus (no ioeventfd), then one event-loop turn of the device.
    fn kick(&mut self) {
        self.wr(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        lock(&self.block).handle_queue_event();
    }

    fn interrupts(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }

    /// Waits (generously) for the device's worker thread to raise the interrupt line;
    /// returns how often it was raised.
    fn wait_interrupt(&self) -> u64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match self.irq.read() {
                Ok(n) => return n,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("no interrupt from the I/O worker: {e}"),
            }
        }
    }

    fn data(&self) -> Vec<u8> {
        let mut v = vec![0; 512];
        self.mem.read_slice(&mut v, GuestAddress(DATA)).unwrap();
        v
    }
}

fn disk() -> Arc<MemBackend> {
    Arc::new(MemBackend::from_vec(
        (0..32 * 512).map(|i| (i / 512) as u8).collect(),
    ))
}

#[test]
fn init_sequence_notify_and_interrupt() {
    let mem = guest_mem();
    let mut vm = Vm::new(&mem, disk());
    let features = vm.device_features();
    assert_ne!(features & VIRTIO_F_VERSION_1, 0);
    assert_eq!(features & 1 << VIRTIO_BLK_F_RO, 0);
    // Without EVENT_IDX every completion interrupts (event_idx_suppresses_interrupts covers it).
    vm.init(features & !VIRTIO_RING_F_EVENT_IDX);

    // The guest's notify travels the device's own eventfd to its I/O worker thread.
    lock(&vm.block).start_worker("test-blk").unwrap();
    vm.queue_read(7, 0);
    vm.wr(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    let irqs = vm.wait_interrupt();

    assert_eq!(vm.d.used_idx(), 1);
    assert_eq!(vm.d.used_elem(0), (0, 513));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    assert_eq!(vm.data(), vec![7; 512]);
    assert_eq!(irqs, 1);
    assert_eq!(vm.rd(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    vm.wr(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(vm.rd(VIRTIO_MMIO_INTERRUPT_STATUS), 0);

    // A write, then a read of it back.
    write_header(&mem, HDR, VIRTIO_BLK_T_OUT, 3);
    mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
    let head =
        vm.d.write_chain(10, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    vm.d.publish(head);
    vm.kick();
    assert_eq!(vm.d.used_elem(1), (10, 1));
    assert_eq!(vm.disk.contents()[3 * 512..4 * 512], [0x77; 512]);
    assert_eq!(vm.interrupts(), 1);
}

#[test]
fn config_space() {
    let mem = guest_mem();
    let mut vm = Vm::new(&mem, disk());
    assert_eq!(vm.rd(0x100), 32, "capacity low");
    assert_eq!(vm.rd(0x104), 0, "capacity high");
    assert_eq!(vm.rd(0x108), 1 << 20, "size_max");
    assert_eq!(vm.rd(0x10c), 128, "seg_max");
    assert_eq!(vm.rd(0x114), 512, "blk_size");
    let mut b = [0u8; 1];
    vm.t.read(0x100, &mut b);
    assert_eq!(b, [32]);
    let mut b = [0xffu8; 8];
    vm.t.read(0xff8, &mut b);
    assert_eq!(b, [0; 8], "past the config space");
    vm.t.write(0x100, &[0; 8]);
    assert_eq!(vm.rd(0x100), 32, "config is read-only");
    assert_eq!(vm.rd(VIRTIO_MMIO_CONFIG_GENERATION), 0);

    let ro = Arc::new(MemBackend::new(4096).with_read_only(true));
    let mut vm = Vm::new(&mem, ro);
    assert_ne!(vm.device_features() & 1 << VIRTIO_BLK_F_RO, 0);
}

#[test]
fn odd_accesses_are_ignored() {
    let mem = guest_mem();
    let mut vm = Vm::new(&mem, disk());
    let mut b = [0xffu8; 2];
    vm.t.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut b);
    assert_eq!(b, [0, 0], "2-byte register read");
    let mut b = [0xffu8; 4];
    vm.t.read(2, &mut b);
    assert_eq!(b, [0; 4], "unaligned register read");
    vm.t.write(u64::from(VIRTIO_MMIO_STATUS), &[ACK as u8]);
    vm.t.write(u64::from(VIRTIO_MMIO_STATUS) + 1, &ACK.to_le_bytes());
    vm.t.write(u64::from(VIRTIO_MMIO_STATUS), &[]);
    assert_eq!(vm.rd(VIRTIO_MMIO_STATUS), 0);
    assert_eq!(vm.rd(0x0f0), 0, "unknown register");
    vm.wr(0x0f0, 1);
    assert_eq!(vm.rd(VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX, "no shared memory");
    // Absent queue: no size, configuration ignored, notify ignored.
    vm.wr(VIRTIO_MMIO_QUEUE_SEL, 3);
    assert_eq!(vm.rd(VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    vm.wr(VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(vm.rd(VIRTIO_MMIO_QUEUE_READY), 0);
    vm.wr(VIRTIO_MMIO_QUEUE_NOTIFY, 9);
    vm.wr(VIRTIO_MMIO_QUEUE_NOTIFY, u32::MAX);
    vm.wr(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
    assert_eq!(vm.rd(VIRTIO_MMIO_DEVICE_FEATURES), 0);
    // Oversized queue sizes do not truncate into valid ones.
    vm.wr(VIRTIO_MMIO_QUEUE_SEL, 0);
    vm.wr(VIRTIO_MMIO_QUEUE_NUM, 0x1_0010);
    assert_eq!(vm.t.save().unwrap().queues[0].size, QSIZE);
}

#[test]
fn feature_negotiation() {
    let mem = guest_mem();
    let mut vm = Vm::new(&mem, disk());
    let offered = vm.device_features();
    assert!(!vm.negotiate(offered | 1 << 40), "feature not offered");
    assert!(
        !vm.negotiate(offered & !VIRTIO_F_VERSION_1),
        "legacy driver"
    );
    assert!(vm.negotiate(VIRTIO_F_VERSION_1), "minimal set");
    // Features are frozen once FEATURES_OK is set.
    vm.wr(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    vm.wr(VIRTIO_MMIO_DRIVER_FEATURES, u32::MAX);
    assert_eq!(vm.t.save().unwrap().acked_features, VIRTIO_F_VERSION_1);
    // Status bits cannot be cleared except by reset; FAILED can be added.
    vm.wr(VIRTIO_MMIO_STATUS, ACK);
    assert_eq!(vm.rd(VIRTIO_MMIO_STATUS), ACK | DRIVER | FEATURES_OK);
    vm.wr(
        VIRTIO_MMIO_STATUS,
        ACK | DRIVER | FEATURES_OK | VIRTIO_CONFIG_S_FAILED,
    );
    assert_ne!(vm.rd(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FAILED, 0);

    // Driver features written before DRIVER are ignored; DRIVER_OK needs FEATURES_OK.
    vm.wr(VIRTIO_MMIO_STATUS, 0);
    vm.wr(VIRTIO_MMIO_DRIVER_FEATURES, 1);
    assert_eq!(vm.t.save().unwrap().acked_features, 0);
    vm.wr(VIRTIO_MMIO_STATUS, ACK | DRIVER);
    vm.setup_queue();
    vm.wr(VIRTIO_MMIO_STATUS, ACK | DRIVER | DRIVER_OK);
    assert_eq!(vm.rd(VIRTIO_MMIO_STATUS), ACK | DRIVER);
    assert!(!vm.t.is_activated());
}

#[test]
fn invalid_queue_sets_needs_reset() {
    let mem = guest_mem();
    let mut vm = Vm::new(&mem, disk());
    let f = vm.device_features();
    assert!(vm.negotiate(f));
    vm.setup_queue();
    // Not ready: QueueReady=0 and the addresses can change again.
    vm.wr(VIRTIO_MMIO_QUEUE_READY, 0);
    vm.wr(VIRTIO_MMIO_QUEUE_USED_HIGH, 0x10);
    vm.wr(VIRTIO_MMIO_QUEUE_READY, 1);
    vm.wr(VIRTIO_MMIO_STATUS, RUNNING);
    assert_eq!(vm.rd(VIRTIO_MMIO_STATUS), RUNNING | NEEDS_RESET);
    assert!(!vm.t.is_activated());
    assert!(!lock(&vm.block).is_activated());
    assert_eq!(vm.rd(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(vm.interrupts(), 1);
    // Reset clears everything, and a correct initialization then works.
    vm.init(f);
    assert_eq!(vm.rd(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    vm.queue_read(1, 0);
    vm.kick();
    assert_eq!(vm.data(), vec![1; 512]);
}

#[test]
fn reset_after_activation() {
    let mem = guest_mem();
    let mut vm = Vm::new(&mem, disk());
    let f = vm.device_features();
    vm.init(f);
    // Queue configuration is frozen while running.
    vm.wr(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x8000);
    vm.wr(VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(vm.t.save().unwrap().queues[0].desc_table, QBASE);
    assert_eq!(vm.rd(VIRTIO_MMIO_QUEUE_READY), 1);
    vm.queue_read(2, 0);
    vm.kick();
    assert_eq!(vm.rd(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);

    vm.wr(VIRTIO_MMIO_STATUS, 0);
    assert!(!lock(&vm.block).is_activated());
    assert_eq!(vm.rd(VIRTIO_MMIO_STATUS), 0);
    assert_eq!(vm.rd(VIRTIO_MMIO_QUEUE_READY), 0);
    assert_eq!(vm.rd(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    // A notify while reset does nothing.
    vm.d.publish(0);
    vm.kick();
    assert_eq!(vm.d.used_idx(), 1);
}

#[test]
fn hostile_avail_index_needs_reset_without_hanging() {
    let mem = guest_mem();
    let mut vm = Vm::new(&mem, disk());
    let f = vm.device_features();
    vm.init(f);
    vm.d.set_avail_idx(QSIZE + 1);
    vm.kick();
    assert_ne!(vm.rd(VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
    assert_ne!(
        vm.rd(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
        0
    );
    vm.kick();
    assert_eq!(vm.d.used_idx(), 0);

    // An avail entry naming a descriptor past the table is skipped, the rest processed.
    let mut vm = Vm::new(&mem, disk());
    vm.init(f);
    vm.d.publish(QSIZE + 3);
    vm.queue_read(4, 0);
    vm.kick();
    assert_eq!((vm.d.used_idx(), vm.d.used_elem(0)), (1, (0, 513)));
    assert_eq!(vm.rd(VIRTIO_MMIO_STATUS), RUNNING);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mem = guest_mem();
    let mut vm = Vm::new(&mem, disk());
    let f = vm.device_features();
    assert_ne!(f & VIRTIO_RING_F_EVENT_IDX, 0);
    vm.init(f);
    // used_event (after the avail ring) = 5: no interrupt until used index passes 5.
    let used_event = vm.d.avail_addr() + 4 + 2 * u64::from(QSIZE);
    mem.write_obj(5u16, GuestAddress(used_event)).unwrap();
    vm.queue_read(1, 0);
    vm.kick();
    assert_eq!((vm.d.used_idx(), vm.interrupts()), (1, 0));
    // The device asks to be notified at the next avail index (avail_event after the used ring).
    let avail_event = vm.d.used_addr() + 4 + 8 * u64::from(QSIZE);
    assert_eq!(mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap(), 1);
    mem.write_obj(1u16, GuestAddress(used_event)).unwrap();
    vm.queue_read(2, 0);
    vm.kick();
    assert_eq!((vm.d.used_idx(), vm.interrupts()), (2, 1));
}

#[test]
fn save_and_restore_continue_the_queue() {
    let mem = guest_mem();
    let disk = disk();
    let mut vm = Vm::new(&mem, disk.clone());
    let f = vm.device_features();
    vm.init(f);
    vm.queue_read(1, 0);
    vm.kick();
    // A request queued but not yet processed when the VM is saved.
    vm.queue_read(9, 0);
    let t_state = vm.t.save().unwrap();
    let b_state = lock(&vm.block).save().unwrap();
    assert_eq!(t_state.queues[0].next_avail, 1);
    assert_eq!(t_state.queues[0].next_used, 1);
    assert_eq!(t_state.interrupt_status, VIRTIO_MMIO_INT_VRING);
    let t_state: MmioTransportState =
        serde_json::from_str(&serde_json::to_string(&t_state).unwrap()).unwrap();
    let b_state: crate::devices::virtio::BlockDeviceState =
        serde_json::from_str(&serde_json::to_string(&b_state).unwrap()).unwrap();

    let block_args = |backend: Arc<MemBackend>| BlockRestoreArgs {
        backend,
        config: BlockConfig {
            id: Some("serial-1".into()),
        },
        force: false,
    };
    // A different disk is refused.
    let other = block_args(Arc::new(MemBackend::new(4096)));
    assert!(BlockDevice::restore(other, &b_state).is_err());

    let mut vm2 = Vm::new(&mem, disk.clone());
    vm2.d.set_avail_idx(2);
    let block = BlockDevice::restore(block_args(disk), &b_state).unwrap();
    vm2.block = Arc::new(Mutex::new(block));
    let t_args = |vm: &Vm| MmioRestoreArgs {
        mem: mem.clone(),
        device: vm.block.clone(),
        irq: IrqLine::new(vm.irq.try_clone().unwrap(), 5),
    };
    vm2.t = MmioTransport::restore(t_args(&vm2), &t_state).unwrap();
    assert!(vm2.t.is_activated());
    assert_eq!(vm2.rd(VIRTIO_MMIO_STATUS), RUNNING);
    assert_eq!(vm2.interrupts(), 1, "pending interrupt re-raised");
    // The restore kicked the queue: the pending request completes on the next loop turn.
    lock(&vm2.block).handle_queue_event();
    assert_eq!(vm2.d.used_idx(), 2);
    assert_eq!(vm2.data(), vec![9; 512]);
    assert_eq!(vm2.t.save().unwrap().queues[0].next_used, 2);

    let mut bad = t_state.clone();
    bad.queues[0].size = 3;
    assert!(MmioTransport::restore(t_args(&vm2), &bad).is_err());
    bad.queues.clear();
    assert!(matches!(
        MmioTransport::restore(t_args(&vm2), &bad),
        Err(MmioError::QueueCount { .. })
    ));
}

#[test]
fn cmdline_arg() {
    assert_eq!(
        kernel_cmdline_arg(0xd000_1000, 6),
        "virtio_mmio.device=4K@0xd0001000:6"
    );
    assert_eq!(NOTIFY_REG_OFFSET, 0x50);
}

#[test]
fn shareable_with_the_vmm() {
    fn bus_and_threads<T: Send + 'static>() {}
    bus_and_threads::<MmioTransport>();
    bus_and_threads::<BlockDevice>();
    let mem = guest_mem();
    let vm = Vm::new(&mem, disk());
    let _: crate::vstate::bus::SharedDevice = Arc::new(Mutex::new(vm.t));
    let _: Arc<Mutex<dyn VirtioDevice>> = vm.block;
}
