//! [`S3Store`]: chunks as objects in S3-compatible object storage (AWS S3, MinIO, Ceph
//! RGW, SeaweedFS, Garage), in the same layout as a local store or archive:
//! `s3://BUCKET/PREFIX/chunks/<2 hex>/<64 hex>`, each object a chunk file of the chunk
//! [`codec`] — so an archive pushed to a bucket can also be served by the bucket's public
//! HTTP endpoint and read by the HTTP store.
//!
//! * **Reads** go through an [`HttpStore`] on the `s3://` base (presigned GETs): its
//!   keep-alive pool (at most `max_connections` in flight), coalescing, retries with
//!   backoff inside a budget, and verification of every chunk against its id.
//! * **Writes**: [`ChunkWrite::put_hashed`] asks with `HEAD` first and skips a chunk that
//!   is there; a `PUT` of a new chunk is retried like a read (transport errors, 5xx,
//!   408/429) within the same budget. Content-addressed objects make concurrent writers
//!   of the same chunk harmless: they write the same bytes.
//! * **Range reads** ([`S3Store::get_range`]): a `GET` with a `Range` header, for
//!   layouts that pack many chunks into one object.
//!
//! Retries live here and in the HTTP store only (docs/DESIGN.md, "Chunk stores"):
//! [`ChunkRead::retries`] says so, and callers do not retry on top.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::codec::{self, Compression};
use super::http::{HttpError, HttpStats, HttpStore, HttpStoreOptions};
use super::s3sign::{S3Config, S3Error, S3Method, S3Url};
use super::{ChunkId, ChunkRead, ChunkWrite, PutOutcome, Result};
use crate::util::error_chain;

/// Running totals of an [`S3Store`]'s writes (reads: [`S3Store::read_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct S3WriteStats {
    /// Objects written (`PUT` that succeeded).
    pub puts: u64,
    /// Bytes of the objects written.
    pub put_bytes: u64,
    /// Chunks not written because a `HEAD` found them present.
    pub skipped: u64,
    /// Requests of the writing side (`PUT`, `DELETE`, ranged `GET`; retries included).
    pub requests: u64,
    /// Backoff waits.
    pub retries: u64,
}

#[derive(Default)]
struct Counters {
    puts: AtomicU64,
    put_bytes: AtomicU64,
    skipped: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// A chunk store in an S3 bucket (see the module documentation).
pub struct S3Store {
    base: String,
    http: HttpStore,
    agent: ureq::Agent,
    opts: HttpStoreOptions,
    compression: Compression,
    counters: Counters,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("base", &self.base)
            .field("writes", &self.write_stats())
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// A store on `url` (`s3://BUCKET/PREFIX`) with `opts` (retries, timeouts, pool size,
    /// and the endpoint and credentials in `opts.s3`, else from the environment). New
    /// chunks are written zstd-compressed (level 1) like a local store's. No request is
    /// made yet.
    pub fn open(url: &str, mut opts: HttpStoreOptions) -> std::result::Result<Self, S3Error> {
        let parsed = S3Url::parse(url)?;
        if opts.s3.is_none() {
            opts.s3 = Some(S3Config::from_env(url)?);
        }
        let base = parsed.to_string();
        let http = HttpStore::new(&base, opts.clone()).map_err(|e| S3Error::BadUrl {
            url: url.into(),
            reason: error_chain(&e),
        })?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_idle_connections_per_host(opts.max_connections.max(1))
            .timeout_connect(Some(opts.connect_timeout))
            .timeout_recv_response(Some(opts.response_timeout))
            .timeout_global(Some(opts.request_timeout))
            .user_agent(concat!("vmm/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(S3Store {
            base,
            http,
            agent,
            opts,
            compression: Compression::Zstd { level: 1 },
            counters: Counters::default(),
        })
    }

    /// The store's `s3://BUCKET/PREFIX` URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The HTTP store reading this bucket (metadata files, chunks).
    pub fn http(&self) -> &HttpStore {
        &self.http
    }

    /// Totals of the reading side.
    pub fn read_stats(&self) -> HttpStats {
        self.http.stats()
    }

