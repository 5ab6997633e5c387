//! relayq's reliability harnesses, shared by the tests in `tests/`:
//!
//! - [`differential`]: random operation sequences run against the memory
//!   backend (the model) and a backend under test, compared step by step.
//! - [`crash`]: worker OS processes killed, frozen and cut off from their
//!   database mid-job, and the checks that no job was lost or finished twice.
//! - [`pg_cluster`]: a throwaway PostgreSQL cluster a test may restart.

pub mod crash;
pub mod differential;
pub mod pg_cluster;
