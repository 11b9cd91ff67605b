//! A small blocking client for the API, used by the CLI and by tests.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use super::http::Stream;

/// Default time [`request`] waits for connecting, sending and receiving (11 min: longer than
/// the server's snapshot reply timeout).
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(660);
/// Largest response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Largest response body accepted.
const MAX_RESPONSE_BODY: u64 = 16 * 1024 * 1024;

/// Where the API server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiTarget {
    /// `127.0.0.1:<port>`.
    Tcp(u16),
    /// A unix socket path.
    Unix(PathBuf),
}

impl fmt::Display for ApiTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiTarget::Tcp(port) => write!(f, "127.0.0.1:{port}"),
            ApiTarget::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Errors of the API client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The method or path cannot be sent (empty, whitespace or control characters).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Connecting to the server failed (is the VMM running?).
    #[error("cannot connect to the VMM API at {target}")]
    Connect {
        /// The target.
        target: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Sending the request or receiving the response failed.
    #[error("API request failed")]
    Io(#[source] io::Error),
    /// The server's answer is not a valid HTTP response.
    #[error("invalid response from the VMM API: {0}")]
    BadResponse(String),
}

/// Sends one request (with `Connection: close`) and returns the status and body.
///
/// `body`, if any, is sent as `application/json`. Non-2xx statuses are not errors: the
/// server's `{"error": ...}` body is returned with them.
pub fn request(
    target: &ApiTarget,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), ClientError> {
    request_with_timeout(target, method, path, body, DEFAULT_CLIENT_TIMEOUT)
}

/// Same as [`request`] with an explicit I/O timeout.
pub fn request_with_timeout(
    target: &ApiTarget,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), ClientError> {
    let bad = |v: &str| {
        v.is_empty()
            || v.bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    };
    if bad(method) {
        return Err(ClientError::InvalidRequest(format!(
            "bad method `{method}`"
        )));
    }
    if bad(path) || !path.starts_with('/') {
        return Err(ClientError::InvalidRequest(format!("bad path `{path}`")));
    }
    let timeout = timeout.max(Duration::from_millis(1));
    let connect_err = |source| ClientError::Connect {
        target: target.to_string(),
        source,
    };
    let mut stream = match target {
        ApiTarget::Tcp(port) => Stream::Tcp(
            TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, *port).into(), timeout)
                .map_err(connect_err)?,
        ),
        ApiTarget::Unix(path) => Stream::Unix(UnixStream::connect(path).map_err(connect_err)?),
    };
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(ClientError::Io)?;

    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if let Some(body) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    stream.write_all(req.as_bytes()).map_err(ClientError::Io)?;
    stream.flush().map_err(ClientError::Io)?;
    read_response(&mut stream)
}

/// Reads one final (non-1xx) response.
pub(super) fn read_response(stream: &mut impl Read) -> Result<(u16, String), ClientError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // Parse any complete head(s) in the buffer; skip interim 1xx responses.
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = std::str::from_utf8(buf.get(..end).unwrap_or_default())
                .map_err(|_| ClientError::BadResponse("non UTF-8 response head".into()))?;
            let (status, content_length) = parse_response_head(head)?;
            let rest = buf.split_off(end + 4);
            if (100..200).contains(&status) {
                buf = rest;
                continue;
            }
            let body = read_body(stream, rest, status, content_length)?;
            let body = String::from_utf8(body)
                .map_err(|_| ClientError::BadResponse("non UTF-8 response body".into()))?;
            return Ok((status, body));
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(ClientError::BadResponse("response head too large".into()));
        }
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(ClientError::BadResponse(
                    "connection closed before a complete response".into(),
                ));
            }
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ClientError::Io(e)),
        }
    }
}

fn read_body(
    stream: &mut impl Read,
    mut body: Vec<u8>,
    status: u16,
    content_length: Option<u64>,
) -> Result<Vec<u8>, ClientError> {
    if status == 204 || status == 304 {
        return Ok(Vec::new());
    }
    match content_length {
        Some(len) if len > MAX_RESPONSE_BODY => Err(ClientError::BadResponse(format!(
            "response body too large ({len} bytes)"
        ))),
        Some(len) => {
            // Cannot truncate: len <= MAX_RESPONSE_BODY.
            let len = len as usize;
            if body.len() < len {
                let mut more = vec![0u8; len - body.len()];
                stream.read_exact(&mut more).map_err(ClientError::Io)?;
                body.extend_from_slice(&more);
            }
            body.truncate(len);
            Ok(body)
        }
        None => {
            stream
                .take(MAX_RESPONSE_BODY)
                .read_to_end(&mut body)
                .map_err(ClientError::Io)?;
            Ok(body)
        }
    }
}

fn parse_response_head(head: &str) -> Result<(u16, Option<u64>), ClientError> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let status = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code.parse::<u16>().ok(),
        _ => None,
    }
    .filter(|s| (100..=599).contains(s))
    .ok_or_else(|| ClientError::BadResponse(format!("bad status line `{status_line}`")))?;
    let mut content_length = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            let v = value.trim().parse::<u64>().map_err(|_| {
                ClientError::BadResponse(format!("bad Content-Length `{}`", value.trim()))
            })?;
            content_length = Some(v);
        }
    }
    Ok((status, content_length))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses() {
        let mut r: &[u8] =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}extra";
        assert_eq!(read_response(&mut r).unwrap(), (200, "{}".to_string()));
        let mut r: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(read_response(&mut r).unwrap(), (204, String::new()));
        let mut r: &[u8] = b"HTTP/1.0 404 Not Found\r\n\r\n{\"error\":\"x\"}";
        assert_eq!(
            read_response(&mut r).unwrap(),
            (404, "{\"error\":\"x\"}".to_string())
        );
        let mut r: &[u8] = b"SSH-2.0-OpenSSH\r\n\r\n";
        assert!(matches!(
            read_response(&mut r),
            Err(ClientError::BadResponse(_))
        ));
        let mut r: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort";
        assert!(matches!(read_response(&mut r), Err(ClientError::Io(_))));
    }

    #[test]
    fn rejects_bad_requests() {
        let t = ApiTarget::Tcp(1);
        assert!(matches!(
            request(&t, "GET", "vm", None),
            Err(ClientError::InvalidRequest(_))
        ));
        assert!(matches!(
            request(&t, "G T", "/vm", None),
            Err(ClientError::InvalidRequest(_))
        ));
        assert!(matches!(
            request(&t, "GET", "/v\r\nm", None),
            Err(ClientError::InvalidRequest(_))
        ));
    }
}
