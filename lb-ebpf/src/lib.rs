#![no_std]
//! The datapath is the `lb` binary (src/main.rs); this empty library only lets
//! lb-agent declare a build dependency, so cargo rebuilds it when the datapath changes.
