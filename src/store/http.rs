//! [`HttpStore`]: a read-only chunk store ([`ChunkRead`] only) over plain HTTP.
//!
//! A chunk `id` is fetched from the archive's packs with an HTTP `Range` request for its
//! record (`BASE/packs/list` and the listed `BASE/packs/<id>.idx` are fetched first, once:
//! see `packs`), or, when no pack holds it, with `GET BASE/chunks/<2 hex>/<64 hex>` (the
//! older [`LocalStore`] layout) — both served by any static web server that supports
//! ranges (nginx, S3) — and decoded with the chunk [`codec`]. Every chunk is checked
//! against its id before it is returned.
//!
//! * **Keep-alive pool**: one `ureq` agent keeps idle connections; at most
//!   [`HttpStoreOptions::max_connections`] requests are in flight at once.
//! * **Retries**: transport errors (connection refused or reset, a body cut short),
//!   timeouts (no response head within [`HttpStoreOptions::response_timeout`], or the whole
//!   request over [`HttpStoreOptions::request_timeout`]), 5xx/408/429 answers, and answers
//!   that fail verification (a hash mismatch, a wrong length, an oversized or malformed
//!   body: a proxy or the network may have damaged them) are retried with exponential
//!   backoff, at most [`HttpStoreOptions::attempts`] rounds and within
//!   [`HttpStoreOptions::budget`]; then the fetch fails (a guest sees an I/O error, never
//!   an endless hang, never unverified bytes). A 404 (or another 4xx) is final for that
//!   server, and so is any failure to read a `file://` archive.
//! * **Mirrors**: further base URLs, tried in turn in each round.
//! * **Coalescing**: concurrent fetches of one chunk make one request; the others wait
//!   for its result.
//!
//! Only `http://` URLs are supported (the crate is built without TLS), and `s3://BUCKET/PREFIX`
//! bases: each request then goes to a URL presigned for it by [`super::s3sign`] (endpoint
//! and credentials from [`HttpStoreOptions::s3`] or the environment), and an S3 error
//! answer is reported with its code ([`HttpError::S3`]).
//!
//! [`LocalStore`]: super::LocalStore

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

mod error;
mod file;
mod packs;

pub use error::{HttpError, S3Answer};

use super::codec::{self, HEADER_LEN};
use super::s3sign::{self, S3Config, S3Error, S3Method};
use super::{ChunkId, ChunkRead, MAX_CHUNK_LEN, Result, StoreError, pack};
use crate::util::error_chain;
use crate::util::lock;

/// Options of an [`HttpStore`].
#[derive(Clone, Debug)]
pub struct HttpStoreOptions {
    /// Further base URLs holding the same chunks, tried in turn after the main one.
    pub mirrors: Vec<String>,
    /// Most requests in flight at once (and idle keep-alive connections kept).
    pub max_connections: usize,
    /// Rounds of attempts (each round tries every server still worth trying).
    pub attempts: u32,
    /// Wait before the second round; doubled for each further round.
    pub first_backoff: Duration,
    /// No new round starts once this much time has passed since the first attempt.
    pub budget: Duration,
    /// Limit for establishing a connection.
    pub connect_timeout: Duration,
    /// Limit for the response head to arrive once the request is sent: a stalled server
    /// is given up on and asked again (within the budget) instead of waiting out
    /// `request_timeout`.
    pub response_timeout: Duration,
    /// Limit for one whole request, body included.
    pub request_timeout: Duration,
    /// Endpoint and credentials for `s3://` bases; `None` = from `--s3-endpoint` and the
    /// `AWS_*` environment variables ([`S3Config::from_env`]).
    pub s3: Option<Arc<S3Config>>,
}

impl Default for HttpStoreOptions {
    /// 4 connections; 5 rounds with backoff 0.2, 0.4, 0.8, 1.6 s within a 4 s budget;
    /// 2 s to connect, 3 s for the response head, 10 s per request.
    fn default() -> Self {
        HttpStoreOptions {
            mirrors: Vec::new(),
            max_connections: 4,
            attempts: 5,
            first_backoff: Duration::from_millis(200),
            budget: Duration::from_secs(4),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            s3: None,
        }
    }
}

