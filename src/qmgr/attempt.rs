//! One delivery attempt of one message: its pending recipients grouped by domain (RFC 5321
//! §5: the domain decides the route), each group planned and delivered by the outbound
//! side, and every recipient's outcome turned into what happens next: delivered (settled
//! in the spool), deferred (back in the queue with its retry time), or failed for good
//! (bounced to the reverse path: an RFC 3464 report, spooled like any message; for `<>`,
//! a double bounce to `relay.postmaster`, or none). A message still pending past
//! `delivery.max_queue_age_secs` fails for good too.

use std::time::{Instant, SystemTime};

use bytes::Bytes;

use super::queue::{jittered, retry_delay, Entry};
use super::Shard;
use crate::observe::log::{self, Status};
use crate::outbound::route::Plan;
use crate::outbound::{dsn, HopUsed};
use crate::smtp::client::{Outgoing, RcptOutcome as ClientOutcome};
use crate::smtp::{Mailbox, Reply, ReversePath};
use crate::spool::{NewMessage, RcptOutcome};

/// A recipient that failed for good, for the bounce.
struct Failure {
    index: u32,
    reply: Reply,
    remote_mta: Option<String>,
    /// Why, for the bounce's human-readable part.
    reason: String,
}

/// The recipients of one message grouped by domain (lower case), in envelope order.
fn by_domain(rcpts: &[Mailbox], pending: &[u32]) -> Vec<(String, Vec<u32>)> {
    let mut groups: Vec<(String, Vec<u32>)> = Vec::new();
    for &i in pending {
        let Some(rcpt) = rcpts.get(i as usize) else {
            continue;
        };
        let domain = rcpt.domain().to_ascii_lowercase();
        match groups.iter_mut().find(|(d, _)| *d == domain) {
            Some((_, list)) => list.push(i),
            None => groups.push((domain, vec![i])),
        }
    }
    groups
}

/// One delivery attempt of one message: every pending recipient is delivered, deferred or
/// failed, and the outcome recorded.
pub(crate) async fn run(shard: &Shard, mut entry: Entry) {
    let started = Instant::now();
    // This attempt keeps the routes and settings it started with, whatever a reload does.
    let outbound = shard.outbound();
    let config = shard.config();
    let data = match entry.data.take() {
        Some(d) => d,
        None => match shard.spool.read(&entry.msg.location) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(id = %entry.id(), "cannot read the message back from the spool: {e}");
                entry.last_error = Some(format!("spool read failed: {e}"));
                return reschedule(shard, entry);
            }
        },
    };
    let mut still_pending: Vec<u32> = Vec::new();
    let mut last_error: Option<String> = None;
    let mut failed: Vec<Failure> = Vec::new();
    for (domain, indexes) in by_domain(&entry.msg.rcpts, &entry.msg.pending) {
        let targets = match outbound.plan(&domain).await {
            Plan::Targets(t) => t,
            Plan::Fail(reply) => {
                for &i in &indexes {
                    report(shard, &entry, i, None, Status::Bounced, &reply, started);
                }
                let reason = format!("its domain cannot receive mail ({})", reply.one_line());
                failed.extend(indexes.iter().map(|&index| Failure {
                    index,
                    reply: reply.clone(),
                    remote_mta: None,
                    reason: reason.clone(),
                }));
                continue;
            }
            Plan::Defer(reply) => {
                for &i in &indexes {
                    report(shard, &entry, i, None, Status::Deferred, &reply, started);
                }
                still_pending.extend(&indexes);
                last_error = Some(reply.to_string());
                continue;
            }
        };
        let rcpts: Vec<Mailbox> = indexes
            .iter()
            .filter_map(|&i| entry.msg.rcpts.get(i as usize).cloned())
            .collect();
        let outgoing = Outgoing {
            from: entry.msg.from.clone(),
            rcpts,
            data: data.clone(),
            eight_bit: entry.msg.eight_bit,
        };
        let (hop, outcomes) = outbound.deliver(&domain, &targets, outgoing).await;
        shard
            .metrics
            .throttle_events
            .add(outbound.take_throttle_events());
        let host = &hop.host;
        for (k, outcome) in outcomes.into_iter().enumerate() {
            let Some(&index) = indexes.get(k) else { break };
            let status = match &outcome {
                ClientOutcome::Delivered(_) => Status::Sent,
                ClientOutcome::Deferred(_) => Status::Deferred,
                ClientOutcome::Failed(_) => Status::Bounced,
            };
            report(
                shard,
                &entry,
                index,
                Some(&hop),
                status,
                outcome.reply(),
                started,
            );
            if status == Status::Sent {
                shard.metrics.delivered_to(&domain, 1);
            }
            match outcome {
                ClientOutcome::Delivered(_) => {
                    shard
                        .spool
                        .settle(&entry.msg, index, RcptOutcome::Delivered);
                }
                ClientOutcome::Deferred(reply) => {
                    still_pending.push(index);
                    last_error = Some(format!("{host}: {}", reply.one_line()));
                }
                ClientOutcome::Failed(reply) => failed.push(Failure {
                    index,
                    reply,
                    // RFC 3464 `Remote-MTA: dns; …` wants a name; an address goes in brackets.
                    remote_mta: Some(if host.parse::<std::net::IpAddr>().is_ok() {
                        format!("[{host}]")
                    } else {
                        host.clone()
                    }),
                    reason: "the next hop refused it".into(),
                }),
            }
        }
    }
    // Too old: what is still pending fails for good.
    let age = SystemTime::now()
        .duration_since(entry.msg.arrival)
        .unwrap_or_default();
    if !still_pending.is_empty() && age >= config.max_queue_age {
        let why = last_error
            .clone()
            .unwrap_or_else(|| "no delivery attempt succeeded".into());
        for index in still_pending.drain(..) {
            let reply = Reply::new(
                451,
                format!(
                    "4.4.7 gave up after {} s in the queue: {why}",
                    age.as_secs()
                ),
            );
            report(shard, &entry, index, None, Status::Expired, &reply, started);
            failed.push(Failure {
                index,
                reason: format!("it could not be delivered in time ({})", reply.one_line()),
                reply,
                remote_mta: None,
            });
        }
    }
    if !failed.is_empty() {
        if bounce(shard, &entry, &data, &failed).await {
            for f in &failed {
                shard
                    .spool
                    .settle(&entry.msg, f.index, RcptOutcome::Bounced);
            }
        } else {
            // The bounce could not be spooled: keep the recipients, try again later.
            still_pending.extend(failed.iter().map(|f| f.index));
        }
    }
    entry.msg.pending = still_pending;
    entry.last_error = last_error;
    if entry.msg.pending.is_empty() {
        shard.spool.finish(&entry.msg);
    } else {
        entry.data = Some(data);
        reschedule(shard, entry);
    }
}

