//! Cleaning up on Ctrl-C: on SIGINT / SIGTERM, run every registered teardown,
//! then exit with 130. The signal handler only writes to a pipe; a thread does
//! the work, outside signal context.

use std::{
    sync::{
        Mutex, Once,
        atomic::{AtomicI32, Ordering},
    },
    thread,
};

/// Who registered (for the message), and what to run.
type Teardown = (&'static str, fn());

static TEARDOWNS: Mutex<Vec<Teardown>> = Mutex::new(Vec::new());
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);
static INSTALLED: Once = Once::new();

extern "C" fn on_signal(_: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::SeqCst);
    if fd >= 0 {
        let b = 1u8;
        // SAFETY: write is async-signal-safe; b lives for the call.
        unsafe { libc::write(fd, (&raw const b).cast(), 1) };
    }
}

/// Runs `teardown` (announced as "`who`: interrupted, ...") when the process
/// gets SIGINT or SIGTERM, before it exits with 130. Registering the same
/// `who` twice keeps one. (This replaces earlier handlers of these signals.)
pub fn on_interrupt(who: &'static str, teardown: fn()) {
    {
        let mut t = TEARDOWNS.lock().unwrap_or_else(|p| p.into_inner());
        if !t.iter().any(|(w, _)| *w == who) {
            t.push((who, teardown));
        }
    }
    INSTALLED.call_once(install);
}

fn install() {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("lb-testbed: no signal pipe; Ctrl-C will not clean up");
        return;
    }
    SIGNAL_PIPE.store(fds[1], Ordering::SeqCst);
    let read_fd = fds[0];
    let spawned = thread::Builder::new()
        .name("interrupt".into())
        .spawn(move || {
            let mut b = 0u8;
            loop {
                // SAFETY: reads one byte into b from our own pipe.
                let n = unsafe { libc::read(read_fd, (&raw mut b).cast(), 1) };
                if n == 1 {
                    break;
                }
                if n == 0 {
                    return;
                }
            }
            let teardowns = TEARDOWNS.lock().unwrap_or_else(|p| p.into_inner()).clone();
            for (who, teardown) in teardowns {
                eprintln!("{who}: interrupted, cleaning up");
                teardown();
            }
            std::process::exit(130);
        });
    if spawned.is_err() {
        return;
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a valid handler and an empty mask.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}
