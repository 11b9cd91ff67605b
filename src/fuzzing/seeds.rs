//! Seed inputs for the fuzz targets, made from real files: the golden fixtures written
//! by earlier builds (`tests/fixtures/`: state files, manifests, chunks, an image index, a
//! working set, a repository, an export) and, for the device and API targets, requests
//! laid out the way a guest driver or an API client sends them.
//!
//! `tests/fuzz_corpus.rs` replays them and (ignored test `write_fuzz_seeds`) writes them
//! into `fuzz/corpus/<target>/seed-*`.

use std::fs;
use std::io;
use std::path::Path;

use crate::disk::http::format_prefetch_list;
use crate::formats::file::{HEADER_LEN, TRAILER_LEN};
use crate::store::ChunkId;

/// One seed input.
#[derive(Debug, Clone)]
pub struct Seed {
    /// The fuzz target it is for.
    pub target: &'static str,
    /// File name in the corpus (without the `seed-` prefix).
    pub name: String,
    /// The input.
    pub data: Vec<u8>,
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn part(bytes: &[u8]) -> Vec<u8> {
    let n = u16::try_from(bytes.len()).expect("seed part under 64 KiB");
    cat(&[&n.to_le_bytes(), bytes])
}

fn payload(file: &[u8]) -> &[u8] {
    &file[HEADER_LEN..file.len() - TRAILER_LEN]
}

/// Every seed, from the fixtures under `fixtures` (the repository's `tests/fixtures`).
pub fn seeds(fixtures: &Path) -> io::Result<Vec<Seed>> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: String, data: Vec<u8>| {
        out.push(Seed { target, name, data });
    };
    for v in ["v1", "v2"] {
        let dir = fixtures.join(v);
        let state = fs::read(dir.join("snapshot/state"))?;
        let older = if state[8] == 2 { 3u8 } else { 1 };
        add("state_file", format!("{v}-state"), cat(&[&[0], &state]));
        add(
            "state_file",
            format!("{v}-payload"),
            cat(&[&[older], payload(&state)]),
        );
        let memory = fs::read(dir.join("snapshot/memory"))?;
        add(
            "memory_manifest",
            format!("{v}-memory"),
            cat(&[&[0], &memory]),
        );
        add(
            "memory_manifest",
            format!("{v}-payload"),
            cat(&[&[1], payload(&memory)]),
        );
        let index = fs::read(dir.join("archive/images/data"))?;
        add("image_index", format!("{v}-index"), cat(&[&[0], &index]));
        add(
            "image_index",
            format!("{v}-payload"),
            cat(&[&[1], payload(&index)]),
        );
        let ws = fs::read(dir.join("archive/vms/ticks/workingset"))?;
        add("working_set", format!("{v}-workingset"), cat(&[&[0], &ws]));
        add(
            "working_set",
            format!("{v}-payload"),
            cat(&[&[1], payload(&ws)]),
        );
        for entry in fs::read_dir(dir.join("archive/chunks"))? {
            for chunk in fs::read_dir(entry?.path())? {
                let path = chunk?.path();
                let file = fs::read(&path)?;
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                let short = &name[..name.len().min(12)];
                add("chunk_codec", format!("{v}-{short}"), cat(&[&[0], &file]));
                let id: ChunkId = name.parse().map_err(io::Error::other)?;
                let with_id = cat(&[&[1], id.as_bytes(), &file]);
                add("chunk_codec", format!("{v}-{short}-id"), with_id);
            }
        }
        let export = fs::read(dir.join("second.export"))?;
        add("repo_export", format!("{v}-export"), cat(&[&[0], &export]));
        let synth = cat(&[&[1], &part(&state), &part(&memory), &0u64.to_le_bytes()]);
        add("repo_export", format!("{v}-parts"), synth);
        add(
            "repo_catalogue",
            format!("{v}-repo"),
            catalogue(&dir.join("repo"))?,
        );
    }
    let id = super::files::prefetch_image_id();
    let list = format_prefetch_list(&id, &[3, 1, 7, 0, 4_000_000_000]);
    add(
        "working_set",
        "prefetch".into(),
        cat(&[&[2], list.as_bytes()]),
    );
    let text: &[u8] = b"the quick brown fox jumps over the lazy dog ";
    add("chunk_codec", "text".into(), cat(&[&[3], &text.repeat(40)]));
    for (name, data) in virtio_blk_seeds() {
        add("virtio_blk", name, data);
    }
    add("virtio_mmio", "driver-init".into(), virtio_mmio_seed());
    for (name, data) in api_seeds() {
        add("api_http", name.into(), data);
    }
    Ok(out)
}

