//! Integration tests: the real `backfill` binary against real SQLite files, an in-process fake
//! provider scripted for faults, and (where available) the real peers of ../shared/PEERS.md.

mod support;

mod batch;
mod conformance;
mod crash;
mod job_errors;
mod llama;
mod llmock;
mod pipeline;
mod postgres;
mod postprocess;
mod secrets;
mod storage_faults;
mod workers;
