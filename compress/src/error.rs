//! Errors of the compression pipeline; `is_usage` ones (bad recipe or arguments, a step that
//! cannot apply to the model or would change nothing, an op tract cannot run) make the CLI
//! exit with status 64 (EX_USAGE).

use hearth_model::ModelError;

/// What can go wrong while parsing a recipe or running it.
#[derive(thiserror::Error, Debug)]
pub enum CompressError {
    /// The recipe text is malformed.
    #[error("bad recipe: {0}")]
    Recipe(String),
    /// The arguments (model, data, steps) do not fit together.
    #[error("{0}")]
    Usage(String),
    /// A step failed while running.
    #[error("step {step} ({kind}) failed")]
    Step {
        /// 1-based step number.
        step: usize,
        /// Step kind.
        kind: &'static str,
        /// The cause.
        #[source]
        source: ModelError,
    },
    /// A step would change nothing and the recipe does not allow it (`kind?` / `allow_noop`).
    #[error("step {step} ({kind}) changes nothing: {reason} (mark it `{kind}?` or `allow_noop=true` to accept that)")]
    NoOp {
        /// 1-based step number.
        step: usize,
        /// Step kind.
        kind: &'static str,
        /// Why nothing changes.
        reason: String,
    },
    /// The model uses an op tract cannot run (found before any step runs).
    #[error("{0}")]
    Unsupported(String),
    /// The normalised graph's outputs differ from the original's beyond the tolerance.
    #[error("normalisation changed the outputs: {0}")]
    Normalise(String),
    /// Loading, measuring or writing failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl CompressError {
    /// True for errors caused by the recipe or the arguments (exit 64).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            CompressError::Recipe(_)
                | CompressError::Usage(_)
                | CompressError::NoOp { .. }
                | CompressError::Unsupported(_)
        )
    }
}