/// Running totals of an [`HttpStore`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpStats {
    /// HTTP requests sent (retries included).
    pub requests: u64,
    /// Response body bytes received from successful (200) requests.
    pub bytes_fetched: u64,
    /// Backoff waits between rounds of attempts.
    pub retries: u64,
    /// Requests that failed (any reason).
    pub failed_requests: u64,
    /// Chunks fetched and verified.
    pub chunks_fetched: u64,
    /// Chunk fetches that waited for another thread's fetch of the same chunk.
    pub coalesced: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    bytes_fetched: AtomicU64,
    retries: AtomicU64,
    failed_requests: AtomicU64,
    chunks_fetched: AtomicU64,
    coalesced: AtomicU64,
}

type FlightResult = std::result::Result<Arc<Vec<u8>>, HttpError>;

/// One chunk fetch that other threads may wait for.
#[derive(Default)]
struct Flight {
    result: Mutex<Option<FlightResult>>,
    done: Condvar,
}

/// A counting semaphore bounding requests in flight.
struct Permits {
    free: Mutex<usize>,
    cv: Condvar,
}

struct Permit<'a>(&'a Permits);

impl Permits {
    fn acquire(&self) -> Permit<'_> {
        let mut free = lock(&self.free);
        while *free == 0 {
            free = self.cv.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *lock(&self.0.free) += 1;
        self.0.cv.notify_one();
    }
}

/// A read-only chunk store served over HTTP (see the module documentation).
pub struct HttpStore {
    bases: Vec<String>,
    agent: ureq::Agent,
    opts: HttpStoreOptions,
    permits: Permits,
    inflight: Mutex<HashMap<ChunkId, Arc<Flight>>>,
    counters: Counters,
    /// The base that answered last: tried first in each round.
    preferred: AtomicUsize,
    /// The archive's pack indexes (`packs/list`), loaded on first use.
    packs: Mutex<packs::RemotePacks>,
    /// Held while the pack list and indexes load: other threads wait for that load
    /// instead of missing chunks it is about to add.
    packs_loading: Mutex<()>,
}

impl std::fmt::Debug for HttpStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStore")
            .field("bases", &self.bases)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Checks a base URL and returns it without trailing slashes.
pub fn normalize_base(url: &str) -> std::result::Result<String, HttpError> {
    let invalid = |reason| HttpError::InvalidUrl {
        url: url.into(),
        reason,
    };
    if url.starts_with(s3sign::SCHEME) {
        let u = s3sign::S3Url::parse(url).map_err(|e| HttpError::S3Config {
            url: url.into(),
            source: Arc::new(e),
        })?;
        return Ok(u.to_string());
    }
    if url.starts_with("https://") {
        return Err(invalid(
            "https is not supported by this build (serve the archive over plain http)",
        ));
    }
    if let Some(path) = url.strip_prefix("file://") {
        // A local archive directory, read like a server (see `get_once`).
        if !path.starts_with('/') {
            return Err(invalid("a file:// URL needs an absolute path"));
        }
        if url.contains(['?', '#']) || url.chars().any(|c| c.is_control()) {
            return Err(invalid("must not contain a query or a fragment"));
        }
        let trimmed = url.trim_end_matches('/');
        return Ok(if trimmed == "file://" {
            "file:///".into()
        } else {
            trimmed.into()
        });
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(invalid("must start with http:// (or file:///)"));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(invalid("no host"));
    }
    if url.contains(['?', '#']) || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            "must not contain a query, a fragment or whitespace",
        ));
    }
    Ok(url.trim_end_matches('/').to_string())
}

impl HttpStore {
    /// A store reading chunks from `base` (e.g. `http://host/archive`) and the mirrors in
    /// `opts`. No request is made yet.
    pub fn new(base: &str, opts: HttpStoreOptions) -> std::result::Result<Self, HttpError> {
        let mut bases = vec![normalize_base(base)?];
        for m in &opts.mirrors {
            bases.push(normalize_base(m)?);
        }
        let conns = opts.max_connections.max(1);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(3)
            .max_idle_connections(conns * bases.len())
            .max_idle_connections_per_host(conns)
            .timeout_connect(Some(opts.connect_timeout))
            .timeout_recv_response(Some(opts.response_timeout))
            .timeout_global(Some(opts.request_timeout))
            .user_agent(concat!("vmm/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(HttpStore {
            bases,
            agent,
            permits: Permits {
                free: Mutex::new(conns),
                cv: Condvar::new(),
            },
            opts,
            inflight: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            preferred: AtomicUsize::new(0),
            packs: Mutex::new(packs::RemotePacks::default()),
            packs_loading: Mutex::new(()),
        })
    }

