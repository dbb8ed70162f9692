//! Text generation: the decoder capability ([`model`]), continuous batching on the model's owner
//! thread ([`scheduler`]), sampling, streamed text and chat templates.

pub mod model;
pub mod sampler;
pub mod scheduler;
pub mod service;
pub mod template;
pub mod text;
