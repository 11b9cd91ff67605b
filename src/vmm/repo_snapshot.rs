//! Creating a snapshot of a paused VM into a repository (what `PUT /snapshot/create` with a
//! `repo` does): written into `REPO/tmp/create-…` with the repository as chunk store, then
//! committed by an atomic rename, with the VM's current repository snapshot as parent.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::Vmm;
use super::snapshot::{CreateError, SnapshotReport, create_snapshot};
use crate::repo::lock::LockMode;
use crate::repo::{
    AddedStats, CommitMeta, Repo, RepoError, RepoParent, STORE_FROM_SNAPSHOT, SnapshotId,
    valid_name,
};
use crate::snapshot::microvm::{MicrovmState, STATE_FILE};

/// Errors of creating a snapshot into a repository.
#[derive(Debug, thiserror::Error)]
pub enum RepoCreateError {
    /// The name is not usable (checked before anything is written).
    #[error("invalid snapshot name {0:?} (1-64 letters, digits, '.', '_', '-'; not 64 hex digits)")]
    BadName(String),
    /// The repository could not be opened, locked or written.
    #[error("repository {}", path.display())]
    Repo {
        /// The repository.
        path: PathBuf,
        /// Cause.
        #[source]
        source: RepoError,
    },
    /// Writing the snapshot failed.
    #[error("writing the snapshot")]
    Create(#[source] CreateError),
    /// Rewriting the state file's store path failed.
    #[error("recording the repository-relative chunk store in the state file")]
    State(#[source] crate::formats::StateFileError),
}

/// What a repository snapshot produced: the id, its place in the tree, and the snapshot's own
/// report (flattened: `memory.bytes_written` etc. are at the same level as `id`).
#[derive(Clone, Debug, Serialize)]
pub struct RepoCreateReport {
    /// The new snapshot's id.
    pub id: SnapshotId,
    /// Its short form.
    pub short_id: String,
    /// The repository.
    pub repo: PathBuf,
    /// Parent snapshot (the VM's previous repository snapshot or restore source).
    pub parent: Option<SnapshotId>,
    /// The name given, if any.
    pub name: Option<String>,
    /// False when an identical snapshot already existed (nothing new was listed).
    pub new: bool,
    /// The snapshot report (path = the committed directory).
    #[serde(flatten)]
    pub report: SnapshotReport,
}

/// Snapshots the paused `vmm` into the repository at `repo_path` (created if it does not
/// exist), naming it `name`. Sets the VM's repository parent to the new snapshot.
pub fn create_in_repo(
    vmm: &mut Vmm,
    repo_path: &Path,
    name: Option<&str>,
) -> Result<RepoCreateReport, RepoCreateError> {
    if let Some(n) = name
        && !valid_name(n)
    {
        return Err(RepoCreateError::BadName(n.into()));
    }
    let repo_err = |source| RepoCreateError::Repo {
        path: repo_path.to_path_buf(),
        source,
    };
    let repo = Repo::open_or_init(repo_path).map_err(repo_err)?;
    // Held until the snapshot is listed: gc cannot sweep chunks this create has written or
    // reused but that no listed snapshot refers to yet.
    let _lock = repo
        .lock(LockMode::Shared, "snapshot create")
        .map_err(repo_err)?;
    let work = repo.new_work_dir("create").map_err(repo_err)?;
    let mut result = create_into(vmm, &repo, &work, name);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&work);
    }
    // An incremental snapshot reuses its base's chunk ids without reading them; if the base
    // was removed and garbage-collected since, they are gone. Take a full one instead.
    if let Err(RepoCreateError::Repo {
        source: RepoError::MissingChunks { count, .. },
        ..
    }) = &result
        && vmm.snapshot_base.is_some()
    {
        log::warn!(
            "{count} chunk(s) of the incremental base are gone from {} (removed and collected?); taking a full snapshot",
            repo.root().display()
        );
        vmm.snapshot_base = None;
        let work = repo.new_work_dir("create").map_err(repo_err)?;
        result = create_into(vmm, &repo, &work, name);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&work);
        }
    }
    result
}

fn create_into(
    vmm: &mut Vmm,
    repo: &Repo,
    work: &Path,
    name: Option<&str>,
) -> Result<RepoCreateReport, RepoCreateError> {
    let repo_err = |source| RepoCreateError::Repo {
        path: repo.root().to_path_buf(),
        source,
    };
    let mut report =
        create_snapshot(vmm, work, Some(repo.root())).map_err(RepoCreateError::Create)?;
    // The state records an absolute store; make it relative so the repository can move.
    let state_path = work.join(STATE_FILE);
    let mut state = MicrovmState::read(&state_path).map_err(RepoCreateError::State)?;
    state.store = Some(PathBuf::from(STORE_FROM_SNAPSHOT));
    state.write(&state_path).map_err(RepoCreateError::State)?;

    let parent = vmm
        .repo_parent
        .as_ref()
        .filter(|p| p.repo == repo.root())
        .map(|p| p.id);
    let added = AddedStats {
        bytes_written: report.memory.bytes_written,
        chunks_new: report.memory.chunks_new,
        chunks_reused: report.memory.chunks_reused,
    };
    let (id, new) = repo
        .commit(
            work,
            CommitMeta {
                parent,
                name: name.map(str::to_string),
                added: Some(added),
            },
        )
        .map_err(repo_err)?;
    vmm.repo_parent = Some(RepoParent {
        repo: repo.root().to_path_buf(),
        id,
    });
    if let Some(n) = name {
        repo.set_name(n, &id).map_err(repo_err)?;
    }
    report.path = repo.snapshot_dir(&id);
    log::info!(
        "repository snapshot {} (parent {}) in {}",
        id.short(),
        parent.map_or("none".into(), |p| p.short()),
        repo.root().display()
    );
    Ok(RepoCreateReport {
        id,
        short_id: id.short(),
        repo: repo.root().to_path_buf(),
        parent,
        name: name.map(str::to_string),
        new,
        report,
    })
}
