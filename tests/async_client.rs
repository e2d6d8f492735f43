//! Async calls under tokio against a real server process: correctness,
//! concurrency across tasks and on one client, no busy waiting,
//! cancellation, peer death. They need no io_uring: tasks are woken by the
//! channel's pump, which sleeps in the caller backend (`rpal_core::wait`).

mod common;

use std::time::{Duration, Instant};

use rpal::prelude::*;
use rpal::raw::*;
use rpal::*;

const ECHO: u32 = 1;
const SLOW: u32 = 2;
const DIE: u32 = 3;

fn serve_child() {
    let server = Server::bind(common::arg("RPAL_TEST_SOCK"), ServerOptions::new("async")).unwrap();
    let handler = |req: &Request<'_>, reply: &mut [u8]| match req.method {
        ECHO => {
            reply[..req.payload.len()].copy_from_slice(req.payload);
            Ok(req.payload.len())
        }
        SLOW => {
            std::thread::sleep(Duration::from_millis(400));
            reply[..4].copy_from_slice(b"slow");
            Ok(4)
        }
        // SAFETY: _exit ends the process at once; nothing runs after it.
        DIE => unsafe { libc::_exit(0) },
        _ => Err(RemoteStatus::UnknownMethod),
    };
    rpal::raw::serve(
        server,
        handler,
        PollerConfig {
            threads: 2,
            ..PollerConfig::default()
        },
    )
    .unwrap()
    .join();
}

fn cpu_time() -> Duration {
    // SAFETY: rusage is plain data, filled by the kernel.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a live rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(u.ru_utime) + tv(u.ru_stime)
}

async fn connect(path: &std::path::Path) -> AsyncClient {
    let t0 = Instant::now();
    loop {
        match AsyncClient::connect(path, ClientOptions::new("async")).await {
            Ok(c) => return c,
            Err(_) if t0.elapsed() < Duration::from_secs(20) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => panic!("cannot connect: {e}"),
        }
    }
}

#[test]
fn async_calls_are_woken_not_spun() {
    if common::role().is_some() {
        return serve_child();
    }
    let path = common::sock_path("async");
    let mut child = common::spawn(
        "async_calls_are_woken_not_spun",
        "server",
        &[("RPAL_TEST_SOCK", path.display().to_string())],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = connect(&path).await;
        for i in 0..1000u32 {
            assert_eq!(c.call(ECHO, &i.to_le_bytes()).await.unwrap(), i.to_le_bytes());
        }

        // Several connections used from concurrent tasks.
        let mut tasks = Vec::new();
        for t in 0..4u8 {
            let c = connect(&path).await;
            tasks.push(tokio::spawn(async move {
                for i in 0..200u8 {
                    assert_eq!(c.call(ECHO, &[t, i]).await.unwrap(), [t, i]);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }

        // Many calls in flight on one client at once, each answered with
        // its own reply (whoever's wait reads a reply hands it over).
        let shared = std::sync::Arc::new(connect(&path).await);
        let tasks: Vec<_> = (0..64u32)
            .map(|t| {
                let c = shared.clone();
                tokio::spawn(async move {
                    for i in 0..50u32 {
                        let v = (t << 16 | i).to_le_bytes();
                        assert_eq!(c.call(ECHO, &v).await.unwrap(), v, "a reply went to the wrong call");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }

        // A 400 ms call: the waiting task sleeps (little CPU), it does not spin.
        let cpu0 = cpu_time();
        assert_eq!(c.call(SLOW, b"").await.unwrap(), b"slow");
        let used = cpu_time() - cpu0;
        assert!(used < Duration::from_millis(150), "waiting burned {used:?} of CPU");

        // Cancellation: drop a call's future; the late reply is discarded.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), c.call(SLOW, b""))
                .await
                .is_err()
        );
        assert_eq!(c.call(ECHO, b"after").await.unwrap(), b"after");

        // The server dies during a call: a typed error, promptly.
        let e = c.call(DIE, b"").await.unwrap_err();
        assert!(matches!(e, Error::PeerDied { .. } | Error::Closed { .. }), "{e}");
    });
    // The server died on request: it must be gone.
    child.wait_timeout(Duration::from_secs(10));
}
