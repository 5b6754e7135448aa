//! End-to-end tests through the `pipe` binary (one test binary, modules per area).

mod common;
mod data;
mod errors;
mod lockfile;
mod model;
mod run;
mod safety;
