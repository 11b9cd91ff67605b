//! The deterministic xorshift64* generator of the tests and benches: the crate's own
//! [`vmm::util::testutil::Rng`] (one copy, shared with the unit tests).

// Not every test binary that includes the support module uses both.
#[allow(unused_imports)]
pub use vmm::util::testutil::{Rng, random_bytes};
