//! An anonymous private memory mapping, untouched until used: memory whose first touch
//! costs a page fault (the snapshot bench's first-touch copy). The crate's own
//! (`vmm::util::testutil`, `test-utils` feature), shared with its unit tests.

// Not every binary that includes the support module uses it.
#[allow(unused_imports)]
pub use vmm::util::testutil::Mapping;
