//! A node dying under `send`: two sinks behind a TCP balancer, one SIGKILLed mid-run. The
//! transactions it had in flight are counted as errors, their connections are made again
//! through the balancer (to the survivor), and the run goes on to its normal end.

mod common;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn a_node_killed_mid_run_costs_its_in_flight_messages_and_nothing_more() {
    let dir = Scratch::new("failover");
    let (dj, sj) = (dir.path("send.json"), dir.path("survivor.json"));
    // A delay on every reply keeps each connection inside a transaction nearly all the time.
    let doomed = Sink::start(&["--delay-ms", "5"]);
    let survivor = Sink::start(&["--delay-ms", "5", "--json", sj.to_str().unwrap()]);
    let lb = Balancer::start(vec![doomed.addr, survivor.addr]);
    let (target, json) = (lb.addr.clone(), dj.clone());
    let sender = std::thread::spawn(move || {
        send(&[
            "--target",
            &target,
            "--connections",
            "4",
            "--duration",
            "3",
            "--timeout",
            "10",
            "--json",
            json.to_str().unwrap(),
        ])
    });
    let end = Instant::now() + Duration::from_secs(20);
    while lb.peers().len() < 4 {
        assert!(Instant::now() < end, "send did not open its connections");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    // Connections 0 and 2 went to the doomed node, 1 and 3 to the survivor.
    assert_eq!(lb.connections_to(0), 2);
    doomed.signal(libc::SIGKILL);

    let o = sender.join().unwrap();
    assert!(o.status.success(), "{}", o.stderr);
    let d = read_json(&dj);
    assert_eq!(d["stop_reason"], "duration");
    // Each connection the node had loses the message in flight, counted as an error of the
    // kind the connection died of; nothing else is lost. (A reconnection may still reach the
    // node while it dies: kill(2) returns before the process is gone. It then fails at the
    // greeting, or loses one more message, and is made again.)
    let errors = num(&d, "messages.errors");
    let to_doomed = lb.connections_to(0);
    assert!(
        (2..=to_doomed).contains(&errors),
        "{errors} errors, {to_doomed} connections: {d}"
    );
    assert_eq!(
        num(&d, "errors.closed") + num(&d, "errors.io") + num(&d, "errors.timeout"),
        errors
    );
    assert_eq!(num(&d, "messages.rejected"), 0);
    assert_eq!(
        num(&d, "messages.sent"),
        num(&d, "messages.accepted") + errors
    );
    // Every lost connection was made again through the balancer, and the survivor got them.
    let opened = num(&d, "connections.opened");
    assert_eq!(opened, lb.peers().len() as u64);
    assert!(opened >= 4 + errors, "{opened} opened");
    assert!(opened <= 4 + errors + num(&d, "errors.greeting"), "{d}");
    assert!(lb.connections_to(1) >= 4, "{d}");
    assert_eq!(num(&d, "connections.failed"), 0);

    let (st, _) = survivor.stop();
    assert!(st.success());
    let s = read_json(&sj);
    let (survived, accepted) = (num(&s, "messages.unique"), num(&d, "messages.accepted"));
    assert!(
        survived > accepted / 2 && survived < accepted,
        "{survived} of {accepted}"
    );
}
