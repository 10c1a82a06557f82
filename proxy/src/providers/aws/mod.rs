//! AWS plumbing for the Bedrock adapter: request signing (Signature Version 4, the `tokn-sigv4`
//! crate, shared with the control plane) and the `application/vnd.amazon.eventstream` framing
//! that ConverseStream answers in. Both are pure (no I/O) and tested against AWS's published
//! vectors and hand-built frames.

pub mod eventstream;
pub use tokn_sigv4 as sigv4;
