//! A received value with shm values nested in it: the nested fields are
//! read through `Viewed::nested`, validated against the server's memory,
//! never dereferenced in place; over a stream (where only the top level is
//! copied) the same call is a typed error, not a panic.

mod common;

use common::{Transport, retry};

use std::path::PathBuf;

use rpal::prelude::*;

/// A cache entry whose value and tags live in the server's arena.
#[derive(ShmSafe)]
#[repr(C)]
pub struct Entry {
    /// Its key.
    pub key: u64,
    /// Its value, in the server's arena.
    pub value: ShmString,
    /// Its tags, in the server's arena.
    pub tags: ShmSlice<u64>,
}

#[rpal::service]
pub trait Store {
    /// The entry for `key`, built in the server's memory and lent.
    fn entry(&self, key: u64) -> rpal::Result<ShmBox<Entry>>;
}

struct StoreImpl;

impl Store for StoreImpl {
    fn entry(&self, key: u64) -> rpal::Result<ShmBox<Entry>> {
        ShmBox::new(Entry {
            key,
            value: ShmString::copy_from(&format!("value of {key}"))?,
            tags: ShmSlice::from_slice(&[key, key * 2, key * 3])?,
        })
    }
}

fn serve_child() {
    let base = PathBuf::from(common::arg("RPAL_TEST_SOCK"));
    let host = ServeStore::new(StoreImpl)
        .host()
        .shm(&base)
        .tcp("127.0.0.1:0")
        .start()
        .expect("start the host");
    common::publish_port(&base, host.tcp_addr().expect("tcp").port());
    host.join();
}

#[test]
fn nested_values_are_read_through_the_view() {
    if common::role().is_some() {
        return serve_child();
    }
    let base = common::sock_path("nested");
    let _server = common::spawn(
        "nested_values_are_read_through_the_view",
        "server",
        &[("RPAL_TEST_SOCK", base.display().to_string())],
    );
    let port = common::read_port(&base);
    for t in [Transport::Shm, Transport::Tcp] {
        let c = match t {
            Transport::Shm => retry(|| StoreClient::connect(&base)),
            _ => retry(|| StoreClient::connect_tcp(("127.0.0.1", port))),
        };
        let e = c.entry(7).unwrap();
        let view = e.read();
        assert_eq!(view.key, 7, "{t:?}");
        match t {
            Transport::Shm => {
                assert_eq!(view.nested(&view.value).unwrap(), "value of 7");
                assert_eq!(view.nested(&view.tags).unwrap(), &[7, 14, 21]);
            }
            _ => {
                // Over TCP the nested values did not come along: an error.
                let err = view.nested(&view.value).unwrap_err();
                println!("nested-row: {t:?}: {err}");
                assert!(matches!(err, rpal::Error::InvalidPointer { .. }), "{t:?}: {err}");
            }
        }
    }
}
