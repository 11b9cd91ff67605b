//! Bad input gets a clear one-line error and a non-zero exit code, never a panic.

mod support;

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(support::env::vmm_bin())
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("run vmm");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.code().unwrap_or(-1), stderr)
}

fn assert_clear_error(args: &[&str], needle: &str) {
    let (code, stderr) = run(args);
    assert_ne!(code, 0, "{args:?} should fail; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "{args:?}: expected {needle:?} in stderr: {stderr}"
    );
    let error_lines = stderr.lines().filter(|l| l.contains("error")).count();
    assert!(error_lines >= 1, "no error line: {stderr}");
}

fn tmpfile(name: &str, content: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

#[test]
fn missing_kernel_file() {
    assert_clear_error(
        &["--kernel", "path=/nonexistent/vmlinux"],
        "/nonexistent/vmlinux",
    );
}

#[test]
fn kernel_is_a_directory() {
    assert_clear_error(&["--kernel", "path=/tmp"], "directory");
}

#[test]
fn kernel_neither_elf_nor_bzimage() {
    let p = tmpfile("garbage", &[0x5a; 8192]);
    assert_clear_error(&["--kernel", &format!("path={}", p.display())], "neither");
}

#[test]
fn malformed_flags() {
    assert_clear_error(&["--kernel", "cmdline=x"], "path= is required");
    assert_clear_error(&["--kernel", "path=/k,bogus=1"], "unknown key");
    assert_clear_error(
        &["--kernel", "path=/k", "--memory", "size_mib=lots"],
        "not a number",
    );
    assert_clear_error(
        &["--kernel", "path=/k", "--block", "read_only=true"],
        "path= (a local image) or url= (a remote image) is required",
    );
    assert_clear_error(&["--kernel", r#"path=/k,cmdline="unterminated"#], "quote");
    assert_clear_error(&["--no-such-flag"], "unexpected argument");
}

#[test]
fn zero_vcpus() {
    assert_clear_error(&["--kernel", "path=/k", "--vcpu", "num=0"], "num must be");
}

#[test]
fn more_vcpus_than_kvm_allows() {
    if support::env::kvm_missing().is_some() {
        println!("SKIP: no KVM");
        return;
    }
    let Ok(a) = support::env::artifacts() else {
        println!("SKIP: no guest artifacts");
        return;
    };
    let k = format!("path={}", a.file("vmlinux").display());
    // The VMM's own limit (254: APIC ids in the MP table) is below KVM_CAP_MAX_VCPUS on
    // common hosts; the builder also checks KVM's limit where it is lower.
    assert_clear_error(&["--kernel", &k, "--vcpu", "num=300"], "254");
}

#[test]
fn memory_too_small_for_the_kernel() {
    let Ok(a) = support::env::artifacts() else {
        println!("SKIP: no guest artifacts");
        return;
    };
    if support::env::kvm_missing().is_some() {
        println!("SKIP: no KVM");
        return;
    }
    let k = format!("path={}", a.file("vmlinux").display());
    assert_clear_error(&["--kernel", &k, "--memory", "size_mib=2"], "kernel");
}

#[test]
fn bad_disks() {
    // Disks are checked before the VM is created, so no KVM is needed here.
    let k = tmpfile("kernel-placeholder", b"not checked before the disks");
    let karg = format!("path={}", k.display());
    assert_clear_error(
        &["--kernel", &karg, "--block", "path=/nonexistent/disk.img"],
        "/nonexistent/disk.img",
    );
    let dir = std::env::temp_dir();
    assert_clear_error(
        &[
            "--kernel",
            &karg,
            "--block",
            &format!("path={}", dir.display()),
        ],
        "directory",
    );
    let odd = tmpfile("odd.img", &[0u8; 1000]);
    assert_clear_error(
        &[
            "--kernel",
            &karg,
            "--block",
            &format!("path={}", odd.display()),
        ],
        "512",
    );
}

#[test]
fn bad_nets() {
    // Taps are checked before the VM is created, so no KVM is needed here.
    let k = tmpfile("kernel-placeholder-net", b"not checked before the taps");
    let karg = format!("path={}", k.display());
    let expect = |net: &str, needle: &str, code: i32| {
        let args = ["--kernel", karg.as_str(), "--net", net];
        assert_clear_error(&args, needle);
        assert_eq!(run(&args).0, code, "{args:?}");
    };
    expect("tap=a234567890123456", "1 to 15 bytes", 2);
    expect("tap=t0,mac=01:00:00:00:00:01", "unicast", 2);
    expect("tap=t0,mac=02:00:00:00:00", "unicast", 2);
    expect("mac=02:00:00:00:00:01", "tap= is required", 2);
    expect("tap=vmmnosuchtap9", "no such network interface", 1);
    let (code, stderr) = run(&[
        "--kernel",
        &karg,
        "--net",
        "tap=a,id=x",
        "--net",
        "tap=b,id=x",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("given twice"), "{stderr}");
}
