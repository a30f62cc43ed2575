//! `backfill`: a resumable batch backfill job runner for LLM and local-model column backfills.
//!
//! The data path (see ARCHITECTURE.md): a [`job`] file names a source table, a prompt, a model
//! and limits; the [`store`] enqueues the pending rows into runner tables; the [`runner`] claims
//! batches, the [`packer`] renders multi-item prompts, the [`provider`] client sends them, the
//! [`validate`] step maps answers back to their items, and the store writes each batch in one
//! transaction together with its [`ledger`] row.

pub mod cli;
pub mod dry_run;
pub mod exit;
pub mod ident;
pub mod job;
pub mod ledger;
pub mod local_model;
pub mod packer;
pub mod postprocess;
pub mod pricing;
pub mod provider;
pub mod report;
pub mod runner;
pub mod secret;
pub mod store;
pub mod tokens;
pub mod trial;
pub mod validate;
