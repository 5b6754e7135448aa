//! End-to-end tests through the `pipe` binary (one test binary, modules per area).

mod bpe;
mod common;
mod data;
mod errors;
mod hub_server;
mod lockfile;
mod model;
mod model_stage;
mod pack;
mod pipelines;
mod run;
mod safety;
mod serve;
mod train;
