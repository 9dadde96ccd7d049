//! One delivery attempt of one message: its pending recipients grouped by domain (RFC 5321
//! §5: the domain decides the route), each group planned and delivered by the outbound
//! side, and every recipient's outcome turned into what happens next: delivered (settled
//! in the spool), deferred (back in the queue with its retry time), or failed for good
//! (bounced to the reverse path: an RFC 3464 report, spooled like any message; for `<>`,
//! a double bounce to `relay.postmaster`, or none). A message still pending past
//! `delivery.max_queue_age_secs` fails for good too.
//!
//! The sender's DSN requests (RFC 3461) decide which reports go out: a failure report
//! only for recipients whose NOTIFY includes FAILURE (or who gave none); a "relayed"
//! success report for NOTIFY=SUCCESS recipients handed to a next hop that does not offer
//! DSN (one that does got NOTIFY itself, and reports for itself); a "delayed" report, once
//! per message, for NOTIFY=DELAY recipients still pending after `relay.delay_warning_secs`.
//! Reports go from `<>` and never about mail from `<>`, so no report makes another.
//!
//! SMTPUTF8 (RFC 6531): a message that declared it goes out with it where the next hop
//! offers it; where it does not, the message still goes if its envelope and header section
//! are all ASCII (Postfix's smtputf8_autodetect idea), else those recipients fail with
//! `5.6.7`. Domains are routed by their A-label form (IDNA), so a U-label domain finds
//! its routes and MX like its ASCII twin.

use std::time::{Instant, SystemTime};

use bytes::Bytes;

use super::queue::{jittered, retry_delay, Entry};
use super::{RelayConfig, Shard};
use crate::observe::log::{self, Status};
use crate::outbound::route::Plan;
use crate::outbound::{dsn, HopUsed};
use crate::smtp::client::{Outgoing, RcptOutcome as ClientOutcome};
use crate::smtp::ext::{self, DsnEnvelope, Notify, Ret};
use crate::smtp::{Mailbox, Reply, ReversePath};
use crate::spool::{NewMessage, RcptOutcome};

/// A recipient that failed for good (for the bounce), was relayed (for a success report)
/// or is still pending (for a delay report).
struct Failure {
    index: u32,
    reply: Reply,
    remote_mta: Option<String>,
    /// Why, for the report's human-readable part.
    reason: String,
}