    /// The base URLs: the main one first, then the mirrors.
    pub fn bases(&self) -> &[String] {
        &self.bases
    }

    /// Totals since the store was created.
    pub fn stats(&self) -> HttpStats {
        let c = &self.counters;
        HttpStats {
            requests: c.requests.load(Ordering::Relaxed),
            bytes_fetched: c.bytes_fetched.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            failed_requests: c.failed_requests.load(Ordering::Relaxed),
            chunks_fetched: c.chunks_fetched.load(Ordering::Relaxed),
            coalesced: c.coalesced.load(Ordering::Relaxed),
        }
    }

    /// The URL to send a request for `url` to: `url` itself, or for an `s3://` URL the
    /// one presigned for `method`.
    pub fn request_url(
        &self,
        method: S3Method,
        url: &str,
    ) -> std::result::Result<String, HttpError> {
        if !url.starts_with(s3sign::SCHEME) {
            return Ok(url.to_string());
        }
        let err = |e: S3Error| HttpError::S3Config {
            url: url.into(),
            source: Arc::new(e),
        };
        let config = match &self.opts.s3 {
            Some(c) => Arc::clone(c),
            None => S3Config::from_env(url).map_err(err)?,
        };
        config.presign(method, url).map_err(err)
    }

    /// The error for a non-200 answer to a request for `url`: for an `s3://` URL the
    /// error document's code and message (read up to 16 KiB).
    pub fn status_error(
        method: &'static str,
        url: &str,
        resp: &mut ureq::http::Response<ureq::Body>,
    ) -> HttpError {
        let status = resp.status().as_u16();
        if !url.starts_with(s3sign::SCHEME) {
            return HttpError::Status {
                url: url.into(),
                status,
            };
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(16 << 10)
            .read_to_vec()
            .unwrap_or_default();
        let (code, message) = s3sign::error_code(&body);
        HttpError::S3(Box::new(S3Answer {
            method,
            url: url.into(),
            status,
            code,
            message,
        }))
    }

    /// One GET of `url` (of the byte range `(offset, len)` only, if given), refusing
    /// bodies longer than `max_len`.
    fn get_once(
        &self,
        url: &str,
        max_len: u64,
        range: Option<(u64, u64)>,
    ) -> std::result::Result<Vec<u8>, HttpError> {
        if let Some(path) = url.strip_prefix("file://") {
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let body = file::read(url, path, max_len, range)?;
            self.counters
                .bytes_fetched
                .fetch_add(body.len() as u64, Ordering::Relaxed);
            return Ok(body);
        }
        let transport = |e: ureq::Error| HttpError::Transport {
            url: url.into(),
            source: Arc::new(e),
        };
        let target = self.request_url(S3Method::Get, url)?;
        let _permit = self.permits.acquire();
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut req = self.agent.get(&target);
        if let Some((offset, len)) = range {
            req = req.header("Range", format!("bytes={offset}-{}", offset + len - 1));
        }
        let mut resp = req.call().map_err(transport)?;
        let status = resp.status().as_u16();
        if range.is_some() && status == 200 {
            return Err(HttpError::Invalid {
                url: url.into(),
                reason: "the server ignored the Range request (packs need range support)".into(),
            });
        }
        if status != 200 && !(range.is_some() && status == 206) {
            return Err(Self::status_error("GET", url, &mut resp));
        }
        let too_large = || HttpError::TooLarge {
            url: url.into(),
            limit: max_len,
        };
        if resp.body().content_length().is_some_and(|n| n > max_len) {
            return Err(too_large());
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(max_len)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => too_large(),
                e => transport(e),
            })?;
        self.counters
            .bytes_fetched
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        Ok(body)
    }

    /// Fetches `BASE/rel` (trying mirrors and retrying as described in the module
    /// documentation), refusing bodies over `max_len` bytes, and hands each body to `check`
    /// — a rejection by `check` is retried like a damaged answer.
    pub fn fetch_with<T>(
        &self,
        rel: &str,
        max_len: u64,
        check: impl Fn(&str, Vec<u8>) -> std::result::Result<T, HttpError>,
    ) -> std::result::Result<T, HttpError> {
        self.fetch_inner(rel, max_len, None, check)
    }

