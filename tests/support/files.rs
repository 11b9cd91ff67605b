//! File helpers: hashes of files and trees, the remote tests' image, copying and sizing
//! directory trees.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::rng::random_bytes;

/// md5 of a file, as lowercase hex, via md5sum(1).
pub fn md5_file(p: &Path) -> String {
    let out = Command::new("md5sum").arg(p).output().expect("md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A 4 MiB test image written to `path`: random data with zero regions and a repeated
/// block. Returns its bytes.
pub fn test_image(path: &Path) -> Vec<u8> {
    let mut data = random_bytes(0x5eed, 4 << 20);
    data[256 << 10..768 << 10].fill(0);
    data[3 << 20..(3 << 20) + (300 << 10)].fill(0);
    let (a, b) = data.split_at_mut(2 << 20);
    b[..128 << 10].copy_from_slice(&a[..128 << 10]);
    fs::write(path, &data).unwrap();
    data
}

/// BLAKE3 of every file under `dir`, sorted by path.
pub fn tree_hashes(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let h = blake3::hash(&fs::read(&p).unwrap()).to_hex().to_string();
                out.push((p, h));
            }
        }
    }
    out.sort();
    out
}

/// Copies the directory tree `from` to `to` (which must not exist).
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dest)?;
        } else {
            fs::copy(e.path(), dest)?;
        }
    }
    Ok(())
}

/// Total size of the regular files under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => total += dir_bytes(&e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}
