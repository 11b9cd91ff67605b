//! Minimal HTTP/1.1 request reading and response writing (Content-Length framing only).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Maximum size of a request line plus headers.
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// Maximum number of header lines.
const MAX_HEADERS: usize = 64;
/// Read chunk size.
const CHUNK: usize = 4096;

/// A connected client socket, TCP or unix.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    pub(crate) fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(nb),
            Stream::Unix(s) => s.set_nonblocking(nb),
        }
    }

    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub(crate) fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }

    /// Wakes a thread blocked reading (it sees EOF); replies can still be written.
    pub(crate) fn shutdown_read(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Read),
            Stream::Unix(s) => s.shutdown(Shutdown::Read),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// An error the server answers by itself; `close` when the connection cannot be reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpError {
    pub status: u16,
    pub message: String,
    pub close: bool,
}

impl HttpError {
    pub(crate) fn new(status: u16, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
            close: false,
        }
    }

    /// Same, and the connection is closed after the answer.
    pub(crate) fn fatal(status: u16, message: impl Into<String>) -> Self {
        HttpError {
            close: true,
            ..Self::new(status, message)
        }
    }
}

/// Why no request could be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// Answer with this error, then close.
    Http(HttpError),
    /// Peer closed, idled out or the socket failed: close silently.
    Gone,
}

/// A parsed request line and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    pub method: String,
    /// Request target with any query string removed.
    pub path: String,
    /// Minor version: `HTTP/1.<minor>`.
    pub minor: u8,
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// First value of header `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn header_tokens<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
    }

    /// Whether the client wants the connection kept open after this request.
    pub(crate) fn keep_alive(&self) -> bool {
        let has = |tok: &str| {
            self.header_tokens("connection")
                .any(|t| t.eq_ignore_ascii_case(tok))
        };
        if has("close") {
            false
        } else {
            self.minor >= 1 || has("keep-alive")
        }
    }

    /// Whether a Content-Length header is present.
    pub(crate) fn has_content_length(&self) -> bool {
        self.header("content-length").is_some()
    }

    /// Whether the client sent `Expect: 100-continue`.
    pub(crate) fn expects_continue(&self) -> bool {
        self.minor >= 1
            && self
                .header_tokens("expect")
                .any(|t| t.eq_ignore_ascii_case("100-continue"))
    }

    /// The body length announced by the headers, checked against `max_body`.
    pub(crate) fn body_len(&self, max_body: usize) -> Result<usize, HttpError> {
        if self.header("transfer-encoding").is_some() {
            return Err(HttpError::fatal(
                411,
                "Transfer-Encoding is not supported; send the body with a Content-Length header",
            ));
        }
        let mut len: Option<u64> = None;
        for tok in self.header_tokens("content-length") {
            let valid =
                !tok.is_empty() && tok.len() <= 19 && tok.bytes().all(|b| b.is_ascii_digit());
            let v = match tok.parse::<u64>() {
                Ok(v) if valid => v,
                _ => {
                    return Err(HttpError::fatal(
                        400,
                        format!("invalid Content-Length `{tok}`"),
                    ));
                }
            };
            if len.is_some_and(|l| l != v) {
                return Err(HttpError::fatal(400, "conflicting Content-Length headers"));
            }
            len = Some(v);
        }
        if self.has_content_length() && len.is_none() {
            return Err(HttpError::fatal(400, "empty Content-Length header"));
        }
        let len = len.unwrap_or(0);
        if len > max_body as u64 {
            return Err(HttpError::fatal(
                413,
                format!("request body of {len} bytes exceeds the {max_body}-byte limit"),
            ));
        }
        // Cannot truncate: len <= max_body which is a usize.
        Ok(len as usize)
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Position just past the empty line ending the head, ignoring leading empty lines.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    let mut line_start = 0;
    let mut seen_content = false;
    while i < buf.len() {
        if buf[i] == b'\n' {
            let line = &buf[line_start..i];
            let empty = line.is_empty() || line == b"\r";
            if empty && seen_content {
                return Some(i + 1);
            }
            seen_content |= !empty;
            line_start = i + 1;
        }
        i += 1;
    }
    None
}

