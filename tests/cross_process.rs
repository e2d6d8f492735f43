//! Calls between real processes: pointers that cross, errors, and death.

mod common;

use std::time::Duration;

use rpal::prelude::*;
use rpal::raw::*;
use rpal::*;

/// A node of both a linked list (`next`) and a binary search tree
/// (`left`/`right`), with its name in a separate string: real pointers
/// between blocks of the client's arena. Links are plain addresses (0: none);
/// the name is a `ShmString`.
#[repr(C)]
#[derive(ShmSafe)]
struct Node {
    value: u64,
    name: ShmString,
    next: u64,
    left: u64,
    right: u64,
}

const NODES: u64 = 1000;
const WALK_LIST: u32 = 1;
const WALK_TREE: u32 = 2;

fn name_of(v: u64) -> String {
    format!("node-{v}-{}", "x".repeat((v % 7) as usize))
}

/// Server side: walks the client's structure by pointer, validating every
/// pointer against the client's region, and reports what it saw.
fn walker(req: &Request<'_>, reply: &mut [u8]) -> Result<usize, RemoteStatus> {
    let root = u64::from_le_bytes(
        req.payload
            .get(..8)
            .ok_or(RemoteStatus::BadRequest)?
            .try_into()
            .unwrap(),
    );
    let (mut count, mut sum, mut names_ok, mut in_place, mut sorted) = (0u64, 0u64, 0u64, 0u64, 1u64);
    let mut visit = |node: &Node, addr: u64| -> Result<(), RemoteStatus> {
        let name = node.name.get(req.mem()).map_err(|_| RemoteStatus::BadRequest)?;
        names_ok += (name == name_of(node.value)) as u64;
        // The view is the client's memory itself, not a copy.
        in_place += (std::ptr::eq(node, addr as *const Node)
            && req.peer.check(addr, size_of::<Node>() as u64, 8).is_ok()) as u64;
        count += 1;
        sum += node.value;
        Ok(())
    };
    match req.method {
        WALK_LIST => {
            let (mut p, mut steps) = (root, 0);
            while p != 0 {
                steps += 1;
                if steps > 10 * NODES {
                    return Err(RemoteStatus::BadRequest); // a cycle: the walk is bounded
                }
                let node: &Node = req.mem().view(p).map_err(|_| RemoteStatus::BadRequest)?;
                visit(node, p)?;
                p = node.next;
            }
        }
        WALK_TREE => {
            // In-order walk with an explicit, bounded stack.
            let (mut stack, mut p, mut last, mut steps) = (Vec::new(), root, None::<u64>, 0);
            while p != 0 || !stack.is_empty() {
                steps += 1;
                if stack.len() as u64 > 10 * NODES || steps > 10 * NODES {
                    return Err(RemoteStatus::BadRequest);
                }
                while p != 0 {
                    stack.push(p);
                    p = req.mem().view::<Node>(p).map_err(|_| RemoteStatus::BadRequest)?.left;
                }
                let addr = stack.pop().unwrap();
                let node: &Node = req.mem().view(addr).map_err(|_| RemoteStatus::BadRequest)?;
                if last.is_some_and(|l| l > node.value) {
                    sorted = 0;
                }
                last = Some(node.value);
                visit(node, addr)?;
                p = node.right;
            }
        }
        _ => return Err(RemoteStatus::UnknownMethod),
    }
    for (i, v) in [count, sum, names_ok, in_place, sorted].into_iter().enumerate() {
        reply[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    Ok(40)
}

fn build_structure() -> (Vec<ShmBox<Node>>, u64, u64) {
    let mut nodes: Vec<ShmBox<Node>> = Vec::new();
    let mut head = 0u64;
    // Insert in a scrambled order so the tree has real shape.
    for i in 0..NODES {
        let v = (i * 7919) % NODES;
        let name = ShmString::copy_from(&name_of(v)).unwrap();
        let node = ShmBox::new(Node {
            value: v,
            name,
            next: head,
            left: 0,
            right: 0,
        })
        .unwrap();
        head = node.addr();
        nodes.push(node);
    }
    let index: std::collections::HashMap<u64, usize> = nodes.iter().enumerate().map(|(i, n)| (n.addr(), i)).collect();
    let root = nodes[0].addr();
    for i in 1..nodes.len() {
        let (addr, v) = (nodes[i].addr(), nodes[i].value);
        let mut cur = root;
        loop {
            let n = &mut nodes[index[&cur]];
            let link = if v < n.value { &mut n.left } else { &mut n.right };
            if *link == 0 {
                *link = addr;
                break;
            }
            cur = *link;
        }
    }
    (nodes, head, root)
}

fn words(reply: &[u8]) -> Vec<u64> {
    reply
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn pointers_cross_processes() {
    if common::role().is_some() {
        // Child: build a list and a tree with strings in our arena, pass the roots.
        let (_nodes, head, tree) = build_structure();
        let mut c = Client::connect(common::arg("RPAL_TEST_SOCK"), ClientOptions::new("walker")).unwrap();
        let expect_sum = (0..NODES).sum::<u64>();
        for (method, root) in [(WALK_LIST, head), (WALK_TREE, tree)] {
            let r = words(&c.call(method, &root.to_le_bytes()).unwrap());
            assert_eq!(r, vec![NODES, expect_sum, NODES, NODES, 1], "method {method}");
        }
        // A pointer outside our region is refused by the server's validation.
        let err = c.call(WALK_LIST, &0x10u64.to_le_bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Remote {
                    status: RemoteStatus::BadRequest,
                    ..
                }
            ),
            "{err}"
        );
        return;
    }
    let path = common::sock_path("walker");
    let server = Server::bind(&path, ServerOptions::new("walker")).unwrap();
    let mut child = common::spawn(
        "pointers_cross_processes",
        "client",
        &[("RPAL_TEST_SOCK", path.display().to_string())],
    );
    let conn = server.accept().unwrap();
    assert_eq!(conn.peer().cred.pid, child.pid());
    conn.run(walker).unwrap();
    child.expect_success();
    assert_eq!(server.stats().calls.load(std::sync::atomic::Ordering::Relaxed), 3);
}

#[test]
fn remote_errors_and_timeouts_fail_one_call() {
    if common::role().is_some() {
        let mut c = Client::connect(common::arg("RPAL_TEST_SOCK"), ClientOptions::new("echo")).unwrap();
        assert_eq!(c.call(1, b"hello").unwrap(), b"hello");
        let e = c.call(77, b"").unwrap_err();
        assert!(
            matches!(
                e,
                Error::Remote {
                    method: 77,
                    status: RemoteStatus::UnknownMethod,
                    ..
                }
            ),
            "{e}"
        );
        let e = c.call(3, b"").unwrap_err();
        assert!(
            matches!(
                e,
                Error::Remote {
                    status: RemoteStatus::HandlerPanicked,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(c.call(1, b"after panic").unwrap(), b"after panic");
        let e = c
            .call_with(4, Some(Duration::from_millis(30)), |_| 0, |_, _| ())
            .unwrap_err();
        assert!(matches!(e, Error::Timeout(_)), "{e}");
        // The late reply of the timed-out call is discarded, not taken for this one.
        assert_eq!(c.call(1, b"after timeout").unwrap(), b"after timeout");
        // A request far larger than a queue block travels in a block of its own.
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let sum = u64::from_le_bytes(c.call(5, &big).unwrap()[..8].try_into().unwrap());
        assert_eq!(sum, big.iter().map(|&b| b as u64).sum::<u64>());
        // A reply larger than the reply buffer is the handler's bug, reported as such.
        let e = c.call(6, b"").unwrap_err();
        assert!(
            matches!(
                e,
                Error::Remote {
                    status: RemoteStatus::BadReply,
                    ..
                }
            ),
            "{e}"
        );
        return;
    }
    let path = common::sock_path("echo");
    let server = Server::bind(&path, ServerOptions::new("echo")).unwrap();
    let mut child = common::spawn(
        "remote_errors_and_timeouts_fail_one_call",
        "client",
        &[("RPAL_TEST_SOCK", path.display().to_string())],
    );
    let conn = server.accept().unwrap();
    conn.run(|req: &Request<'_>, reply: &mut [u8]| match req.method {
        1 => {
            reply[..req.payload.len()].copy_from_slice(req.payload);
            Ok(req.payload.len())
        }
        3 => panic!("handler bug (expected by the test)"),
        4 => {
            std::thread::sleep(Duration::from_millis(300));
            Ok(0)
        }
        5 => {
            let sum = req.payload.iter().map(|&b| b as u64).sum::<u64>();
            reply[..8].copy_from_slice(&sum.to_le_bytes());
            Ok(8)
        }
        6 => Ok(reply.len() + 1),
        _ => Err(RemoteStatus::UnknownMethod),
    })
    .unwrap();
    child.expect_success();
}

#[test]
fn server_death_fails_the_call_in_flight() {
    if common::role().is_some() {
        let server = Server::bind(common::arg("RPAL_TEST_SOCK"), ServerOptions::new("dying")).unwrap();
        let conn = server.accept().unwrap();
        let _ = conn.run(|req: &Request<'_>, _: &mut [u8]| {
            if req.method == 2 {
                // Die without a word while the client waits.
                // SAFETY: _exit ends the process at once; nothing runs after it.
                unsafe { libc::_exit(3) };
            }
            Ok(0)
        });
        return;
    }
    let path = common::sock_path("dying");
    let mut child = common::spawn(
        "server_death_fails_the_call_in_flight",
        "server",
        &[("RPAL_TEST_SOCK", path.display().to_string())],
    );
    let mut c = connect_retry(&path, ClientOptions::new("dying"));
    c.call(1, b"").unwrap();
    let space = rpal::raw::Space::global().unwrap();
    let region = c.peer().region.addr();
    let e = c.call(2, b"").unwrap_err();
    assert!(matches!(e, Error::PeerDied { pid } if pid == child.pid()), "{e}");
    assert_eq!(child.wait_timeout(Duration::from_secs(10)).code(), Some(3));
    drop(c);
    assert_eq!(space.occupant(region), None, "the dead peer's region is unmapped");
}

#[test]
fn client_death_ends_its_connection_only() {
    const TEST: &str = "client_death_ends_its_connection_only";
    match common::role().as_deref() {
        Some("dying") => {
            let mut c = Client::connect(common::arg("RPAL_TEST_SOCK"), ClientOptions::new("svc")).unwrap();
            c.call(1, b"x").unwrap();
            // SAFETY: _exit ends the process at once, without the client's goodbye.
            unsafe { libc::_exit(0) };
        }
        Some("survivor") => {
            // Calls before and after the other client's death, on the same server.
            let mut c = Client::connect(common::arg("RPAL_TEST_SOCK"), ClientOptions::new("svc")).unwrap();
            let call = |c: &mut Client, i: u64| assert_eq!(c.call(1, &i.to_le_bytes()).unwrap(), i.to_le_bytes());
            (0..100).for_each(|i| call(&mut c, i));
            let mark = std::path::PathBuf::from(common::arg("RPAL_TEST_MARK"));
            let t0 = std::time::Instant::now();
            while !mark.exists() {
                assert!(t0.elapsed() < Duration::from_secs(60), "the other client never died");
                std::thread::sleep(Duration::from_millis(5));
            }
            (100..200).for_each(|i| call(&mut c, i));
            return; // the goodbye ends its connection cleanly
        }
        _ => {}
    }
    let echo = |req: &Request<'_>, reply: &mut [u8]| {
        reply[..req.payload.len()].copy_from_slice(req.payload);
        Ok(req.payload.len())
    };
    let path = common::sock_path("svc");
    let mark = path.with_extension("died");
    let server = Server::bind(&path, ServerOptions::new("svc")).unwrap();
    let env = [
        ("RPAL_TEST_SOCK", path.display().to_string()),
        ("RPAL_TEST_MARK", mark.display().to_string()),
    ];
    let mut survivor = common::spawn(TEST, "survivor", &env);
    let survivor_conn = server.accept().unwrap();
    assert_eq!(survivor_conn.peer().cred.pid, survivor.pid());
    let serving = std::thread::spawn(move || survivor_conn.run(echo));

    let mut dying = common::spawn(TEST, "dying", &env);
    let conn = server.accept().unwrap();
    let pid = conn.peer().cred.pid;
    assert_eq!(pid, dying.pid());
    let e = conn.run(echo).unwrap_err();
    assert!(
        matches!(e, Error::PeerDied { pid: p } | Error::Closed { pid: p } if p == pid),
        "{e}"
    );
    assert!(
        dying.wait_timeout(Duration::from_secs(10)).success(),
        "the dying client made its call"
    );
    std::fs::write(&mark, b"died").unwrap();
    // The survivor's connection served all its calls and ended with its goodbye.
    serving.join().unwrap().expect("the survivor's connection ends cleanly");
    survivor.expect_success();
    let _ = std::fs::remove_file(&mark);

    // The server goes on accepting.
    let mut next = common::spawn(TEST, "dying", &env);
    let conn = server.accept().unwrap();
    assert_eq!(conn.peer().cred.pid, next.pid());
    let e = conn.run(echo).unwrap_err();
    assert!(matches!(e, Error::PeerDied { .. } | Error::Closed { .. }), "{e}");
    assert!(next.wait_timeout(Duration::from_secs(10)).success());
}

fn connect_retry(path: &std::path::Path, opts: ClientOptions) -> Client {
    let t0 = std::time::Instant::now();
    loop {
        match Client::connect(path, opts.clone()) {
            Ok(c) => return c,
            Err(e) if t0.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("cannot connect: {e}"),
        }
    }
}
