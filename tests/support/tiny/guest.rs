//! Constants shared with `guest.s` (keep in sync).

/// Port-I/O test device base (16 ports).
pub const TEST_PORT: u64 = 0x700;
/// Length of the port-I/O test device.
pub const TEST_PORT_LEN: u64 = 0x10;
/// MMIO test device base.
pub const MMIO_BASE: u64 = 0xd010_0000;
/// Length of the MMIO test device.
pub const MMIO_LEN: u64 = 0x1000;
/// Host <-> guest mailbox page.
pub const MAILBOX: u64 = 0x3f_f000;
/// u64 the host sets to [`HOST_GO`] to let the memory scenario continue.
pub const MB_HOST_GO: u64 = MAILBOX;
/// u32 the AP sets to [`AP_ALIVE`] once in long mode.
pub const MB_AP_MARK: u64 = MAILBOX + 0x8;
/// u32: the AP's LAPIC id.
pub const MB_AP_APIC_ID: u64 = MAILBOX + 0xc;
/// u32: timer interrupts counted by the guest.
pub const MB_TICKS: u64 = MAILBOX + 0x10;
/// 4 KiB the host fills while the memory scenario is paused.
pub const HOST_DATA: u64 = MAILBOX + 0x1000;
/// Value of [`MB_HOST_GO`] that releases the guest.
pub const HOST_GO: u64 = 0x600d_600d_600d_600d;
/// Value of [`MB_AP_MARK`] once the AP runs 64-bit code.
pub const AP_ALIVE: u32 = 0xa11e_a11e;
/// Value of the trampoline's real-mode mark once the AP ran its first instructions.
pub const AP_REAL_MODE: u32 = 0x1e41;
/// Pattern area written by the memory scenario.
pub const PATTERN_BASE: u64 = 0x20_0000;
/// Length of the pattern area.
pub const PATTERN_LEN: u64 = 0x10_0000;
/// The qword at address `a` of the pattern area is `a ^ PATTERN_XOR`.
pub const PATTERN_XOR: u64 = 0x5a5a_a5a5_f00d_d00d;
/// The qword at address `a` of [`HOST_DATA`] is `a ^ HOST_XOR`.
pub const HOST_XOR: u64 = 0x0123_4567_89ab_cdef;
/// Where the AP's real-mode trampoline is copied (SIPI vector 0x10).
pub const TRAMP_BASE: u64 = 0x1_0000;
/// u32 the AP sets to [`AP_REAL_MODE`] while still in real mode.
pub const TRAMP_RM_MARK: u64 = TRAMP_BASE + 0xff0;
/// Timer interrupts the timer scenarios wait for.
pub const TICKS: u32 = 10;
/// u32: the snapshot scenarios' counter (kept equal to r12 by the guest).
pub const MB_COUNT: u64 = MAILBOX + 0x14;
/// u32: [`super::Scenario::SnapDirty`] command number, bumped by the host.
pub const MB_CMD_SEQ: u64 = MAILBOX + 0x18;
/// u32: the last command the guest carried out.
pub const MB_CMD_ACK: u64 = MAILBOX + 0x1c;
/// [`MB_CMD_ACK`] once the `SnapDirty` guest is parked waiting for commands.
pub const DIRTY_READY: u32 = 0x7ead_c0de;
/// u32: how many addresses of [`MB_CMD_LIST`] the command writes.
pub const MB_CMD_COUNT: u64 = MAILBOX + 0x20;
/// u64[32]: the addresses; the guest writes `seq << 32 | address` to each.
pub const MB_CMD_LIST: u64 = MAILBOX + 0x100;
/// COM1 register values the tick scenario sets and checks: (offset, value, needs DLAB).
pub const SERIAL_REGS: [(u8, u8, bool); 5] = [
    (0, 0x03, true),
    (1, 0x01, true),
    (3, 0x1b, false),
    (4, 0x0b, false),
    (7, 0xa7, false),
];
/// virtio-mmio window of disk 0.
pub const VIRTIO_BASE: u64 = 0xd000_0000;
/// The virtio scenarios' available ring (u16 flags, u16 idx, then u16 heads).
pub const VQ_AVAIL: u64 = 0x30_1000;
/// The virtio scenario's used ring (u16 flags, u16 idx, then {u32 id, u32 len}).
pub const VQ_USED: u64 = 0x30_2000;
/// Where the virtio scenario reads the disk into.
pub const READ_BUF: u64 = 0x30_4000;
/// Bytes per virtio request.
pub const IO_LEN: u64 = 4096;
/// Sector the virtio scenario reads.
pub const READ_SECTOR: u64 = 8;
/// Sector the virtio scenario writes.
pub const WRITE_SECTOR: u64 = 24;
/// The disk's qword at byte offset `o` is `o ^ DISK_XOR`.
pub const DISK_XOR: u64 = 0x0d15_c0ff_ee00_d15c;
/// The guest writes `o ^ WRITE_XOR` at each byte offset `o` of its write.
pub const WRITE_XOR: u64 = 0x77aa_55cc_33ee_11ff;
/// u32: [`super::Scenario::VirtioReads`] starts read k only while k < this (host).
pub const MB_READ_LIMIT: u64 = MAILBOX + 0x24;
/// Distinct places [`super::Scenario::VirtioReads`] reads, in turn.
pub const READ_SLOTS: u64 = 64;
/// Read k of [`super::Scenario::VirtioReads`] is at byte `(k % READ_SLOTS) * READ_STRIDE`.
pub const READ_STRIDE: u64 = 256 << 10;
/// u64: [`super::Scenario::TscClock`]: the guest's RDTSC at its last tick.
pub const MB_TSC: u64 = MAILBOX + 0x28;
/// u32: periods the last tick skipped.
pub const MB_MISSED: u64 = MAILBOX + 0x30;
/// u32: the most periods one tick skipped.
pub const MB_MISSED_MAX: u64 = MAILBOX + 0x34;
/// u32: ticks that found the TSC far behind the armed deadline (it went backwards).
pub const MB_TSC_BACK: u64 = MAILBOX + 0x38;
/// kvmclock's `pvclock_vcpu_time_info` (32 bytes) with `KVMCLOCK=1`.
pub const MB_PVCLOCK: u64 = MAILBOX + 0x40;
/// TSC cycles between two ticks of [`super::Scenario::TscClock`].
pub const TSC_PERIOD: u64 = 25_000_000;