/// A repository catalogue input (see `repo_catalogue`) from the repository at `repo`.
fn catalogue(repo: &Path) -> io::Result<Vec<u8>> {
    let mut out = part(&fs::read(repo.join("vmm-repo.json"))?);
    let mut snaps = Vec::new();
    for e in fs::read_dir(repo.join("snapshots"))? {
        let e = e?;
        let meta = fs::read(e.path().join("meta.json"))?;
        snaps.push((e.file_name().to_string_lossy().into_owned(), meta));
    }
    snaps.sort();
    out.push(snaps.len() as u8);
    for (i, (dir, meta)) in snaps.iter().enumerate() {
        out.extend(part(dir.as_bytes()));
        out.extend(part(meta));
        out.push(i as u8 & 1);
        if i & 1 == 1 {
            for n in [3u64, 8192, 4096, 0] {
                out.extend_from_slice(&n.to_le_bytes());
            }
        }
    }
    let mut names = Vec::new();
    for e in fs::read_dir(repo.join("names"))? {
        let e = e?;
        names.push((
            e.file_name().to_string_lossy().into_owned(),
            fs::read(e.path())?,
        ));
    }
    names.sort();
    out.push(names.len() as u8);
    for (n, content) in &names {
        out.extend(part(n.as_bytes()));
        out.extend(part(content));
    }
    Ok(out)
}

/// One descriptor as the virtio_blk harness reads it.
fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    cat(&[
        &addr.to_le_bytes(),
        &len.to_le_bytes(),
        &flags.to_le_bytes(),
        &next.to_le_bytes(),
    ])
}

/// virtio_blk inputs: an 8-entry queue holding real requests (IN, OUT, FLUSH, GET_ID,
/// and an IN through an indirect table), headers and data at 0x2000.
fn virtio_blk_seeds() -> Vec<(String, Vec<u8>)> {
    const NEXT: u16 = 1;
    const W: u16 = 2;
    const IND: u16 = 4;
    let hdr = |t: u32, sector: u64| cat(&[&t.to_le_bytes(), &[0; 4], &sector.to_le_bytes()]);
    // Payload at 0x2000: headers at 0x2000 + 16 * k, indirect table at 0x2100, data after.
    let mut payload = cat(&[&hdr(0, 1), &hdr(1, 2), &hdr(4, 0), &hdr(8, 0), &hdr(0, 3)]);
    payload.resize(0x100, 0);
    payload.extend(desc(0x2040, 16, NEXT, 1));
    payload.extend(desc(0x3400, 1024, W | NEXT, 2));
    payload.extend(desc(0x3c00, 1, W, 0));
    payload.resize(0x1000, 0x5a);
    let descs = [
        desc(0x2000, 16, NEXT, 1), // IN: header, 512 bytes, status
        desc(0x3000, 512, W | NEXT, 2),
        desc(0x3200, 1, W, 0),
        desc(0x2010, 16, NEXT, 4), // OUT: header, data, status
        desc(0x2800, 512, NEXT, 5),
        desc(0x3201, 1, W, 0),
        desc(0x2100, 48, IND, 0), // IN through an indirect table
        desc(0x2020, 16, 0, 0),   // FLUSH without a status byte
    ];
    let mut seeds = Vec::new();
    for (name, ring) in [("in-out", vec![0u16, 3]), ("indirect", vec![6, 7, 0])] {
        let mut d = cat(&[&[3, 0, 16], &(ring.len() as u16).to_le_bytes(), &[0; 4]]);
        d.extend(descs.concat());
        for i in 0..8 {
            d.extend_from_slice(&ring.get(i).copied().unwrap_or(0).to_le_bytes());
        }
        d.extend_from_slice(&payload);
        seeds.push((name.to_string(), d));
    }
    seeds
}

