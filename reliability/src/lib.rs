//! relayq's reliability harnesses, shared by the tests in `tests/`:
//!
//! - [`differential`]: random operation sequences run against the memory
//!   backend (the model) and a backend under test, compared step by step.

pub mod differential;
