//! The `vmm snapshot ls|show|rm|gc|verify|export|import|tag|untag` commands: argument
//! parsing (clap, flattened into `vmm snapshot`) and human / `--json` output.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Serialize;

use super::gc::RmReport;
pub use super::listing::{
    Catalogue, Entry, catalogue, describe_create, human_bytes, link_catalogue, render_entry,
    render_tree, utc,
};
use super::verify::VerifyReport;
use super::{Repo, RepoError};
use crate::util::error_chain;

/// Options every repository command takes.
#[derive(Args, Debug, Clone)]
pub struct RepoArgs {
    /// The snapshot repository directory.
    #[arg(long)]
    pub repo: PathBuf,
    /// Print the result as JSON on stdout (for scripts).
    #[arg(long)]
    pub json: bool,
}

/// Repository subcommands of `vmm snapshot`.
#[derive(Subcommand, Debug)]
pub enum RepoCmd {
    /// List the snapshots of a repository as a tree (children under their parent).
    Ls {
        #[command(flatten)]
        args: RepoArgs,
    },
    /// Show one snapshot (by name, id, or unique id prefix).
    Show {
        #[command(flatten)]
        args: RepoArgs,
        /// Name, id or id prefix.
        id: String,
    },
    /// Remove snapshots from the repository; their chunks are freed by the next `gc`.
    Rm {
        #[command(flatten)]
        args: RepoArgs,
        /// Names, ids or id prefixes.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Delete every chunk no listed snapshot needs (crash-safe mark and sweep).
    Gc {
        #[command(flatten)]
        args: RepoArgs,
    },
    /// Re-read and re-hash every chunk of one or all snapshots; exit 1 on any problem.
    Verify {
        #[command(flatten)]
        args: RepoArgs,
        /// Name, id or id prefix (default: every snapshot).
        id: Option<String>,
    },
    /// Write one snapshot and exactly the chunks it needs to a single file.
    Export {
        #[command(flatten)]
        args: RepoArgs,
        /// Name, id or id prefix.
        id: String,
        /// The file to write.
        file: PathBuf,
    },
    /// Import a file written by `export` (the repository is created if needed).
    Import {
        #[command(flatten)]
        args: RepoArgs,
        /// The export file.
        file: PathBuf,
        /// Name to give the imported snapshot.
        #[arg(long)]
        name: Option<String>,
    },
    /// Give a snapshot a friendly name (moving the name if it named another one).
    Tag {
        #[command(flatten)]
        args: RepoArgs,
        /// Name, id or id prefix of the snapshot.
        id: String,
        /// The new name.
        name: String,
    },
    /// Remove a friendly name (the snapshot stays).
    Untag {
        #[command(flatten)]
        args: RepoArgs,
        /// The name.
        name: String,
    },
}

/// A failure and its exit code: 2 for bad input (unknown or ambiguous id, bad name), 1 for
/// everything else.
struct Failure(u8, String);

impl From<RepoError> for Failure {
    fn from(e: RepoError) -> Self {
        let code = match e {
            RepoError::Unknown(_) | RepoError::Ambiguous { .. } | RepoError::BadName(_) => 2,
            _ => 1,
        };
        Failure(code, error_chain(&e))
    }
}

impl From<super::export::ExportError> for Failure {
    fn from(e: super::export::ExportError) -> Self {
        match e {
            super::export::ExportError::Repo(r) => r.into(),
            other => Failure(1, error_chain(&other)),
        }
    }
}

/// Runs a repository subcommand; returns the process exit code.
pub fn run(cmd: RepoCmd) -> ExitCode {
    let json = match &cmd {
        RepoCmd::Ls { args }
        | RepoCmd::Show { args, .. }
        | RepoCmd::Rm { args, .. }
        | RepoCmd::Gc { args }
        | RepoCmd::Verify { args, .. }
        | RepoCmd::Export { args, .. }
        | RepoCmd::Import { args, .. }
        | RepoCmd::Tag { args, .. }
        | RepoCmd::Untag { args, .. } => args.json,
    };
    match dispatch(cmd) {
        Ok(code) => ExitCode::from(code),
        Err(Failure(code, msg)) => {
            if json {
                println!("{}", serde_json::json!({ "error": msg }));
            }
            eprintln!("vmm: error: {msg}");
            ExitCode::from(code)
        }
    }
}

fn emit<T: Serialize>(json: bool, value: &T, human: impl FnOnce() -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("report serializes")
        );
    } else {
        print!("{}", human());
    }
}

fn dispatch(cmd: RepoCmd) -> Result<u8, Failure> {
    match cmd {
        RepoCmd::Ls { args } => ls(&args),
        RepoCmd::Show { args, id } => show(&args, &id),
        RepoCmd::Rm { args, ids } => rm(&args, &ids),
        RepoCmd::Gc { args } => gc(&args),
        RepoCmd::Verify { args, id } => verify(&args, id.as_deref()),
        RepoCmd::Export { args, id, file } => export(&args, &id, &file),
        RepoCmd::Import { args, file, name } => import(&args, &file, name.as_deref()),
        RepoCmd::Tag { args, id, name } => tag(&args, &id, &name),
        RepoCmd::Untag { args, name } => untag(&args, &name),
    }
}

fn ls(args: &RepoArgs) -> Result<u8, Failure> {
    let repo = Repo::open(&args.repo)?;
    let cat = catalogue(&repo)?;
    emit(args.json, &cat, || render_tree(&cat));
    Ok(0)
}

