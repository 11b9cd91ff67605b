//! Where an S3 object is and how to ask for it: `s3://BUCKET/KEY` URLs ([`S3Url`]), the
//! endpoint, region and credentials ([`S3Config`]), and presigned request URLs made by
//! the `rusty-s3` crate (AWS Signature Version 4; no hand-written signing).
//!
//! The HTTP store ([`super::http`]) reads `s3://` bases through this module: it turns
//! each `s3://BUCKET/KEY` into a presigned `http://ENDPOINT/BUCKET/KEY?X-Amz-…` URL just
//! before a request, so retries, coalescing and verification are the HTTP store's. The
//! writing side is [`super::s3::S3Store`].
//!
//! Configuration, as the AWS tools read it: the endpoint from `--s3-endpoint`
//! ([`set_endpoint`]), else `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`; the region from
//! `AWS_REGION`, else `AWS_DEFAULT_REGION`, else `us-east-1`; the credentials from
//! `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`), and without
//! them requests go unsigned (a bucket readable anonymously). Addressing is path-style
//! (`ENDPOINT/BUCKET/KEY`), which MinIO, Ceph RGW, SeaweedFS and Garage all serve.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rusty_s3::{Bucket, Credentials, S3Action as _, UrlStyle};

/// The URL scheme of objects in S3-compatible storage.
pub const SCHEME: &str = "s3://";

/// How long a presigned request stays valid: longer than any request with its retries.
const SIGNED_FOR: Duration = Duration::from_secs(15 * 60);

/// Errors of S3 locations and configuration.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// An `s3://` URL is not usable.
    #[error("invalid S3 URL {url:?}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// No endpoint was configured.
    #[error(
        "no S3 endpoint for {url}: pass --s3-endpoint http://HOST:PORT or set AWS_ENDPOINT_URL"
    )]
    NoEndpoint {
        /// The URL asked for.
        url: String,
    },
    /// The endpoint is not usable.
    #[error("S3 endpoint {endpoint:?}: {reason}")]
    BadEndpoint {
        /// The endpoint.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
}

/// `s3://BUCKET/KEY`, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    /// The bucket.
    pub bucket: String,
    /// The object key or key prefix (no leading `/`; may be empty).
    pub key: String,
}

impl S3Url {
    /// Parses `s3://BUCKET[/KEY]`. Bucket names follow S3's rules (3-63 of `[a-z0-9.-]`,
    /// starting and ending with a letter or digit); keys must not contain `..` segments,
    /// empty segments, a query or a fragment, so that relative references resolve as
    /// they would on a web server.
    pub fn parse(url: &str) -> Result<Self, S3Error> {
        let bad = |reason: &str| S3Error::BadUrl {
            url: url.into(),
            reason: reason.into(),
        };
        let rest = url
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("must start with s3://"))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let key = key.trim_end_matches('/');
        let ok_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
            && bucket
                .bytes()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            && bucket
                .bytes()
                .last()
                .is_some_and(|c| c.is_ascii_alphanumeric());
        if !ok_bucket {
            return Err(bad(
                "the bucket name must be 3-63 of [a-z0-9.-], starting and ending with a \
                 letter or digit",
            ));
        }
        if key.contains(['?', '#']) || key.chars().any(|c| c.is_control() || c == '\\') {
            return Err(bad(
                "the key must not contain a query, a fragment or control characters",
            ));
        }
        if !key.is_empty()
            && key
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err(bad("the key must not have empty, '.' or '..' segments"));
        }
        Ok(S3Url {
            bucket: bucket.into(),
            key: key.into(),
        })
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SCHEME}{}", self.bucket)?;
        if !self.key.is_empty() {
            write!(f, "/{}", self.key)?;
        }
        Ok(())
    }
}

/// The request an object URL is presigned for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S3Method {
    /// `GET` (also with a `Range` header: unsigned headers are allowed).
    Get,
    /// `HEAD`.
    Head,
    /// `PUT`.
    Put,
    /// `DELETE`.
    Delete,
}

/// Endpoint, region and credentials of an S3-compatible service.
#[derive(Clone)]
pub struct S3Config {
    endpoint: url::Url,
    region: String,
    credentials: Option<Credentials>,
}

impl std::fmt::Debug for S3Config {
    /// Never prints the secret key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint.as_str())
            .field("region", &self.region)
            .field("access_key", &self.credentials.as_ref().map(|c| c.key()))
            .finish()
    }
}

static ENDPOINT_OVERRIDE: OnceLock<String> = OnceLock::new();
static FROM_ENV: OnceLock<Arc<S3Config>> = OnceLock::new();

