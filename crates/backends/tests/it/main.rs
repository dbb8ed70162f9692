//! hearth-backends' integration tests: forward passes against independent numpy references, and
//! reading model directories safely. (`tests/memory.rs` is a binary of its own: it replaces the
//! global allocator to count bytes.)

mod decoder;
mod model_dir;
mod reference;
mod spm;
