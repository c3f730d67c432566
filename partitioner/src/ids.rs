//! Newtypes for ranks, pipeline stages and microbatches, so that one cannot be passed
//! where another is expected. All are zero-based and print as plain numbers.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub usize);

        impl $name {
            /// The zero-based index.
            pub fn index(self) -> usize {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id_newtype!(
    /// A process's rank in the world communicator.
    Rank
);
id_newtype!(
    /// A pipeline stage (with virtual stages, a model chunk).
    StageId
);
id_newtype!(
    /// A microbatch within one optimizer step.
    MicrobatchId
);
