//! Records per second through one queue between two processes.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::*;

/// Method of the queue bench's setup call: body = the consumer's cursor
/// address; reply = the producer's first block.
const QUEUE_SETUP: u32 = 7;

/// Child side of the queue bench: streams `count` records of `payload`
/// bytes through a bare [`rpal::raw::queue::Producer`] to the connected parent.
pub(crate) fn queue_producer(path: &str, payload: usize, count: u64) -> rpal::Result<()> {
    use rpal::raw::queue::Producer;
    let server = rpal::raw::Server::bind(path, rpal::ServerOptions::new("queue-bench"))?;
    println!("ready");
    let mut conn = server.accept()?;
    let slot: std::cell::RefCell<Option<(Producer, u64)>> = std::cell::RefCell::new(None);
    let mut setup = |req: &rpal::raw::Request<'_>, reply: &mut [u8]| {
        let cursor = u64::from_le_bytes(
            req.payload
                .get(..8)
                .ok_or(rpal::RemoteStatus::BadRequest)?
                .try_into()
                .unwrap(),
        );
        let p = Producer::new().map_err(|_| rpal::RemoteStatus::BadRequest)?;
        reply[..8].copy_from_slice(&p.head().to_le_bytes());
        *slot.borrow_mut() = Some((p, cursor));
        Ok(8)
    };
    conn.serve_one(&mut setup)?;
    let (mut p, cursor_addr) = slot.borrow_mut().take().expect("setup call");
    let pid = conn.peer().cred.pid;
    // The consumer's cursor is in its memory: read it with access granted.
    let region = conn.peer().region.clone();
    let access = region.access();
    let cursor: &AtomicU64 = region.mem(&access).view(cursor_addr)?;
    let record = vec![0x5Au8; payload];
    for i in 0..count {
        // Backpressure: keep at most 64 blocks unread.
        while p.backlog_blocks() > 64 {
            p.recycle(cursor.load(Ordering::Acquire), pid)?;
            std::hint::spin_loop();
        }
        let buf = p.reserve(payload)?;
        if payload == 8 {
            buf.copy_from_slice(&i.to_le_bytes());
        } else {
            buf.copy_from_slice(&record);
            buf[..8.min(payload)].copy_from_slice(&i.to_le_bytes()[..8.min(payload)]);
        }
        p.commit(payload);
    }
    // Keep the blocks alive until the parent hangs up.
    while conn.serve_one(&mut |_: &rpal::raw::Request<'_>, _: &mut [u8]| Ok(0))? {}
    Ok(())
}

/// Records per second through one queue between two processes: a child
/// produces `count` records of `payload` bytes, this process consumes them
/// in place (reading every byte of each, and checking its sequence number).
pub fn measure_queue(exe: &Path, payload: usize, count: u64) -> rpal::Result<f64> {
    use rpal::raw::queue::Consumer;
    let path = std::env::temp_dir().join(format!("rpal-bench-q-{}-{payload}.sock", std::process::id()));
    let (_child, _) = ChildGuard::start(
        exe,
        "queue-producer",
        &[path.display().to_string(), payload.to_string(), count.to_string()],
    )
    .map_err(|e| rpal::Error::io("start the producer child", e))?;
    let mut client = rpal::raw::Client::connect(&path, rpal::ClientOptions::new("queue-bench"))?;
    let cursor_box = rpal::ShmBox::new(AtomicU64::new(0))?;
    let head = client.call(QUEUE_SETUP, &cursor_box.addr().to_le_bytes())?;
    let cursor: &AtomicU64 = &cursor_box;
    let head = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    let region: &rpal::PeerRegion = &client.peer().region;
    let access = region.access();
    let mem = region.mem(&access);
    let mut rx = Consumer::new(mem, head, client.peer().cred.pid)?;
    let mut got = 0u64;
    let mut start = None;
    let mut check = 0u64;
    while got < count {
        match rx.next(mem)? {
            Some(rec) => {
                start.get_or_insert_with(Instant::now);
                // Read the whole record, as a consumer of the data would (so
                // records/s x payload is a real bandwidth), and check that it
                // is the next one.
                if payload >= 8 && rec[..8] != got.to_le_bytes() {
                    return Err(rpal::Error::io(
                        format!("queue record {got}"),
                        std::io::Error::other("out of order or corrupted"),
                    ));
                }
                check = rec.chunks_exact(8).fold(check, |h, w| {
                    h.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")))
                });
                got += 1;
            }
            None => {
                // Publish progress so the producer can recycle, then spin.
                cursor.store(rx.passed(), Ordering::Release);
                std::hint::spin_loop();
            }
        }
    }
    let secs = start.map_or(0.0, |t| t.elapsed().as_secs_f64());
    std::hint::black_box(check);
    drop(client);
    Ok(if secs > 0.0 { count as f64 / secs } else { 0.0 })
}
