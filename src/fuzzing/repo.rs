//! Harnesses of the repository's on-disk catalogue and of its export files.

use std::collections::BTreeMap;
use std::path::Path;

use super::Input;
use crate::formats::REPO_VERSION;
use crate::repo::cli::{Entry, link_catalogue, render_entry, render_tree};
use crate::repo::export::ExportReader;
use crate::repo::gc::Usage;
use crate::repo::{MARKER_FILE, REPO_FORMAT, SnapshotId, parse_meta, parse_name_file, valid_name};
use crate::store::ChunkId;

/// Most snapshots and names one input describes.
const MAX_RECORDS: usize = 16;

/// Repository catalogue: the marker (`vmm-repo.json`), snapshot directories with their
/// `meta.json`, and name files, each a u16-length-prefixed part of the input, assembled
/// into the catalogue `repo ls` and `repo show` print (`repo::cli::link_catalogue`).
///
/// Properties: a marker that parses has the version asked for; a `meta.json` that parses
/// names its own snapshot and survives a JSON round trip; every snapshot is in the
/// catalogue's tree exactly once (a root or the child of one listed snapshot) and `ls`
/// prints one line for each.
pub fn repo_catalogue(data: &[u8]) {
    let mut inp = Input::new(data);
    let marker = inp.part();
    let path = Path::new("repo").join(MARKER_FILE);
    let name = "vmm snapshot repository";
    if let Ok(v) = crate::formats::parse_marker(&path, marker, REPO_FORMAT, name, 1, 1) {
        assert_eq!(v, REPO_VERSION);
    }
    let count = usize::from(inp.u8()) % (MAX_RECORDS + 1);
    let mut snapshots = Vec::new();
    for _ in 0..count {
        let dir = inp.part();
        let meta = inp.part();
        let usage = (inp.u8() & 1 == 1).then(|| Usage {
            chunks: inp.u64(),
            bytes_unique: inp.u64(),
            bytes_shared: inp.u64(),
            chunks_missing: inp.u64(),
        });
        let Some(id) = std::str::from_utf8(dir).ok().and_then(|d| d.parse().ok()) else {
            continue;
        };
        snapshots.push((id, meta, usage));
    }
    let mut names: BTreeMap<SnapshotId, Vec<String>> = BTreeMap::new();
    for _ in 0..usize::from(inp.u8()) % (MAX_RECORDS + 1) {
        let (n, content) = (String::from_utf8_lossy(inp.part()), inp.part());
        if let Some(id) = parse_name_file(content).filter(|_| valid_name(&n)) {
            names.entry(id).or_default().push(n.into_owned());
        }
    }
    check_catalogue(snapshots, &names);
}

fn check_catalogue(
    snapshots: Vec<(SnapshotId, &[u8], Option<Usage>)>,
    names: &BTreeMap<SnapshotId, Vec<String>>,
) {
    let root = Path::new("/repo");
    let mut entries = Vec::new();
    let mut usage = BTreeMap::new();
    for (id, bytes, u) in snapshots {
        if entries.iter().any(|e: &Entry| e.id == id) {
            continue; // a directory lists each id once
        }
        let mut errors = Vec::new();
        let meta = parse_meta(&id, bytes)
            .map_err(|e| errors.push(e.to_string()))
            .ok();
        if let Some(m) = &meta {
            assert_eq!(m.id, id);
            let json = serde_json::to_vec(m).expect("a meta serializes");
            assert_eq!(&parse_meta(&id, &json).expect("round trip"), m);
        }
        if let Some(u) = u {
            usage.insert(id, u);
        }
        entries.push(Entry {
            id,
            short_id: id.short(),
            parent: meta.as_ref().and_then(|m| m.parent),
            parent_listed: false,
            children: Vec::new(),
            names: names.get(&id).cloned().unwrap_or_default(),
            path: root.join("snapshots").join(id.to_string()),
            meta,
            usage: None,
            errors,
        });
    }
    let n = entries.len();
    let cat = link_catalogue(root.to_path_buf(), entries, &usage);
    assert_eq!(cat.snapshots.len(), n);
    let mut placed: BTreeMap<SnapshotId, usize> = cat.roots.iter().map(|r| (*r, 1)).collect();
    for e in &cat.snapshots {
        for c in &e.children {
            *placed.entry(*c).or_default() += 1;
        }
        render_entry(e);
    }
    for e in &cat.snapshots {
        assert_eq!(
            placed.get(&e.id),
            Some(&1),
            "{} not once in the tree",
            e.short_id
        );
    }
    let tree = render_tree(&cat);
    let lines = tree.lines().filter(|l| !l.is_empty()).count();
    assert_eq!(lines, n.max(1), "ls prints a line per snapshot:\n{tree}");
    serde_json::to_string(&cat).expect("a catalogue serializes");
}

/// Repository export file (`repo::export::ExportReader`, the reading side of `repo
/// import`). First byte 0: the rest is the file. Otherwise the rest is a u16-prefixed
/// state file, a u16-prefixed manifest and the chunk section (count and chunks), which
/// the harness wraps with a header naming their true id and with the trailing checksum,
/// so the chunk parser is reached.
///
/// Properties: a head that reads names the id of its state and manifest and announces no
/// more chunks than the file has room for; every chunk read hashes to its id; a file that
/// reads to the end is exactly as long as the input and ends with the hash of the rest.
pub fn repo_export(data: &[u8]) {
    let mut inp = Input::new(data);
    let file = match inp.u8() {
        0 => inp.rest().to_vec(),
        _ => synthesize_export(&mut inp),
    };
    let mut r = ExportReader::new(&file[..], file.len() as u64, Path::new("fuzz.export"));
    let Ok(head) = r.head() else {
        return;
    };
    assert_eq!(head.id, SnapshotId::of_files(&head.state, &head.memory));
    assert!(head.state.len() + head.memory.len() <= file.len());
    assert!(head.count <= file.len() as u64 / 36);
    for _ in 0..head.count {
        let Ok((id, chunk)) = r.chunk() else {
            return;
        };
        assert_eq!(
            ChunkId::of(&chunk),
            id,
            "an imported chunk does not hash to its id"
        );
    }
    if let Ok(n) = r.finish() {
        assert_eq!(n, file.len() as u64);
        let (body, hash) = file.split_at(file.len() - 32);
        assert_eq!(blake3::hash(body).as_bytes(), hash);
    }
}

/// An export file around the parts in `inp` (see [`repo_export`]).
fn synthesize_export(inp: &mut Input<'_>) -> Vec<u8> {
    let state = inp.part();
    let memory = inp.part();
    let chunks = inp.rest();
    let id = SnapshotId::of_files(state, memory);
    let header = serde_json::json!({ "id": id, "meta": null }).to_string();
    let mut f = b"VMMEXPRT".to_vec();
    f.extend_from_slice(&crate::formats::EXPORT_VERSION.to_le_bytes());
    f.extend_from_slice(&(header.len() as u32).to_le_bytes());
    f.extend_from_slice(header.as_bytes());
    for part in [state, memory] {
        f.extend_from_slice(&(part.len() as u64).to_le_bytes());
        f.extend_from_slice(part);
    }
    f.extend_from_slice(chunks);
    f.extend_from_slice(b"VMMEXEND");
    let hash = blake3::hash(&f);
    f.extend_from_slice(hash.as_bytes());
    f
}
