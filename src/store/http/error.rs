//! The errors of [`HttpStore`](super::HttpStore) requests ([`HttpError`]) and the S3
//! error answers they carry ([`S3Answer`]).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::store::s3sign::S3Error;
use crate::store::{ChunkId, StoreError};
use crate::util::IoError;

/// Errors of HTTP fetches.
#[derive(Clone, Debug, thiserror::Error)]
pub enum HttpError {
    /// A base URL is not usable.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The server answered with a status other than 200.
    #[error("GET {url}: HTTP status {status}")]
    Status {
        /// The URL fetched.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The request failed: connection refused or reset, timeout, protocol error.
    #[error("GET {url} failed")]
    Transport {
        /// The URL fetched.
        url: String,
        /// Underlying error.
        #[source]
        source: Arc<ureq::Error>,
    },
    /// The answer is longer than anything valid at that URL.
    #[error("GET {url}: response is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The URL fetched.
        url: String,
        /// The limit.
        limit: u64,
    },
    /// A fetched chunk is not the chunk asked for (bad header, wrong length, hash mismatch).
    #[error("chunk {id} fetched from {url} is corrupt: {reason}")]
    Corrupt {
        /// The chunk asked for.
        id: ChunkId,
        /// Where it came from.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A fetched file other than a chunk was rejected by its reader.
    #[error("{url}: {reason}")]
    Invalid {
        /// Where it came from.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Retries ran out.
    #[error("GET {url}: gave up after {attempts} attempts in {elapsed_ms} ms")]
    GaveUp {
        /// The URL of the last attempt.
        url: String,
        /// Requests made.
        attempts: u32,
        /// Time spent.
        elapsed_ms: u64,
        /// The last failure.
        #[source]
        last: Box<HttpError>,
    },
    /// An S3 service answered with an error (status, and the error document's code).
    #[error("{0}")]
    S3(Box<S3Answer>),
    /// An `s3://` URL cannot be used (no endpoint configured, bad bucket name, …).
    #[error("cannot use {url}")]
    S3Config {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: Arc<S3Error>,
    },
    /// The fetch of this chunk by another thread, which this one waited for, ended abnormally.
    #[error("the shared fetch of chunk {id} was abandoned")]
    Abandoned {
        /// The chunk.
        id: ChunkId,
    },
}

/// An S3 service's error answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Answer {
    /// The request.
    pub method: &'static str,
    /// The `s3://` URL asked for.
    pub url: String,
    /// The HTTP status.
    pub status: u16,
    /// The S3 error code (`NoSuchKey`, `NoSuchBucket`, `AccessDenied`,
    /// `SignatureDoesNotMatch`, `InvalidAccessKeyId`, …); empty if the answer had none
    /// (a `HEAD`).
    pub code: String,
    /// The service's message.
    pub message: String,
}

impl std::fmt::Display for S3Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let code = if self.code.is_empty() {
            "(no code)"
        } else {
            &self.code
        };
        write!(
            f,
            "{} {}: S3 error {code} (HTTP {})",
            self.method, self.url, self.status
        )?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl HttpError {
    /// Whether asking the same server again may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            HttpError::Status { status, .. } => *status >= 500 || matches!(status, 408 | 429),
            HttpError::S3(a) => a.status >= 500 || matches!(a.status, 408 | 429),
            HttpError::Transport { .. } => true,
            // Damaged on the way (or by a confused proxy): the next answer is verified too.
            HttpError::TooLarge { url, .. }
            | HttpError::Corrupt { url, .. }
            | HttpError::Invalid { url, .. } => !url.starts_with("file://"),
            _ => false,
        }
    }

    /// Whether the resource is absent (404 or 410 on every server).
    pub fn is_not_found(&self) -> bool {
        match self {
            HttpError::Status { status, .. } => matches!(status, 404 | 410),
            // A missing bucket is not a missing object: it is reported as it is.
            HttpError::S3(a) => a.status == 404 && a.code != "NoSuchBucket",
            HttpError::GaveUp { last, .. } => last.is_not_found(),
            _ => false,
        }
    }

    /// Converts to the chunk store error of chunk `id`.
    pub fn into_store_error(self, id: &ChunkId) -> StoreError {
        match self {
            HttpError::Corrupt { id, url, reason } => StoreError::Corrupt {
                id,
                reason: format!("{reason} (fetched from {url})"),
            },
            HttpError::GaveUp { attempts, last, .. }
                if matches!(*last, HttpError::Corrupt { .. }) =>
            {
                let HttpError::Corrupt { id, url, reason } = *last else {
                    unreachable!("matched above")
                };
                StoreError::Corrupt {
                    id,
                    reason: format!("{reason} (fetched from {url}; {attempts} attempts)"),
                }
            }
            e if e.is_not_found() => StoreError::NotFound { id: *id },
            e => {
                let url = match &e {
                    HttpError::S3(a) => a.url.clone(),
                    HttpError::Status { url, .. }
                    | HttpError::Transport { url, .. }
                    | HttpError::TooLarge { url, .. }
                    | HttpError::GaveUp { url, .. } => url.clone(),
                    _ => id.relative_path(),
                };
                StoreError::Io(IoError {
                    op: "fetch",
                    path: PathBuf::from(url),
                    source: io::Error::other(e),
                })
            }
        }
    }
}