/// virtio_mmio input: a driver initializing the device, queueing a read, notifying,
/// reading registers and config space, and a save/restore.
fn virtio_mmio_seed() -> Vec<u8> {
    // (register index in the harness's MMIO_REGS, value)
    let reg = |i: u8, v: u32| cat(&[&[2, i], &v.to_le_bytes()]);
    let mut s = Vec::new();
    for v in [1u32, 3] {
        s.extend(reg(8, v)); // status ACKNOWLEDGE, DRIVER
    }
    s.extend(reg(2, 1)); // driver features word 1
    s.extend(reg(1, 1)); // VERSION_1
    s.extend(reg(8, 0xb)); // FEATURES_OK
    s.extend(reg(3, 0)); // queue 0
    s.extend(reg(4, 8)); // 8 entries
    s.extend(reg(9, 0)); // desc
    s.extend(reg(11, 0x1000)); // avail
    s.extend(reg(13, 0x1400)); // used
    s.extend(reg(5, 1)); // ready
    s.extend(reg(8, 0xf)); // DRIVER_OK
    let mem = |at: u16, bytes: &[u8]| cat(&[&[4], &at.to_le_bytes(), &[bytes.len() as u8], bytes]);
    let table = [
        desc(0x2000, 16, 1, 1),
        desc(0x3000, 512, 3, 2),
        desc(0x3200, 1, 2, 0),
    ]
    .concat();
    s.extend(mem(0, &table));
    s.extend(mem(0x2000, &[0; 16]));
    s.extend(mem(0x1000, &[0, 0, 1, 0, 0, 0]));
    s.extend([5]); // process the queue
    for (off, w) in [
        (0u16, 2u8),
        (0x70, 2),
        (0x60, 2),
        (0x100, 3),
        (0x34, 2),
        (0x71, 0),
    ] {
        s.extend(cat(&[&[3], &off.to_le_bytes(), &[w]]));
    }
    s.extend(reg(7, 1)); // interrupt ack
    s.push(6); // save and restore
    s.extend(reg(8, 0)); // reset
    s
}

/// api_http inputs: the requests `vmm` clients send (docs/API.md).
fn api_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let req = |method: &str, path: &str, body: &str| {
        let mut r = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
        if !body.is_empty() {
            r += &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            );
        }
        r + "\r\n" + body
    };
    let get = req("GET", "/vm", "");
    let pause = req("PATCH", "/vm", r#"{"state":"Paused"}"#);
    let snap = req("PUT", "/snapshot/create", r#"{"path":"/tmp/snap"}"#);
    let repo = req(
        "PUT",
        "/snapshot/create",
        r#"{"repo":"/tmp/repo","name":"first","parent":"ab12"}"#,
    );
    let stop = req("PUT", "/actions", r#"{"action":"Shutdown"}"#);
    let cont = "PUT /snapshot/create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 22\r\n\
                Connection: keep-alive, close\r\n\r\n{\"path\":\"/tmp/snap2\"}\n";
    vec![
        ("get", get.clone().into_bytes()),
        (
            "pipelined",
            [get, pause, snap.clone()].concat().into_bytes(),
        ),
        ("repo", repo.into_bytes()),
        ("http10", "GET /vm?x=1 HTTP/1.0\r\n\r\n".into()),
        ("actions", stop.into_bytes()),
        ("continue", cont.into()),
    ]
}
