//! Portcullis: an identity-aware gateway for Azure OpenAI and OpenAI-compatible APIs.
//!
//! The modules follow the request pipeline (see `ARCHITECTURE.md`):
//! [`listener`] accepts, [`route`] recognises the call, [`identify`] and [`authorize`]
//! decide who calls and whether they may, [`admit`] checks there is room, [`buffer`] reads the
//! body within its limits, [`routing`] picks backends,
//! [`upstream_auth`] signs the upstream request, [`proxy`] forwards and relays the stream,
//! [`account`] reads what the answer cost and [`usage_log`] writes it to the [`store`];
//! [`audit`] records the outcome. [`gateway`] composes them; [`config`], [`admin`],
//! [`metrics`], [`reload`] (live configuration), [`sim`], [`demo`], [`worker`] and [`app`]
//! surround the path; [`report`] is
//! `portcullis usage`; [`shown`], [`digest`], [`pricing`] and [`tokens`] (token counts and
//! estimates) are leaf helpers several stages use, and [`chart`] draws the dashboard's SVG
//! charts.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod account;
pub mod activity;
pub mod admin;
pub mod admit;
pub mod app;
pub mod audit;
pub mod authorize;
pub mod buffer;
pub mod chart;
pub mod config;
pub mod demo;
pub mod digest;
pub mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod gateway;
pub mod identify;
pub mod listener;
pub mod metrics;
pub mod pricing;
pub mod proxy;
pub mod reload;
pub mod report;
pub mod route;
pub mod routing;
pub mod shown;
pub mod sidecar;
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod tokens;
pub mod upstream_auth;
pub mod usage_log;
pub mod worker;
