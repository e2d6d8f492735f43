//! Handlers that fail: a user error type crosses to the caller as a code
//! and a message, sync and async, over every transport; an allocation that
//! fails in a handler is an error it returns, not a panic; a panic's
//! message reaches the caller with the method's name.

mod common;

use common::{ALL, Transport, retry, runtime};

use std::path::PathBuf;

use rpal::prelude::*;

/// The cache's own errors.
#[derive(Debug)]
pub enum CacheError {
    /// No entry for this key.
    Missing(u64),
    /// The key is reserved.
    Reserved,
}

impl std::fmt::Display for CacheError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing(k) => write!(f, "no entry for key {k}"),
            Self::Reserved => f.write_str("key 0 is reserved"),
        }
    }
}

impl rpal::ServiceError for CacheError {
    fn code(&self) -> u32 {
        match self {
            Self::Missing(_) => 404,
            Self::Reserved => 403,
        }
    }
}

#[rpal::service]
pub trait Cache {
    /// The value of key `k`: keys 1..=10 hold `k * 10`.
    fn get(&self, k: u64) -> Result<u64, CacheError>;
    /// As `get`, from an async handler.
    async fn get_later(&self, k: u64) -> Result<u64, CacheError>;
    /// Fails unless `k` is not 0; nothing to return.
    fn check(&self, k: u64) -> Result<(), CacheError>;
    /// A string of `len` bytes, built in the server's arena: an arena too
    /// small is an error the handler returns with `?`.
    fn blob(&self, len: u64) -> rpal::Result<ShmString>;
    /// Panics with a message.
    fn boom(&self) -> rpal::Result<u64>;
}

struct CacheImpl;

fn lookup(k: u64) -> Result<u64, CacheError> {
    match k {
        0 => Err(CacheError::Reserved),
        1..=10 => Ok(k * 10),
        k => Err(CacheError::Missing(k)),
    }
}

impl Cache for CacheImpl {
    fn get(&self, k: u64) -> Result<u64, CacheError> {
        lookup(k)
    }
    async fn get_later(&self, k: u64) -> Result<u64, CacheError> {
        tokio::task::yield_now().await;
        lookup(k)
    }
    fn check(&self, k: u64) -> Result<(), CacheError> {
        lookup(k).map(drop)
    }
    fn blob(&self, len: u64) -> rpal::Result<ShmString> {
        let text = "x".repeat(usize::try_from(len).unwrap_or(usize::MAX).min(1 << 20));
        if len > 1 << 20 {
            // More than a test should build in private memory: ask the
            // arena for the size itself, which fails.
            let _ = rpal::ShmVec::<u8>::with_capacity(len as usize)?;
        }
        ShmString::copy_from(&text)
    }
    fn boom(&self) -> rpal::Result<u64> {
        common::quiet_panic("the handler gave up on purpose")
    }
}

fn serve_child() {
    let base = PathBuf::from(common::arg("RPAL_TEST_SOCK"));
    let host = ServeCache::new(CacheImpl)
        .host()
        .shm(&base)
        .tcp("127.0.0.1:0")
        .unix_stream(base.with_extension("stream"))
        .start()
        .expect("start the host");
    common::publish_port(&base, host.tcp_addr().expect("tcp").port());
    host.join();
}

#[test]
fn handler_errors_reach_the_caller_with_their_code_and_message() {
    if common::role().is_some() {
        return serve_child();
    }
    let base = common::sock_path("errors");
    let _server = common::spawn(
        "handler_errors_reach_the_caller_with_their_code_and_message",
        "server",
        &[("RPAL_TEST_SOCK", base.display().to_string())],
    );
    let port = common::read_port(&base);
    let rt = runtime();
    for t in ALL {
        let c = match t {
            Transport::Shm => retry(|| CacheClient::connect(&base)),
            Transport::Tcp => retry(|| CacheClient::connect_tcp(("127.0.0.1", port))),
            Transport::UnixStream => retry(|| CacheClient::connect_unix_stream(base.with_extension("stream"))),
        };
        assert_eq!(c.get(3).unwrap(), 30, "{t:?}");

        let e = c.get(7_000).unwrap_err();
        println!("errors-row: {t:?}: {e}");
        assert_eq!(e.handler_error(), Some((404, "no entry for key 7000")), "{t:?}: {e}");
        assert_eq!(
            e.to_string(),
            "`get` failed on the server: the handler returned error 404: no entry for key 7000"
        );

        let e = rt.block_on(c.get_later_async(0)).unwrap_err();
        assert_eq!(e.handler_error(), Some((403, "key 0 is reserved")), "{t:?}: {e}");
        let e = c.get_later(11).unwrap_err();
        assert_eq!(e.handler_error(), Some((404, "no entry for key 11")), "{t:?}: {e}");
        assert_eq!(c.get_later(10).unwrap(), 100, "{t:?}");

        c.check(1).unwrap();
        let e = c.check(0).unwrap_err();
        assert_eq!(e.handler_error(), Some((403, "key 0 is reserved")), "{t:?}: {e}");

        // An arena too small is the handler's error (code 0: rpal's own),
        // with the arena's message; a blob that fits still works.
        let e = c.blob(1 << 40).unwrap_err();
        println!("errors-row: {t:?}: {e}");
        let (code, message) = e.handler_error().unwrap_or_else(|| panic!("{t:?}: {e}"));
        assert_eq!(code, 0, "{t:?}: {e}");
        assert!(message.contains("region full"), "{t:?}: {e}");
        assert_eq!(c.blob(5).unwrap().read().len(), 5, "{t:?}");

        // A panic names the method and carries its message.
        let e = c.boom().unwrap_err();
        println!("errors-row: {t:?}: {e}");
        match &e {
            rpal::Error::Remote {
                name, status, message, ..
            } => {
                assert_eq!(name, "boom", "{t:?}");
                assert_eq!(*status, RemoteStatus::HandlerPanicked, "{t:?}");
                assert_eq!(message, "the handler gave up on purpose", "{t:?}");
            }
            other => panic!("{t:?}: {other}"),
        }
        assert_eq!(c.get(1).unwrap(), 10, "{t:?}: the server goes on");
    }
}