    /// Totals of the writing side.
    pub fn write_stats(&self) -> S3WriteStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        S3WriteStats {
            puts: g(&c.puts),
            put_bytes: g(&c.put_bytes),
            skipped: g(&c.skipped),
            requests: g(&c.requests),
            retries: g(&c.retries),
        }
    }

    fn object(&self, rel: &str) -> String {
        format!("{}/{}", self.base, rel.trim_start_matches('/'))
    }

    /// Runs `op` until it succeeds, fails for good, or the rounds or the time budget of
    /// the options run out (backoff doubling from `first_backoff`).
    fn with_retries<T>(
        &self,
        url: &str,
        mut op: impl FnMut() -> std::result::Result<T, HttpError>,
    ) -> std::result::Result<T, HttpError> {
        let start = Instant::now();
        let mut backoff = self.opts.first_backoff;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let err = match op() {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if !err.is_transient() {
                return Err(err);
            }
            if attempts >= self.opts.attempts.max(1) || start.elapsed() + backoff > self.opts.budget
            {
                return Err(HttpError::GaveUp {
                    url: url.into(),
                    attempts,
                    elapsed_ms: start.elapsed().as_millis() as u64,
                    last: Box::new(err),
                });
            }
            log::warn!("{} (attempt {attempts}, will retry)", error_chain(&err));
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(backoff);
            backoff = backoff.saturating_mul(2);
        }
    }

    /// One request of `method` on object `url`, with `body` for a `PUT`, and `range`
    /// (`Range: bytes=…`) for a `GET`; returns the status and, for a `GET`, the body (at
    /// most `max_len` bytes).
    fn request(
        &self,
        method: S3Method,
        url: &str,
        body: &[u8],
        range: Option<(u64, u64)>,
        max_len: u64,
    ) -> std::result::Result<(u16, Vec<u8>), HttpError> {
        let target = self.http.request_url(method, url)?;
        let transport = |e: ureq::Error| HttpError::Transport {
            url: url.into(),
            source: Arc::new(e),
        };
        let (name, result) = match method {
            S3Method::Put => ("PUT", self.agent.put(&target).send(body)),
            S3Method::Delete => ("DELETE", self.agent.delete(&target).call()),
            S3Method::Head => ("HEAD", self.agent.head(&target).call()),
            S3Method::Get => {
                let mut req = self.agent.get(&target);
                if let Some((first, last)) = range {
                    req = req.header("Range", format!("bytes={first}-{last}"));
                }
                ("GET", req.call())
            }
        };
        let mut resp = result.map_err(transport)?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(HttpStore::status_error(name, url, &mut resp));
        }
        let data = if method == S3Method::Get {
            resp.body_mut()
                .with_config()
                .limit(max_len)
                .read_to_vec()
                .map_err(|e| match e {
                    ureq::Error::BodyExceedsLimit(_) => HttpError::TooLarge {
                        url: url.into(),
                        limit: max_len,
                    },
                    e => transport(e),
                })?
        } else {
            Vec::new()
        };
        Ok((status, data))
    }

    /// Writes object `PREFIX/rel` with `body` (retried as described in the module
    /// documentation).
    pub fn put_object(&self, rel: &str, body: &[u8]) -> std::result::Result<(), HttpError> {
        let url = self.object(rel);
        self.with_retries(&url, || {
            self.request(S3Method::Put, &url, body, None, 0).map(drop)
        })?;
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        self.counters
            .put_bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Removes object `PREFIX/rel`; an absent object is no error.
    pub fn delete_object(&self, rel: &str) -> std::result::Result<(), HttpError> {
        let url = self.object(rel);
        match self.with_retries(&url, || {
            self.request(S3Method::Delete, &url, &[], None, 0).map(drop)
        }) {
            Err(e) if e.is_not_found() => Ok(()),
            r => r,
        }
    }

    /// Whether object `PREFIX/rel` exists (one `HEAD`, retried).
    pub fn exists(&self, rel: &str) -> std::result::Result<bool, HttpError> {
        let url = self.object(rel);
        match self.with_retries(&url, || self.request(S3Method::Head, &url, &[], None, 0)) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(HttpError::S3(a)) if a.status == 404 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reads `len` bytes at `offset` of object `PREFIX/rel` (a ranged `GET`, retried). A
    /// server that ignores the range and sends the whole object is answered from it; an
    /// answer of another length is an error.
    pub fn get_range(
        &self,
        rel: &str,
        offset: u64,
        len: usize,
    ) -> std::result::Result<Vec<u8>, HttpError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let url = self.object(rel);
        let last = offset + len as u64 - 1;
        self.with_retries(&url, || {
            let max = if offset == 0 {
                len as u64
            } else {
                super::MAX_CHUNK_LEN as u64 * 64
            };
            let (status, body) =
                self.request(S3Method::Get, &url, &[], Some((offset, last)), max)?;
            let data = if status == 206 {
                body
            } else {
                let end = (offset as usize).saturating_add(len);
                body.get(offset as usize..end)
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default()
            };
            if data.len() != len {
                return Err(HttpError::Invalid {
                    url: url.clone(),
                    reason: format!(
                        "range {offset}-{last}: answer of {} bytes, expected {len}",
                        data.len()
                    ),
                });
            }
            Ok(data)
        })
    }

    /// Writes an already encoded chunk file for `id` unless the bucket has it.
    pub fn put_chunk_file(
        &self,
        id: &ChunkId,
        file: &[u8],
    ) -> std::result::Result<PutOutcome, HttpError> {
        let rel = id.relative_path();
        if self.exists(&rel)? {
            self.counters.skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(PutOutcome::Present);
        }
        self.put_object(&rel, file)?;
        Ok(PutOutcome::Written {
            stored_bytes: file.len() as u64,
        })
    }
}

