//! `backfill`: a resumable batch backfill job runner for LLM and local-model column backfills.
//!
//! The data path (see ARCHITECTURE.md): a [`job`] file names a source table, a prompt, a model
//! and limits; the [`store`] enqueues the pending rows into runner tables; the [`runner`] claims
//! them, the [`pipeline`] packs them into multi-item prompts, the [`provider`] client sends
//! them, the pipeline maps answers back to their items and post-processes them, and the store
//! writes each request's outcome in one transaction together with its [`ledger`] row.

pub mod cli;
pub mod dry_run;
pub mod exit;
pub mod ident;
pub mod job;
pub mod ledger;
pub mod local_model;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod pricing;
pub mod provider;
pub mod report;
pub mod runner;
pub mod secret;
pub mod store;
pub mod time;
pub mod tokens;
pub mod trial;
