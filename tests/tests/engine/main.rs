//! The engine against diffusers: tiny random models in the real layouts, compared with the reference
//! dumps of `tools/reference/make_fixtures.py`, and the engine's answers to bad input.

mod bad_input;
mod engine_thread;
mod models;
mod noise;
mod pipeline;
mod prompting;
mod tokenizer;
mod wgpu;
