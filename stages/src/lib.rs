//! pipe-stages: the built-in stage kinds, one file each, listed in
//! [`registry`]. Adding a kind = one file here + one line in `registry.rs`.

pub mod command;
pub mod dataset;
mod jinja;
pub mod messages;
mod registry;
mod table;

pub use registry::registry;
