//! `file://` archives for the [`HttpStore`](super::HttpStore): the same requests answered
//! from the local file system, with the answers an HTTP server would give (a missing file
//! is a 404).

use std::io::Read as _;
use std::os::unix::fs::FileExt as _;

use super::error::HttpError;

/// The body of `url` (local path `path`): the whole file (refused when over `max_len`
/// bytes), or the byte range `(offset, len)` of it.
pub(super) fn read(
    url: &str,
    path: &str,
    max_len: u64,
    range: Option<(u64, u64)>,
) -> Result<Vec<u8>, HttpError> {
    let failed = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::NotFound {
            return HttpError::Status {
                url: url.into(),
                status: 404,
            };
        }
        let reason = match range {
            None => format!("cannot read: {e}"),
            Some((offset, len)) => format!("cannot read {len} bytes at {offset}: {e}"),
        };
        HttpError::Invalid {
            url: url.into(),
            reason,
        }
    };
    let f = std::fs::File::open(path).map_err(failed)?;
    if let Some((offset, len)) = range {
        let mut body = vec![0u8; len as usize];
        f.read_exact_at(&mut body, offset).map_err(failed)?;
        return Ok(body);
    }
    let mut body = Vec::new();
    f.take(max_len + 1).read_to_end(&mut body).map_err(failed)?;
    if body.len() as u64 > max_len {
        return Err(HttpError::TooLarge {
            url: url.into(),
            limit: max_len,
        });
    }
    Ok(body)
}
