//! The catalogue `vmm snapshot ls` and `show` report (every snapshot, its names, tree
//! links and chunk usage) and its human renderings.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::gc::Usage;
use super::{Repo, RepoError, SnapshotId, SnapshotMeta};
use crate::util::error_chain;

/// One snapshot as `ls`/`show` report it.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    /// Full id.
    pub id: SnapshotId,
    /// Short id.
    pub short_id: String,
    /// Parent, as recorded.
    pub parent: Option<SnapshotId>,
    /// Whether the parent is still listed.
    pub parent_listed: bool,
    /// Listed snapshots whose parent this is.
    pub children: Vec<SnapshotId>,
    /// Friendly names.
    pub names: Vec<String>,
    /// Directory.
    pub path: PathBuf,
    /// Catalogue entry (absent when unreadable).
    pub meta: Option<SnapshotMeta>,
    /// Chunk usage (absent when the snapshot cannot be read).
    pub usage: Option<Usage>,
    /// Problems reading it.
    pub errors: Vec<String>,
}

/// The whole catalogue.
#[derive(Clone, Debug, Serialize)]
pub struct Catalogue {
    /// The repository.
    pub repo: PathBuf,
    /// Snapshots without a listed parent.
    pub roots: Vec<SnapshotId>,
    /// Every snapshot, oldest first.
    pub snapshots: Vec<Entry>,
}

/// Reads the catalogue: every snapshot, its meta, names, tree links and usage.
pub fn catalogue(repo: &Repo) -> Result<Catalogue, RepoError> {
    let ids = repo.list()?;
    let names = repo.names_by_id()?;
    let mut refs = BTreeMap::new();
    let mut entries = Vec::new();
    for id in &ids {
        let mut errors = Vec::new();
        let meta = repo
            .read_meta(id)
            .map_err(|e| errors.push(e.to_string()))
            .ok();
        match repo.refs(id) {
            Ok(r) => {
                refs.insert(*id, r);
            }
            Err(e) => errors.push(error_chain(&e)),
        }
        entries.push(Entry {
            id: *id,
            short_id: id.short(),
            parent: meta.as_ref().and_then(|m| m.parent),
            parent_listed: false,
            children: Vec::new(),
            names: names.get(id).cloned().unwrap_or_default(),
            path: repo.snapshot_dir(id),
            meta,
            usage: None,
            errors,
        });
    }
    let usage = super::gc::usage(repo, &refs);
    Ok(link_catalogue(repo.root().to_path_buf(), entries, &usage))
}

/// Completes the entries read from a repository into its catalogue: sorts them (oldest
/// first), adds their usage, and links each to its parent when that one is listed too.
pub fn link_catalogue(
    repo: PathBuf,
    mut entries: Vec<Entry>,
    usage: &BTreeMap<SnapshotId, Usage>,
) -> Catalogue {
    let mut ids: Vec<SnapshotId> = entries.iter().map(|e| e.id).collect();
    ids.sort();
    entries.sort_by_key(|e| (e.meta.as_ref().map_or(0, |m| m.created_unix), e.id));
    let mut children: BTreeMap<SnapshotId, Vec<SnapshotId>> = BTreeMap::new();
    for e in &entries {
        if let Some(p) = e.parent.filter(|p| ids.binary_search(p).is_ok()) {
            children.entry(p).or_default().push(e.id);
        }
    }
    let mut roots = Vec::new();
    for e in &mut entries {
        e.usage = usage.get(&e.id).copied();
        e.children = children.remove(&e.id).unwrap_or_default();
        e.parent_listed = e.parent.is_some_and(|p| ids.binary_search(&p).is_ok());
        if !e.parent_listed {
            roots.push(e.id);
        }
    }
    break_parent_cycles(&mut entries, &mut roots);
    Catalogue {
        repo,
        roots,
        snapshots: entries,
    }
}

/// Recorded parents can form a cycle (a damaged or edited `meta.json`): no snapshot on
/// it, nor below it, is reachable from a root, and `ls` would not show them. Each cycle
/// is cut above its oldest member met, which becomes a root.
fn break_parent_cycles(entries: &mut [Entry], roots: &mut Vec<SnapshotId>) {
    let index: BTreeMap<SnapshotId, usize> =
        entries.iter().enumerate().map(|(i, e)| (e.id, i)).collect();
    let mut reached = vec![false; entries.len()];
    let mark = |from: SnapshotId, entries: &[Entry], reached: &mut Vec<bool>| {
        let mut stack = vec![from];
        while let Some(id) = stack.pop() {
            let i = index[&id];
            if !std::mem::replace(&mut reached[i], true) {
                stack.extend(entries[i].children.iter().copied());
            }
        }
    };
    for r in roots.iter() {
        mark(*r, entries, &mut reached);
    }
    for i in 0..entries.len() {
        if reached[i] {
            continue;
        }
        // Every ancestor is listed (or this would be reached): walk up onto the cycle.
        let mut on_cycle = i;
        let mut seen = vec![false; entries.len()];
        while !std::mem::replace(&mut seen[on_cycle], true) {
            on_cycle = entries[on_cycle].parent.map_or(on_cycle, |p| index[&p]);
        }
        let id = entries[on_cycle].id;
        if let Some(p) = entries[on_cycle].parent.map(|p| index[&p]) {
            entries[p].children.retain(|c| *c != id);
        }
        roots.push(id);
        mark(id, entries, &mut reached);
    }
}

