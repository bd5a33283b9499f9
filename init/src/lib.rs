//! `tandem-init`: installs the rules that steer a pod's (or VM host's) TCP traffic
//! through the proxy, and nothing else.
//!
//! The pipeline is deliberately one-way: flags become a [`config::Config`], the config
//! becomes a pure [`rules::RuleSet`], the rule set is rendered to text by [`render`],
//! and only [`backend`] hands that text to the kernel's tools. Everything before the
//! backend is free of I/O so it can be checked by golden files.

pub mod backend;
pub mod config;
pub mod exit;
pub mod inbound_probe;
pub mod log;
pub mod netns;
pub mod render;
pub mod rules;
pub mod validate;
