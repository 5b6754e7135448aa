//! pipe-engine: from a pipeline file to executed, cached stages.
//!
//! - [`spec`]: YAML -> [`spec::PipelineSpec`] (vars, params files, `--set`),
//!   every value located for errors ([`diag`], [`yaml`]).
//! - [`stage`]: the stage contract ([`stage::StageKind`], [`stage::Stage`],
//!   [`stage::RunCtx`]) and the [`stage::Registry`] the `pipe-stages` crate fills.
//! - [`graph`]: kinds looked up, params validated, the DAG sorted.
//! - [`key`]: [`key::KeyInputs`], the one struct hashed into a stage key.
//! - [`workspace`], [`records`]: `.pipe/` (store, records, states) and lock files.
//! - [`status`], [`exec`]: `pipe status` and the scheduler behind `pipe run`;
//!   [`maint`]: `pipe verify` and `pipe gc`.

pub mod diag;
pub mod exec;
pub mod graph;
pub mod key;
pub mod maint;
pub mod records;
pub mod spec;
pub mod stage;
pub mod status;
pub mod workspace;
pub mod yaml;

use std::path::Path;

pub use diag::SpecErrors;
pub use graph::Pipeline;
pub use workspace::Workspace;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Spec(#[from] SpecErrors),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] pipe_cache::StoreError),
    #[error("stage `{stage}`: cannot hash `{path}`: {message}")]
    File { stage: String, path: String, message: String },
    #[error("stage `{stage}`: cannot resolve its source: {message}")]
    Pin { stage: String, message: String },
    #[error("unknown stage `{name}`\nhint: {hint}")]
    UnknownStage { name: String, hint: String },
    #[error("{0}")]
    Lock(String),
}

impl EngineError {
    /// Exit code per the CLI contract: 2 for invalid input, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            EngineError::Spec(_) | EngineError::UnknownStage { .. } => 2,
            _ => 1,
        }
    }
}

/// Load, validate and resolve a pipeline file; returns it with its workspace.
pub fn load(
    path: &Path,
    overrides: &[spec::VarOverride],
    registry: &stage::Registry,
) -> Result<(Workspace, Pipeline), EngineError> {
    let root = Workspace::find_root(path);
    let spec = spec::load(path, overrides)?;
    let pipeline = graph::resolve(spec, registry, &root)?;
    let ws = Workspace::open(&root)?;
    Ok((ws, pipeline))
}
