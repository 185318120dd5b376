//! Noise schedules and samplers.

pub mod schedule;