/// Parses a request head (request line + headers, including the terminating empty line).
pub(crate) fn parse_head(raw: &[u8]) -> Result<Head, HttpError> {
    let text = std::str::from_utf8(raw)
        .map_err(|_| HttpError::fatal(400, "request head is not valid UTF-8"))?;
    let mut lines = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .skip_while(|l| l.is_empty());
    let request_line = lines
        .next()
        .ok_or_else(|| HttpError::fatal(400, "missing request line"))?;
    let bad_line = || HttpError::fatal(400, "malformed HTTP request line");
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) => (m, t, v),
        _ => return Err(bad_line()),
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(bad_line());
    }
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(HttpError::fatal(
            400,
            "request target must be an absolute path",
        ));
    }
    let minor = match version {
        "HTTP/1.1" => 1,
        "HTTP/1.0" => 0,
        v if v.starts_with("HTTP/") => {
            return Err(HttpError::fatal(
                505,
                format!("{v} is not supported; use HTTP/1.1"),
            ));
        }
        _ => return Err(bad_line()),
    };
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            return Err(HttpError::fatal(
                400,
                "folded header lines are not supported",
            ));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| HttpError::fatal(400, "malformed header line"))?;
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(HttpError::fatal(400, "malformed header name"));
        }
        if headers.len() >= MAX_HEADERS {
            return Err(HttpError::fatal(431, "too many request headers"));
        }
        headers.push((
            name.to_string(),
            value.trim_matches([' ', '\t']).to_string(),
        ));
    }
    let path = target.split('?').next().unwrap_or(target).to_string();
    Ok(Head {
        method: method.to_string(),
        path,
        minor,
        headers,
    })
}

/// Takes the request head at the start of `buf` out of it and parses it: `Ok(None)` while
/// the head is incomplete (and still within [`MAX_HEAD`]), an error for a head too large or
/// malformed.
pub(crate) fn take_head(buf: &mut Vec<u8>) -> Result<Option<Head>, HttpError> {
    let too_large = || {
        HttpError::fatal(
            431,
            format!("request line and headers exceed {MAX_HEAD} bytes"),
        )
    };
    match head_end(buf) {
        Some(end) if end > MAX_HEAD => Err(too_large()),
        Some(end) => {
            let raw: Vec<u8> = buf.drain(..end).collect();
            parse_head(&raw).map(Some)
        }
        None if buf.len() >= MAX_HEAD => Err(too_large()),
        None => Ok(None),
    }
}

/// A connection with its read buffer (which may hold pipelined bytes of the next request).
pub(crate) struct Conn {
    pub stream: Stream,
    buf: Vec<u8>,
}

