//! `report`: a run looked at over time — its timeline from the ledger, and a chart of it.

pub mod chart;
pub mod timeline;

pub use chart::render_svg;
pub use timeline::{Bucket, Timeline};
