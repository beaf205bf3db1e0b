//! (filled in by the files work)
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FdImage {
    /// The descriptor number in the process.
    pub fd: i32,
}
