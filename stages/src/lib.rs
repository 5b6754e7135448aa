//! pipe-stages: the built-in stage kinds, one file each, listed in
//! [`registry`]. Adding a kind = one file here + one line in `registry.rs`.

pub mod bpe;
pub mod chat;
pub mod command;
pub mod dataset;
pub mod hub;
mod jinja;
pub mod messages;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod pack;
mod registry;
mod table;
pub mod train;

pub use registry::registry;