/// Sets the endpoint every later [`S3Config::from_env`] uses, over the environment
/// (`--s3-endpoint`). Only the first call counts.
pub fn set_endpoint(endpoint: &str) {
    let _ = ENDPOINT_OVERRIDE.set(endpoint.to_string());
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl S3Config {
    /// A configuration with an explicit endpoint (`http://HOST:PORT[/PATH]`), region and
    /// optional access key and secret (none: unsigned requests).
    pub fn new(
        endpoint: &str,
        region: &str,
        credentials: Option<(&str, &str)>,
    ) -> Result<Self, S3Error> {
        let bad = |reason: &str| S3Error::BadEndpoint {
            endpoint: endpoint.into(),
            reason: reason.into(),
        };
        let url: url::Url = endpoint.parse().map_err(|e| bad(&format!("{e}")))?;
        match url.scheme() {
            "http" => {}
            "https" => {
                return Err(bad(
                    "https is not supported by this build (the crate is built without TLS); \
                     use an http:// endpoint (e.g. on a private network or through a local \
                     TLS proxy)",
                ));
            }
            _ => return Err(bad("must be an http:// URL")),
        }
        if url.host_str().is_none() || url.query().is_some() || url.fragment().is_some() {
            return Err(bad("needs a host and no query or fragment"));
        }
        Ok(S3Config {
            endpoint: url,
            region: region.into(),
            credentials: credentials.map(|(k, s)| Credentials::new(k, s)),
        })
    }

    /// The process's configuration from `--s3-endpoint` and the `AWS_*` environment
    /// variables (see the module documentation), read once; `url` names what needed it
    /// (for the error).
    pub fn from_env(url: &str) -> Result<Arc<Self>, S3Error> {
        if let Some(c) = FROM_ENV.get() {
            return Ok(Arc::clone(c));
        }
        let endpoint = ENDPOINT_OVERRIDE
            .get()
            .cloned()
            .or_else(|| env_var("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env_var("AWS_ENDPOINT_URL"))
            .ok_or_else(|| S3Error::NoEndpoint { url: url.into() })?;
        let region = env_var("AWS_REGION")
            .or_else(|| env_var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".into());
        let mut c = S3Config::new(&endpoint, &region, None)?;
        c.credentials = Credentials::from_env();
        Ok(Arc::clone(FROM_ENV.get_or_init(|| Arc::new(c))))
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str()
    }

    /// Whether requests are signed (credentials are set).
    pub fn signs(&self) -> bool {
        self.credentials.is_some()
    }

    /// The presigned `http://` URL for `method` on object `url` (`s3://BUCKET/KEY`).
    pub fn presign(&self, method: S3Method, url: &str) -> Result<String, S3Error> {
        let o = S3Url::parse(url)?;
        let bucket = Bucket::new(
            self.endpoint.clone(),
            UrlStyle::Path,
            o.bucket.clone(),
            self.region.clone(),
        )
        .map_err(|e| S3Error::BadEndpoint {
            endpoint: self.endpoint.to_string(),
            reason: format!("{e:?}"),
        })?;
        let c = self.credentials.as_ref();
        let key = o.key.as_str();
        let signed = match method {
            S3Method::Get => bucket.get_object(c, key).sign(SIGNED_FOR),
            S3Method::Head => bucket.head_object(c, key).sign(SIGNED_FOR),
            S3Method::Put => bucket.put_object(c, key).sign(SIGNED_FOR),
            S3Method::Delete => bucket.delete_object(c, key).sign(SIGNED_FOR),
        };
        Ok(signed.into())
    }
}

/// The `<Code>` and `<Message>` of an S3 error document (empty when absent).
pub fn error_code(body: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(body);
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let close = format!("</{name}>");
        text.find(&open)
            .and_then(|i| {
                let rest = &text[i + open.len()..];
                rest.find(&close).map(|j| rest[..j].trim().to_string())
            })
            .unwrap_or_default()
    };
    (tag("Code"), tag("Message"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_parse() {
        let u = S3Url::parse("s3://my-bucket/a/b/").unwrap();
        assert_eq!((u.bucket.as_str(), u.key.as_str()), ("my-bucket", "a/b"));
        assert_eq!(u.to_string(), "s3://my-bucket/a/b");
        assert_eq!(S3Url::parse("s3://bkt").unwrap().key, "");
        for bad in [
            "http://b/k",
            "s3://",
            "s3://B/k",
            "s3://ab/k",
            "s3://-ab/k",
            "s3://bkt/a//b",
            "s3://bkt/../x",
            "s3://bkt/a?x",
        ] {
            assert!(S3Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn presigned_urls_are_path_style_and_signed_only_with_credentials() {
        let c = S3Config::new("http://127.0.0.1:9000", "us-east-1", Some(("AK", "SK"))).unwrap();
        let u = c.presign(S3Method::Get, "s3://bkt/p/chunks/ab/x").unwrap();
        assert!(
            u.starts_with("http://127.0.0.1:9000/bkt/p/chunks/ab/x?"),
            "{u}"
        );
        assert!(u.contains("X-Amz-Signature="), "{u}");
        assert!(u.contains("X-Amz-Credential=AK"), "{u}");
        assert!(!u.contains("SK"), "{u}");
        let anon = S3Config::new("http://h:9000", "r", None).unwrap();
        assert_eq!(
            anon.presign(S3Method::Head, "s3://bkt/k").unwrap(),
            "http://h:9000/bkt/k"
        );
        assert!(!format!("{c:?}").contains("SK"));
        assert!(S3Config::new("https://h", "r", None).is_err());
        assert!(S3Config::new("ftp://h", "r", None).is_err());
    }

    #[test]
    fn error_documents_name_their_code() {
        let body = b"<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code>\
            <Message>The specified bucket does not exist</Message></Error>";
        assert_eq!(
            error_code(body),
            (
                "NoSuchBucket".into(),
                "The specified bucket does not exist".into()
            )
        );
        assert_eq!(error_code(b""), (String::new(), String::new()));
    }
}
