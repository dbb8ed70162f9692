//! Hearth: one binary serving OpenAI-compatible AI APIs from local models. The library half holds
//! everything the binary runs, so tests drive the real router without sockets.

pub mod catalogue;
pub mod cli;
pub mod config;
pub mod http;
pub mod loader;
pub mod server;
pub mod store;
pub mod telemetry;