fn show(args: &RepoArgs, id: &str) -> Result<u8, Failure> {
    let repo = Repo::open(&args.repo)?;
    let id = repo.resolve(id)?;
    let cat = catalogue(&repo)?;
    let e = cat
        .snapshots
        .into_iter()
        .find(|e| e.id == id)
        .ok_or_else(|| Failure(1, format!("snapshot {} vanished", id.short())))?;
    emit(args.json, &e, || render_entry(&e));
    Ok(0)
}

fn rm(args: &RepoArgs, ids: &[String]) -> Result<u8, Failure> {
    let repo = Repo::open(&args.repo)?;
    let ids = ids
        .iter()
        .map(|s| repo.resolve(s))
        .collect::<Result<Vec<_>, _>>()?;
    let r = super::gc::rm(&repo, &ids)?;
    emit(args.json, &r, || describe_rm(&r));
    Ok(0)
}

fn describe_rm(r: &RmReport) -> String {
    let mut s = String::new();
    for x in &r.removed {
        s += &format!("removed {}", x.id.short());
        if !x.names.is_empty() {
            s += &format!(" ({})", x.names.join(", "));
        }
        s += "\n";
    }
    s + &format!(
        "`vmm snapshot gc` will free {} in {} chunk(s) no remaining snapshot uses\n",
        human_bytes(r.bytes_freed),
        r.chunks_freed
    )
}

fn gc(args: &RepoArgs) -> Result<u8, Failure> {
    let repo = Repo::open(&args.repo)?;
    let r = super::gc::gc(&repo, progress(args.json))?;
    emit(args.json, &r, || {
        format!(
            "gc: {} snapshot(s); kept {} chunk(s); deleted {} chunk(s), {} freed; {} leftover(s) removed\n",
            r.snapshots,
            r.chunks_kept,
            r.chunks_deleted,
            human_bytes(r.bytes_freed),
            r.leftovers_deleted
        )
    });
    Ok(0)
}

fn verify(args: &RepoArgs, id: Option<&str>) -> Result<u8, Failure> {
    let repo = Repo::open(&args.repo)?;
    let ids = match id {
        Some(s) => Some(vec![repo.resolve(s)?]),
        None => None,
    };
    let r = super::verify::verify(&repo, ids.as_deref(), progress(args.json))?;
    emit(args.json, &r, || describe_verify(&r));
    Ok(if r.ok { 0 } else { 1 })
}

fn describe_verify(r: &VerifyReport) -> String {
    let mut s = String::new();
    for c in &r.snapshots {
        let id = c.id.map_or("?".into(), |i| i.short());
        if c.ok() {
            s += &format!("{id}: ok ({} chunks)\n", c.chunks);
            continue;
        }
        s += &format!(
            "{id}: DAMAGED: {} missing, {} corrupt chunk(s)\n",
            c.missing.len(),
            c.corrupt.len()
        );
        for m in &c.missing {
            s += &format!("  missing chunk {m}\n");
        }
        for (m, why) in &c.corrupt {
            s += &format!("  corrupt chunk {m}: {why}\n");
        }
        for e in &c.errors {
            s += &format!("  {e}\n");
        }
    }
    s + &format!(
        "{} chunk(s) checked: {}\n",
        r.chunks_checked,
        if r.ok { "all intact" } else { "PROBLEMS FOUND" }
    )
}

fn export(args: &RepoArgs, id: &str, file: &Path) -> Result<u8, Failure> {
    let repo = Repo::open(&args.repo)?;
    let id = repo.resolve(id)?;
    let r = super::export::export(&repo, &id, file, progress(args.json))?;
    emit(args.json, &r, || {
        format!(
            "exported {} to {}: {} chunk(s), {}\n",
            r.id.short(),
            r.file.display(),
            r.chunks,
            human_bytes(r.file_bytes)
        )
    });
    Ok(0)
}

fn import(args: &RepoArgs, file: &Path, name: Option<&str>) -> Result<u8, Failure> {
    let repo = Repo::open_or_init(&args.repo)?;
    let r = super::export::import(&repo, file, name, progress(args.json))?;
    emit(args.json, &r, || {
        format!(
            "imported {} from {}: {} chunk(s), {} new{}\n",
            r.id.short(),
            r.file.display(),
            r.chunks,
            r.chunks_new,
            if r.new {
                ""
            } else {
                " (the snapshot was already there)"
            }
        )
    });
    Ok(0)
}

fn tag(args: &RepoArgs, id: &str, name: &str) -> Result<u8, Failure> {
    let repo = Repo::open(&args.repo)?;
    let id = repo.resolve(id)?;
    repo.set_name(name, &id)?;
    emit(
        args.json,
        &serde_json::json!({ "name": name, "id": id }),
        || format!("{name} -> {}\n", id.short()),
    );
    Ok(0)
}

fn untag(args: &RepoArgs, name: &str) -> Result<u8, Failure> {
    let repo = Repo::open(&args.repo)?;
    if !repo.remove_name(name)? {
        return Err(RepoError::Unknown(name.to_string()).into());
    }
    emit(args.json, &serde_json::json!({ "removed": name }), || {
        format!("removed name {name}\n")
    });
    Ok(0)
}

fn progress(json: bool) -> Option<bool> {
    // On a terminal only; never mixed into --json output.
    if json { Some(false) } else { None }
}