/// One recipient's outcome on this attempt: the delivery log's line and the counters.
fn report(
    shard: &Shard,
    entry: &Entry,
    index: u32,
    hop: Option<&HopUsed>,
    status: Status,
    reply: &Reply,
    started: Instant,
) {
    let m = &shard.metrics;
    match status {
        Status::Sent => m.recipients_delivered.inc(),
        Status::Deferred => m.recipients_deferred.inc(),
        Status::Bounced | Status::Expired => m.recipients_bounced.inc(),
    }
    if hop.is_some() {
        m.delivery_duration.observe(started.elapsed().as_secs_f64());
    }
    if !log::enabled() {
        return;
    }
    let rcpt = entry
        .msg
        .rcpts
        .get(index as usize)
        .map_or_else(String::new, ToString::to_string);
    let dsn = match (reply.enhanced_status(), status) {
        (Some(s), _) => s.to_string(),
        (None, Status::Sent) => "2.0.0".into(),
        (None, Status::Deferred) => "4.0.0".into(),
        (None, _) => "5.0.0".into(),
    };
    let line = reply.one_line();
    log::outcome(&log::Outcome {
        id: entry.id(),
        rcpt: &rcpt,
        relay: log::RelayHost {
            host: hop.map_or("none", |h| h.host.as_str()),
            addr: hop.and_then(|h| h.addr),
        },
        delay: SystemTime::now()
            .duration_since(entry.msg.arrival)
            .unwrap_or_default(),
        attempts: entry.attempts + 1,
        dsn: &dsn,
        status,
        reply: &line,
    });
}

/// Back into the queue, due after the next step of the retry schedule.
fn reschedule(shard: &Shard, mut entry: Entry) {
    entry.count_attempt();
    let delay = jittered(
        retry_delay(&shard.config().retry_schedule, entry.attempts),
        entry.id().as_u128() ^ u128::from(entry.attempts),
    );
    tracing::debug!(
        id = %entry.id(),
        "deferred for {} s: {}",
        delay.as_secs(),
        entry.last_error.as_deref().unwrap_or("")
    );
    shard.defer(entry, delay);
}

