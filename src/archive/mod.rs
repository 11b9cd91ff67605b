//! VM archives: snapshots pushed into a directory that a plain web server serves, and
//! resumed from it — over HTTP or from the local directory — with guest memory fetched
//! lazily, chunk by chunk, as the guest touches it.
//!
//! ```text
//! ARCHIVE/vmm-archive.json      marker: {"format": "vmm-archive", "version": 1}
//! ARCHIVE/vms/NAME/state        the snapshot's state file; its chunk store is "../.."
//! ARCHIVE/vms/NAME/memory       the memory manifest
//! ARCHIVE/vms/NAME/workingset   optional: the chunks a resume touches first, in order
//! ARCHIVE/images/NAME           disk image indexes (src/image.rs)
//! ARCHIVE/chunks/xx/<id>        every chunk: memory, captured overlays, disk images
//! ```
//!
//! * [`push`] writes a snapshot directory into an archive (only the chunks it lacks).
//! * [`restore`] resumes an archived VM from `http://HOST/ARCHIVE/vms/NAME` or a local
//!   `ARCHIVE/vms/NAME`: memory through [`LazyMemory`](crate::vstate::uffd::LazyMemory)
//!   over a [`CachedStore`](crate::store::cache::CachedStore) (a verified local chunk cache shared between instances),
//!   disks through the remote-disk backend with a fresh overlay per instance.
//! * [`session`] is what a resumed archived VM fetched, and when.
//! * [`workingset`] records the chunks a resumed VM touches in its first seconds and
//!   prefetches them (then, rate-limited, the rest) on the next resume.
//! * [`s3push`] pushes into an archive in an S3 bucket (`s3://BUCKET/PREFIX`, same
//!   layout); [`restore`] reads `s3://…/vms/NAME` through signed requests.
//! * [`cli`] is the `vmm archive …` / `vmm restore http://…` front end.
//!
//! Decisions and formats: `docs/ARCHIVE.md`.

pub mod cli;
pub mod push;
pub mod restore;
pub mod s3push;
pub mod session;
pub mod workingset;

use std::path::PathBuf;

/// Directory of archived VMs inside an archive.
pub const VMS_DIR: &str = "vms";
/// File name of a working-set list inside an archived VM's directory.
pub const WORKINGSET_FILE: &str = "workingset";
/// The chunk store of an archived VM, relative to its directory (`ARCHIVE/vms/NAME`).
pub const STORE_FROM_VM_DIR: &str = "../..";
/// Overlay path recorded for an archived writable disk: every resumed instance gets a
/// fresh overlay of its own instead.
pub const INSTANCE_OVERLAY: &str = "<fresh overlay per instance>";

/// Errors of archive locations.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A URL or relative reference cannot be resolved.
    #[error("invalid archive URL {url:?}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A VM name is not usable.
    #[error("invalid VM name {name:?}: 1-128 of [A-Za-z0-9._-], not starting with '.'")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        #[source]
        source: crate::image::ImageError,
    },
}

/// Where an archived VM is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `http://HOST/ARCHIVE/vms/NAME` (no trailing slash).
    Http {
        /// The VM's directory URL.
        vm_url: String,
    },
    /// A local `ARCHIVE/vms/NAME` directory.
    Local {
        /// The VM's directory.
        vm_dir: PathBuf,
    },
}

impl Source {
    /// `http://…` or `s3://…` → [`Source::Http`] (the HTTP store reads `s3://` URLs with
    /// signed requests), anything else a local directory.
    pub fn parse(s: &str) -> Self {
        if is_url(s) {
            Source::Http {
                vm_url: s.trim_end_matches('/').to_string(),
            }
        } else {
            Source::Local {
                vm_dir: PathBuf::from(s),
            }
        }
    }

    /// The location as given, for messages.
    pub fn display(&self) -> String {
        match self {
            Source::Http { vm_url } => vm_url.clone(),
            Source::Local { vm_dir } => vm_dir.display().to_string(),
        }
    }
}

/// Whether `s` names something `vmm restore` must read as an archived VM rather than a
/// plain snapshot directory: an `http://` URL, or a local directory `…/vms/NAME` whose
/// state names its archive as chunk store.
pub fn is_archive_source(s: &str) -> bool {
    if is_url(s) {
        return true;
    }
    let p = std::path::Path::new(s);
    let in_vms = p
        .canonicalize()
        .ok()
        .and_then(|c| c.parent().map(|d| d.ends_with(VMS_DIR)))
        .unwrap_or(false);
    in_vms && p.join(crate::snapshot::microvm::STATE_FILE).is_file()
}

