//! Empty library so that lb-userspace can list this crate as a build-dependency (rebuild tracking).
#![no_std]
