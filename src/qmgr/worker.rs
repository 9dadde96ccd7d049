//! One shard's delivery worker: starts an attempt for each message as it falls due (at
//! most `MAX_IN_FLIGHT` at once), and once a second tidies the outbound pool and the
//! spool's idle segment.

use std::rc::Rc;
use std::time::{Duration, Instant};

use super::queue::Entry;
use super::{attempt, Shard};

/// Deliveries a shard runs at once.
const MAX_IN_FLIGHT: usize = 256;
/// Bytes of message content a shard's deliveries may hold at once (each attempt holds
/// its message, read back from the spool if need be): a next hop that accepts and never
/// answers (a tarpit) then pins at most this much, whatever the queue holds. A message
/// larger than this still goes, alone.
const MAX_IN_FLIGHT_BYTES: u64 = 16 << 20;

/// Starts deliveries as messages become due, and tidies; runs for the shard's life.
pub(crate) async fn run(shard: Rc<Shard>) {
    let far = Duration::from_secs(3600);
    // Once a second: close idle outbound connections, let go of an empty segment.
    let mut tidy = tokio::time::interval(Duration::from_secs(1));
    loop {
        let next_due = shard.queue.borrow_mut().promote_due(Instant::now());
        while shard.in_flight.get() < MAX_IN_FLIGHT && !shard.stopping.get() {
            let Some(size) = shard.queue.borrow_mut().next_ready_size() else {
                break;
            };
            if shard.in_flight.get() > 0 && shard.in_flight_bytes.get() + size > MAX_IN_FLIGHT_BYTES
            {
                // Waits for a delivery to end (it wakes the worker).
                break;
            }
            let Some(entry) = shard.queue.borrow_mut().pop_ready() else {
                break;
            };
            shard.in_flight.set(shard.in_flight.get() + 1);
            shard
                .in_flight_bytes
                .set(shard.in_flight_bytes.get() + size);
            tokio::task::spawn_local(deliver(Rc::clone(&shard), entry, size));
        }
        let sleep_until = next_due.unwrap_or_else(|| Instant::now() + far);
        tokio::select! {
            _ = shard.wake.notified() => {}
            _ = tokio::time::sleep_until(sleep_until.into()) => {}
            _ = tidy.tick() => {
                shard.outbound().tidy();
                shard.count_dns();
                shard.check_room();
                shard.spool.tidy();
                let queue = shard.queue.borrow();
                shard.metrics.queue_messages.set((queue.len() + shard.in_flight.get()) as u64);
                shard.metrics.oldest_queued_unix.set(queue.oldest_arrival_unix().unwrap_or(0));
            }
        }
    }
}

async fn deliver(shard: Rc<Shard>, entry: Entry, size: u64) {
    let id = entry.id();
    attempt::run(&shard, entry).await;
    shard.queue.borrow_mut().attempt_ended(id);
    shard.in_flight.set(shard.in_flight.get().saturating_sub(1));
    shard
        .in_flight_bytes
        .set(shard.in_flight_bytes.get().saturating_sub(size));
    shard.wake.notify_one();
    shard.delivered.notify_one();
}