/// Bytes as B / KiB / MiB / GiB with one decimal.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn one_line(e: &Entry) -> String {
    let mut s = e.short_id.clone();
    if let Some(m) = &e.meta {
        s += &format!(
            "  {}  {} MiB {} vCPU",
            utc(m.created_unix),
            m.vm.mem_mib,
            m.vm.vcpus
        );
    }
    if let Some(u) = &e.usage {
        s += &format!(
            "  unique {} shared {}",
            human_bytes(u.bytes_unique),
            human_bytes(u.bytes_shared)
        );
        if u.chunks_missing > 0 {
            s += &format!("  {} CHUNK(S) MISSING", u.chunks_missing);
        }
    }
    if !e.names.is_empty() {
        s += &format!("  [{}]", e.names.join(", "));
    }
    if let (Some(p), false) = (e.parent, e.parent_listed) {
        s += &format!("  (parent {} removed)", p.short());
    }
    if !e.errors.is_empty() {
        s += &format!("  ERROR: {}", e.errors.join("; "));
    }
    s
}

/// `ls` as text: one line per snapshot, children indented under their parent. A single
/// child continues in the same column (a linear history stays flat); several children
/// branch out. Iterative, so a deep history cannot overflow the stack.
pub fn render_tree(cat: &Catalogue) -> String {
    let by_id: BTreeMap<SnapshotId, &Entry> = cat.snapshots.iter().map(|e| (e.id, e)).collect();
    let mut out = String::new();
    if cat.snapshots.is_empty() {
        out += "(no snapshots)\n";
    }
    for (i, r) in cat.roots.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        render_subtree(*r, &by_id, &mut out);
    }
    out
}

/// Prints `root` and its subtree, depth first, children in order. Each entry on the stack
/// is a snapshot, the prefix of its own line and the prefix of its subtree's lines.
fn render_subtree(root: SnapshotId, by_id: &BTreeMap<SnapshotId, &Entry>, out: &mut String) {
    let mut stack = vec![(root, String::new(), String::new())];
    while let Some((id, head, cont)) = stack.pop() {
        let Some(e) = by_id.get(&id) else { continue };
        *out += &format!("{head}{}\n", one_line(e));
        if let [only] = e.children.as_slice() {
            stack.push((*only, cont.clone(), cont));
            continue;
        }
        let last = e.children.len().saturating_sub(1);
        for (i, c) in e.children.iter().enumerate().rev() {
            let (h, n) = if i == last {
                ("└── ", "    ")
            } else {
                ("├── ", "│   ")
            };
            stack.push((*c, format!("{cont}{h}"), format!("{cont}{n}")));
        }
    }
}

/// `show` as text.
pub fn render_entry(e: &Entry) -> String {
    let mut s = format!("id:       {}\n", e.id);
    s += &format!("path:     {}\n", e.path.display());
    if !e.names.is_empty() {
        s += &format!("names:    {}\n", e.names.join(", "));
    }
    match (e.parent, e.parent_listed) {
        (Some(p), true) => s += &format!("parent:   {}\n", p.short()),
        (Some(p), false) => s += &format!("parent:   {} (removed)\n", p.short()),
        (None, _) => s += "parent:   none\n",
    }
    if !e.children.is_empty() {
        let c: Vec<String> = e.children.iter().map(SnapshotId::short).collect();
        s += &format!("children: {}\n", c.join(", "));
    }
    if let Some(m) = &e.meta {
        s += &format!("created:  {} UTC\n", utc(m.created_unix));
        s += &format!(
            "vm:       {} MiB, {} vCPU, kernel {}\n",
            m.vm.mem_mib, m.vm.vcpus, m.vm.kernel
        );
        for d in &m.vm.disks {
            s += &format!("disk:     {d}\n");
        }
        if let Some(a) = &m.added {
            s += &format!(
                "added:    {} in {} new chunk(s) ({} reused from the parent)\n",
                human_bytes(a.bytes_written),
                a.chunks_new,
                a.chunks_reused
            );
        }
    }
    if let Some(u) = &e.usage {
        s += &format!(
            "chunks:   {} ({} unique to it, {} shared)\n",
            u.chunks,
            human_bytes(u.bytes_unique),
            human_bytes(u.bytes_shared)
        );
        if u.chunks_missing > 0 {
            s += &format!("MISSING:  {} chunk(s)\n", u.chunks_missing);
        }
    }
    for err in &e.errors {
        s += &format!("error:    {err}\n");
    }
    s
}

