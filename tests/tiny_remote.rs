//! A VM whose disk is a lazy remote image (served by a real nginx) with a persistent overlay:
//! its snapshot restores with the same overlay and base image, and is refused with another
//! overlay.

mod remote;
mod tiny;

use std::time::{Duration, Instant};

use remote::{Nginx, nginx_available};
use tiny::{Scenario, Spec, TempDir};
use vmm::config::BlockConfig;

#[test]
fn snapshot_of_a_vm_on_a_remote_disk_restores_with_its_overlay() {
    if !tiny::have_kvm() || !nginx_available() {
        return;
    }
    let tmp = TempDir::new("tiny-remote");
    let src = tmp.join("src.img");
    std::fs::write(&src, remote::random_bytes(2 << 20, 7)).unwrap();
    let archive = tmp.join("archive");
    vmm::image::import_image(&src, &archive, "img", vmm::image::DEFAULT_IMAGE_CHUNK_SIZE)
        .expect("import");
    let nginx = Nginx::start(&archive);
    let disk = |overlay: &str| BlockConfig {
        url: Some(format!("{}/images/img", nginx.url())),
        cache: Some(tmp.join("cache")),
        overlay: Some(tmp.join(overlay)),
        ..Default::default()
    };
    let mut vm = tiny::boot(Spec::new(Scenario::SnapDirty), vec![disk("a.overlay")]).expect("boot");
    vm.wait_for(Instant::now() + Duration::from_secs(30), "dirty: ready\n")
        .expect("ready");
    vm.pause().expect("pause");
    let snap = tmp.join("snap");
    vm.snapshot(&snap, None).expect("snapshot");
    drop(vm);

    let r =
        tiny::restore(&snap, None, true).expect("restore with the same remote disk and overlay");
    assert_eq!(r.vmm.remote.len(), 1, "the remote disk was not re-attached");
    drop(r);
    std::fs::copy(tmp.join("a.overlay"), tmp.join("b.overlay")).unwrap();
    let _ = std::fs::copy(tmp.join("a.overlay.map"), tmp.join("b.overlay.map"));
    let err = match tiny::restore(&snap, Some(vec![disk("b.overlay")]), true) {
        Ok(_) => panic!("a different overlay file was accepted"),
        Err(e) => e,
    };
    assert!(err.contains("overlay"), "{err}");
}
