//! batchtune tuner: finds the knob settings that sustain the highest request rate while meeting
//! latency and error targets, measured with loadgen against the real server, and writes them as
//! a profile with its provenance.
//!
//! Where to look: [`space`] (knobs → unit box), [`trial`] (the sustainable rate of one
//! configuration: bracket and bisect), [`strategy`] (Nelder–Mead via argmin, grid, random, hill
//! climbing), [`search`] (the live loop, profile writer), [`confirm`] (the leaders raced, the
//! winner's rate with an interval), [`journal`] (resume),
//! [`server`] (the server under test: batchtune's runtime, or any HTTP server through an
//! adapter file; spawned, reconfigured, stopped).
#![warn(missing_docs)]

pub mod compare;
pub mod confirm;
pub mod gate;
pub mod gate_calibration;
pub mod journal;
pub mod replay;
pub mod report;
pub mod search;
pub mod server;
pub mod space;
pub mod strategy;
pub mod trial;