impl ChunkRead for S3Store {
    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.http.get(id)
    }

    fn get_into(&self, id: &ChunkId, buf: &mut [u8]) -> Result<()> {
        self.http.get_into(id, buf)
    }

    fn contains(&self, id: &ChunkId) -> Result<bool> {
        self.exists(&id.relative_path())
            .map_err(|e| e.into_store_error(id))
    }

    /// Yes: reads and writes are retried here (see the module documentation).
    fn retries(&self) -> bool {
        true
    }
}

impl ChunkWrite for S3Store {
    fn put(&self, data: &[u8]) -> Result<ChunkId> {
        let id = ChunkId::of(data);
        self.put_hashed(&id, data)?;
        Ok(id)
    }

    fn put_hashed(&self, id: &ChunkId, data: &[u8]) -> Result<PutOutcome> {
        let enc = codec::encode(id, data, self.compression)?;
        let mut file = Vec::with_capacity(enc.file_len());
        file.extend_from_slice(&enc.header);
        file.extend_from_slice(&enc.body);
        self.put_chunk_file(id, &file)
            .map_err(|e| e.into_store_error(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_checks_the_url_and_the_endpoint() {
        let opts = HttpStoreOptions {
            s3: Some(Arc::new(
                S3Config::new("http://127.0.0.1:1", "us-east-1", Some(("k", "s"))).unwrap(),
            )),
            ..HttpStoreOptions::default()
        };
        assert!(S3Store::open("s3://Bad_Bucket/x", opts.clone()).is_err());
        let s = S3Store::open("s3://bkt/a/b/", opts).unwrap();
        assert_eq!(s.url(), "s3://bkt/a/b");
        assert_eq!(s.object("chunks/ab/c"), "s3://bkt/a/b/chunks/ab/c");
        assert!(s.retries());
    }

    #[test]
    fn an_unreachable_endpoint_gives_up_with_a_clear_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let opts = HttpStoreOptions {
            s3: Some(Arc::new(
                S3Config::new(&format!("http://127.0.0.1:{port}"), "r", Some(("k", "s"))).unwrap(),
            )),
            attempts: 2,
            first_backoff: std::time::Duration::from_millis(10),
            ..HttpStoreOptions::default()
        };
        let s = S3Store::open("s3://bkt/p", opts).unwrap();
        let e = s.put(b"chunk").unwrap_err();
        let msg = error_chain(&e);
        assert!(msg.contains("s3://bkt/p/chunks/"), "{msg}");
        assert!(msg.contains("gave up after 2 attempts"), "{msg}");
        assert_eq!(s.write_stats().retries, 1);
    }
}
