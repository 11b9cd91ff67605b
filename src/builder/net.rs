//! Network interfaces for both builders: taps opened before the guest starts, virtio-net
//! devices wired to the VM after the disks (slot `disks + i` of the MMIO window), and on a
//! restore the devices rebuilt from their state on the recorded tap or the one given for
//! their id, then announced (docs/NETWORK.md).

use std::sync::{Arc, Mutex};

use super::{BuildError, block_slot, irq_evt, register_queue_events};
use crate::config::{NetConfig, VmConfig};
use crate::devices::IrqLine;
use crate::devices::virtio::mmio::{MmioRestoreArgs, MmioTransport};
use crate::devices::virtio::net::{NetDevice, NetRestoreArgs, Tap};
use crate::devices::virtio::{MMIO_WINDOW_SIZE, VirtioDevice, kernel_cmdline_arg};
use crate::formats::Persist;
use crate::snapshot::microvm::MicrovmState;
use crate::util::lock;
use crate::vmm::AttachedNet;
use crate::vstate::bus::Bus;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vm::Vm;

/// Opens every interface's tap, in order (a missing or busy tap ends the build here,
/// before the guest starts).
pub fn open_taps(nets: &[NetConfig]) -> Result<Vec<Tap>, BuildError> {
    nets.iter()
        .map(|n| Tap::open(&n.tap).map_err(BuildError::Tap))
        .collect()
}

/// Gives every interface without a MAC a random locally administered one (recorded in the
/// configuration, so snapshots keep it).
pub fn fill_macs(nets: &mut [NetConfig]) {
    for n in nets.iter_mut().filter(|n| n.mac.is_none()) {
        let mut r = [0u8; 4];
        // SAFETY: getrandom writes at most r.len() bytes into the buffer.
        let got = unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
        if got != r.len() as isize {
            r = (std::process::id() ^ 0x5a5a_0000).to_le_bytes();
        }
        n.mac = Some([0x02, 0xfc, r[0], r[1], r[2], r[3]]);
    }
}

/// A net device wired to the VM: thread started (gate held if `paused`), ioeventfds and
/// irqfd registered.
pub struct WiredNet {
    device: Arc<Mutex<NetDevice>>,
    base: u64,
    gsi: u32,
    irq: IrqLine,
}

fn wire_net(
    vm: &Vm,
    index: usize,
    (base, gsi): (u64, u32),
    mut device: NetDevice,
    paused: bool,
) -> Result<WiredNet, BuildError> {
    if paused {
        device.io_gate().hold();
    }
    device
        .start_worker(&format!("virtio-net{index}"))
        .map_err(|e| BuildError::Device(crate::util::error_chain(&e)))?;
    let irq = IrqLine::new(irq_evt(vm, gsi)?, gsi);
    register_queue_events(vm, base, device.queue_events())?;
    Ok(WiredNet {
        device: Arc::new(Mutex::new(device)),
        base,
        gsi,
        irq,
    })
}

fn plug_net(
    mmio: &mut Bus,
    device: Arc<Mutex<NetDevice>>,
    (base, gsi): (u64, u32),
    transport: MmioTransport,
) -> Result<AttachedNet, BuildError> {
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(transport.clone(), base, MMIO_WINDOW_SIZE)
        .map_err(|e| BuildError::Device(e.to_string()))?;
    Ok(AttachedNet {
        device,
        transport,
        base,
        gsi,
    })
}

/// Where interface `i` sits: after the disks.
fn net_slot(cfg: &VmConfig, i: usize) -> Result<(u64, u32), BuildError> {
    let index = cfg.blocks.len() + i;
    block_slot(index, cfg.blocks.len() + cfg.nets.len())
}

