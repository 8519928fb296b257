//! The error type of every fallible operation in hearth-model.

/// Errors returned by hearth-model.
#[derive(thiserror::Error, Debug)]
pub enum ModelError {
    /// File system error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The ONNX protobuf could not be decoded.
    #[error("onnx decode: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The ONNX graph is well-formed protobuf but not a model Hearth understands.
    #[error("onnx: {0}")]
    Onnx(String),
    /// tract failed to load, optimise or run the model.
    #[error("tract: {0}")]
    Tract(String),
    /// Tensor names or shapes do not match.
    #[error("shape: {0}")]
    Shape(String),
    /// A data set file is missing or malformed.
    #[error("data: {0}")]
    Data(String),
    /// A task file is unreadable or invalid, or its data is malformed (names file and field).
    #[error("task: {0}")]
    Task(#[from] crate::task::TaskError),
    /// An update byte stream is malformed or the codec configuration is invalid.
    #[error("codec: {0}")]
    Codec(String),
}

impl From<hearth_dense::DenseError> for ModelError {
    fn from(e: hearth_dense::DenseError) -> Self {
        ModelError::Shape(e.to_string())
    }
}

impl From<crate::bytes::DecodeError> for ModelError {
    fn from(e: crate::bytes::DecodeError) -> Self {
        ModelError::Codec(e.to_string())
    }
}

impl ModelError {
    /// A tract failure, with its cause chain.
    pub fn tract(e: impl std::fmt::Display) -> Self {
        ModelError::Tract(format!("{e:#}"))
    }
}
