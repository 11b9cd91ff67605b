//! Tests of the HTTP chunk store.
use super::*;

#[test]
fn base_urls_are_checked() {
    assert_eq!(normalize_base("http://h:8/a/").unwrap(), "http://h:8/a");
    for bad in [
        "https://h/a",
        "ftp://h",
        "http://",
        "http:///x",
        "http://h/a?x",
        "h/a",
    ] {
        assert!(normalize_base(bad).is_err(), "{bad}");
    }
    let e = HttpStore::new("https://h", HttpStoreOptions::default()).unwrap_err();
    assert!(e.to_string().contains("https"), "{e}");
}

#[test]
fn a_file_url_reads_a_local_archive_directory() {
    assert_eq!(normalize_base("file:///srv/a/").unwrap(), "file:///srv/a");
    assert!(normalize_base("file://srv/a").is_err(), "relative file URL");
    let dir = crate::util::testutil::TempDir::new("http-file");
    std::fs::write(dir.path().join("x"), b"hello").unwrap();
    let base = format!("file://{}", dir.path().display());
    let store = HttpStore::new(&base, HttpStoreOptions::default()).unwrap();
    assert_eq!(store.fetch("x", 16).unwrap(), b"hello");
    assert!(store.fetch("missing", 16).unwrap_err().is_not_found());
    assert!(matches!(
        store.fetch("x", 3),
        Err(HttpError::TooLarge { limit: 3, .. })
    ));
    let data = vec![7u8; 4096];
    let id = ChunkId::of(&data);
    let local = crate::store::local::LocalStore::open(dir.path(), Default::default()).unwrap();
    crate::store::ChunkWrite::put(&local, &data).unwrap();
    assert_eq!(*store.fetch_chunk(&id, Some(4096)).unwrap(), data);
}

#[test]
fn unreachable_server_gives_up_within_budget() {
    // A port nothing listens on: bind then drop.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = HttpStoreOptions {
        attempts: 3,
        first_backoff: Duration::from_millis(20),
        ..HttpStoreOptions::default()
    };
    let store = HttpStore::new(&format!("http://127.0.0.1:{port}/a"), opts).unwrap();
    let id = ChunkId::of(b"x");
    let t = Instant::now();
    let e = store.get(&id).unwrap_err();
    // A ceiling that only a hang reaches (the attempts are counted below).
    assert!(t.elapsed() < Duration::from_secs(30));
    let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(msg.contains("gave up after 3 attempts"), "{msg}");
    // The pack list (first use), then the chunk file: 3 attempts each.
    let st = store.stats();
    assert_eq!((st.requests, st.retries, st.failed_requests), (6, 4, 6));
    // Writing is refused at compile time: HttpStore is no `ChunkWrite` (see the
    // `compile_fail` example on `ChunkRead`).
}
