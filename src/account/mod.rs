//! Accounting (issue #14): what a request really cost, read from the backend's answer.
//!
//! [`usage`] reads the `usage` object backends report (and finds it in a non-streamed JSON
//! answer as its frames pass); [`tap`] watches a relayed Server-Sent Events stream for its
//! usage, its end and the text streamed so far, and can remove the usage chunks the gateway
//! asked for on the client's behalf. The account stage that reconciles reservations with
//! these figures will grow here.

pub mod tap;
pub mod usage;
