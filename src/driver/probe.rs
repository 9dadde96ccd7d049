//! Can this process use io_uring? `--io auto` asks here once at start-up.
//!
//! io_uring can be missing (old kernel), switched off (`kernel.io_uring_disabled`),
//! filtered (seccomp in containers) or lack an operation the driver needs. Each case gets
//! a reason an operator can act on.

use io_uring::{opcode, IoUring, Probe};

/// `Ok` when io_uring works with every operation the driver uses, else why not.
pub(crate) fn io_uring_usable() -> Result<(), String> {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .map(|s| s.trim().to_string());
    let ring = IoUring::new(8).map_err(|e| match disabled.as_deref() {
        Some(v) if v != "0" => {
            format!("io_uring_setup failed: {e} (kernel.io_uring_disabled = {v})")
        }
        _ => format!("io_uring_setup failed: {e} (old kernel or seccomp filter?)"),
    })?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe failed: {e} (kernel older than 5.6?)"))?;
    let needed = [
        ("accept", opcode::Accept::CODE),
        ("read", opcode::Read::CODE),
        ("write", opcode::Write::CODE),
        ("close", opcode::Close::CODE),
        ("connect", opcode::Connect::CODE),
        ("fsync", opcode::Fsync::CODE),
    ];
    for (name, code) in needed {
        if !probe.is_supported(code) {
            return Err(format!(
                "io_uring lacks the {name} operation (kernel too old)"
            ));
        }
    }
    Ok(())
}