    /// `fetch_with`, of the byte range `(offset, len)` of the file if given.
    fn fetch_inner<T>(
        &self,
        rel: &str,
        max_len: u64,
        range: Option<(u64, u64)>,
        check: impl Fn(&str, Vec<u8>) -> std::result::Result<T, HttpError>,
    ) -> std::result::Result<T, HttpError> {
        let start = Instant::now();
        let deadline = start + self.opts.budget;
        let mut dead = vec![false; self.bases.len()];
        let mut backoff = self.opts.first_backoff;
        let mut attempts = 0u32;
        let mut round = 0u32;
        loop {
            round += 1;
            let mut last: Option<(String, HttpError)> = None;
            let first = self.preferred.load(Ordering::Relaxed);
            for k in 0..self.bases.len() {
                let i = (first + k) % self.bases.len();
                if dead[i] {
                    continue;
                }
                let base = &self.bases[i];
                attempts += 1;
                let url = format!("{base}/{rel}");
                match self
                    .get_once(&url, max_len, range)
                    .and_then(|b| check(&url, b))
                {
                    Ok(v) => {
                        self.preferred.store(i, Ordering::Relaxed);
                        if attempts > 1 {
                            log::info!("GET {url} succeeded after {attempts} attempts");
                        }
                        return Ok(v);
                    }
                    Err(e) => {
                        self.counters
                            .failed_requests
                            .fetch_add(1, Ordering::Relaxed);
                        if e.is_transient() {
                            log::warn!("{} (attempt {attempts}, will retry)", error_chain(&e));
                        } else {
                            if !e.is_not_found() || self.bases.len() > 1 {
                                log::error!("{}", error_chain(&e));
                            }
                            dead[i] = true;
                        }
                        last = Some((url, e));
                    }
                }
            }
            let Some((url, err)) = last else {
                // Every server failed for good in an earlier round; cannot happen as the
                // loop returns below once they are all dead.
                return Err(HttpError::InvalidUrl {
                    url: rel.into(),
                    reason: "no server left to try",
                });
            };
            if dead.iter().all(|&d| d) {
                return Err(err);
            }
            if round >= self.opts.attempts.max(1) || Instant::now() + backoff > deadline {
                let e = HttpError::GaveUp {
                    url,
                    attempts,
                    elapsed_ms: start.elapsed().as_millis() as u64,
                    last: Box::new(err),
                };
                log::error!("{}", error_chain(&e));
                return Err(e);
            }
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(backoff);
            backoff = backoff.saturating_mul(2);
        }
    }

    /// Fetches `BASE/rel` whole (with retries and mirrors), up to `max_len` bytes.
    pub fn fetch(&self, rel: &str, max_len: u64) -> std::result::Result<Vec<u8>, HttpError> {
        self.fetch_with(rel, max_len, |_, body| Ok(body))
    }