/// The next hop's name as RFC 3464 `Remote-MTA: dns; …` wants it (an address in brackets).
fn remote_mta(host: &str) -> String {
    if host.parse::<std::net::IpAddr>().is_ok() {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// The recipients of one message grouped by domain (lower case, in its A-label form:
/// routes, relay domains and MX are looked up so), in envelope order.
fn by_domain(rcpts: &[Mailbox], pending: &[u32]) -> Vec<(String, Vec<u32>)> {
    let mut groups: Vec<(String, Vec<u32>)> = Vec::new();
    for &i in pending {
        let Some(rcpt) = rcpts.get(i as usize) else {
            continue;
        };
        let domain = ext::ascii_domain(rcpt.domain()).into_owned();
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
        None => match shard.spool.read(&entry.msg.location).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(id = %entry.id(), "cannot read the message back from the spool: {e}");
                entry.last_error = Some(format!("spool read failed: {e}"));
                return reschedule(shard, &config, entry);
            }
        },
    };
    let mut still_pending: Vec<u32> = Vec::new();
    let mut last_error: Option<String> = None;
    let mut failed: Vec<Failure> = Vec::new();
    // Recipients handed to a next hop without DSN that asked for success reports, and the
    // last reply of each recipient left pending (for a delay report).
    let mut relayed: Vec<Failure> = Vec::new();
    let mut delayed: Vec<Failure> = Vec::new();
    let dsn_of = |i: u32| DsnEnvelope::rcpt(entry.msg.dsn.as_ref(), i as usize);
    // Whether the message really needs SMTPUTF8 beyond its recipients: a UTF-8 sender or
    // header section (RFC 6532). Checked once; recipients per group.
    let utf8_beyond_rcpts = entry.msg.smtputf8
        && (entry.msg.from.mailbox().is_some_and(|m| !m.is_ascii())
            || !dsn::header_section(&data).is_ascii());
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
                    delayed.push(Failure {
                        index: i,
                        reply: reply.clone(),
                        remote_mta: None,
                        reason: "its next hop cannot be found yet".into(),
                    });
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
        let needs_smtputf8 =
            entry.msg.smtputf8 && (utf8_beyond_rcpts || rcpts.iter().any(|r| !r.is_ascii()));
        let dsn = entry.msg.dsn.as_ref().map(|d| {
            Box::new(DsnEnvelope {
                ret: d.ret,
                envid: d.envid.clone(),
                rcpts: indexes.iter().map(|&i| dsn_of(i)).collect(),
            })
        });
        let outgoing = Outgoing {
            from: entry.msg.from.clone(),
            rcpts,
            data: data.clone(),
            eight_bit: entry.msg.eight_bit,
            smtputf8: entry.msg.smtputf8,
            needs_smtputf8,
            dsn,
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
                ClientOutcome::Delivered(reply) => {
                    shard
                        .spool
                        .settle(&entry.msg, index, RcptOutcome::Delivered);
                    // RFC 3461 §5.2.2: past a next hop without DSN, the success report
                    // the sender asked for is ours to send.
                    if !hop.dsn && dsn_of(index).notify.has(Notify::SUCCESS) {
                        relayed.push(Failure {
                            index,
                            reply,
                            remote_mta: Some(remote_mta(host)),
                            reason: "relayed to a next hop that does not report deliveries".into(),
                        });
                    }
                }
                ClientOutcome::Deferred(reply) => {
                    still_pending.push(index);
                    last_error = Some(format!("{host}: {}", reply.one_line()));
                    delayed.push(Failure {
                        index,
                        reply,
                        remote_mta: Some(remote_mta(host)),
                        reason: "the next hop could not take it yet".into(),
                    });
                }
                ClientOutcome::Failed(reply) => failed.push(Failure {
                    index,
                    reply,
                    remote_mta: Some(remote_mta(host)),
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
    if !relayed.is_empty() {
        // Best effort: the mail itself went on; a success report that cannot be spooled
        // is logged, not retried.
        notify_sender(
            shard,
            &config,
            &entry,
            &data,
            &relayed,
            dsn::Action::Relayed,
        )
        .await;
    }
    let warn_after = config.delay_warning;
    if !still_pending.is_empty()
        && !entry.delay_warned
        && !warn_after.is_zero()
        && age >= warn_after
    {
        // At most one delay report per message (so per recipient), for those that asked.
        entry.delay_warned = true;
        delayed.retain(|d| {
            still_pending.contains(&d.index) && dsn_of(d.index).notify.has(Notify::DELAY)
        });
        if !delayed.is_empty() {
            notify_sender(
                shard,
                &config,
                &entry,
                &data,
                &delayed,
                dsn::Action::Delayed,
            )
            .await;
        }
    }
    if !failed.is_empty() {
        if bounce(shard, &config, &entry, &data, &failed).await {
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
        reschedule(shard, &config, entry);
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
fn reschedule(shard: &Shard, config: &RelayConfig, mut entry: Entry) {
    entry.count_attempt();
    let delay = jittered(
        retry_delay(&config.retry_schedule, entry.attempts),
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
async fn bounce(
    shard: &Shard,
    config: &RelayConfig,
    entry: &Entry,
    data: &Bytes,
    failed: &[Failure],
) -> bool {
    // NOTIFY=NEVER, or a NOTIFY without FAILURE: the sender wants no failure report.
    let notify_of =
        |f: &&Failure| DsnEnvelope::rcpt(entry.msg.dsn.as_ref(), f.index as usize).notify;
    let (failed, unwanted): (Vec<&Failure>, Vec<&Failure>) =
        failed.iter().partition(|f| notify_of(f).wants_failure());
    if !unwanted.is_empty() {
        tracing::info!(id = %entry.id(), "no failure report for {} recipient(s): their NOTIFY does not ask for one", unwanted.len());
    }
    if failed.is_empty() {
        return true;
    }
    let (sender, failed): (&Mailbox, Vec<&Failure>) = match (&entry.msg.from, &config.postmaster) {
        (ReversePath::Mailbox(sender), _) => (sender, failed),
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
                failed.into_iter().partition(is_postmaster);
            if !own.is_empty() {
                tracing::warn!(id = %entry.id(), "dropping a double bounce: mail from <> to the postmaster <{postmaster}> failed");
            }
            if others.is_empty() {
                return true;
            }
            (postmaster, others)
        }
    };
    spool_report(
        shard,
        config,
        entry,
        data,
        sender,
        &failed,
        dsn::Action::Failed,
    )
    .await
}

/// Spools a success ("relayed") or delay report to the reverse path; none for mail from
/// `<>`. A report that cannot be spooled is logged: the mail itself is unaffected.
async fn notify_sender(
    shard: &Shard,
    config: &RelayConfig,
    entry: &Entry,
    data: &Bytes,
    recipients: &[Failure],
    action: dsn::Action,
) {
    let ReversePath::Mailbox(sender) = &entry.msg.from else {
        return;
    };
    let recipients: Vec<&Failure> = recipients.iter().collect();
    spool_report(shard, config, entry, data, sender, &recipients, action).await;
}

/// Builds a report (RFC 3464) on `recipients` with `action`, and spools it from `<>` to
/// `to`. True once it is spooled.
async fn spool_report(
    shard: &Shard,
    config: &RelayConfig,
    entry: &Entry,
    data: &Bytes,
    to: &Mailbox,
    recipients: &[&Failure],
    action: dsn::Action,
) -> bool {
    let id = shard.bounce_ids.borrow_mut().next_id();
    let message_dsn = entry.msg.dsn.as_deref();
    let reported: Vec<dsn::FailedRecipient> = recipients
        .iter()
        .filter_map(|f| {
            let recipient = entry.msg.rcpts.get(f.index as usize)?.clone();
            let orcpt = DsnEnvelope::rcpt(entry.msg.dsn.as_ref(), f.index as usize).orcpt;
            let status = match action {
                dsn::Action::Failed => bounce_status(&f.reply),
                dsn::Action::Delayed => delay_status(&f.reply),
                dsn::Action::Relayed => "2.0.0".to_string(),
            };
            Some(dsn::FailedRecipient {
                action,
                original_recipient: orcpt.map(|o| format!("{};{}", o.addr_type, o.addr)),
                recipient,
                status,
                reason: f.reason.clone(),
                // Diagnostic-Code is for a remote server's answer, not for our give-up.
                remote_reply: f.remote_mta.is_some().then(|| f.reply.clone()),
                remote_mta: f.remote_mta.clone(),
            })
        })
        .collect();
    let unique = id.to_string();
    let message = dsn::build_bounce(&dsn::BounceInput {
        reporting_mta: &config.hostname,
        original_id: entry.id(),
        to,
        arrival: entry.msg.arrival,
        now: SystemTime::now(),
        failed: &reported,
        original: data,
        unique: &unique,
        return_full: message_dsn.is_some_and(|d| d.ret == Some(Ret::Full)),
        envid: message_dsn.and_then(|d| d.envid.as_deref()),
    });
    // Signed like any other mail, when our host name's domain has a DKIM key.
    let message = crate::dkim::sign_off_thread(&config.dkim, &unique, message).await;
    let accepted = shard
        .spool
        .accept(NewMessage {
            id,
            arrival: SystemTime::now(),
            from: ReversePath::Null,
            rcpts: vec![to.clone()],
            eight_bit: false,
            // An internationalized sender can only be reached with SMTPUTF8.
            smtputf8: !to.is_ascii(),
            dsn: None,
            data: &message,
        })
        .await;
    let what = match action {
        dsn::Action::Failed => "bounced",
        dsn::Action::Delayed => "sent a delay report for",
        dsn::Action::Relayed => "sent a success report for",
    };
    match accepted {
        Ok(msg) => {
            tracing::info!(id = %entry.id(), report = %id, "{what} {} recipient(s) to <{to}>", reported.len());
            shard.enqueue(Entry::new(msg, Some(message)));
            true
        }
        Err(e) => {
            tracing::warn!(id = %entry.id(), "cannot spool a report ({what}): {e}");
            false
        }
    }
}

/// The status a delay report gives: the reply's enhanced code when it is a 4.x.x one,
/// else `4.0.0`.
fn delay_status(reply: &Reply) -> String {
    match reply.enhanced_status() {
        Some(s) if s.starts_with("4.") => s.to_string(),
        _ => "4.0.0".into(),
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
