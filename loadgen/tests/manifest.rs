//! Loss accounting: `sink --check-manifest` against what `send --manifest` recorded. A
//! message acknowledged elsewhere (so never delivered here) must be reported lost.

mod common;
use common::*;
use std::io::Write;

#[test]
fn complete_delivery_passes_the_check() {
    let dir = Scratch::new("mf-ok");
    let (sj, mf) = (dir.path("sink.json"), dir.path("manifest"));
    let sink = Sink::start(&[
        "--check-manifest",
        mf.to_str().unwrap(),
        "--json",
        sj.to_str().unwrap(),
    ]);
    assert!(send(&[
        "--target",
        &sink.target(),
        "--messages",
        "100",
        "--manifest",
        mf.to_str().unwrap()
    ])
    .status
    .success());
    let (st, out) = sink.stop();
    assert_eq!(st.code(), Some(0), "{out}");
    let s = read_json(&sj);
    assert_eq!(num(&s, "manifest.lost"), 0);
    assert_eq!(num(&s, "manifest.entries"), 100);
    assert_eq!(num(&s, "manifest.unexpected"), 0);
}

#[test]
fn a_dropped_message_is_caught() {
    let dir = Scratch::new("mf-lost");
    let (sj, mf, other) = (
        dir.path("sink.json"),
        dir.path("manifest"),
        dir.path("other"),
    );
    let sink = Sink::start(&[
        "--check-manifest",
        mf.to_str().unwrap(),
        "--json",
        sj.to_str().unwrap(),
    ]);
    assert!(send(&[
        "--target",
        &sink.target(),
        "--messages",
        "100",
        "--manifest",
        mf.to_str().unwrap()
    ])
    .status
    .success());

    // One more message is acknowledged, but by a different receiver: from the checking
    // sink's point of view the relay said 250 and then dropped it.
    let elsewhere = Sink::start(&[]);
    assert!(send(&[
        "--target",
        &elsewhere.target(),
        "--messages",
        "1",
        "--manifest",
        other.to_str().unwrap()
    ])
    .status
    .success());
    drop(elsewhere);
    let dropped = manifest_ids(&other).pop().expect("one id");
    // Put it before the trailer so the manifest still reads as complete.
    let text = std::fs::read_to_string(&mf).unwrap();
    let (body, trailer) = text.split_at(text.find("# end").expect("trailer"));
    let mut f = std::fs::File::create(&mf).unwrap();
    write!(f, "{body}{dropped}\n{trailer}").unwrap();
    drop(f);

    let (st, out) = sink.stop();
    assert_eq!(st.code(), Some(3), "expected loss exit status; {out}");
    assert!(out.contains(&format!("lost {dropped}")), "{out}");
    let s = read_json(&sj);
    assert_eq!(num(&s, "manifest.lost"), 1);
    assert_eq!(s["manifest"]["lost_ids"][0], dropped.as_str());
    assert_eq!(num(&s, "manifest.entries"), 101);
    assert_eq!(num(&s, "manifest.unexpected"), 0);
}

#[test]
fn unlisted_arrivals_are_unexpected_not_lost() {
    let dir = Scratch::new("mf-unexpected");
    let (sj, mf) = (dir.path("sink.json"), dir.path("manifest"));
    let sink = Sink::start(&[
        "--check-manifest",
        mf.to_str().unwrap(),
        "--json",
        sj.to_str().unwrap(),
    ]);
    assert!(send(&[
        "--target",
        &sink.target(),
        "--messages",
        "10",
        "--manifest",
        mf.to_str().unwrap()
    ])
    .status
    .success());
    // As if the 250 of one message never reached the sender.
    let text = std::fs::read_to_string(&mf).unwrap();
    let victim = manifest_ids(&mf)[3].clone();
    std::fs::write(&mf, text.replace(&format!("{victim}\n"), "")).unwrap();
    let (st, _) = sink.stop();
    assert_eq!(st.code(), Some(0));
    let s = read_json(&sj);
    assert_eq!(num(&s, "manifest.lost"), 0);
    assert_eq!(num(&s, "manifest.unexpected"), 1);
    assert_eq!(s["manifest"]["unexpected_ids"][0], victim.as_str());
}