/// Spools a bounce for the failed recipients, to the reverse path. A message from `<>` (a
/// bounce itself, or any other report) gets a double bounce to `relay.postmaster` instead,
/// or none when that is empty; never about mail to the postmaster, which would go where
/// delivery just failed. True when there is nothing more to do for them.
async fn bounce(shard: &Shard, entry: &Entry, data: &Bytes, failed: &[Failure]) -> bool {
    let config = shard.config();
    let (sender, failed): (&Mailbox, Vec<&Failure>) = match (&entry.msg.from, &config.postmaster) {
        (ReversePath::Mailbox(sender), _) => (sender, failed.iter().collect()),
        (ReversePath::Null, None) => {
            tracing::info!(id = %entry.id(), "not bouncing a message from <>: {} recipient(s) failed (no relay.postmaster for double bounces)", failed.len());
            return true;
        }
        (ReversePath::Null, Some(postmaster)) => {
            let is_postmaster = |f: &&Failure| {
                (entry.msg.rcpts.get(f.index as usize))
                    .is_some_and(|r| r.as_str().eq_ignore_ascii_case(postmaster.as_str()))
            };
            let (own, others): (Vec<&Failure>, Vec<&Failure>) =
                failed.iter().partition(is_postmaster);
            if !own.is_empty() {
                tracing::warn!(id = %entry.id(), "dropping a double bounce: mail from <> to the postmaster <{postmaster}> failed");
            }
            if others.is_empty() {
                return true;
            }
            (postmaster, others)
        }
    };
    let id = shard.bounce_ids.borrow_mut().next_id();
    let failed_rcpts: Vec<dsn::FailedRecipient> = failed
        .iter()
        .filter_map(|f| {
            let recipient = entry.msg.rcpts.get(f.index as usize)?.clone();
            Some(dsn::FailedRecipient {
                recipient,
                status: bounce_status(&f.reply),
                reason: f.reason.clone(),
                // Diagnostic-Code is for a remote server's answer, not for our give-up.
                remote_reply: f.remote_mta.is_some().then(|| f.reply.clone()),
                remote_mta: f.remote_mta.clone(),
            })
        })
        .collect();
    let unique = id.to_string();
    let message = dsn::build_bounce(&dsn::BounceInput {
        reporting_mta: &shard.config().hostname,
        original_id: entry.id(),
        to: sender,
        arrival: entry.msg.arrival,
        now: SystemTime::now(),
        failed: &failed_rcpts,
        original: data,
        unique: &unique,
    });
    let accepted = shard
        .spool
        .accept(NewMessage {
            id,
            arrival: SystemTime::now(),
            from: ReversePath::Null,
            rcpts: vec![sender.clone()],
            eight_bit: false,
            data: &message,
        })
        .await;
    match accepted {
        Ok(msg) => {
            tracing::info!(id = %entry.id(), bounce = %id, "bounced {} recipient(s) to <{sender}>", failed.len());
            shard.enqueue(Entry::new(msg, Some(message)));
            true
        }
        Err(e) => {
            tracing::warn!(id = %entry.id(), "cannot spool a bounce: {e}");
            false
        }
    }
}

/// The status a bounce reports for a failed recipient: the remote reply's enhanced code
/// when it gave a permanent one; `4.4.7` for a give-up after temporary failures; else
/// `5.0.0`.
fn bounce_status(reply: &Reply) -> String {
    if reply.code() < 500 {
        // A give-up after a 4xx history is still a permanent failure for the DSN.
        return "4.4.7".into();
    }
    reply.enhanced_status().unwrap_or("5.0.0").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(s: &str) -> Mailbox {
        Mailbox::parse(s).expect("mailbox")
    }

    #[test]
    fn recipients_are_grouped_by_domain_in_envelope_order() {
        let rcpts = [
            mailbox("a@One.test"),
            mailbox("b@two.test"),
            mailbox("c@one.test"),
            mailbox("d@three.test"),
        ];
        let groups = by_domain(&rcpts, &[0, 1, 2, 3, 9]);
        assert_eq!(
            groups,
            vec![
                ("one.test".to_string(), vec![0, 2]),
                ("two.test".to_string(), vec![1]),
                ("three.test".to_string(), vec![3]),
            ]
        );
        // Only pending recipients are grouped.
        assert_eq!(
            by_domain(&rcpts, &[1]),
            vec![("two.test".to_string(), vec![1])]
        );
    }

    #[test]
    fn bounce_status_comes_from_a_permanent_reply() {
        assert_eq!(
            bounce_status(&Reply::new(550, "5.1.1 no such user")),
            "5.1.1"
        );
        assert_eq!(bounce_status(&Reply::new(554, "no code here")), "5.0.0");
        assert_eq!(bounce_status(&Reply::new(550, "5.x.1 bad")), "5.0.0");
        assert_eq!(bounce_status(&Reply::new(451, "4.4.1 timeout")), "4.4.7");
    }
}
