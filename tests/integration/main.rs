//! Integration tests: the real `backfill` binary against real SQLite files, an in-process fake
//! provider scripted for faults, and the real peers (PostgreSQL, llama.cpp, llmock) that
//! scripts/test.sh starts.

mod support;

mod budget;
mod batch;
mod conformance;
mod crash;
mod cron;
mod dry_run;
mod exit_codes;
mod hostile;
mod job_errors;
mod ledger;
mod operator;
mod llama;
mod llmock;
mod local;
mod pipeline;
mod report;
mod postgres;
mod postprocess;
mod secrets;
mod storage_faults;
mod trial;
mod workers;
