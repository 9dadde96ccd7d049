//! `loadgen`: SMTP load generator (`send`) and verifying sink (`sink`). A stub until its issue.

fn main() {
    eprintln!("loadgen: not built yet (see the loadgen issue)");
    std::process::exit(2);
}
