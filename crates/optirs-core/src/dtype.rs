//! The element types the core updates.

/// The element types the core updates. NumPy has no bfloat16: the bindings recognise it by
/// `ml_dtypes.bfloat16`, or (the torch bridge) by its uint16 bit patterns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    F16,
    Bf16,
}

impl DType {
    /// Bytes per element.
    #[must_use]
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    /// Its name, as NumPy and torch (`torch.<name>`) give it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::Bf16 => "bfloat16",
        }
    }

    /// The name torch gives it (`torch.<name>`).
    #[must_use]
    pub fn torch_name(self) -> &'static str {
        self.name()
    }
}
