//! The stages one row goes through, in data-path order, each pure or nearly so:
//!
//! 1. [`pack`]: claimed rows → one multi-item prompt within the token budget;
//! 2. the request itself goes out through `crate::provider` (the runner's call task);
//! 3. [`answers`]: the answer mapped back to the request's items, by id only;
//! 4. [`postprocess`]: each output checked (and maybe rewritten) by the job's rules;
//! 5. then the runner concludes the call into one write (`runner/sync/call.rs`) and the writer
//!    commits it (`runner/writer.rs`, `Store::write_batch`).

pub mod pack;
pub mod answers;
pub mod postprocess;
