//! Allocator tuning for a long-running mount process.
//!
//! Decompressed spans are 4 MiB buffers that come and go with the cache.
//! glibc serves such sizes with `mmap`, but raises its mmap threshold after
//! the first one is freed, so later spans land in the heap arenas and their
//! memory is never returned: the serving process's RSS would grow far past
//! the cache bound. Fixing the threshold keeps large buffers in `mmap`.

/// Keeps allocations of 1 MiB and more in their own mappings.
pub fn return_large_buffers_to_the_os() {
    // SAFETY: mallopt only changes allocator parameters; it is called with a
    // valid option and value and does not touch any Rust-owned memory.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
    if ok != 1 {
        tracing::debug!("mallopt(M_MMAP_THRESHOLD) failed");
    }
}
