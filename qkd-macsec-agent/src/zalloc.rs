//! A global allocator that wipes every heap block when it is freed.
//!
//! Our own key buffers are zeroizing types ([`crate::secret::SecretBytes`], `Zeroizing<..>`), but
//! key plaintext also passes through buffers this crate does not own: rustls's received-plaintext
//! chunks, hyper's read buffer, serde_json's scratch buffer, `Vec`s that grew (a reallocation
//! leaves the old block behind). Those are freed without being wiped, and freed memory keeps its
//! contents until the allocator hands it out again: it is readable in a core dump, in swap, or by
//! anything that can read the process's memory. The agent binary installs [`ZeroingAlloc`] as its
//! global allocator, so every block is zeroed before the C allocator gets it back:
//!
//! - `dealloc` zeroes the whole block, then frees it;
//! - `realloc` is alloc + copy + zero + free: the C allocator's `realloc` may move a block and
//!   free the old one with its contents intact;
//! - `alloc` and `alloc_zeroed` pass through.
//!
//! The zeroing uses `explicit_bzero(3)`, which the compiler may not drop as a dead store before
//! `free` (a plain `memset` there may legally be optimised away).
//!
//! What this does not cover: memory still in use (a live buffer is wiped only by its owner, or
//! when it is finally freed), the stack, registers, and memory the kernel holds (socket buffers
//! carry ciphertext only). Cost: one `memset` per byte freed and no in-place `realloc`; measured
//! by `qkd-macsec-bench-alloc` (`cargo xtask bench agent`, docs/testing.md).

use std::alloc::{GlobalAlloc, Layout, System};

/// Wipes every block it frees (see the module docs), on top of the allocator `A`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Zeroing<A>(pub A);

/// [`Zeroing`] over the system allocator: the agent binary's `#[global_allocator]`.
pub type ZeroingAlloc = Zeroing<System>;

/// Zeroes `len` bytes at `ptr` in a way the optimiser keeps.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
pub unsafe fn wipe(ptr: *mut u8, len: usize) {
    if len > 0 {
        // SAFETY: the caller guarantees `ptr` is writable for `len` bytes.
        unsafe { libc::explicit_bzero(ptr.cast(), len) };
    }
}

