//! Harness of the control API's HTTP request parsing.

use crate::api::http::{Head, MAX_HEAD, Response, take_head};
use crate::api::{ApiRequest, ApiServerConfig, parse_request};

/// Control API: the input is what a client sends on one connection. It is read as the
/// server reads it (`api::http::take_head`, `Head::body_len`, `api::server::parse_request`)
/// until the input ends or the server would close the connection.
///
/// Properties: a parsed head has a token method, an absolute path without query, at most
/// 64 headers with trimmed values, and prints back to a head that parses the same; no body
/// over the limit is accepted; a request that reaches the VMM is consistent (e.g. a
/// snapshot request names exactly one of `path`/`repo`); every answer the server gives by
/// itself is a well-formed 4xx/5xx response with a JSON error body.
pub fn api_http(data: &[u8]) {
    let max_body = ApiServerConfig::default().max_body;
    let mut buf = data.to_vec();
    loop {
        let head = match take_head(&mut buf) {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => {
                assert!(e.close, "a head error closes the connection");
                return check_response(&Response::from_http_error(&e));
            }
        };
        check_head(&head);
        let len = match head.body_len(max_body) {
            Ok(len) => len,
            Err(e) => return check_response(&Response::from_http_error(&e)),
        };
        assert!(len <= max_body);
        if buf.len() < len {
            return; // the server would wait for the rest of the body
        }
        let body: Vec<u8> = buf.drain(..len).collect();
        let close = match parse_request(&head, &body) {
            Ok(req) => {
                check_request(&req);
                false
            }
            Err(resp) => {
                check_response(&resp);
                resp.close
            }
        };
        if close || !head.keep_alive() {
            return;
        }
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn check_head(head: &Head) {
    assert!(!head.method.is_empty() && head.method.bytes().all(is_tchar));
    assert!(head.path.starts_with('/') && !head.path.contains('?'));
    assert!(head.path.bytes().all(|b| b.is_ascii_graphic()));
    assert!(head.minor <= 1);
    assert!(head.headers.len() <= 64);
    for (n, v) in &head.headers {
        assert!(!n.is_empty() && n.bytes().all(is_tchar));
        assert_eq!(v.trim_matches([' ', '\t']), v);
    }
    let mut text = format!("{} {} HTTP/1.{}\r\n", head.method, head.path, head.minor);
    for (n, v) in &head.headers {
        text += &format!("{n}: {v}\r\n");
    }
    text += "\r\n";
    if text.len() <= MAX_HEAD {
        let mut again = text.into_bytes();
        let parsed = take_head(&mut again).expect("a printed head parses");
        assert_eq!(parsed.as_ref(), Some(head), "head round trip");
        assert!(again.is_empty());
    }
}

fn check_request(req: &ApiRequest) {
    if let ApiRequest::CreateSnapshot(r) = req {
        let path = !r.path.as_os_str().is_empty();
        assert!(path != r.repo.is_some(), "exactly one of path and repo");
        assert!(r.repo.as_ref().is_none_or(|p| !p.as_os_str().is_empty()));
        assert!(r.store.as_ref().is_none_or(|p| !p.as_os_str().is_empty()));
        assert!(!(r.repo.is_some() && r.store.is_some()));
        assert!(r.name.is_none() || r.repo.is_some());
        assert!(r.parent.as_ref().is_none_or(|p| !p.is_empty()));
    }
}

fn check_response(resp: &Response) {
    assert!((400..=599).contains(&resp.status), "{resp:?}");
    let bytes = resp.to_bytes(!resp.close);
    let text = String::from_utf8(bytes).expect("a response is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response has a head");
    assert!(head.starts_with(&format!("HTTP/1.1 {} ", resp.status)));
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("an error response has a body");
    assert_eq!(len.parse::<usize>().ok(), Some(body.len()));
    let v: serde_json::Value = serde_json::from_str(body).expect("the body is JSON");
    assert!(v["error"].is_string());
}
