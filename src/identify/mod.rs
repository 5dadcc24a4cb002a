//! Identify: who is calling.

pub mod api_key;