// SAFETY: every method forwards to `A` with the layout it was given (realloc allocates the new
// layout from `A` and frees the old one to `A`), so `A`'s guarantees carry over; the extra work is
// writing zeros into a block we still own.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Zeroing<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` is a live block of `layout.size()` bytes from this allocator.
        unsafe {
            wipe(ptr, layout.size());
            self.0.dealloc(ptr, layout);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to `layout.align()`, does not
        // overflow isize (GlobalAlloc::realloc's contract), so this layout is valid.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: `new_layout` has a non-zero size (realloc's contract).
        let new = unsafe { self.0.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live, distinct, and at least this long; then the old block
            // is wiped and freed with the layout it was allocated with.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                wipe(ptr, layout.size());
                self.0.dealloc(ptr, layout);
            }
        }
        // On failure the old block stays allocated and untouched, as realloc requires.
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts blocks that reach the backing allocator's `dealloc` with a non-zero byte left.
    struct Checking {
        dirty: AtomicUsize,
        freed: AtomicUsize,
    }

    // SAFETY: forwards to System; the extra read in dealloc stays within the live block.
    unsafe impl GlobalAlloc for Checking {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: same contract.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` is live for `layout.size()` bytes until the call below.
            let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            if block.iter().any(|b| *b != 0) {
                self.dirty.fetch_add(1, Ordering::Relaxed);
            }
            self.freed.fetch_add(1, Ordering::Relaxed);
            // SAFETY: same contract.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    fn checking() -> Zeroing<Checking> {
        Zeroing(Checking {
            dirty: AtomicUsize::new(0),
            freed: AtomicUsize::new(0),
        })
    }

    fn fill(ptr: *mut u8, len: usize, seed: u8) {
        for i in 0..len {
            // SAFETY: the tests only fill blocks they allocated with at least `len` bytes.
            unsafe { ptr.add(i).write(seed.wrapping_add(i as u8) | 1) };
        }
    }

    fn check(ptr: *const u8, len: usize, seed: u8) -> bool {
        // SAFETY: as in `fill`.
        (0..len).all(|i| unsafe { ptr.add(i).read() } == seed.wrapping_add(i as u8) | 1)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// realloc keeps the common prefix, honours the alignment, and the block it leaves
        /// behind reaches the backing allocator all zeros; so does every freed block.
        #[test]
        fn realloc_preserves_data_and_frees_wiped_blocks(
            size in 1usize..70_000,
            new_size in 1usize..70_000,
            align_log in 0u32..13,
            seed in any::<u8>(),
        ) {
            let a = checking();
            let align = 1usize << align_log;
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: a non-zero layout; every block is freed with the layout it has.
            unsafe {
                let p = a.alloc(layout);
                prop_assert!(!p.is_null());
                fill(p, size, seed);
                let q = a.realloc(p, layout, new_size);
                prop_assert!(!q.is_null());
                prop_assert_eq!(q as usize % align, 0);
                prop_assert!(check(q, size.min(new_size), seed));
                fill(q, new_size, seed);
                a.dealloc(q, Layout::from_size_align(new_size, align).unwrap());
            }
            prop_assert_eq!(a.0.freed.load(Ordering::Relaxed), 2);
            prop_assert_eq!(a.0.dirty.load(Ordering::Relaxed), 0);
        }

        /// alloc_zeroed gives zeros at the requested alignment.
        #[test]
        fn alloc_zeroed_is_zeroed(size in 1usize..70_000, align_log in 0u32..13) {
            let a = checking();
            let layout = Layout::from_size_align(size, 1usize << align_log).unwrap();
            // SAFETY: a non-zero layout, freed with the same layout.
            unsafe {
                let p = a.alloc_zeroed(layout);
                prop_assert!(!p.is_null());
                prop_assert_eq!(p as usize % layout.align(), 0);
                prop_assert!(std::slice::from_raw_parts(p, size).iter().all(|b| *b == 0));
                fill(p, size, 7);
                a.dealloc(p, layout);
            }
            prop_assert_eq!(a.0.dirty.load(Ordering::Relaxed), 0);
        }
    }

    /// The backing allocator without the wrapper does see dirty blocks: the check above is not
    /// vacuous.
    #[test]
    fn the_check_sees_dirty_blocks_without_the_wrapper() {
        let c = checking().0;
        let layout = Layout::from_size_align(64, 8).unwrap();
        // SAFETY: a non-zero layout, freed with the same layout.
        unsafe {
            let p = c.alloc(layout);
            fill(p, 64, 1);
            c.dealloc(p, layout);
        }
        assert_eq!(c.dirty.load(Ordering::Relaxed), 1);
    }

    /// Growing a Vec through many reallocations keeps its contents (the pattern hyper's and
    /// serde_json's buffers follow), with the wrapper driving the moves.
    #[test]
    fn a_growing_buffer_keeps_its_contents() {
        let a = checking();
        let mut cap = 1usize;
        let layout = |n| Layout::from_size_align(n, 1).unwrap();
        // SAFETY: every block is used within its size and freed with its layout.
        unsafe {
            let mut p = a.alloc(layout(cap));
            fill(p, cap, 3);
            while cap < 1 << 20 {
                let next = cap * 2;
                p = a.realloc(p, layout(cap), next);
                assert!(check(p, cap, 3));
                fill(p, next, 3);
                cap = next;
            }
            a.dealloc(p, layout(cap));
        }
        assert_eq!(a.0.dirty.load(Ordering::Relaxed), 0);
        assert_eq!(a.0.freed.load(Ordering::Relaxed), 21);
    }
}