    /// Fetches and verifies chunk `id`. With `len`, the chunk must be exactly `len` bytes
    /// long (and longer answers are refused early). Concurrent calls for the same chunk
    /// share one fetch.
    pub fn fetch_chunk(
        &self,
        id: &ChunkId,
        len: Option<usize>,
    ) -> std::result::Result<Arc<Vec<u8>>, HttpError> {
        let (flight, leader) = {
            let mut map = lock(&self.inflight);
            match map.get(id) {
                Some(f) => (Arc::clone(f), false),
                None => {
                    let f = Arc::new(Flight::default());
                    map.insert(*id, Arc::clone(&f));
                    (f, true)
                }
            }
        };
        if !leader {
            self.counters.coalesced.fetch_add(1, Ordering::Relaxed);
            let mut slot = lock(&flight.result);
            while slot.is_none() {
                slot = flight.done.wait(slot).unwrap_or_else(|e| e.into_inner());
            }
            let data = slot
                .clone()
                .unwrap_or(Err(HttpError::Abandoned { id: *id }))?;
            return match len {
                Some(l) if l != data.len() => Err(HttpError::Corrupt {
                    id: *id,
                    url: id.relative_path(),
                    reason: format!("chunk is {} bytes, expected {l}", data.len()),
                }),
                _ => Ok(data),
            };
        }
        // Publishes the result (or, if the fetch unwinds, an error) and wakes the waiters.
        struct Publish<'a> {
            store: &'a HttpStore,
            id: ChunkId,
            flight: Arc<Flight>,
            result: Option<FlightResult>,
        }
        impl Drop for Publish<'_> {
            fn drop(&mut self) {
                let r = self
                    .result
                    .take()
                    .unwrap_or(Err(HttpError::Abandoned { id: self.id }));
                *lock(&self.flight.result) = Some(r);
                self.flight.done.notify_all();
                lock(&self.store.inflight).remove(&self.id);
            }
        }
        let mut publish = Publish {
            store: self,
            id: *id,
            flight,
            result: None,
        };
        let result = self.fetch_chunk_uncoalesced(id, len).map(Arc::new);
        publish.result = Some(result.clone());
        drop(publish);
        result
    }

    /// Fetches chunk `id` from its pack if a pack index lists it, else its chunk file
    /// (older layout); a chunk found in neither makes the pack list be reloaded once.
    fn fetch_chunk_uncoalesced(
        &self,
        id: &ChunkId,
        len: Option<usize>,
    ) -> std::result::Result<Vec<u8>, HttpError> {
        if let Some(loc) = self.pack_location(id, false) {
            return self.fetch_from_pack(id, loc, len);
        }
        match self.fetch_chunk_file(id, len) {
            Err(e) if e.is_not_found() => match self.pack_location(id, true) {
                Some(loc) => self.fetch_from_pack(id, loc, len),
                None => Err(e),
            },
            r => r,
        }
    }

    /// Fetches chunk file `chunks/xx/<id>` (the older layout).
    fn fetch_chunk_file(
        &self,
        id: &ChunkId,
        len: Option<usize>,
    ) -> std::result::Result<Vec<u8>, HttpError> {
        let max = (HEADER_LEN + len.unwrap_or(MAX_CHUNK_LEN)) as u64;
        let data = self.fetch_with(&id.relative_path(), max, |url, file| {
            let corrupt = |reason: String| HttpError::Corrupt {
                id: *id,
                url: url.into(),
                reason,
            };
            let data = codec::decode(id, &file).map_err(|e| match e {
                StoreError::Corrupt { reason, .. } => corrupt(reason),
                e => corrupt(e.to_string()),
            })?;
            match len {
                Some(l) if l != data.len() => Err(corrupt(format!(
                    "chunk is {} bytes, expected {l}",
                    data.len()
                ))),
                _ => Ok(data),
            }
        })?;
        self.counters.chunks_fetched.fetch_add(1, Ordering::Relaxed);
        Ok(data)
    }
}

/// Pack reading (see `packs`): locating chunks, ranged fetches, merged runs.
impl HttpStore {
    /// Where chunk `id` is in a pack: loads the list and indexes the first time, and again
    /// (rate-limited) when `reload_on_miss` and the chunk is unknown.
    fn pack_location(&self, id: &ChunkId, reload_on_miss: bool) -> Option<packs::RemoteLoc> {
        if let Some(l) = lock(&self.packs).get(id) {
            return Some(l);
        }
        // One load at a time; a thread that waited for it looks again before loading.
        let _loading = lock(&self.packs_loading);
        {
            let p = lock(&self.packs);
            if let Some(l) = p.get(id) {
                return Some(l);
            }
            if !p.due(reload_on_miss) {
                return None;
            }
        }
        self.load_packs();
        lock(&self.packs).get(id)
    }

    /// Fetches `packs/list` and the indexes not loaded yet. Failures are logged: the
    /// chunk file layout is still tried.
    fn load_packs(&self) {
        lock(&self.packs).loading();
        let list = match self.fetch(&packs::list_rel(), 64 << 20) {
            Ok(b) => pack::parse_list(&String::from_utf8_lossy(&b)),
            Err(e) if e.is_not_found() => return,
            Err(e) => {
                log::warn!("no pack list: {}", error_chain(&e));
                return;
            }
        };
        for id in list {
            if lock(&self.packs).has(&id) {
                continue;
            }
            let got = self.fetch_with(&id.index_rel(), packs::INDEX_CAP, |url, body| {
                packs::parse_index(id, &body).map_err(|reason| HttpError::Invalid {
                    url: url.into(),
                    reason,
                })
            });
            match got {
                Ok(ix) => lock(&self.packs).add(id, &ix),
                Err(e) => log::warn!("skipping pack {id}: {}", error_chain(&e)),
            }
        }
    }