/// Whether `s` is a remote archive URL: `http://`, `https://` or `s3://`.
pub fn is_url(s: &str) -> bool {
    s.starts_with("http://")
        || s.starts_with("https://")
        || s.starts_with(crate::store::s3sign::SCHEME)
}

/// Checks that `name` can name an archived VM (same rules as image names).
pub fn check_vm_name(name: &str) -> Result<(), ArchiveError> {
    crate::image::check_name(name).map_err(|source| ArchiveError::BadName {
        name: name.into(),
        source,
    })
}

/// Whether a disk URL recorded in an archived state is relative to the VM's directory.
pub fn is_relative_url(url: &str) -> bool {
    !url.contains("://")
}

/// Resolves `rel` (`/`-separated, may start with `..`) against the directory URL
/// `dir_url` (`http://HOST/a/b`, no trailing slash): `("http://h/a/vms/x", "../..")` →
/// `http://h/a`. An absolute URL `rel` is returned as is.
pub fn resolve_url(dir_url: &str, rel: &str) -> Result<String, ArchiveError> {
    if !is_relative_url(rel) {
        return Ok(rel.to_string());
    }
    let bad = |reason: &str| ArchiveError::BadUrl {
        url: format!("{dir_url} + {rel}"),
        reason: reason.into(),
    };
    let scheme_end = dir_url.find("://").ok_or_else(|| bad("no scheme"))? + 3;
    let host_end = dir_url[scheme_end..]
        .find('/')
        .map_or(dir_url.len(), |i| scheme_end + i);
    if host_end == scheme_end && !dir_url.starts_with("file://") {
        return Err(bad("no host"));
    }
    if rel.starts_with('/') {
        return Err(bad("absolute paths are not allowed, only relative ones"));
    }
    let mut segs: Vec<&str> = dir_url[host_end..]
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    for s in rel.split('/') {
        match s {
            "" | "." => {}
            ".." => {
                segs.pop()
                    .ok_or_else(|| bad("goes above the server's root"))?;
            }
            s => segs.push(s),
        }
    }
    let mut out = dir_url[..host_end].to_string();
    for s in segs {
        out.push('/');
        out.push_str(s);
    }
    Ok(out)
}

/// `$XDG_CACHE_HOME/vmm`, else `$HOME/.cache/vmm`, else `<tmp>/vmm-cache`: the root of
/// the one shared chunk cache (`chunks/` below it), for memory and remote disks alike.
pub fn default_cache_root() -> PathBuf {
    crate::store::cache::default_cache_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_resolve_against_the_vm_directory() {
        let vm = "http://h:8/a/vms/x";
        assert_eq!(resolve_url(vm, "../..").unwrap(), "http://h:8/a");
        assert_eq!(
            resolve_url(vm, "../../images/d").unwrap(),
            "http://h:8/a/images/d"
        );
        assert_eq!(resolve_url(vm, ".").unwrap(), vm);
        assert_eq!(resolve_url(vm, "http://o/i").unwrap(), "http://o/i");
        assert!(resolve_url(vm, "../../../../x").is_err());
        assert!(resolve_url(vm, "/x").is_err());
        assert!(resolve_url("nohost", "x").is_err());
        assert_eq!(resolve_url("http://h", "a/b").unwrap(), "http://h/a/b");
    }

    #[test]
    fn sources_parse() {
        assert_eq!(
            Source::parse("http://h/a/vms/x/"),
            Source::Http {
                vm_url: "http://h/a/vms/x".into()
            }
        );
        assert!(matches!(Source::parse("/a/vms/x"), Source::Local { .. }));
        assert!(is_archive_source("http://h/x"));
        assert!(is_archive_source("s3://bkt/a/vms/x"));
        assert_eq!(
            resolve_url("s3://bkt/a/vms/x", "../..").unwrap(),
            "s3://bkt/a"
        );
        assert!(!is_archive_source("/nonexistent/vms/x"));
        assert!(check_vm_name("ok-1.2").is_ok());
        assert!(check_vm_name("../x").is_err());
    }
}
