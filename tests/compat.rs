//! A peer built from another version of a service's types is refused at
//! connect, over shared memory and over TCP, and the error names the
//! methods that differ. The server child serves `v1`; clients built with
//! an added field, a swapped pair and a same-size type change connect to it.

mod common;

use std::path::PathBuf;

/// The service, the same text in every version: only `Stats` changes.
macro_rules! cache_service {
    () => {
        #[rpal::service]
        pub trait Cache {
            /// `k + 1`: its id does not depend on `Stats`.
            fn get(&self, k: u64) -> u64;
            /// The counters, by value.
            fn stats(&self) -> Stats;
            /// The counters, behind a pointer: the entries.
            fn entries(&self, s: ShmBox<Stats>) -> u64;
        }
    };
}

mod v1 {
    use rpal::prelude::*;
    #[derive(ShmSafe, Clone, Copy, Debug, PartialEq)]
    #[repr(C)]
    pub struct Stats {
        pub entries: u64,
        pub hits: u64,
        pub misses: u64,
    }
    cache_service!();
}

/// `Stats` gained a field.
#[allow(dead_code)] // only its client is used
mod added {
    use rpal::prelude::*;
    #[derive(ShmSafe, Clone, Copy, Debug)]
    #[repr(C)]
    pub struct Stats {
        pub entries: u64,
        pub hits: u64,
        pub misses: u64,
        pub evictions: u64,
    }
    cache_service!();
}

/// Two fields of `Stats` swapped places (same types, same size).
#[allow(dead_code)] // only its client is used
mod swapped {
    use rpal::prelude::*;
    #[derive(ShmSafe, Clone, Copy, Debug)]
    #[repr(C)]
    pub struct Stats {
        pub entries: u64,
        pub misses: u64,
        pub hits: u64,
    }
    cache_service!();
}

/// A field of `Stats` changed type, keeping its size.
#[allow(dead_code)] // only its client is used
mod retyped {
    use rpal::prelude::*;
    #[derive(ShmSafe, Clone, Copy, Debug)]
    #[repr(C)]
    pub struct Stats {
        pub entries: f64,
        pub hits: u64,
        pub misses: u64,
    }
    cache_service!();
}

struct CacheImpl;

impl v1::Cache for CacheImpl {
    fn get(&self, k: u64) -> u64 {
        k + 1
    }
    fn stats(&self) -> v1::Stats {
        v1::Stats {
            entries: 0,
            hits: 0,
            misses: 2,
        }
    }
    fn entries(&self, s: &v1::Stats) -> u64 {
        s.entries
    }
}

fn serve_child() {
    let base = PathBuf::from(common::arg("RPAL_TEST_SOCK"));
    let host = v1::ServeCache::new(CacheImpl)
        .host()
        .shm(&base)
        .tcp("127.0.0.1:0")
        .start()
        .expect("start the host");
    common::publish_port(&base, host.tcp_addr().expect("tcp").port());
    host.join();
}

/// Checks that `e` is a method-table mismatch naming `stats` and `entries`,
/// and not `get`.
fn assert_names_the_changed_methods(case: &str, e: &rpal::Error) {
    println!("compat-row: {case}: {e}");
    let rpal::Error::MethodTableMismatch {
        service,
        ours,
        theirs,
        methods,
    } = e
    else {
        panic!("{case}: expected MethodTableMismatch, got {e}");
    };
    assert_eq!(service, "Cache", "{case}");
    assert_ne!(ours, theirs, "{case}");
    let mut named: Vec<&str> = methods.iter().map(|m| m.name.as_str()).collect();
    named.sort_unstable();
    assert_eq!(named, ["entries", "stats"], "{case}: {e}");
    for m in methods {
        assert!(
            m.ours.is_some() && m.theirs.is_some() && m.ours != m.theirs,
            "{case}: {m}"
        );
    }
}

#[test]
fn a_changed_struct_is_refused_at_connect() {
    if common::role().is_some() {
        return serve_child();
    }
    let base = common::sock_path("compat");
    let _server = common::spawn(
        "a_changed_struct_is_refused_at_connect",
        "server",
        &[("RPAL_TEST_SOCK", base.display().to_string())],
    );
    let port = common::read_port(&base);
    let tcp = ("127.0.0.1", port);

    // The same build is served, on both transports.
    let same = common::retry(|| v1::CacheClient::connect(&base));
    assert_eq!(same.get(1).unwrap(), 2);
    let want = v1::Stats {
        entries: 0,
        hits: 0,
        misses: 2,
    };
    assert_eq!(same.stats().unwrap(), want);
    assert_eq!(v1::CacheClient::connect_tcp(tcp).unwrap().stats().unwrap(), want);

    // Each changed build is refused before any call, over either transport.
    type Connect<'a> = Box<dyn Fn() -> rpal::Result<()> + 'a>;
    let cases: [(&str, Connect<'_>); 6] = [
        (
            "added field, shm",
            Box::new(|| added::CacheClient::connect(&base).map(drop)),
        ),
        (
            "added field, tcp",
            Box::new(|| added::CacheClient::connect_tcp(tcp).map(drop)),
        ),
        (
            "swapped pair, shm",
            Box::new(|| swapped::CacheClient::connect(&base).map(drop)),
        ),
        (
            "swapped pair, tcp",
            Box::new(|| swapped::CacheClient::connect_tcp(tcp).map(drop)),
        ),
        (
            "u64 -> f64, shm",
            Box::new(|| retyped::CacheClient::connect(&base).map(drop)),
        ),
        (
            "u64 -> f64, tcp",
            Box::new(|| retyped::CacheClient::connect_tcp(tcp).map(drop)),
        ),
    ];
    for (case, connect) in &cases {
        let e = connect().expect_err(case);
        assert_names_the_changed_methods(case, &e);
    }
    // The refusals cost the server nothing: the first client still calls.
    assert_eq!(same.get(41).unwrap(), 42);
}