    /// Fetches one chunk from its pack record (one `Range` request), verified.
    fn fetch_from_pack(
        &self,
        id: &ChunkId,
        loc: packs::RemoteLoc,
        len: Option<usize>,
    ) -> std::result::Result<Vec<u8>, HttpError> {
        let range = (loc.offset, u64::from(loc.len));
        let data = self.fetch_inner(&loc.pack.pack_rel(), range.1, Some(range), |url, rec| {
            packs::decode_checked(id, &rec, len).map_err(|reason| HttpError::Corrupt {
                id: *id,
                url: url.into(),
                reason,
            })
        })?;
        self.counters.chunks_fetched.fetch_add(1, Ordering::Relaxed);
        Ok(data)
    }

    /// Fetches several chunks, merging those adjacent in one pack (up to
    /// [`packs::MAX_RUN_BYTES`] per request) into one `Range` request; chunks not in a
    /// pack are fetched one by one. Results are in the order of `ids`.
    pub fn fetch_many(&self, ids: &[ChunkId]) -> Vec<std::result::Result<Vec<u8>, HttpError>> {
        let mut out: Vec<Option<std::result::Result<Vec<u8>, HttpError>>> =
            (0..ids.len()).map(|_| None).collect();
        let mut located = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            match self.pack_location(id, false) {
                Some(l) => located.push((l, i)),
                None => {
                    let r = self.fetch_chunk(id, None);
                    out[i] = Some(r.map(|a| Arc::try_unwrap(a).unwrap_or_else(|a| (*a).clone())));
                }
            }
        }
        located.sort_by_key(|(l, _)| (l.pack, l.offset));
        for run in packs::runs(&located) {
            let (first, last) = (run[0].0, run[run.len() - 1].0);
            let len = last.offset + u64::from(last.len) - first.offset;
            let rel = first.pack.pack_rel();
            let got = self.fetch_inner(&rel, len, Some((first.offset, len)), |url, body| {
                run.iter()
                    .map(|(l, i)| {
                        let at = (l.offset - first.offset) as usize;
                        let rec = &body[at..at + l.len as usize];
                        packs::decode_checked(&ids[*i], rec, None).map_err(|reason| {
                            HttpError::Corrupt {
                                id: ids[*i],
                                url: url.into(),
                                reason,
                            }
                        })
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()
            });
            match got {
                Ok(datas) => {
                    let n = datas.len() as u64;
                    self.counters.chunks_fetched.fetch_add(n, Ordering::Relaxed);
                    for ((_, i), d) in run.iter().zip(datas) {
                        out[*i] = Some(Ok(d));
                    }
                }
                Err(e) => {
                    for (_, i) in run {
                        out[*i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        out.into_iter()
            .map(|r| r.expect("every chunk was fetched"))
            .collect()
    }
}

impl ChunkRead for HttpStore {
    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let data = self
            .fetch_chunk(id, None)
            .map_err(|e| e.into_store_error(id))?;
        Ok(Arc::try_unwrap(data).unwrap_or_else(|a| a.as_ref().clone()))
    }

    fn get_into(&self, id: &ChunkId, buf: &mut [u8]) -> Result<()> {
        let data = self
            .fetch_chunk(id, Some(buf.len()))
            .map_err(|e| e.into_store_error(id))?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Present if a pack index lists it; else asks the servers for its chunk file with
    /// `HEAD` (one attempt each): present if any answers 200.
    fn contains(&self, id: &ChunkId) -> Result<bool> {
        if self.pack_location(id, true).is_some() {
            return Ok(true);
        }
        let mut last = None;
        for base in &self.bases {
            let url = format!("{base}/{}", id.relative_path());
            let target = self
                .request_url(S3Method::Head, &url)
                .map_err(|e| e.into_store_error(id))?;
            let _permit = self.permits.acquire();
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            match self.agent.head(&target).call() {
                Ok(r) if r.status().as_u16() == 200 => return Ok(true),
                Ok(r) if matches!(r.status().as_u16(), 404 | 410) => {}
                Ok(r) => {
                    last = Some(HttpError::Status {
                        url,
                        status: r.status().as_u16(),
                    })
                }
                Err(e) => {
                    last = Some(HttpError::Transport {
                        url,
                        source: Arc::new(e),
                    })
                }
            }
        }
        match last {
            None => Ok(false),
            Some(e) => Err(e.into_store_error(id)),
        }
    }

    /// Yes: fetches are retried here (see the module documentation), so callers do not.
    fn retries(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
