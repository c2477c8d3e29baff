//! Memory the proxy freed, given back to the system. The binary allocates with jemalloc
//! (`smartproxy/src/main.rs`), which keeps objects of one size class together, so the
//! long-lived records of idle connections do not pin the pages their short-lived tasks
//! freed around them. jemalloc purges freed pages only as it allocates, though, and a
//! proxy whose connections all went idle allocates nothing: [`release_freed`] purges at
//! once. The park driver calls it at a sweep when connections parked since the last one
//! (`smartproxy/src/park/mod.rs`), and the proxy once its setup is done. Measured in
//! docs/performance.md#idle-connections.

use std::io;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether jemalloc is the global allocator: [`jemalloc_is_global`] was called.
static JEMALLOC_IS_GLOBAL: AtomicBool = AtomicBool::new(false);

/// Says that jemalloc is this process's global allocator (the binary's `main`), so that
/// [`release_freed`] has something to give back. Elsewhere (tests, anything embedding the
/// library) it does nothing, rather than start a jemalloc heap of its own.
pub fn jemalloc_is_global() {
    JEMALLOC_IS_GLOBAL.store(true, Ordering::Relaxed);
}

/// Gives every page no allocation uses back to the system, in all of jemalloc's arenas,
/// if jemalloc is the global allocator.
pub fn release_freed() -> io::Result<()> {
    if !JEMALLOC_IS_GLOBAL.load(Ordering::Relaxed) {
        return Ok(());
    }
    // 4096 is MALLCTL_ARENAS_ALL: every arena.
    mallctl_do(c"arena.4096.purge")
}

/// Runs a jemalloc control that takes and returns nothing.
fn mallctl_do(name: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated, and a control without value takes null pointers.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::null_mut(),
            0,
        )
    };
    match rc {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};
    use std::ffi::{c_void, CStr};
    use std::mem::size_of;

    use tikv_jemallocator::Jemalloc;

    use super::*;

    /// Pages of every arena that hold nothing but are not yet given back.
    fn dirty_pages() -> usize {
        let mut epoch = 1u64;
        // SAFETY: "epoch" takes a u64; it refreshes the statistics read below.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"epoch".as_ptr(),
                ptr::null_mut(),
                ptr::null_mut(),
                (&raw mut epoch).cast::<c_void>(),
                size_of::<u64>(),
            )
        };
        assert_eq!(rc, 0, "epoch");
        read_usize(c"stats.arenas.4096.pdirty")
    }

    fn read_usize(name: &CStr) -> usize {
        let mut value = 0usize;
        let mut len = size_of::<usize>();
        // SAFETY: the control named returns a size_t into `value`, `len` bytes long.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                (&raw mut value).cast::<c_void>(),
                &raw mut len,
                ptr::null_mut(),
                0,
            )
        };
        assert_eq!(rc, 0, "{name:?}");
        value
    }

    /// Allocates 32 MiB through jemalloc in 1 KiB blocks and frees them, as a burst of
    /// connections' tasks does, until it finds freed pages kept (another test's proxy
    /// may purge in between); returns how many.
    fn leave_dirty_pages() -> usize {
        let layout = Layout::from_size_align(1024, 8).expect("a valid layout");
        for _ in 0..5 {
            // SAFETY: each block is allocated with `layout` and freed once, with it.
            unsafe {
                let blocks: Vec<*mut u8> = (0..32 * 1024).map(|_| Jemalloc.alloc(layout)).collect();
                assert!(blocks.iter().all(|block| !block.is_null()));
                for block in blocks {
                    Jemalloc.dealloc(block, layout);
                }
            }
            let dirty = dirty_pages();
            if dirty > 0 {
                return dirty;
            }
        }
        panic!("32 MiB freed five times over left no dirty page");
    }

    #[test]
    fn freed_pages_are_given_back() {
        jemalloc_is_global();
        let before = leave_dirty_pages();
        release_freed().expect("purging every arena");
        assert_eq!(dirty_pages(), 0, "{before} dirty pages before the purge");
    }
}
