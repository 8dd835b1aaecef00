//! The page-aligned memory region the workload fills, dirties and verifies.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

pub const PAGE_SIZE: usize = 4096;

/// A page-aligned block of `pages * PAGE_SIZE` bytes, handed out one page at a
/// time.
///
/// The block is allocated uninitialised on purpose: glibc serves an
/// allocation this large with a fresh anonymous mapping, so nothing is backed
/// by guest RAM until the fill writes it, and guest memory use grows exactly
/// with `filled=`. (A zeroing allocation with this alignment would memset the
/// whole block up front and stall start-up.) Pages are therefore initialised
/// strictly in order, and only initialised pages can be borrowed.
pub struct PageRegion {
    base: NonNull<u8>,
    layout: Layout,
    pages: usize,
    initialised_pages: usize,
}

impl PageRegion {
    /// Reserves `pages` pages; `None` if the allocator refuses.
    pub fn new(pages: usize) -> Option<PageRegion> {
        assert!(pages > 0, "a region needs at least one page");
        let size = pages.checked_mul(PAGE_SIZE)?;
        let layout = Layout::from_size_align(size, PAGE_SIZE).ok()?;
        // SAFETY: `layout` has a non-zero size.
        let base = NonNull::new(unsafe { alloc::alloc(layout) })?;
        Some(PageRegion {
            base,
            layout,
            pages,
            initialised_pages: 0,
        })
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn initialised_pages(&self) -> usize {
        self.initialised_pages
    }

    /// Zeroes the next uninitialised page and returns it with its index, or
    /// `None` once every page has been initialised.
    pub fn initialise_next(&mut self) -> Option<(usize, &mut [u8])> {
        if self.initialised_pages == self.pages {
            return None;
        }
        let index = self.initialised_pages;
        // SAFETY: `index < pages`, so the page lies inside the allocation;
        // writing zeroes makes it initialised before any slice is formed.
        unsafe { self.page_ptr(index).write_bytes(0, PAGE_SIZE) };
        self.initialised_pages += 1;
        Some((index, self.page_mut(index)))
    }

    pub fn page(&self, index: usize) -> &[u8] {
        assert!(
            index < self.initialised_pages,
            "page {index} is not initialised"
        );
        // SAFETY: in bounds and initialised (checked above); the borrow of
        // `self` prevents a concurrent mutable borrow.
        unsafe { std::slice::from_raw_parts(self.page_ptr(index), PAGE_SIZE) }
    }

    pub fn page_mut(&mut self, index: usize) -> &mut [u8] {
        assert!(
            index < self.initialised_pages,
            "page {index} is not initialised"
        );
        // SAFETY: as for `page`, with exclusive access through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.page_ptr(index), PAGE_SIZE) }
    }

    fn page_ptr(&self, index: usize) -> *mut u8 {
        debug_assert!(index < self.pages);
        // SAFETY: `index < pages`, so the offset stays inside the allocation.
        unsafe { self.base.as_ptr().add(index * PAGE_SIZE) }
    }
}

impl Drop for PageRegion {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { alloc::dealloc(self.base.as_ptr(), self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_aligned_zeroed_and_handed_out_in_order() {
        let mut region = PageRegion::new(3).expect("allocation");
        assert_eq!(region.pages(), 3);
        for expected_index in 0..3 {
            let (index, page) = region.initialise_next().expect("a page left");
            assert_eq!(index, expected_index);
            assert_eq!(page.len(), PAGE_SIZE);
            assert_eq!(page.as_ptr() as usize % PAGE_SIZE, 0);
            assert!(page.iter().all(|&b| b == 0));
            page[0] = 0xAB;
        }
        assert!(region.initialise_next().is_none());
        assert_eq!(region.page(2)[0], 0xAB);
    }

    #[test]
    #[should_panic(expected = "not initialised")]
    fn uninitialised_pages_cannot_be_borrowed() {
        let region = PageRegion::new(2).expect("allocation");
        let _ = region.page(0);
    }
}
