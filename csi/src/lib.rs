//! What both ends of a gRPC unix socket share: the CSI v1 messages (storaged serves
//! them, noded calls them), a small CSI client, and the channel over a unix socket that
//! noded's CRI client uses too. A crate of its own so noded does not depend on storaged.

pub mod api;
pub mod client;
pub mod unix;

pub use client::Client;
