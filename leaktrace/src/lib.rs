//! leaktrace: find the call stacks that leak memory in a live process, with eBPF.
pub mod decode;
pub mod driver;
pub mod export;
pub mod report;
pub mod source;
pub mod symbolize;
pub mod targets;
pub mod track;
pub mod unwind;