impl Conn {
    pub(crate) fn new(stream: Stream) -> Self {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads once into the buffer within `timeout`; `Ok(false)` on EOF.
    fn fill(&mut self, timeout: Duration) -> Result<bool, io::Error> {
        self.stream
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut chunk = [0u8; CHUNK];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf
                        .extend_from_slice(chunk.get(..n).unwrap_or_default());
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether bytes of a next request are already buffered (pipelined).
    pub(crate) fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Waits up to `idle` for the first byte of the next request (at once if one is
    /// buffered). False when the peer closed, the wait timed out or the socket failed.
    pub(crate) fn wait_for_input(&mut self, idle: Duration) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        matches!(self.fill(idle), Ok(true))
    }

    /// Reads the next request head. `Ok(None)`: the peer closed or stayed idle for
    /// `idle` without starting a request. Once a request starts it must be complete within
    /// `limit`; the returned deadline is for reading its body.
    pub(crate) fn read_head(
        &mut self,
        idle: Duration,
        limit: Duration,
    ) -> Result<Option<(Head, Instant)>, ReadError> {
        let mut deadline = (!self.buf.is_empty()).then(|| Instant::now() + limit);
        loop {
            if let Some(head) = take_head(&mut self.buf).map_err(ReadError::Http)? {
                let deadline = deadline.unwrap_or_else(|| Instant::now() + limit);
                return Ok(Some((head, deadline)));
            }
            let timeout = match deadline {
                None => idle,
                Some(d) => d.saturating_duration_since(Instant::now()),
            };
            if timeout.is_zero() {
                return Err(timed_out());
            }
            match self.fill(timeout) {
                Ok(true) => {
                    deadline.get_or_insert_with(|| Instant::now() + limit);
                }
                Ok(false) if self.buf.is_empty() => return Ok(None),
                Ok(false) => return Err(ReadError::Gone),
                Err(e) if is_timeout(&e) => {
                    return if deadline.is_none() {
                        Ok(None)
                    } else {
                        Err(timed_out())
                    };
                }
                Err(_) => return Err(ReadError::Gone),
            }
        }
    }

    /// Reads exactly `len` body bytes before `deadline`.
    pub(crate) fn read_body(
        &mut self,
        len: usize,
        deadline: Instant,
    ) -> Result<Vec<u8>, ReadError> {
        while self.buf.len() < len {
            let timeout = deadline.saturating_duration_since(Instant::now());
            if timeout.is_zero() {
                return Err(timed_out());
            }
            match self.fill(timeout) {
                Ok(true) => {}
                Ok(false) => return Err(ReadError::Gone),
                Err(e) if is_timeout(&e) => return Err(timed_out()),
                Err(_) => return Err(ReadError::Gone),
            }
        }
        Ok(self.buf.drain(..len).collect())
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn timed_out() -> ReadError {
    ReadError::Http(HttpError::fatal(
        408,
        "timed out waiting for the complete request",
    ))
}

/// A response about to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    pub status: u16,
    /// JSON body; `None` for 204.
    pub body: Option<String>,
    /// Value of the `Allow` header (405 responses).
    pub allow: Option<&'static str>,
    /// Close the connection after writing.
    pub close: bool,
}

impl Response {
    /// A 200 response with a JSON body, or 204 when `value` is null.
    pub(crate) fn ok(value: &serde_json::Value) -> Self {
        if value.is_null() {
            return Response {
                status: 204,
                body: None,
                allow: None,
                close: false,
            };
        }
        Response {
            status: 200,
            body: Some(value.to_string()),
            allow: None,
            close: false,
        }
    }

    /// An error response with body `{"error": message}`; statuses outside 4xx/5xx become 500.
    pub(crate) fn error(status: u16, message: &str) -> Self {
        let status = if (400..=599).contains(&status) {
            status
        } else {
            500
        };
        Response {
            status,
            body: Some(serde_json::json!({ "error": message }).to_string()),
            allow: None,
            close: false,
        }
    }

    pub(crate) fn from_http_error(e: &HttpError) -> Self {
        Response {
            close: e.close,
            ..Self::error(e.status, &e.message)
        }
    }

    /// Serializes the response; `keep_alive` false adds `Connection: close`.
    pub(crate) fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: vmm\r\n",
            self.status,
            reason(self.status)
        );
        if let Some(allow) = self.allow {
            out.push_str(&format!("Allow: {allow}\r\n"));
        }
        if let Some(body) = &self.body {
            out.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        if !keep_alive || self.close {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        if let Some(body) = &self.body {
            out.push_str(body);
        }
        out.into_bytes()
    }

    pub(crate) fn write_to(&self, w: &mut impl Write, keep_alive: bool) -> io::Result<()> {
        w.write_all(&self.to_bytes(keep_alive))?;
        w.flush()
    }
}

/// Reason phrase for the statuses this server produces.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_head_and_headers() {
        let raw = b"\r\nPATCH /vm?x=1 HTTP/1.1\r\nHost: a\r\nCONTENT-length:  12 \r\nConnection: Keep-Alive, Close\r\n\r\n";
        assert_eq!(head_end(raw), Some(raw.len()));
        let h = parse_head(raw).unwrap();
        assert_eq!(h.method, "PATCH");
        assert_eq!(h.path, "/vm");
        assert_eq!(h.header("content-length"), Some("12"));
        assert_eq!(h.body_len(100), Ok(12));
        assert!(!h.keep_alive());
    }

    #[test]
    fn keep_alive_defaults() {
        let h11 = parse_head(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(h11.keep_alive());
        let h10 = parse_head(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(!h10.keep_alive());
        let h10ka = parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        assert!(h10ka.keep_alive());
    }

    #[test]
    fn rejects_bad_heads() {
        for raw in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET /vm HTTP/1.1 extra\r\n\r\n",
            b"GET vm HTTP/1.1\r\n\r\n",
            b"GET /vm FTP/1.1\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nNoColon\r\n\r\n",
            b"GET /vm HTTP/1.1\r\n folded: x\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"G\xffT /vm HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse_head(raw).unwrap_err().status, 400, "{raw:?}");
        }
        assert_eq!(
            parse_head(b"GET / HTTP/2.0\r\n\r\n").unwrap_err().status,
            505
        );
    }

    #[test]
    fn body_framing_errors() {
        let cl = |v: &str| {
            parse_head(format!("PUT / HTTP/1.1\r\nContent-Length: {v}\r\n\r\n").as_bytes()).unwrap()
        };
        assert_eq!(cl("-1").body_len(10).unwrap_err().status, 400);
        assert_eq!(cl("1x").body_len(10).unwrap_err().status, 400);
        assert_eq!(
            cl("99999999999999999999999")
                .body_len(10)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(cl("11").body_len(10).unwrap_err().status, 413);
        assert_eq!(cl("3, 4").body_len(10).unwrap_err().status, 400);
        assert_eq!(cl("4, 4").body_len(10), Ok(4));
        let te = parse_head(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert_eq!(te.body_len(10).unwrap_err().status, 411);
    }

    #[test]
    fn response_bytes() {
        let r = Response::error(405, "no");
        let r = Response {
            allow: Some("GET"),
            ..r
        };
        let s = String::from_utf8(r.to_bytes(false)).unwrap();
        assert!(s.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(s.contains("Allow: GET\r\n"));
        assert!(s.contains("Connection: close\r\n"));
        assert!(s.ends_with("\r\n\r\n{\"error\":\"no\"}"));
        let s = String::from_utf8(Response::ok(&serde_json::Value::Null).to_bytes(true)).unwrap();
        assert_eq!(s, "HTTP/1.1 204 No Content\r\nServer: vmm\r\n\r\n");
        assert_eq!(Response::error(200, "x").status, 500);
    }
}
