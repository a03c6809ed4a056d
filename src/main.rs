//! `tollgate`: argv → cli → exit code. Nothing else, but the allocator and how the process
//! ends.

/// jemalloc rather than glibc's malloc: minted leaves live for hours among connection buffers
/// that live for milliseconds, and glibc's heap fragments around them — 8.0 KiB of RSS per
/// cached leaf, of which 3.3 KiB is live, against 3.2 KiB with jemalloc (README, Performance).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let code = tollgate::cli::main();
    // stdout is line-buffered: a last line without its newline would be lost.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    // `exit` would run the C libraries' teardown (atexit handlers, C++ static destructors)
    // while the HSM worker threads still run, some perhaps inside a PKCS#11 call: SoftHSM2
    // and OpenSSL then free what a worker is using (measured: 3 in 3,000 `cert list` runs
    // ended in a double free or a segfault). A call hung on a dropped network HSM could also
    // hold the exit. Everything tollgate writes is on disk by now (written, fsynced,
    // renamed), and the kernel closes files, sockets and the HSM's connection.
    // SAFETY: `_exit` only ends the process; nothing runs after it in this process.
    unsafe { libc::_exit(code) }
}