/// Boot: a device and transport per interface on its opened tap, on the MMIO bus; returns
/// them with their kernel command-line parameters.
pub fn attach_nets(
    vm: &Vm,
    mem: &GuestMemory,
    cfg: &VmConfig,
    taps: Vec<Tap>,
    mmio: &mut Bus,
    paused: bool,
) -> Result<(Vec<AttachedNet>, Vec<String>), BuildError> {
    let mut attached = Vec::new();
    let mut params = Vec::new();
    for (i, (n, tap)) in cfg.nets.iter().zip(taps).enumerate() {
        let mac = n.mac.unwrap_or([0x02, 0xfc, 0, 0, 0, i as u8]);
        let device = NetDevice::new(&n.id, tap, mac)
            .map_err(|e| BuildError::Device(crate::util::error_chain(&e)))?;
        let slot = net_slot(cfg, i)?;
        let wired = wire_net(vm, i, slot, device, paused)?;
        let transport = MmioTransport::new(mem.clone(), wired.device.clone(), wired.irq)
            .map_err(|e| BuildError::Device(e.to_string()))?;
        params.push(kernel_cmdline_arg(slot.0, slot.1));
        attached.push(plug_net(mmio, wired.device, slot, transport)?);
    }
    Ok((attached, params))
}

/// Restore, step 1: the interfaces of the snapshot, with the taps `overrides` gives by id.
pub fn restore_net_config(
    cfg: &mut VmConfig,
    state: &MicrovmState,
    overrides: &[NetConfig],
) -> Result<(), BuildError> {
    cfg.nets = state
        .nets
        .iter()
        .map(|n| NetConfig {
            id: n.device.id.clone(),
            tap: n.device.tap.clone(),
            mac: Some(n.device.mac),
        })
        .collect();
    for o in overrides {
        let Some(n) = cfg.nets.iter_mut().find(|n| n.id == o.id) else {
            let ids: Vec<&str> = state.nets.iter().map(|n| n.device.id.as_str()).collect();
            return Err(BuildError::Device(format!(
                "--net id={}: the snapshot has no such interface (it has: {})",
                o.id,
                if ids.is_empty() {
                    "none".into()
                } else {
                    ids.join(", ")
                }
            )));
        };
        n.tap = o.tap.clone();
    }
    Ok(())
}

/// Restore, step 4: each device rebuilt from its state on its tap, wired with its gate held.
pub fn restore_net_devices(
    vm: &Vm,
    cfg: &VmConfig,
    state: &MicrovmState,
    taps: Vec<Tap>,
) -> Result<Vec<WiredNet>, BuildError> {
    let mut wired = Vec::new();
    for (i, (tap, saved)) in taps.into_iter().zip(&state.nets).enumerate() {
        let (base, gsi) = net_slot(cfg, i)?;
        if base != saved.base || gsi != saved.gsi {
            return Err(BuildError::Device(format!(
                "network interface {i}: snapshot has it at {:#x}/GSI {}, this VMM puts it at {base:#x}/GSI {gsi}",
                saved.base, saved.gsi
            )));
        }
        let device = NetDevice::restore(NetRestoreArgs { tap }, &saved.device)
            .map_err(|e| BuildError::Device(format!("network interface {i}: {e}")))?;
        wired.push(wire_net(vm, i, (base, gsi), device, true)?);
    }
    Ok(wired)
}

/// Restore, step 6: each transport rebuilt around its device, on the MMIO bus.
pub fn restore_net_transports(
    mem: &GuestMemory,
    wired: Vec<WiredNet>,
    state: &MicrovmState,
    mmio: &mut Bus,
) -> Result<Vec<AttachedNet>, BuildError> {
    let mut attached = Vec::new();
    for (i, (w, saved)) in wired.into_iter().zip(&state.nets).enumerate() {
        let args = MmioRestoreArgs {
            mem: mem.clone(),
            device: w.device.clone(),
            irq: w.irq,
        };
        let transport = MmioTransport::restore(args, &saved.transport)
            .map_err(|e| BuildError::Device(format!("network interface {i} transport: {e}")))?;
        attached.push(plug_net(mmio, w.device, (w.base, w.gsi), transport)?);
    }
    Ok(attached)
}

/// After a restore: every interface announces the guest on its tap.
pub fn announce(nets: &[AttachedNet]) {
    for n in nets {
        lock(&n.device).announce();
    }
}