/// A one-line human description of the JSON report of `PUT /snapshot/create` with a repo.
pub fn describe_create(report: &serde_json::Value) -> String {
    let short = report["short_id"].as_str().unwrap_or("?");
    let parent = report["parent"].as_str().map_or("none".to_string(), |p| {
        p.chars().take(super::SHORT_ID_LEN).collect()
    });
    let added = report["memory"]["bytes_written"].as_u64().unwrap_or(0);
    let name = report["name"]
        .as_str()
        .map_or(String::new(), |n| format!(" [{n}]"));
    format!(
        "snapshot {short}{name} (parent {parent}): {} added in {:.0} ms",
        human_bytes(added),
        report["total_ms"].as_f64().unwrap_or(0.0)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8, parent: Option<u8>, children: &[u8]) -> Entry {
        let id = |n: u8| SnapshotId::from_bytes([n; 32]);
        Entry {
            id: id(n),
            short_id: id(n).short(),
            parent: parent.map(id),
            parent_listed: parent.is_some(),
            children: children.iter().map(|c| id(*c)).collect(),
            names: Vec::new(),
            path: PathBuf::new(),
            meta: None,
            usage: None,
            errors: Vec::new(),
        }
    }

    #[test]
    fn tree_is_flat_for_a_line_and_branches_for_siblings() {
        // 1 -> 2 -> {3 -> 5, 4}; 6 is another root.
        let cat = Catalogue {
            repo: PathBuf::new(),
            roots: vec![
                SnapshotId::from_bytes([1; 32]),
                SnapshotId::from_bytes([6; 32]),
            ],
            snapshots: vec![
                entry(1, None, &[2]),
                entry(2, Some(1), &[3, 4]),
                entry(3, Some(2), &[5]),
                entry(4, Some(2), &[]),
                entry(5, Some(3), &[]),
                entry(6, None, &[]),
            ],
        };
        let s = |n: u8| format!("{n:02x}").repeat(6);
        let want = format!(
            "{}\n{}\n├── {}\n│   {}\n└── {}\n\n{}\n",
            s(1),
            s(2),
            s(3),
            s(5),
            s(4),
            s(6)
        );
        assert_eq!(render_tree(&cat), want);
    }

    #[test]
    fn snapshots_whose_parents_form_a_cycle_are_listed() {
        // Found by the repo_catalogue fuzz harness: 1 and 2 name each other as parent, 3
        // hangs below them; `ls` printed none of them.
        let mut e = [
            entry(1, Some(2), &[]),
            entry(2, Some(1), &[]),
            entry(3, Some(2), &[]),
        ];
        for e in &mut e {
            let meta = serde_json::json!({
                "id": e.id, "parent": e.parent, "name": null, "created_unix": 1,
                "vm": {"mem_mib": 1, "vcpus": 1, "kernel": "k", "disks": []}, "added": null,
            });
            e.meta = Some(serde_json::from_value(meta).unwrap());
        }
        let cat = link_catalogue(PathBuf::new(), e.to_vec(), &BTreeMap::new());
        assert_eq!(cat.roots, vec![SnapshotId::from_bytes([1; 32])]);
        // The cycle is cut above 1 (the oldest met): 1 -> 2 -> 3, flat.
        let s = |n: u8| format!("{n:02x}").repeat(6) + "  1970-01-01 00:00:01  1 MiB 1 vCPU";
        assert_eq!(render_tree(&cat), format!("{}\n{}\n{}\n", s(1), s(2), s(3)));
    }

    #[test]
    fn a_deep_history_renders_without_overflowing_the_stack() {
        const DEPTH: u32 = 100_000;
        let id = |n: u32| {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&n.to_be_bytes());
            SnapshotId::from_bytes(b)
        };
        let entries = (0..DEPTH)
            .map(|n| Entry {
                id: id(n),
                short_id: id(n).short(),
                parent: n.checked_sub(1).map(id),
                parent_listed: false,
                children: Vec::new(),
                names: Vec::new(),
                path: PathBuf::new(),
                meta: None,
                usage: None,
                errors: Vec::new(),
            })
            .collect();
        let cat = link_catalogue(PathBuf::new(), entries, &BTreeMap::new());
        assert_eq!(cat.roots, vec![id(0)]);
        let tree = render_tree(&cat);
        let lines: Vec<&str> = tree.lines().collect();
        assert_eq!(lines.len(), DEPTH as usize);
        // A linear history stays flat: every line starts with its id, in order.
        assert_eq!(lines[0], id(0).short());
        assert_eq!(lines[DEPTH as usize - 1], id(DEPTH - 1).short());
        assert!(lines.iter().zip(0..).all(|(l, n)| *l == id(n).short()));
    }

    #[test]
    fn utc_and_bytes_format() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(human_bytes(5), "5 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
